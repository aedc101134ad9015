//! Federated authentication: the API accepts ID and access tokens (JWTs) of the OpenID
//! Connect IdPs configured in [`crate::domain::federation`], while federation is enabled.
//!
//! A token is federated when its `iss` is a configured IdP's issuer. It must be signed with
//! one of [`ALGORITHMS`] by a key of that IdP's JWKS ([`jwks`], found through discovery and
//! fetched over [`fetch`]), be within its `exp`/`nbf` (± [`TOKEN_CLOCK_SKEW_SECS`]), and name
//! in `aud` the `clientId` of one of the IdP's App or User client configurations. Its roles
//! come only from the IdP's auth maps, matched against the token's identifiers, which the
//! applicable client configurations choose ([`identifiers`]). Everything is judged on every
//! request against the current configuration: deleting a map or disabling federation takes
//! effect on the next request.
//!
//! [`TOKEN_CLOCK_SKEW_SECS`]: crate::limits::TOKEN_CLOCK_SKEW_SECS

pub mod fetch;
pub mod jwks;

use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use crate::domain::federation::{AuthzMode, Federation, IdpClientConf};
use crate::limits::{CLAIM_BYTES_MAX, CLAIM_VALUES_MAX};

/// The claims of a verified token.
pub type Claims = Map<String, Value>;

/// What an IdP may sign tokens with: the asymmetric JWS algorithms (never HMAC: an IdP's
/// published keys are public).
pub const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The claim user-mode identifiers are always read from, besides `sub` and the configured one.
pub const GROUPS_CLAIM: &str = "groups";

/// The audiences tokens of `idp` may carry: the client ids of its App and User
/// configurations.
pub fn audiences(f: &Federation, idp: &str) -> Vec<String> {
    f.clients_of(idp)
        .filter(|c| c.mode != AuthzMode::Converge)
        .map(|c| c.client_id.clone())
        .collect()
}

/// The client configurations that apply to a token of `idp` whose audience is `aud`: those
/// whose client id it names, plus the IdP's Converge one if any of those does.
pub fn applicable<'a>(f: &'a Federation, idp: &'a str, aud: &[String]) -> Vec<&'a IdpClientConf> {
    let named: Vec<&IdpClientConf> = f
        .clients_of(idp)
        .filter(|c| c.mode != AuthzMode::Converge && aud.contains(&c.client_id))
        .collect();
    if named.is_empty() {
        return named;
    }
    let converge = f.clients_of(idp).filter(|c| c.mode == AuthzMode::Converge);
    named.iter().copied().chain(converge).collect()
}

