//! JSON request bodies, checked field by field so a 422 names the field that is
//! wrong (API-COMPAT.md §1, §4). Unknown fields are ignored: m3u-editor sends
//! some that m3u-edge does not use.

use std::collections::BTreeMap;

use http::header::{HeaderName, HeaderValue};
use serde_json::{Map, Value};

use super::ApiReply;
use crate::registry::StreamSpec;

/// Parses a body that must be a JSON object. An empty body and m3u-editor's
/// bodiless `[]` count as `{}`.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiReply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(Value::Array(a)) if a.is_empty() => Ok(Map::new()),
        Ok(other) => Err(ApiReply::invalid(
            &["body"],
            "Input should be a valid dictionary",
            other,
        )),
        Err(e) => Err(ApiReply::invalid(
            &["body", &e.column().to_string()],
            format!("JSON decode error: {e}"),
            Value::Null,
        )),
    }
}

pub fn wrong(field: &str, msg: &str, input: &Value) -> ApiReply {
    ApiReply::invalid(&["body", field], msg, input.clone())
}

/// A string field the body must have, with m3u-proxy's (pydantic's) 422s
/// when it is missing or not a string.
pub fn required_str(m: &Map<String, Value>, field: &str) -> Result<String, ApiReply> {
    match m.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err(ApiReply::invalid(
            &["body", field],
            "Field required",
            Value::Null,
        )),
        Some(v) => Err(wrong(field, "Input should be a valid string", v)),
    }
}

fn opt_str(m: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiReply> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(wrong(field, "Input should be a valid string", v)),
    }
}

fn opt_bool(m: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiReply> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong(field, "Input should be a valid boolean", v)),
    }
}

fn opt_number(m: &Map<String, Value>, field: &str) -> Result<Option<f64>, ApiReply> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(v) => Err(wrong(field, "Input should be a valid number", v)),
    }
}

/// `enable_silence_detection` and its thresholds (m3u-proxy's defaults for
/// the ones not sent); `None` when detection is off. Out-of-range values are
/// a 422 naming the field.
fn silence(m: &Map<String, Value>) -> Result<Option<crate::silence::SilenceSpec>, ApiReply> {
    let on = opt_bool(m, "enable_silence_detection")?.unwrap_or(false);
    let mut s = crate::silence::SilenceSpec::default();
    if let Some(v) = opt_number(m, "silence_threshold_db")? {
        s.threshold_db = v;
    }
    if let Some(v) = opt_number(m, "silence_duration")? {
        s.duration = v;
    }
    if let Some(v) = opt_number(m, "silence_check_interval")? {
        s.check_interval = v;
    }
    if let Some(v) = opt_number(m, "silence_failover_threshold")? {
        if v.fract() != 0.0 || !(0.0..=f64::from(u32::MAX)).contains(&v) {
            return Err(wrong(
                "silence_failover_threshold",
                "Input should be a valid integer",
                &Value::from(v),
            ));
        }
        s.failover_threshold = v as u32;
    }
    if let Some(v) = opt_number(m, "silence_monitoring_grace_period")? {
        s.grace = v;
    }
    // Checked even when off: a value out of range is a mistake either way.
    if let Err((field, msg)) = s.check() {
        let input = m.get(field).cloned().unwrap_or(Value::Null);
        return Err(wrong(field, &msg, &input));
    }
    Ok(on.then_some(s))
}

/// Accepts only http(s) URLs with a host and none of the script-injection
/// markers m3u-proxy rejects.
pub fn check_url(field: &str, raw: &str) -> Result<(), ApiReply> {
    check_url_for(field, raw, false)
}

/// [`check_url`]; a `page` for a resolver may also carry one of streamlink's
/// protocol prefixes (`hls://http://host/x.m3u8`).
fn check_url_for(field: &str, raw: &str, page: bool) -> Result<(), ApiReply> {
    let input = Value::String(raw.to_string());
    let lower = raw.to_ascii_lowercase();
    if ["<script", "javascript:", "data:", "vbscript:"]
        .iter()
        .any(|bad| lower.contains(bad))
    {
        return Err(wrong(field, "URL contains a forbidden pattern", &input));
    }
    if page && crate::resolvers::is_page_url(raw) {
        return Ok(());
    }
    match url::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Ok(()),
        Ok(_) => Err(wrong(
            field,
            "URL must be http or https with a host",
            &input,
        )),
        Err(e) => Err(wrong(field, &format!("invalid URL: {e}"), &input)),
    }
}

/// Python's `str()` of a JSON scalar, which is how m3u-proxy stores metadata.
pub fn python_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(true) => Some("True".into()),
        Value::Bool(false) => Some("False".into()),
        Value::Number(n) => Some(match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => python_float(f),
            _ => n.to_string(),
        }),
        _ => None,
    }
}

/// `repr(float)`: shortest round-trip digits, positional for exponents in
/// [-4, 16), scientific otherwise, and always a `.0` on integral values.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// `POST /streams`: the validated spec and the request's own metadata (echoed
/// back as sent).
#[derive(Debug)]
pub struct CreateStream {
    pub spec: StreamSpec,
    pub raw_metadata: Option<Value>,
}

