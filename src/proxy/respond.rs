//! Every response m3u-edge writes itself: API replies and JSON errors. Error
//! bodies name the stream id or the reason, never a provider URL, token or header.

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use serde_json::{json, Value};

/// Writes a complete JSON response (header only for HEAD).
pub async fn json(session: &mut Session, status: u16, body: &Value) -> Result<()> {
    json_with(session, status, body, &[]).await
}

/// 405 with the `Allow` header listing `allow` (RFC 9110 §15.5.6).
pub async fn method_not_allowed(session: &mut Session, allow: &'static str) -> Result<()> {
    let body = json!({ "detail": "Method Not Allowed" });
    json_with(session, 405, &body, &[(header::ALLOW, allow)]).await
}

/// Like [`json`] with extra response headers.
pub async fn json_with(
    session: &mut Session,
    status: u16,
    body: &Value,
    extra: &[(header::HeaderName, &'static str)],
) -> Result<()> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    let mut resp = ResponseHeader::build(status, Some(6 + extra.len()))?;
    for (name, value) in extra {
        resp.insert_header(name.clone(), *value)?;
    }
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, bytes.len())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    if status == 401 || status == 403 {
        resp.insert_header(header::WWW_AUTHENTICATE, "Bearer")?;
    }
    if let Some(origin) = session.req_header().headers.get(header::ORIGIN).cloned() {
        resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
        resp.insert_header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
        resp.insert_header(header::VARY, "Origin")?;
    }
    let head = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(resp), head).await?;
    if !head {
        session.write_response_body(Some(bytes), true).await?;
    }
    Ok(())
}

/// `{"detail": msg}`, m3u-proxy's error shape.
pub async fn error(session: &mut Session, status: u16, msg: &str) -> Result<()> {
    json(session, status, &json!({ "detail": msg })).await
}

/// CORS preflight: m3u-proxy answers 200 and echoes the Origin.
pub async fn preflight(session: &mut Session) -> Result<()> {
    let mut resp = ResponseHeader::build(200, Some(6))?;
    if let Some(origin) = session.req_header().headers.get(header::ORIGIN).cloned() {
        resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
        resp.insert_header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
    }
    resp.insert_header(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        "GET, POST, DELETE, HEAD, OPTIONS",
    )?;
    let asked = session
        .req_header()
        .headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned();
    match asked {
        Some(h) => resp.insert_header(header::ACCESS_CONTROL_ALLOW_HEADERS, h)?,
        None => resp.insert_header(header::ACCESS_CONTROL_ALLOW_HEADERS, "*")?,
    }
    resp.insert_header(header::ACCESS_CONTROL_MAX_AGE, "600")?;
    resp.insert_header(header::CONTENT_LENGTH, 0)?;
    session.write_response_header(Box::new(resp), true).await
}
