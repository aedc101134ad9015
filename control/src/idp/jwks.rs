//! The signing keys of each configured IdP, found through its discovery document
//! (`<issuer>/.well-known/openid-configuration` → `jwks_uri`) and cached in memory.
//!
//! A token naming a key id the cache lacks makes the cache fetch again, but an IdP is fetched
//! at most once per [`JWKS_REFRESH_MIN_INTERVAL_MS`] whatever tokens arrive, and one fetch at
//! a time (the others wait for it): random key ids cannot make evstor hammer an IdP. Keys are
//! also fetched again on use once [`JWKS_MAX_AGE_SECS`] old; if that fails the old keys stay.
//! The cache holds one entry per IdP configuration (at most [`IDP_CONFIGURATIONS_MAX`]),
//! each of at most [`JWKS_KEYS_MAX`] keys; an entry is dropped when its configuration
//! changes (its generation is the configuration's ETag).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

use super::fetch::Fetcher;
use crate::domain::federation::IdpConfig;
use crate::domain::url::HttpUrl;
use crate::limits::{
    IDP_CONFIGURATIONS_MAX, JWKS_KEYS_MAX, JWKS_MAX_AGE_SECS, JWKS_REFRESH_MIN_INTERVAL_MS,
};

/// One verification key of an IdP.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    /// The algorithm the JWK pins, if it does.
    pub alg: Option<Algorithm>,
    /// The key type and curve: `RSA`, `EC P-256`, `EC P-384` or `OKP Ed25519`.
    pub kty: &'static str,
    pub key: DecodingKey,
}

/// What the cache knows of one IdP's health, for `GET /api/v2/cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub idp: String,
    /// Unix seconds of the last fetch attempt (0: never tried).
    pub checked_unix: u64,
    /// The last attempt's failure, if it failed.
    pub error: Option<String>,
}

#[derive(Default)]
struct SlotState {
    keys: Vec<Key>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    checked_unix: u64,
    error: Option<String>,
}

/// The cache entry of one IdP configuration (one generation of it).
struct Slot {
    generation: u64,
    issuer: String,
    proxy: String,
    state: Mutex<SlotState>,
    /// Held while fetching: one fetch per IdP at a time.
    fetching: tokio::sync::Mutex<()>,
}

/// Why no key was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// No key of the IdP matches the token's key id and algorithm.
    Unknown(String),
    /// The IdP could not be asked.
    Unreachable(String),
}

pub struct JwksCache {
    fetcher: Arc<Fetcher>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    refresh_min: Duration,
}

impl JwksCache {
    pub fn new(fetcher: Fetcher) -> JwksCache {
        JwksCache {
            fetcher: Arc::new(fetcher),
            slots: Mutex::new(HashMap::new()),
            refresh_min: Duration::from_millis(JWKS_REFRESH_MIN_INTERVAL_MS),
        }
    }

