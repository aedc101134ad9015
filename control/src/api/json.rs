//! JSON in and out the way LightOS clients expect it (SCHEMAS.md §1 and §4): input keys with
//! exact case, unknown keys ignored, `null` as absent, numbers accepted as strings, sizes in
//! every observed form; output with 64-bit numbers as strings and zero values omitted.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde_json::{Map, Value};

use super::error::{ApiError, ApiResult};
use crate::domain::duration::{parse_go_duration_ns, DurationError};
use crate::domain::volume::Label;
use crate::limits::{API_DURATION_SECS_MAX, REQUEST_BODY_BYTES_MAX};

/// A request body as a JSON object; an empty body is an empty object.
#[derive(Debug, Clone, Default)]
pub struct Body(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(super::admission::body_error)?;
        Body::parse(&bytes)
    }
}

fn type_error(key: &str, want: &str, got: &Value) -> ApiError {
    ApiError::bad_request(format!("field {key}: expected {want}, got {got}"))
}

impl Body {
    pub fn parse(bytes: &[u8]) -> ApiResult<Body> {
        if bytes.len() > REQUEST_BODY_BYTES_MAX {
            return Err(ApiError::bad_request(format!(
                "body larger than {REQUEST_BODY_BYTES_MAX} bytes"
            )));
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body::default());
        }
        match serde_json::from_slice(bytes) {
            Ok(Value::Object(map)) => Ok(Body(map)),
            Ok(other) => Err(ApiError::bad_request(format!(
                "body must be a JSON object, got {other}"
            ))),
            Err(e) => Err(ApiError::bad_request(format!("malformed JSON body: {e}"))),
        }
    }

    /// The value of `key`, with `null` treated as absent.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub fn str(&self, key: &str) -> ApiResult<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(type_error(key, "a string", other)),
        }
    }

    /// A string that must be present and not empty.
    pub fn required_str(&self, key: &str) -> ApiResult<String> {
        match self.str(key)? {
            Some(s) if !s.is_empty() => Ok(s),
            _ => Err(ApiError::bad_request(format!("field {key} is required"))),
        }
    }

    pub fn u64(&self, key: &str) -> ApiResult<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                type_error(key, "a non-negative integer", &Value::Number(n.clone()))
            }),
            Some(Value::String(s)) => {
                s.trim().parse().map(Some).map_err(|_| {
                    type_error(key, "a non-negative integer", &Value::String(s.clone()))
                })
            }
            Some(other) => Err(type_error(key, "a number", other)),
        }
    }

    pub fn u32(&self, key: &str) -> ApiResult<Option<u32>> {
        match self.u64(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("field {key}: {n} is too large"))),
        }
    }

    /// Booleans are JSON booleans only (a string is rejected, as jsonpb does).
    pub fn bool(&self, key: &str) -> ApiResult<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(type_error(key, "true or false", other)),
        }
    }

    pub fn object(&self, key: &str) -> ApiResult<Option<Body>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Body(m.clone()))),
            Some(other) => Err(type_error(key, "an object", other)),
        }
    }

    pub fn array(&self, key: &str) -> ApiResult<Vec<Value>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => Ok(a.clone()),
            Some(other) => Err(type_error(key, "an array", other)),
        }
    }

    /// An array of strings (absent: empty).
    pub fn strings(&self, key: &str) -> ApiResult<Vec<String>> {
        self.array(key)?
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(type_error(key, "strings", &other)),
            })
            .collect()
    }

    /// A `StringList` (`{"values": [...]}`).
    pub fn string_list(&self, key: &str) -> ApiResult<Option<Vec<String>>> {
        let Some(list) = self.object(key)? else {
            return Ok(None);
        };
        list.strings("values").map(Some)
    }

    /// `labels: [{"key": .., "value": ..}]`; `None` when absent.
    pub fn labels(&self, key: &str) -> ApiResult<Option<Vec<Label>>> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.array(key)?
            .into_iter()
            .map(|v| match v {
                Value::Object(m) => {
                    let b = Body(m);
                    Ok(Label {
                        key: b.str("key")?.unwrap_or_default(),
                        value: b.str("value")?.unwrap_or_default(),
                    })
                }
                other => Err(type_error(key, "label objects", &other)),
            })
            .collect::<ApiResult<Vec<_>>>()
            .map(Some)
    }

    /// A size given as text (`"1073741824"`, `"1073741824b"`, `"10 gib"`, `"10GiB"`) or as a
    /// number.
    pub fn size(&self, key: &str) -> ApiResult<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| type_error(key, "a positive size", &Value::Number(n.clone()))),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => parse_size(s)
                .map(Some)
                .map_err(|why| ApiError::bad_request(format!("field {key}: {why}"))),
            Some(other) => Err(type_error(key, "a size", other)),
        }
    }
}

/// A UUID from a path segment, query or body field, or a 400 naming it.
pub fn parse_uuid(text: &str) -> ApiResult<uuid::Uuid> {
    uuid::Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not a UUID")))
}

/// Parses a byte count with an optional unit: `b`, decimal `kb mb gb tb pb`, binary
/// `k m g t p` and `kib mib gib tib pib`, any case, optional space.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size {text:?} is not a positive integer with an optional unit"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "p" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} overflows"))
}

