//! Authentication and authorization: RS256 JWTs whose `kid` names a credential
//! (`<project>:<credential ID>`), and the cluster-admin / project admin / viewer rules.
//!
//! A project role is bound to the project's incarnation, so a token minted for project `P`
//! grants nothing in a `P` deleted and created again. Tokens evstor mints name the UUID of
//! every project they grant a role in (claim [`PROJECT_UUIDS_CLAIM`]), which must be the
//! project's current UUID; a token without it (minted elsewhere, with a credential's key)
//! must have been issued (`iat`) no earlier than the second the project was created.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{
    decode, decode_header, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiResult};
use super::App;

/// The claims evstor reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub iss: String,
    #[serde(default)]
    pub aud: String,
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
            "token is not signed with RS256"
        }
        ErrorKind::MissingRequiredClaim(_) => "token lacks a required claim",
        _ => "malformed bearer token",
    };
    reject(message, e)
}

/// Verifies a bearer token against the credentials in the cluster state.
pub fn authenticate(app: &App, token: &str) -> ApiResult<Principal> {
    let header = decode_header(token).map_err(|e| reject("malformed bearer token", e))?;
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
    validation.validate_aud = false;
    validation.validate_nbf = true;
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
        authenticate(app, token.trim())
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
        iss: "evstor".into(),
        aud: "LightOS".into(),
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
            aud: String::new(),
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