/// A claim as a list of strings: a string, or the strings of an array (at most
/// [`CLAIM_VALUES_MAX`], each at most [`CLAIM_BYTES_MAX`] bytes; longer ones are skipped).
pub fn claim_values(claims: &Claims, name: &str) -> Vec<String> {
    let fits = |s: &&str| !s.is_empty() && s.len() <= CLAIM_BYTES_MAX;
    match claims.get(name) {
        Some(Value::String(s)) => [s.as_str()]
            .into_iter()
            .filter(fits)
            .map(str::to_string)
            .collect(),
        Some(Value::Array(items)) => items
            .iter()
            .take(CLAIM_VALUES_MAX)
            .filter_map(Value::as_str)
            .filter(fits)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// The identifiers auth maps are matched against, by mode: App reads the calling client
/// (`client_id`, else `azp`, else `sub`); User reads `sub`, the `groups` claim and the
/// configured claim; Converge reads both.
pub fn identifiers(claims: &Claims, confs: &[&IdpClientConf]) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    let mut add = |values: Vec<String>| {
        for v in values {
            if !ids.contains(&v) {
                ids.push(v);
            }
        }
    };
    for c in confs {
        if matches!(c.mode, AuthzMode::App | AuthzMode::Converge) {
            let client = ["client_id", "azp", "sub"]
                .iter()
                .map(|claim| claim_values(claims, claim))
                .find(|v| !v.is_empty())
                .unwrap_or_default();
            add(client);
        }
        if matches!(c.mode, AuthzMode::User | AuthzMode::Converge) {
            add(claim_values(claims, "sub"));
            add(claim_values(claims, GROUPS_CLAIM));
            if !c.claim_name.is_empty() {
                add(claim_values(claims, &c.claim_name));
            }
        }
    }
    ids
}

/// The `(scope, role)` pairs the auth maps of `idp` grant to `ids`, each once.
pub fn granted(f: &Federation, idp: &str, ids: &[String]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for m in f.maps_of(idp).filter(|m| ids.contains(&m.identifier)) {
        let pair = (m.scope.clone(), m.role.clone());
        if !out.contains(&pair) {
            out.push(pair);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::federation::AuthMapEntry;
    use serde_json::json;
    use uuid::Uuid;

    fn conf(name: &str, client_id: &str, mode: AuthzMode, claim: &str) -> IdpClientConf {
        IdpClientConf {
            uuid: Uuid::nil(),
            name: name.into(),
            client_id: client_id.into(),
            idp: "idp".into(),
            claim_name: claim.into(),
            mode,
        }
    }

    fn map(name: &str, identifier: &str, scope: &str, role: &str) -> (String, AuthMapEntry) {
        let e = AuthMapEntry {
            uuid: Uuid::nil(),
            name: name.into(),
            identifier: identifier.into(),
            scope: scope.into(),
            role: role.into(),
            idp: "idp".into(),
        };
        (name.into(), e)
    }

    fn federation() -> Federation {
        let mut f = Federation::default();
        for c in [
            conf("app", "evstor-app", AuthzMode::App, ""),
            conf("ui", "evstor-ui", AuthzMode::User, "department"),
            conf("conv", "NOT_APPLICABLE", AuthzMode::Converge, "team"),
        ] {
            f.clients.insert(c.name.clone(), c);
        }
        f.maps = [
            map("m1", "ci-robot", "p1", "viewer"),
            map("m2", "ops", "p2", "admin"),
            map("m3", "storage", "system", "cluster-admin"),
            map("m4", "alice", "p1", "viewer"),
        ]
        .into_iter()
        .collect();
        f
    }

    fn claims(v: Value) -> Claims {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn audiences_select_client_configurations_and_converge_joins_them() {
        let f = federation();
        assert_eq!(audiences(&f, "idp"), ["evstor-app", "evstor-ui"]);
        let names = |aud: &[&str]| {
            let aud: Vec<String> = aud.iter().map(|s| s.to_string()).collect();
            applicable(&f, "idp", &aud)
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&["evstor-app"]), ["app", "conv"]);
        assert_eq!(names(&["other", "evstor-ui"]), ["ui", "conv"]);
        assert!(
            names(&["other"]).is_empty(),
            "Converge alone accepts nothing"
        );
        assert!(names(&["NOT_APPLICABLE"]).is_empty());
    }

    #[test]
    fn identifiers_by_mode_and_roles_from_maps() {
        let f = federation();
        let c = claims(
            json!({"sub": "alice", "client_id": "ci-robot", "groups": ["ops", 7],
                              "department": "storage", "team": ["t1"]}),
        );
        let app = [&f.clients["app"]];
        assert_eq!(identifiers(&c, &app), ["ci-robot"]);
        let user = [&f.clients["ui"]];
        assert_eq!(identifiers(&c, &user), ["alice", "ops", "storage"]);
        let conv = [&f.clients["conv"]];
        assert_eq!(identifiers(&c, &conv), ["ci-robot", "alice", "ops", "t1"]);
        let roles = granted(&f, "idp", &identifiers(&c, &user));
        assert_eq!(
            roles,
            [
                ("p2".to_string(), "admin".to_string()),
                ("system".into(), "cluster-admin".into()),
                ("p1".into(), "viewer".into()),
            ]
        );
        assert!(granted(&f, "other-idp", &["alice".into()]).is_empty());
        let no_client = claims(json!({"sub": "svc", "azp": "ci-robot"}));
        assert_eq!(identifiers(&no_client, &app), ["ci-robot"]);
        let only_sub = claims(json!({"sub": "svc"}));
        assert_eq!(identifiers(&only_sub, &app), ["svc"]);
    }

    #[test]
    fn claim_values_are_bounded() {
        let many: Vec<String> = (0..CLAIM_VALUES_MAX + 10)
            .map(|i| format!("g{i}"))
            .collect();
        let c = claims(json!({"groups": many, "long": "x".repeat(CLAIM_BYTES_MAX + 1), "n": 3}));
        assert_eq!(claim_values(&c, "groups").len(), CLAIM_VALUES_MAX);
        assert!(claim_values(&c, "long").is_empty());
        assert!(claim_values(&c, "n").is_empty());
        assert!(claim_values(&c, "absent").is_empty());
    }
}
