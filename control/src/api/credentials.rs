//! `/api/v2/projects/{projectName}/credentials…`: the RS256 public keys that tokens are checked
//! against (a token with `kid: "<project>:<ID>"` is verified with that credential).

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};

use super::auth::{Access, Principal};
use super::error::{ApiError, ApiResult};
use super::json::{Body, Obj};
use super::App;
use crate::domain::credential::{Command as CredentialCommand, Credential, CredentialType};
use crate::domain::Command;
use crate::limits::RSA_KEY_BITS_MIN;

pub fn routes() -> Router<App> {
    Router::new()
        .route(
            "/api/v2/projects/{projectName}/credentials",
            get(list).post(create),
        )
        .route(
            "/api/v2/projects/{projectName}/credentials/{ID}",
            get(get_one).delete(delete),
        )
}

fn type_name(t: CredentialType) -> &'static str {
    match t {
        CredentialType::Rs256PubKey => "RS256PubKey",
    }
}

/// The `Credential` message; `kind` is `UserCreds`, the zero value, so it is omitted.
pub fn credential_json(c: &Credential) -> Value {
    let payload = base64::engine::general_purpose::STANDARD.encode(c.payload_pem.as_bytes());
    Obj::new()
        .str("projectName", &c.project)
        .str("ID", &c.id)
        .str("type", type_name(c.kind))
        .str("payload", &payload)
        .build()
}

/// `type` is an enum: its name or its number.
fn credential_type(b: &Body) -> ApiResult<CredentialType> {
    match b.get("type") {
        Some(Value::String(s)) if s == "RS256PubKey" => Ok(CredentialType::Rs256PubKey),
        Some(Value::Number(n)) if n.as_u64() == Some(1) => Ok(CredentialType::Rs256PubKey),
        Some(Value::String(s)) if matches!(s.as_str(), "TlsCertChainPem" | "TlsPrivKeyPem") => {
            Err(ApiError::bad_request(format!(
                "credential type {s} is not supported; use RS256PubKey"
            )))
        }
        None => Err(ApiError::bad_request(
            "field type is required (RS256PubKey)",
        )),
        Some(other) => Err(ApiError::bad_request(format!(
            "unknown credential type {other}"
        ))),
    }
}

/// `payload` is protobuf `bytes`: base64 (standard or URL-safe, padding optional) of the PEM.
fn decode_payload(text: &str) -> ApiResult<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let t = text.trim();
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(t).ok())
        .ok_or_else(|| ApiError::bad_request("field payload is not base64"))
}

/// Checks that `pem` is an RSA public key (SPKI `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`) of
/// at least [`RSA_KEY_BITS_MIN`] bits: a shorter modulus can be factored, and then anyone
/// could sign tokens this credential vouches for.
pub fn check_rsa_public_pem(pem: &str) -> ApiResult<()> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    let spki = rsa::RsaPublicKey::from_public_key_pem(pem);
    let pkcs1 = || rsa::RsaPublicKey::from_pkcs1_pem(pem);
    let key = spki
        .or_else(|_| pkcs1())
        .map_err(|e| ApiError::bad_request(format!("payload is not a PEM RSA public key: {e}")))?;
    let bits = key.n().bits();
    if bits < RSA_KEY_BITS_MIN {
        return Err(ApiError::bad_request(format!(
            "the RSA key has {bits} bits; at least {RSA_KEY_BITS_MIN} are required"
        )));
    }
    Ok(())
}

async fn list(
    State(app): State<App>,
    who: Principal,
    Path(project): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_project(&project, Access::Read)?;
    let state = app.bus.state();
    state.projects.require(&project)?;
    let credentials: Vec<Value> = state
        .credentials
        .in_project(&project)
        .map(credential_json)
        .collect();
    Ok(Json(json!({ "credentials": credentials })))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path((project, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    who.require_project(&project, Access::Read)?;
    let state = app.bus.state();
    state.projects.require(&project)?;
    let c = state
        .credentials
        .get(&project, &id)
        .ok_or_else(|| ApiError::not_found(format!("credential {project}:{id} not found")))?;
    Ok(Json(credential_json(c)))
}

async fn create(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(project): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_project(&project, Access::Write)?;
    let id = b.required_str("ID")?;
    let kind = credential_type(&b)?;
    let payload = decode_payload(&b.required_str("payload")?)?;
    let pem =
        String::from_utf8(payload).map_err(|_| ApiError::bad_request("payload is not PEM text"))?;
    check_rsa_public_pem(&pem)?;
    let cmd = CredentialCommand::CreateCredential {
        project: project.clone(),
        id: id.clone(),
        kind,
        payload_pem: pem,
    };
    app.submit(&who, &headers, Command::Credential(cmd)).await?;
    let state = app.bus.state();
    let c = state
        .credentials
        .get(&project, &id)
        .ok_or_else(|| ApiError::internal("created credential is not in the projection"))?;
    Ok(Json(credential_json(c)))
}

async fn delete(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path((project, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    who.require_project(&project, Access::Write)?;
    let cmd = CredentialCommand::DeleteCredential { project, id };
    app.submit(&who, &headers, Command::Credential(cmd)).await?;
    Ok(Json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public_pem(bits: usize) -> String {
        use rsa::pkcs8::{EncodePublicKey, LineEnding};
        let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), bits).unwrap();
        key.to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    #[test]
    fn keys_under_2048_bits_are_refused() {
        for bits in [512, 1024, 2040] {
            let err = check_rsa_public_pem(&public_pem(bits)).unwrap_err();
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
            assert!(err.message.contains("2048"), "{}", err.message);
        }
    }

    #[test]
    fn payload_forms_and_key_check() {
        let pem = public_pem(2048);
        let b64 = base64::engine::general_purpose::STANDARD.encode(pem.as_bytes());
        assert_eq!(decode_payload(&b64).unwrap(), pem.as_bytes());
        assert_eq!(
            decode_payload(b64.trim_end_matches('=')).unwrap(),
            pem.as_bytes()
        );
        assert!(check_rsa_public_pem(&pem).is_ok());
        assert!(check_rsa_public_pem(
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        )
        .is_err());
        assert!(check_rsa_public_pem("hello").is_err());
        assert!(decode_payload("***").is_err());
    }
}