pub fn create_stream(body: &[u8]) -> Result<CreateStream, ApiReply> {
    let m = object(body)?;
    let url = required_str(&m, "url")?;
    // A resolver's sources are pages, possibly with a streamlink prefix.
    let page = m.get("resolver").is_some_and(|v| !v.is_null());
    check_url_for("url", &url, page)?;

    let failover_urls = match m.get("failover_urls") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, v) in a.iter().enumerate() {
                let field = format!("failover_urls.{i}");
                let Value::String(s) = v else {
                    return Err(wrong(&field, "Input should be a valid string", v));
                };
                check_url_for(&field, s, page)?;
                out.push(s.clone());
            }
            out
        }
        Some(v) => return Err(wrong("failover_urls", "Input should be a valid list", v)),
    };
    let failover_resolver_url = opt_str(&m, "failover_resolver_url")?;
    if let Some(r) = &failover_resolver_url {
        check_url("failover_resolver_url", r)?;
    }
    let user_agent = opt_str(&m, "user_agent")?.filter(|s| !s.is_empty());

    let mut metadata = BTreeMap::new();
    match m.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            for (k, v) in o {
                let s = python_str(v).ok_or_else(|| {
                    wrong(
                        &format!("metadata.{k}"),
                        "Input should be a string, integer, number or boolean",
                        v,
                    )
                })?;
                metadata.insert(k.clone(), s);
            }
        }
        Some(v) => return Err(wrong("metadata", "Input should be a valid dictionary", v)),
    }

    let mut headers = Vec::new();
    match m.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            for (k, v) in o {
                let field = format!("headers.{k}");
                let Value::String(s) = v else {
                    return Err(wrong(&field, "Input should be a valid string", v));
                };
                if HeaderName::from_bytes(k.as_bytes()).is_err() {
                    return Err(wrong(&field, "not a valid HTTP header name", v));
                }
                if crate::upstream::headers::is_reserved(k) {
                    return Err(wrong(
                        &field,
                        "hop-by-hop and framing headers are set by m3u-edge itself",
                        v,
                    ));
                }
                // m3u-editor sends empty custom values; m3u-proxy 422s the whole
                // join for it. An empty value is simply not sent.
                if s.trim().is_empty() {
                    continue;
                }
                if HeaderValue::from_str(s).is_err() {
                    return Err(wrong(&field, "not a valid HTTP header value", v));
                }
                headers.push((k.clone(), s.clone()));
            }
        }
        Some(v) => return Err(wrong("headers", "Input should be a valid dictionary", v)),
    }

    let strict_live_ts = opt_bool(&m, "strict_live_ts")?.unwrap_or(false);
    let sticky = opt_bool(&m, "use_sticky_session")?.unwrap_or(false);
    let live = opt_bool(&m, "live")?;
    let silence = silence(&m)?;

    Ok(CreateStream {
        spec: StreamSpec {
            url,
            failover_urls,
            failover_resolver_url,
            user_agent,
            headers,
            metadata,
            live,
            sticky,
            strict_live_ts,
            provider: None,
            transcode: None,
            resolver: None,
            silence,
        },
        raw_metadata: m.get("metadata").filter(|v| !v.is_null()).cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_str_matches_python() {
        for (v, want) in [
            (json!(5), "5"),
            (json!(true), "True"),
            (json!(false), "False"),
            (json!(1.0), "1.0"),
            (json!(1.5), "1.5"),
            (json!(1e20), "1e+20"),
            (json!(0.0001), "0.0001"),
            (json!(0.00001), "1e-05"),
            (json!(-3), "-3"),
            (json!("x"), "x"),
        ] {
            assert_eq!(python_str(&v).as_deref(), Some(want), "{v}");
        }
        assert_eq!(python_str(&json!(null)), None);
        assert_eq!(python_str(&json!({"a":1})), None);
    }

    #[test]
    fn bodies() {
        assert!(create_stream(br#"{"url":"ftp://x/a"}"#).is_err());
        assert!(create_stream(br#"{"url":"http://x/a?javascript:1"}"#).is_err());
        let e = create_stream(br#"{"url":"http://x/a","metadata":{"a":null}}"#).unwrap_err();
        assert_eq!(e.status, 422);
        assert_eq!(e.body["detail"][0]["loc"], json!(["body", "metadata.a"]));
        let e = create_stream(br#"{"url":"http://x/a","headers":{"a":null}}"#).unwrap_err();
        assert_eq!(e.status, 422);
        for framing in [
            "Transfer-Encoding",
            "content-length",
            "Connection",
            "TE",
            "Upgrade",
        ] {
            let body = format!(r#"{{"url":"http://x/a","headers":{{"{framing}":"chunked"}}}}"#);
            let e = create_stream(body.as_bytes()).unwrap_err();
            assert_eq!(e.status, 422, "{framing}");
            assert_eq!(
                e.body["detail"][0]["loc"],
                json!(["body", format!("headers.{framing}")])
            );
        }
        let ok =
            create_stream(br#"{"url":"http://x/a","unknown":1,"headers":{"X-A":""}}"#).unwrap();
        assert!(ok.spec.headers.is_empty());
        assert!(create_stream(b"{bad").is_err());
        assert!(object(b"[]").unwrap().is_empty());
        assert!(object(b"").unwrap().is_empty());
    }
}
