//! What reaches the client after the upstream answered: byte accounting, the
//! end of a request whose client the API dropped, the JSON error when every
//! source failed, and the access log line.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, Session};

use super::ctx::RequestCtx;
use super::respond;
use crate::app::App;
use crate::events::EventType;
use crate::metrics::RouteLabel;
use crate::route::Route;

pub fn body(app: &App, ctx: &mut RequestCtx, body: &Option<Bytes>) -> Result<()> {
    if let Some(g) = &ctx.guard {
        // The API dropped this client or deleted its stream: end the response.
        if g.client.cancel.is_cancelled() {
            return Error::e_explain(
                ErrorType::ConnectionClosed,
                "client disconnected through the API",
            );
        }
        if let Some(b) = body {
            let n = b.len() as u64;
            if !ctx.first_byte && n > 0 {
                ctx.first_byte = true;
                app.metrics
                    .join_seconds
                    .observe(ctx.started.elapsed().as_secs_f64());
            }
            // Per-client proxying relays what it reads.
            app.metrics.bytes_in.inc_by(n);
            app.metrics.bytes_out.inc_by(n);
            ctx.bytes_out += n;
            g.client.add_bytes(n);
            g.stream.bytes.fetch_add(n, Ordering::Relaxed);
        }
    }
    Ok(())
}

pub async fn fail(
    app: &App,
    session: &mut Session,
    e: &Error,
    ctx: &mut RequestCtx,
) -> FailToProxy {
    // Mid-body failures cannot be reported to the client any more.
    if session.response_written().is_some() {
        return FailToProxy {
            error_code: 0,
            can_reuse_downstream: false,
        };
    }
    if let Some((code, msg)) = super::protocol::body_error_status(e, ctx) {
        if let Err(err) = super::protocol::reject(session, ctx, code, msg).await {
            tracing::debug!(error = %err, "could not send the error response");
        }
        return FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        };
    }
    if let Some(full) = ctx.full.clone() {
        ctx.local_status = Some(503);
        app.metrics
            .provider_rejections
            .with_label_values(&[full.provider.as_str()])
            .inc();
        let body = serde_json::json!({
            "detail": full.detail(),
            "provider": full.provider,
            "max_connections": full.max_connections,
        });
        if let Err(err) = respond::json(session, 503, &body).await {
            tracing::debug!(error = %err, "could not send the error response");
        }
        return FailToProxy {
            error_code: 503,
            can_reuse_downstream: false,
        };
    }
    let (code, msg) = match e.etype() {
        ErrorType::HTTPStatus(_) | ErrorType::ConnectTimedout | ErrorType::ConnectRefused
            if ctx.stream_id.is_some() =>
        {
            let code = ctx.sel.final_status();
            let msg = if code == 404 {
                "Stream source not found"
            } else {
                "Every source of the stream failed"
            };
            (code, msg)
        }
        _ if ctx.stream_id.is_some() && !ctx.committed => {
            (ctx.sel.final_status(), "Every source of the stream failed")
        }
        _ => match e.esource() {
            ErrorSource::Downstream => (0, ""),
            ErrorSource::Upstream => (502, "Upstream error"),
            _ => (500, "Internal error"),
        },
    };
    if code >= 404 && !ctx.committed {
        if let Some(g) = &ctx.guard {
            let reasons: Vec<&str> = ctx.sel.failures.iter().map(|f| f.2.as_str()).collect();
            g.stream.emit(
                EventType::StreamFailed,
                serde_json::json!({
                    "client_id": g.client.id,
                    "error": msg,
                    "error_type": "all_sources_failed",
                    "reason": reasons.join("; "),
                    "retry_count": ctx.sel.failures.len(),
                    "mode": "direct_proxy",
                }),
            );
        }
    }
    // A source refused by security.deny_private_upstreams says so.
    let refused = ctx
        .sel
        .failures
        .iter()
        .find(|f| f.2.contains("security.deny_private_upstreams"));
    let msg = match refused {
        Some(f) if code >= 500 => f.2.as_str(),
        _ => msg,
    };
    if code > 0 {
        let detail = match &ctx.stream_id {
            Some(id) => format!("{msg} (stream {id})"),
            None => msg.to_string(),
        };
        if let Err(err) = respond::error(session, code, &detail).await {
            tracing::debug!(error = %err, "could not send the error response");
        }
        ctx.local_status = Some(code);
    }
    FailToProxy {
        error_code: code,
        can_reuse_downstream: false,
    }
}

/// One access-log line per request: stream, client, route, status, bytes, time.
pub fn log(app: &App, session: &Session, e: Option<&Error>, ctx: &RequestCtx) {
    let status = session
        .response_written()
        .map(|r| r.status.as_u16())
        .or(ctx.local_status)
        .unwrap_or(0);
    let mut rec = Access::of(session, ctx);
    rec.status = status;
    if !rec.enabled() {
        // Playlist polls are the hot path: count, and skip building the line.
        rec.count(app);
        return;
    }
    rec.bytes = if ctx.bytes_out > 0 {
        ctx.bytes_out
    } else {
        session.body_bytes_sent() as u64
    };
    rec.error = e.map(|e| format!("{:?}", e.etype()));
    rec.write(app);
}

/// One access-log line. It borrows nothing from the session, so a live viewer
/// served off the session (proxy/live.rs) logs the same way when it leaves.
#[derive(Debug, Clone)]
pub struct Access {
    pub route: RouteLabel,
    pub method: http::Method,
    pub path: String,
    pub stream_id: Option<String>,
    pub client: Option<String>,
    pub addr: String,
    pub status: u16,
    pub bytes: u64,
    pub started: std::time::Instant,
    pub error: Option<String>,
}

impl Access {
    /// The route and start time always; the rest only when access logs are on.
    pub fn of(session: &Session, ctx: &RequestCtx) -> Access {
        let route = match &ctx.route {
            Some(Route::Api(_)) => RouteLabel::Api,
            Some(Route::Play(_)) => RouteLabel::Stream,
            Some(Route::HlsPlaylist(_) | Route::HlsSegment(_)) => RouteLabel::Hls,
            Some(Route::Metrics) => RouteLabel::Metrics,
            _ => RouteLabel::Other,
        };
        let mut rec = Access {
            route,
            method: session.req_header().method.clone(),
            path: String::new(),
            stream_id: None,
            client: None,
            addr: String::new(),
            status: 0,
            bytes: 0,
            started: ctx.started,
            error: None,
        };
        if rec.enabled() {
            rec.path = session.req_header().uri.path().to_string();
            rec.stream_id = ctx.stream_id.clone();
            rec.client = ctx.guard.as_ref().map(|g| g.client.id.clone());
            rec.addr = session
                .client_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
        }
        rec
    }

    fn enabled(&self) -> bool {
        tracing::enabled!(target: "access", tracing::Level::INFO)
    }

    fn count(&self, app: &App) {
        if self.status > 0 {
            app.metrics.request(self.route, self.status);
        }
    }

    pub fn write(&self, app: &App) {
        self.count(app);
        tracing::info!(
            target: "access",
            method = %self.method,
            path = self.path.as_str(),
            stream_id = self.stream_id.as_deref().unwrap_or("-"),
            client = self.client.as_deref().unwrap_or("-"),
            addr = self.addr.as_str(),
            status = self.status,
            bytes = self.bytes,
            ms = self.started.elapsed().as_millis() as u64,
            error = self.error.as_deref(),
            "request"
        );
    }
}