/// Parses a Go `time.ParseDuration` string (`"86400s"`, `"24h"`, `"1h30m"`, `"1.5h"`) into
/// whole seconds, rounding a fraction up (so a short but non-zero duration never becomes 0),
/// within the protobuf `Duration` range clients decode.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    match parse_go_duration_ns(text.trim()) {
        Ok(ns) => u64::try_from(ns.div_ceil(1_000_000_000))
            .map_err(|_| format!("duration {text:?} is too long")),
        Err(DurationError::Malformed) => Err(format!(
            "duration {text:?} is not like \"86400s\" or \"24h\""
        )),
        Err(DurationError::TooLong) => Err(format!(
            "duration {text:?} is longer than {API_DURATION_SECS_MAX}s"
        )),
    }
}

/// A JSON object under construction that leaves out zero values, as the LightOS gateway does.
#[derive(Debug, Default)]
pub struct Obj(Map<String, Value>);

impl Obj {
    pub fn new() -> Obj {
        Obj::default()
    }

    pub fn str(mut self, key: &str, v: &str) -> Obj {
        if !v.is_empty() {
            self.0.insert(key.into(), Value::String(v.into()));
        }
        self
    }

    /// A 64-bit integer, written as a string of digits.
    pub fn u64s(mut self, key: &str, v: u64) -> Obj {
        if v != 0 {
            self.0.insert(key.into(), Value::String(v.to_string()));
        }
        self
    }

    pub fn num(mut self, key: &str, v: u64) -> Obj {
        if v != 0 {
            self.0.insert(key.into(), Value::from(v));
        }
        self
    }

    pub fn float(mut self, key: &str, v: f64) -> Obj {
        if v != 0.0 {
            self.0.insert(key.into(), Value::from(v));
        }
        self
    }

    pub fn bool(mut self, key: &str, v: bool) -> Obj {
        if v {
            self.0.insert(key.into(), Value::Bool(true));
        }
        self
    }

    pub fn strs(mut self, key: &str, v: &[String]) -> Obj {
        if !v.is_empty() {
            self.0.insert(key.into(), Value::from(v.to_vec()));
        }
        self
    }

    /// A `StringList` object.
    pub fn list(mut self, key: &str, v: &[String]) -> Obj {
        if !v.is_empty() {
            self.0
                .insert(key.into(), serde_json::json!({ "values": v }));
        }
        self
    }

    pub fn val(mut self, key: &str, v: Value) -> Obj {
        let empty = match &v {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        if !empty {
            self.0.insert(key.into(), v);
        }
        self
    }

    /// An RFC 3339 timestamp from Unix nanoseconds.
    pub fn time(self, key: &str, unix_ns: u64) -> Obj {
        if unix_ns == 0 {
            return self;
        }
        let t = rfc3339(unix_ns);
        self.str(key, &t)
    }

    pub fn build(self) -> Value {
        Value::Object(self.0)
    }
}

pub fn rfc3339(unix_ns: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(unix_ns);
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn labels_json(labels: &[Label]) -> Value {
    Value::Array(
        labels
            .iter()
            .map(|l| serde_json::json!({"key": l.key, "value": l.value}))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_observed_size_form_parses() {
        for (text, bytes) in [
            ("1073741824", 1u64 << 30),
            ("1073741824b", 1 << 30),
            ("10 gib", 10 << 30),
            ("10GiB", 10 << 30),
            ("4096", 4096),
            ("1 TiB", 1 << 40),
            ("5gb", 5_000_000_000),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in ["", "-1", "ten", "10 zib", "1.5GiB", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn go_durations_parse() {
        for (text, secs) in [
            ("86400s", 86400),
            ("24h", 86400),
            ("120m", 7200),
            ("1h30m", 5400),
            ("1.5h", 5400),
            ("0", 0),
        ] {
            assert_eq!(parse_duration_secs(text), Ok(secs), "{text}");
        }
        assert_eq!(
            parse_duration_secs("100ms"),
            Ok(1),
            "never 0 (kept forever)"
        );
        assert_eq!(parse_duration_secs("315576000000s"), Ok(315_576_000_000));
        for bad in [
            "",
            "10",
            "5 days",
            "h",
            "-1h",
            "99999999999999999999h",
            "315576000001s",
        ] {
            assert!(parse_duration_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn body_quirks() {
        let b = Body::parse(br#"{"replicaCount":"3","n":null,"size":"10 gib","flag":"true","acl":{"values":["ALLOW_ANY"]},"extra":{"x":1}}"#).unwrap();
        assert_eq!(b.u32("replicaCount").unwrap(), Some(3));
        assert_eq!(b.str("n").unwrap(), None);
        assert_eq!(b.size("size").unwrap(), Some(10 << 30));
        assert!(b.bool("flag").is_err());
        assert_eq!(b.string_list("acl").unwrap().unwrap(), ["ALLOW_ANY"]);
        assert!(Body::parse(b"").unwrap().0.is_empty());
        assert!(Body::parse(b"[1]").is_err());
        assert!(Body::parse(b"{").is_err());
    }

    #[test]
    fn output_omits_zero_values_and_stringifies_u64() {
        let v = Obj::new()
            .str("a", "")
            .u64s("size", 5)
            .num("n", 0)
            .bool("b", false)
            .build();
        assert_eq!(v, serde_json::json!({"size": "5"}));
    }
}