    fn slot(&self, idp: &IdpConfig) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(&idp.name).filter(|s| s.generation == idp.etag) {
            return s.clone();
        }
        if slots.len() >= IDP_CONFIGURATIONS_MAX {
            // Entries of deleted configurations linger until then; refetching is cheap.
            slots.clear();
        }
        let slot = Arc::new(Slot {
            generation: idp.etag,
            issuer: idp.issuer_url.clone(),
            proxy: idp.proxy_url.clone(),
            state: Mutex::new(SlotState::default()),
            fetching: tokio::sync::Mutex::new(()),
        });
        slots.insert(idp.name.clone(), slot.clone());
        slot
    }

    /// The key of `idp` that verifies a token signed with `alg` under key id `kid`.
    pub async fn key(
        &self,
        idp: &IdpConfig,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<DecodingKey, KeyError> {
        let slot = self.slot(idp);
        let max_age = Duration::from_secs(JWKS_MAX_AGE_SECS);
        if let Some(k) = slot.find(kid, alg, Some(max_age)) {
            return Ok(k);
        }
        let _one_at_a_time = slot.fetching.lock().await;
        if let Some(k) = slot.find(kid, alg, Some(max_age)) {
            return Ok(k); // fetched while we waited
        }
        if slot.may_fetch(Instant::now(), self.refresh_min) {
            let (fetcher, issuer, proxy) = (
                self.fetcher.clone(),
                slot.issuer.clone(),
                slot.proxy.clone(),
            );
            let fetched =
                tokio::task::spawn_blocking(move || fetch_keys(&fetcher, &issuer, &proxy))
                    .await
                    .unwrap_or_else(|e| Err(format!("fetch task: {e}")));
            slot.store(fetched);
        }
        match slot.find(kid, alg, None) {
            Some(k) => Ok(k),
            None => Err(slot.why_not(kid)),
        }
    }

    /// The health of every cached IdP.
    pub fn health(&self) -> Vec<Health> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Health> = slots
            .iter()
            .map(|(name, slot)| {
                let s = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                Health {
                    idp: name.clone(),
                    checked_unix: s.checked_unix,
                    error: s.error.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.idp.cmp(&b.idp));
        out
    }
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A key for the token, from keys at most `max_age` old (`None`: any age).
    fn find(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
        max_age: Option<Duration>,
    ) -> Option<DecodingKey> {
        let s = self.lock();
        let fresh = match (s.fetched_at, max_age) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(at), Some(age)) => at.elapsed() < age,
        };
        if !fresh {
            return None;
        }
        pick(&s.keys, kid, alg)
    }

    /// Whether a fetch may start now (the first one always may).
    fn may_fetch(&self, now: Instant, min_interval: Duration) -> bool {
        let mut s = self.lock();
        let due = s
            .last_attempt
            .is_none_or(|at| now.saturating_duration_since(at) >= min_interval);
        if due {
            s.last_attempt = Some(now);
        }
        due
    }

    fn store(&self, fetched: Result<Vec<Key>, String>) {
        let mut s = self.lock();
        s.checked_unix = crate::store::bus::now_unix_ns() / 1_000_000_000;
        match fetched {
            Ok(keys) => {
                s.keys = keys;
                s.fetched_at = Some(Instant::now());
                s.error = None;
            }
            Err(e) => {
                tracing::warn!("IdP {}: cannot fetch its keys: {e}", self.issuer);
                s.error = Some(e);
            }
        }
    }

    fn why_not(&self, kid: Option<&str>) -> KeyError {
        let s = self.lock();
        match (&s.error, s.fetched_at) {
            (Some(e), None) => KeyError::Unreachable(e.clone()),
            _ => KeyError::Unknown(match kid {
                Some(kid) => format!("the IdP has no signing key {kid:?} (keys are fetched again at most every {} s)", JWKS_REFRESH_MIN_INTERVAL_MS / 1000),
                None => "the token names no key id (kid) and the IdP has no single key for its algorithm".into(),
            }),
        }
    }
}

/// The key type (and curve) an algorithm needs; none for the symmetric ones, which an IdP's
/// published keys can never serve.
fn kty_of(alg: Algorithm) -> Option<&'static str> {
    use Algorithm::*;
    match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Some("RSA"),
        ES256 => Some("EC P-256"),
        ES384 => Some("EC P-384"),
        EdDSA => Some("OKP Ed25519"),
        HS256 | HS384 | HS512 => None,
    }
}

/// The key for a token: the one with its `kid`, or without a `kid` the only candidate; the
/// key's type must fit `alg` and its own `alg`, if pinned, must be `alg`.
fn pick(keys: &[Key], kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
    let kty = kty_of(alg)?;
    let fits = |k: &&Key| k.kty == kty && k.alg.is_none_or(|a| a == alg);
    match kid {
        Some(kid) => keys
            .iter()
            .filter(fits)
            .find(|k| k.kid.as_deref() == Some(kid))
            .map(|k| k.key.clone()),
        None => {
            let mut candidates = keys.iter().filter(fits);
            match (candidates.next(), candidates.next()) {
                (Some(k), None) => Some(k.key.clone()),
                _ => None,
            }
        }
    }
}

/// Discovery, then the JWKS it names (blocking).
fn fetch_keys(fetcher: &Fetcher, issuer: &str, proxy: &str) -> Result<Vec<Key>, String> {
    let issuer_url = HttpUrl::parse(issuer).map_err(|e| format!("issuer {issuer:?} {e}"))?;
    let proxy = match proxy {
        "" => None,
        p => Some(HttpUrl::parse(p).map_err(|e| format!("proxy {p:?} {e}"))?),
    };
    let discovery_url = issuer_url.join(".well-known/openid-configuration");
    let body = fetcher.get(&discovery_url, proxy.as_ref()).map_err(|e| {
        format!(
            "discovery {}{}: {e}",
            discovery_url.authority(),
            discovery_url.path
        )
    })?;
    let doc: Value =
        serde_json::from_slice(&body).map_err(|e| format!("discovery document: {e}"))?;
    let said = doc["issuer"].as_str().unwrap_or_default();
    if said.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(format!(
            "the discovery document names issuer {said:?}, not {issuer:?}"
        ));
    }
    let jwks_text = doc["jwks_uri"]
        .as_str()
        .ok_or("the discovery document has no jwks_uri")?;
    let jwks_url = HttpUrl::parse(jwks_text).map_err(|e| format!("jwks_uri {jwks_text:?} {e}"))?;
    if !jwks_url.https && !jwks_url.is_loopback() {
        return Err(format!("jwks_uri {jwks_text:?} is plain http off loopback"));
    }
    let body = fetcher
        .get(&jwks_url, proxy.as_ref())
        .map_err(|e| format!("JWKS {jwks_text}: {e}"))?;
    parse_jwks(&body)
}

