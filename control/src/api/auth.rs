//! Authentication and authorization: RS256 JWTs whose `kid` names a credential
//! (`<project>:<credential ID>`), tokens of federated IdPs ([`crate::idp`]), and the
//! cluster-admin / project admin / viewer rules.
//!
//! Every credential-verified token must name [`AUDIENCE`] in `aud`; one signed by the root key
//! (`system:root`) must also carry `iss` [`ISSUER`], as every token evstor mints does (the
//! root key signs nothing else). A token whose `iss` is a configured IdP's issuer is verified
//! against that IdP instead, and only while federation is enabled.
//!
//! A project role is bound to the project's incarnation, so a token minted for project `P`
//! grants nothing in a `P` deleted and created again. Tokens evstor mints name the UUID of
//! every project they grant a role in (claim [`PROJECT_UUIDS_CLAIM`]), which must be the
//! project's current UUID; a token without it (minted elsewhere, with a credential's key)
//! must have been issued (`iat`) no earlier than the second the project was created. Roles
//! from auth maps are looked up on every request, so they hold in whatever project of that
//! name exists now.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{
    decode, decode_header, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::{ApiError, ApiResult};
use super::App;
use crate::domain::federation::IdpConfig;
use crate::idp::jwks::KeyError;
use crate::limits::TOKEN_CLOCK_SKEW_SECS;

/// The `iss` of every token evstor mints.
pub const ISSUER: &str = "evstor";
/// The `aud` every credential-verified token must name (LightOS tokens carry it too).
pub const AUDIENCE: &str = "LightOS";
/// The credential of the root key.
pub const ROOT_KID: &str = "system:root";

/// `aud` is a string or an array of strings; one audience is written as a string.
mod audience {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }

    pub fn serialize<S: Serializer>(aud: &[String], s: S) -> Result<S::Ok, S::Error> {
        match aud {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(a) => vec![a],
            OneOrMany::Many(a) => a,
        })
    }
}

/// The claims evstor reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub iss: String,
    #[serde(default, with = "audience")]
    pub aud: Vec<String>,
    pub roles: Vec<String>,
    pub iat: u64,
    #[serde(default)]
    pub nbf: u64,
    pub exp: u64,
    #[serde(default)]
    pub jti: String,
    /// Project name → UUID of the incarnation each project role was granted for.
    #[serde(
        default,
        rename = "evstorProjectUUIDs",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub project_uuids: BTreeMap<String, String>,
}

/// The claim evstor's tokens bind their project roles with.
pub const PROJECT_UUIDS_CLAIM: &str = "evstorProjectUUIDs";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    ClusterAdmin,
    Admin,
    Viewer,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: String,
    /// `(scope, role)`: scope is a project name or `system`.
    pub roles: Vec<(String, Role)>,
    /// Projects the token named a role in that it no longer holds: granted for an earlier
    /// incarnation of the project (or one that does not exist).
    pub stale: Vec<String>,
}

/// Read or change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Principal {
    pub fn is_cluster_admin(&self) -> bool {
        self.roles
            .iter()
            .any(|(s, r)| s == "system" && *r == Role::ClusterAdmin)
    }

    pub fn require_cluster_admin(&self) -> ApiResult<()> {
        if self.is_cluster_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "this operation needs the system:cluster-admin role",
            ))
        }
    }

    /// May the caller read (or change) resources of `project`?
    pub fn require_project(&self, project: &str, access: Access) -> ApiResult<()> {
        if self.is_cluster_admin() {
            return Ok(());
        }
        let allowed = self.roles.iter().any(|(scope, role)| {
            scope == project
                && match access {
                    Access::Read => matches!(role, Role::Admin | Role::Viewer),
                    Access::Write => *role == Role::Admin,
                }
        });
        if allowed {
            Ok(())
        } else if self.stale.iter().any(|p| p == project) {
            Err(ApiError::forbidden(format!(
                "permission denied: the token's role on project {project} was granted for an \
                 earlier project of that name (or one that does not exist)"
            )))
        } else {
            Err(ApiError::forbidden(format!(
                "permission denied: no {} role on project {project}",
                if access == Access::Read {
                    "viewer or admin"
                } else {
                    "admin"
                }
            )))
        }
    }

    /// Projects the caller may read, `None` meaning all of them.
    pub fn readable_projects(&self) -> Option<Vec<String>> {
        if self.is_cluster_admin() {
            return None;
        }
        Some(self.roles.iter().map(|(s, _)| s.clone()).collect())
    }
}

