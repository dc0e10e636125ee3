//! HTTP protocol hygiene of requests we answer ourselves: a request head
//! without exactly one `Host` (HTTP/1.1), a request body that is malformed or
//! stalls, and which failures are the client's (logged at debug, not ERROR).

use pingora::prelude::*;
use pingora::proxy::Session;

use super::ctx::RequestCtx;
use super::respond;
use crate::route::Route;

/// Why an HTTP/1.1 request head is refused with 400: RFC 9112 §3.2 requires
/// exactly one `Host` header.
pub fn host_problem(req: &RequestHeader) -> Option<&'static str> {
    if req.version != http::Version::HTTP_11 {
        return None;
    }
    match req.headers.get_all(http::header::HOST).iter().count() {
        1 => None,
        0 => Some("Bad Request: missing Host header"),
        _ => Some("Bad Request: more than one Host header"),
    }
}

/// Answers `code` with `{"detail": msg}` and closes the connection after it:
/// what follows a bad request on the same connection cannot be trusted.
pub async fn reject(
    session: &mut Session,
    ctx: &mut RequestCtx,
    code: u16,
    msg: &str,
) -> Result<()> {
    session.set_keepalive(None);
    ctx.local_status = Some(code);
    respond::error(session, code, msg).await
}

/// The status for an error reading the body of a request we answer
/// ourselves (the management API): 400 for a malformed body (bad chunk
/// framing, bad length), 408 for a body that stopped arriving. `None` for
/// anything else, including a client that went away (nobody to answer).
pub fn body_error_status(e: &Error, ctx: &RequestCtx) -> Option<(u16, &'static str)> {
    if !matches!(ctx.route, Some(Route::Api(_))) || *e.esource() == ErrorSource::Upstream {
        return None;
    }
    match e.etype() {
        ErrorType::ReadTimedout => {
            Some((408, "Request Timeout: the request body stopped arriving"))
        }
        ErrorType::InvalidHTTPHeader => Some((400, "Bad Request: invalid request body framing")),
        t if t.as_str() == "InvalidChunk" => {
            Some((400, "Bad Request: invalid chunked request body"))
        }
        _ => None,
    }
}

/// Whether a final error is the client's doing (it went away, or sent a bad
/// or stalled request): normal for a proxy, so Pingora's ERROR line for it
/// is replaced by a debug line.
pub fn is_client_side(e: &Error, ctx: &RequestCtx) -> bool {
    *e.esource() == ErrorSource::Downstream
        || matches!(e.etype(), ErrorType::ConnectionClosed)
        || body_error_status(e, ctx).is_some()
}