/// The signing keys of a JWKS document; keys evstor cannot use (encryption keys, symmetric
/// keys, unknown types) are skipped, and at most [`JWKS_KEYS_MAX`] are kept.
pub fn parse_jwks(body: &[u8]) -> Result<Vec<Key>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("JWKS: {e}"))?;
    let raw = doc["keys"].as_array().ok_or("JWKS: no \"keys\" array")?;
    let mut keys = Vec::new();
    for value in raw {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value.clone()) else {
            continue;
        };
        let Some(key) = usable(&jwk) else { continue };
        if keys.len() == JWKS_KEYS_MAX {
            tracing::warn!(
                "the IdP publishes more than {JWKS_KEYS_MAX} keys; the rest are ignored"
            );
            break;
        }
        keys.push(key);
    }
    Ok(keys)
}

fn usable(jwk: &Jwk) -> Option<Key> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let kty = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => "RSA",
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => "EC P-256",
            EllipticCurve::P384 => "EC P-384",
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => "OKP Ed25519",
        AlgorithmParameters::OctetKeyPair(_) | AlgorithmParameters::OctetKey(_) => return None,
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(a) => Some(signing_alg(a)?),
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        kty,
        key,
    })
}

/// The signature algorithm a JWK's `alg` pins; `None` for algorithms that are not asymmetric
/// signatures (such a key is skipped).
fn signing_alg(a: KeyAlgorithm) -> Option<Algorithm> {
    use KeyAlgorithm as K;
    Some(match a {
        K::RS256 => Algorithm::RS256,
        K::RS384 => Algorithm::RS384,
        K::RS512 => Algorithm::RS512,
        K::PS256 => Algorithm::PS256,
        K::PS384 => Algorithm::PS384,
        K::PS512 => Algorithm::PS512,
        K::ES256 => Algorithm::ES256,
        K::ES384 => Algorithm::ES384,
        K::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> Slot {
        Slot {
            generation: 1,
            issuer: "https://idp".into(),
            proxy: String::new(),
            state: Mutex::new(SlotState::default()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    #[test]
    fn fetches_are_rate_limited_per_idp() {
        let s = slot();
        let t0 = Instant::now();
        let gap = Duration::from_secs(10);
        assert!(s.may_fetch(t0, gap), "the first fetch");
        for ms in [0, 1, 500, 9_999] {
            assert!(!s.may_fetch(t0 + Duration::from_millis(ms), gap), "{ms}");
        }
        assert!(s.may_fetch(t0 + gap, gap));
        assert!(!s.may_fetch(t0 + gap + Duration::from_millis(1), gap));
    }

    const JWKS: &str = r#"{"keys":[
        {"kty":"EC","crv":"P-256","kid":"ec1","use":"sig","alg":"ES256",
         "x":"WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis",
         "y":"y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE"},
        {"kty":"RSA","kid":"rsa1","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw","e":"AQAB"},
        {"kty":"RSA","kid":"enc","use":"enc","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw","e":"AQAB"},
        {"kty":"oct","kid":"hmac","k":"c2VjcmV0"},
        {"kty":"AKP","kid":"pq","alg":"ML-DSA-44","pub":"AAAA"}
    ]}"#;

    #[test]
    fn jwks_keep_signing_keys_only_and_keys_fit_their_algorithm() {
        let keys = parse_jwks(JWKS.as_bytes()).unwrap();
        let kids: Vec<_> = keys.iter().map(|k| k.kid.clone().unwrap()).collect();
        assert_eq!(kids, ["ec1", "rsa1"]);
        assert!(pick(&keys, Some("ec1"), Algorithm::ES256).is_some());
        assert!(
            pick(&keys, Some("ec1"), Algorithm::RS256).is_none(),
            "wrong family"
        );
        assert!(
            pick(&keys, Some("ec1"), Algorithm::ES384).is_none(),
            "wrong curve"
        );
        assert!(
            pick(&keys, Some("rsa1"), Algorithm::PS256).is_some(),
            "alg not pinned"
        );
        assert!(
            pick(&keys, Some("rsa1"), Algorithm::HS256).is_none(),
            "never HMAC"
        );
        assert!(pick(&keys, Some("hmac"), Algorithm::HS256).is_none());
        assert!(pick(&keys, Some("nope"), Algorithm::RS256).is_none());
        assert!(
            pick(&keys, None, Algorithm::RS256).is_some(),
            "the only RSA key"
        );
        let two_rsa = [keys[1].clone(), keys[1].clone()];
        assert!(
            pick(&two_rsa, None, Algorithm::RS256).is_none(),
            "ambiguous"
        );
        assert!(parse_jwks(b"{}").is_err());
    }
}