fn parse_role(entry: &str) -> Option<(String, Role)> {
    let (scope, role) = entry.rsplit_once(':')?;
    let role = match role {
        "cluster-admin" => Role::ClusterAdmin,
        "admin" => Role::Admin,
        "viewer" => Role::Viewer,
        _ => return None,
    };
    Some((scope.to_string(), role))
}

/// Decoding keys by kid, parsed once per credential PEM.
#[derive(Default)]
pub struct KeyCache {
    keys: Mutex<HashMap<String, (String, DecodingKey)>>,
}

impl KeyCache {
    fn key(&self, kid: &str, pem: &str) -> ApiResult<DecodingKey> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached_pem, key)) = keys.get(kid) {
            if cached_pem == pem {
                return Ok(key.clone());
            }
        }
        let key = DecodingKey::from_rsa_pem(pem.as_bytes())
            .map_err(|e| reject("the credential of the token's key id is unusable", e))?;
        keys.insert(kid.to_string(), (pem.to_string(), key.clone()));
        Ok(key)
    }
}

/// A 401 in user terms; the parser's own words go to the debug log only.
fn reject(user_message: &str, detail: impl std::fmt::Display) -> ApiError {
    tracing::debug!("bearer token refused ({user_message}): {detail}");
    ApiError::unauthenticated(user_message)
}

/// What a token verification failure means to the caller.
fn token_error(e: jsonwebtoken::errors::Error) -> ApiError {
    use jsonwebtoken::errors::ErrorKind;
    let message = match e.kind() {
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not valid yet (nbf is in the future)",
        ErrorKind::InvalidSignature => "token signature does not verify",
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            "token is not signed with an accepted algorithm"
        }
        ErrorKind::InvalidAudience => "token is not meant for this API (aud)",
        ErrorKind::InvalidIssuer => "token has the wrong issuer (iss)",
        ErrorKind::MissingRequiredClaim(_) => "token lacks a required claim",
        _ => "malformed bearer token",
    };
    reject(message, e)
}

/// Verifies a bearer token: against a configured IdP if its `iss` is one's issuer, else
/// against the credential its `kid` names.
pub async fn authenticate(app: &App, token: &str) -> ApiResult<Principal> {
    let header = decode_header(token).map_err(|e| reject("malformed bearer token", e))?;
    let claims = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(token)
        .map_err(|e| reject("malformed bearer token", e))?
        .claims;
    let iss = claims["iss"].as_str().unwrap_or_default();
    let idp = app.bus.state().federation.idp_by_issuer(iss).cloned();
    match idp {
        Some(idp) => federated(app, token, &header, idp).await,
        None => with_credential(app, token, header),
    }
}

