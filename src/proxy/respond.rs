//! Every response m3u-edge writes itself: API replies and JSON errors. Error
//! bodies name the stream id or the reason, never a provider URL, token or header.
//!
//! CORS has two policies. Client routes (`/stream`, `/hls`) are for players,
//! browsers included, on any origin: `Access-Control-Allow-Origin: *`,
//! never with credentials. Management routes answer CORS only to the
//! origins in `api.cors_origins` (none by default: m3u-editor calls them
//! server-side), so no web page can read `/streams` with its provider URLs.

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use serde_json::{json, Value};

/// Who may read a response from a browser page.
#[derive(Debug, Clone, Copy)]
pub enum Cors<'a> {
    /// Any origin, without credentials (client routes).
    Open,
    /// Only this origin (a management route called from an allowed origin),
    /// or none.
    Only(Option<&'a str>),
}

/// `Access-Control-Allow-Origin: *` for a client route's response.
pub fn open_cors(resp: &mut ResponseHeader) -> Result<()> {
    resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")?;
    resp.insert_header(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        "Content-Length, Content-Range, Accept-Ranges",
    )?;
    Ok(())
}

fn cors_headers(resp: &mut ResponseHeader, cors: Cors) -> Result<()> {
    match cors {
        Cors::Open => open_cors(resp),
        Cors::Only(Some(origin)) => {
            resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
            resp.insert_header(header::VARY, "Origin")?;
            Ok(())
        }
        Cors::Only(None) => Ok(()),
    }
}

/// Writes a complete JSON response for a client route (header only for HEAD).
pub async fn json(session: &mut Session, status: u16, body: &Value) -> Result<()> {
    json_with(session, status, body, Cors::Open).await
}

/// Writes a complete JSON response with the given CORS policy.
pub async fn json_with(
    session: &mut Session,
    status: u16,
    body: &Value,
    cors: Cors<'_>,
) -> Result<()> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    let mut resp = ResponseHeader::build(status, Some(6))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, bytes.len())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    if status == 401 || status == 403 {
        resp.insert_header(header::WWW_AUTHENTICATE, "Bearer")?;
    }
    cors_headers(&mut resp, cors)?;
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

/// CORS preflight: 200 (as m3u-proxy), with the policy's headers; a
/// management route asked from an origin not allowed gets none, so the
/// browser refuses the real request.
pub async fn preflight(session: &mut Session, cors: Cors<'_>) -> Result<()> {
    let mut resp = ResponseHeader::build(200, Some(6))?;
    cors_headers(&mut resp, cors)?;
    let methods = match cors {
        Cors::Open => "GET, HEAD, OPTIONS",
        Cors::Only(_) => "GET, POST, DELETE, HEAD, OPTIONS",
    };
    resp.insert_header(header::ACCESS_CONTROL_ALLOW_METHODS, methods)?;
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

/// A new client refused by a `limits.*` cap: 429, counted.
pub async fn refused(
    app: &crate::app::App,
    session: &mut Session,
    ctx: &mut super::RequestCtx,
    why: crate::registry::Refused,
) -> Result<()> {
    use crate::metrics::LimitCut;
    use crate::registry::Refused;
    app.metrics.cut(match why {
        Refused::ViewersPerStream => LimitCut::ViewersPerStream,
        Refused::ViewersPerAddress => LimitCut::ViewersPerAddress,
        Refused::HlsPerStream => LimitCut::HlsClientsPerStream,
        Refused::HlsPerAddress => LimitCut::HlsClientsPerAddress,
    });
    ctx.local_status = Some(429);
    error(session, 429, why.message()).await
}