fn with_credential(app: &App, token: &str, header: Header) -> ApiResult<Principal> {
    if header.alg != Algorithm::RS256 {
        return Err(reject(
            "token is not signed with RS256",
            format!("{:?}", header.alg),
        ));
    }
    let kid = header
        .kid
        .ok_or_else(|| ApiError::unauthenticated("token names no key id (kid)"))?;
    let pem = {
        let state = app.bus.state();
        let cred = state
            .credentials
            .by_kid(&kid)
            .ok_or_else(|| reject("unknown key id", &kid))?;
        cred.payload_pem.clone()
    };
    let key = app.keys.key(&kid, &pem)?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.leeway = TOKEN_CLOCK_SKEW_SECS;
    validation.validate_nbf = true;
    validation.set_audience(&[AUDIENCE]);
    let mut required = vec!["exp", "aud"];
    if kid == ROOT_KID {
        validation.set_issuer(&[ISSUER]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    let claims = decode::<Claims>(token, &key, &validation)
        .map_err(token_error)?
        .claims;
    // A project's key may only vouch for roles in that project; only `system` keys may grant
    // cluster-wide or other projects' roles.
    let issuer_project = kid.split(':').next().unwrap_or_default();
    let granted = claims
        .roles
        .iter()
        .filter_map(|r| parse_role(r))
        .filter(|(scope, _)| issuer_project == "system" || scope == issuer_project)
        .filter(|(scope, role)| *role != Role::ClusterAdmin || scope == "system");
    let (roles, stale) = {
        let state = app.bus.state();
        let (live, stale): (Vec<_>, Vec<_>) =
            granted.partition(|(scope, _)| holds(&state.projects, &claims, scope));
        (live, stale.into_iter().map(|(scope, _)| scope).collect())
    };
    Ok(Principal {
        subject: claims.sub,
        roles,
        stale,
    })
}

/// A token of the IdP `idp` (see [`crate::idp`]).
async fn federated(
    app: &App,
    token: &str,
    header: &Header,
    idp: IdpConfig,
) -> ApiResult<Principal> {
    if !app.bus.state().federation.enabled {
        return Err(ApiError::unauthenticated(
            "federated authentication is disabled: IdP tokens are not accepted",
        ));
    }
    if !crate::idp::ALGORITHMS.contains(&header.alg) {
        return Err(reject(
            "token is not signed with an accepted algorithm",
            format!("{:?}", header.alg),
        ));
    }
    let audiences = crate::idp::audiences(&app.bus.state().federation, &idp.name);
    if audiences.is_empty() {
        return Err(ApiError::unauthenticated(format!(
            "no IdP client configuration of {} accepts its tokens",
            idp.name
        )));
    }
    let key = app
        .idp
        .key(&idp, header.kid.as_deref(), header.alg)
        .await
        .map_err(|e| match e {
            KeyError::Unknown(why) => reject("unknown signing key", why),
            KeyError::Unreachable(why) => {
                reject("the token's IdP cannot be reached to verify it", why)
            }
        })?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = TOKEN_CLOCK_SKEW_SECS;
    validation.validate_nbf = true;
    validation.set_audience(&audiences);
    validation.set_required_spec_claims(&["exp", "aud", "iss"]);
    let claims = decode::<crate::idp::Claims>(token, &key, &validation)
        .map_err(token_error)?
        .claims;
    // Judged against the configuration as it is now (it may have changed while we fetched).
    federated_principal(&app.bus.state(), &idp.name, &claims)
}

/// The caller a verified token of `idp` is: roles from the auth maps its identifiers match.
fn federated_principal(
    state: &crate::domain::State,
    idp: &str,
    claims: &crate::idp::Claims,
) -> ApiResult<Principal> {
    let f = &state.federation;
    if !f.enabled {
        return Err(ApiError::unauthenticated(
            "federated authentication is disabled: IdP tokens are not accepted",
        ));
    }
    let aud = crate::idp::claim_values(claims, "aud");
    let confs = crate::idp::applicable(f, idp, &aud);
    let ids = crate::idp::identifiers(claims, &confs);
    let (roles, stale): (Vec<_>, Vec<_>) = crate::idp::granted(f, idp, &ids)
        .iter()
        .filter_map(|(scope, role)| parse_role(&format!("{scope}:{role}")))
        .partition(|(scope, _)| scope == "system" || state.projects.get(scope).is_some());
    let sub = crate::idp::claim_values(claims, "sub")
        .into_iter()
        .next()
        .or_else(|| ids.first().cloned())
        .unwrap_or_default();
    Ok(Principal {
        subject: format!("{idp}/{sub}"),
        roles,
        stale: stale.into_iter().map(|(scope, _)| scope).collect(),
    })
}

/// Whether a role in `scope` that `claims` grant is for the project's current incarnation.
fn holds(projects: &crate::domain::project::Projects, claims: &Claims, scope: &str) -> bool {
    if scope == "system" {
        return true; // built in: never deleted, never re-created
    }
    let Some(project) = projects.get(scope) else {
        return false;
    };
    match claims.project_uuids.get(scope) {
        Some(uuid) => *uuid == project.uuid.to_string(),
        None => claims.iat >= project.created_unix_ns / 1_000_000_000,
    }
}

/// The UUID of each project `roles` grant a role in, for [`mint`]: the project must exist,
/// as the token is bound to this incarnation of it.
pub fn project_uuids_for(
    state: &crate::domain::State,
    roles: &[String],
) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (scope, _) in roles.iter().filter_map(|r| parse_role(r)) {
        if scope == "system" {
            continue;
        }
        let project = state.projects.get(&scope).ok_or_else(|| {
            format!("project {scope} does not exist; create it before minting a token for it")
        })?;
        out.insert(scope, project.uuid.to_string());
    }
    Ok(out)
}

impl FromRequestParts<App> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        // Admission (`super::admission`) verified the token already; don't verify it twice.
        if let Some(who) = parts.extensions.get::<Principal>() {
            return Ok(who.clone());
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthenticated("missing Authorization: Bearer <JWT>"))?;
        let value = header
            .to_str()
            .map_err(|_| ApiError::unauthenticated("Authorization header is not text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| ApiError::unauthenticated("Authorization must be a Bearer token"))?;
        authenticate(app, token.trim()).await
    }
}

/// Signs a token with a private key (PKCS#8 or PKCS#1 PEM) for the credential `kid`;
/// `project_uuids` binds its project roles (see [`project_uuids_for`]).
pub fn mint(
    private_pem: &str,
    kid: &str,
    subject: &str,
    roles: &[String],
    project_uuids: BTreeMap<String, String>,
    lifetime_secs: u64,
) -> anyhow::Result<String> {
    let now = crate::store::bus::now_unix_ns() / 1_000_000_000;
    let claims = Claims {
        sub: subject.to_string(),
        iss: ISSUER.into(),
        aud: vec![AUDIENCE.into()],
        roles: roles.to_vec(),
        iat: now,
        nbf: now.saturating_sub(60),
        exp: now.saturating_add(lifetime_secs),
        jti: uuid::Uuid::new_v4().simple().to_string(),
        project_uuids,
    };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_string());
    header.typ = Some("JWT".into());
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes())?;
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse() {
        assert_eq!(
            parse_role("system:cluster-admin"),
            Some(("system".into(), Role::ClusterAdmin))
        );
        assert_eq!(parse_role("p-1:viewer"), Some(("p-1".into(), Role::Viewer)));
        assert_eq!(parse_role("p:root"), None);
        assert_eq!(parse_role("admin"), None);
    }

    fn claims(iat: u64, project_uuids: &[(&str, uuid::Uuid)]) -> Claims {
        Claims {
            sub: "s".into(),
            iss: String::new(),
            aud: Vec::new(),
            roles: vec![],
            iat,
            nbf: 0,
            exp: u64::MAX,
            jti: String::new(),
            project_uuids: project_uuids
                .iter()
                .map(|(p, u)| (p.to_string(), u.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_project_role_holds_for_the_incarnation_it_was_granted_for() {
        use crate::domain::project::{Project, Projects};
        let now = uuid::Uuid::from_u128(2);
        let mut projects = Projects::default();
        projects.by_name.insert(
            "p".into(),
            Project {
                uuid: now,
                name: "p".into(),
                description: String::new(),
                default_policies: vec![],
                created_unix_ns: 1_000_500_000_000,
            },
        );
        let before = uuid::Uuid::from_u128(1);
        assert!(holds(&projects, &claims(0, &[]), "system"));
        assert!(!holds(&projects, &claims(u64::MAX, &[]), "gone"));
        assert!(holds(&projects, &claims(0, &[("p", now)]), "p"));
        assert!(!holds(&projects, &claims(u64::MAX, &[("p", before)]), "p"));
        assert!(holds(&projects, &claims(1_000, &[]), "p"), "same second");
        assert!(!holds(&projects, &claims(999, &[]), "p"));
        let json = serde_json::to_value(claims(1, &[("p", now)])).unwrap();
        assert!(json.get(PROJECT_UUIDS_CLAIM).is_some(), "{json}");
    }

    #[test]
    fn project_rules() {
        let p = Principal {
            subject: "s".into(),
            roles: vec![("a".into(), Role::Admin), ("b".into(), Role::Viewer)],
            stale: vec![],
        };
        assert!(p.require_project("a", Access::Write).is_ok());
        assert!(p.require_project("b", Access::Read).is_ok());
        assert!(p.require_project("b", Access::Write).is_err());
        assert!(p.require_project("c", Access::Read).is_err());
        assert!(p.require_cluster_admin().is_err());
    }
}
