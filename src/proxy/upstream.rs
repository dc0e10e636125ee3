//! Source choice and failover before the first byte: `upstream_peer` picks the
//! URL of this attempt; connect errors, bad statuses and redirects each move
//! the request on (next redirect hop, next failover URL, then the resolver),
//! and only while nothing has been written to the client (DESIGN.md, Pingora
//! facts: a retry after response bytes corrupts the body).

use http::header;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;

use super::ctx::{RequestCtx, SourceFailure};
use crate::app::App;
use crate::metrics::{FailoverReason, UpstreamErrorKind};
use crate::upstream::{headers, peer, sources};

/// Resolver rounds per request: enough to skip a dead URL or two, bounded so a
/// resolver that keeps naming dead URLs cannot hold a request forever.
const MAX_RESOLVER_CALLS: usize = 3;

fn resolver_left(ctx: &RequestCtx) -> bool {
    ctx.sel.resolver_calls < MAX_RESOLVER_CALLS
        && ctx
            .spec
            .as_ref()
            .is_some_and(|s| s.failover_resolver_url.is_some())
}

/// Whether another attempt is possible after the current source failed.
fn can_continue(ctx: &RequestCtx) -> bool {
    ctx.sel.target.is_some() || resolver_left(ctx)
}

fn all_failed(ctx: &RequestCtx) -> Box<Error> {
    let mut e = Error::explain(
        ErrorType::HTTPStatus(ctx.sel.final_status()),
        "every source of the stream failed",
    );
    e.set_retry(false);
    e
}

pub async fn peer(app: &App, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
    ctx.sel.wants_retry = false;
    loop {
        let target = match ctx.sel.target.clone() {
            Some(t) => t,
            None => match ask_resolver(app, ctx).await {
                Some(u) => {
                    ctx.sel.push_source(u);
                    continue;
                }
                None => return Err(all_failed(ctx)),
            },
        };
        match peer::peer_for(&target, app.timeouts()).await {
            Ok(p) => {
                take_lease(app, ctx, &target).await?;
                return Ok(Box::new(p));
            }
            Err(e) => {
                app.metrics.upstream_error(UpstreamErrorKind::Dns);
                tracing::warn!(stream_id = ?ctx.stream_id, source = ctx.sel.pos, error = %e, "source unusable");
                ctx.sel.fail(SourceFailure::Failed, e.to_string());
            }
        }
    }
}

/// How long a request waits for a provider lease a closing connection holds.
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Holds a lease of the target's provider for this request's connection. A
/// full provider first loses its idle (lingering) live channels; if still full,
/// the request ends with 503.
async fn take_lease(app: &App, ctx: &mut RequestCtx, target: &url::Url) -> Result<()> {
    let Some(spec) = ctx.spec.clone() else {
        return Ok(());
    };
    let provider = app
        .providers
        .for_stream(&spec, target)
        .map(|p| p.name.clone());
    if ctx.lease.as_ref().is_some_and(|(p, _)| *p == provider) {
        return Ok(());
    }
    ctx.lease = None;
    let lease = match app
        .leases
        .acquire(provider.as_deref(), std::time::Duration::ZERO)
        .await
    {
        Ok(l) => l,
        Err(_) => {
            if let Some(p) = &provider {
                app.hub
                    .free_idle(p, ctx.stream_id.as_deref().unwrap_or_default());
            }
            match app.leases.acquire(provider.as_deref(), LEASE_WAIT).await {
                Ok(l) => l,
                Err(full) => {
                    ctx.full = Some(full);
                    let mut e = Error::explain(ErrorType::HTTPStatus(503), "provider full");
                    e.set_retry(false);
                    return Err(e);
                }
            }
        }
    };
    ctx.lease = Some((provider, lease));
    Ok(())
}

async fn ask_resolver(app: &App, ctx: &mut RequestCtx) -> Option<url::Url> {
    if !resolver_left(ctx) {
        return None;
    }
    ctx.sel.resolver_calls += 1;
    let spec = ctx.spec.clone()?;
    let resolver = spec.failover_resolver_url.as_deref()?;
    let last = ctx
        .sel
        .candidates
        .last()
        .map(|u| u.to_string())
        .unwrap_or_default();
    let index = sources::failover_index(ctx.sel.candidates.len().saturating_sub(1));
    let reason = ctx.sel.last_reason();
    let next = sources::ask_resolver(
        &app.http,
        resolver,
        &spec,
        &last,
        index,
        ctx.sel.last_status,
        &reason,
    )
    .await?;
    // A resolver naming a source that already failed in this request ends it.
    (!ctx.sel.candidates.contains(&next)).then_some(next)
}

pub fn build_request(
    app: &App,
    session: &Session,
    upstream_request: &mut RequestHeader,
    ctx: &RequestCtx,
) -> Result<()> {
    let (Some(target), Some(spec)) = (ctx.sel.target.as_ref(), ctx.spec.as_ref()) else {
        return Error::e_explain(ErrorType::InternalError, "no upstream target chosen");
    };
    let ua = app.user_agent_for(spec, target);
    let extra = app.headers_for(spec, target);
    *upstream_request = headers::upstream_request(session.req_header(), target, &ua, &extra)?;
    Ok(())
}

pub fn connect_failed(app: &App, ctx: &mut RequestCtx, mut e: Box<Error>) -> Box<Error> {
    app.metrics.upstream_error(match e.etype() {
        ErrorType::ConnectTimedout => UpstreamErrorKind::Timeout,
        _ => UpstreamErrorKind::Connect,
    });
    tracing::warn!(stream_id = ?ctx.stream_id, source = ctx.sel.pos, error = ?e.etype(), "cannot connect to source");
    ctx.sel
        .fail(SourceFailure::Failed, format!("connect: {:?}", e.etype()));
    e.set_retry(can_continue(ctx));
    e
}

/// 404/410 say "not there"; these say "not for you, not now": try elsewhere.
fn is_failover_status(status: u16) -> bool {
    matches!(status, 401 | 403 | 404 | 407 | 410 | 429 | 451) || status >= 500
}

fn retry_error(status: u16, what: &'static str) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(status), what)
}

pub fn response_header(app: &App, resp: &mut ResponseHeader, ctx: &mut RequestCtx) -> Result<()> {
    let status = resp.status.as_u16();
    ctx.sel.last_status = Some(status);
    if matches!(status, 301 | 302 | 303 | 307 | 308) {
        let next = resp
            .headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|loc| ctx.sel.target.as_ref()?.join(loc.trim()).ok());
        ctx.sel.wants_retry = true;
        let followed = match next {
            Some(next) => ctx.sel.redirect(next, app.config.upstream.max_redirects),
            None => Err("redirect without a usable Location"),
        };
        if let Err(why) = followed {
            app.metrics.upstream_error(UpstreamErrorKind::Redirect);
            tracing::warn!(stream_id = ?ctx.stream_id, source = ctx.sel.pos, why, "redirect not followed");
            ctx.sel.fail(SourceFailure::Failed, why);
        }
        return Err(retry_error(status, "redirect"));
    }
    if is_failover_status(status) {
        let kind = if matches!(status, 404 | 410) {
            SourceFailure::NotFound
        } else {
            SourceFailure::Failed
        };
        tracing::warn!(stream_id = ?ctx.stream_id, source = ctx.sel.pos, status, "source answered an error");
        app.metrics.upstream_error(UpstreamErrorKind::Status);
        ctx.sel.wants_retry = true;
        ctx.sel.fail(kind, format!("HTTP {status}"));
        if let Some(g) = &ctx.guard {
            g.stream
                .errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        return Err(retry_error(status, "source failed"));
    }
    ctx.committed = true;
    if let Some(g) = &ctx.guard {
        g.stream.started(|| {
            serde_json::json!({
                "mode": "direct_proxy",
                "client_id": g.client.id,
                "source_index": sources::failover_index(ctx.sel.pos),
            })
        });
    }
    headers::scrub_response(resp);
    if !resp.headers.contains_key(header::CONTENT_TYPE) {
        if let Some(t) = &ctx.sel.target {
            resp.insert_header(header::CONTENT_TYPE, headers::content_type_for(t))?;
        }
    }
    if record_source(ctx) {
        app.metrics.failover(FailoverReason::Status);
    }
    Ok(())
}

/// A request that had to fail over moves the stream's current source, so the
/// next request starts on the one that works.
fn record_source(ctx: &RequestCtx) -> bool {
    let (Some(g), Some(spec)) = (&ctx.guard, &ctx.spec) else {
        return false;
    };
    let Some(source) = ctx.sel.candidates.get(ctx.sel.pos) else {
        return false;
    };
    let url = source.as_str();
    let current = g.stream.failover();
    if current.current_url == url {
        return false;
    }
    let index = if url == spec.url {
        -1
    } else {
        spec.failover_urls
            .iter()
            .position(|u| u == url)
            .map_or(current.index + 1, |i| i as i64)
    };
    tracing::warn!(stream_id = %g.stream.id, index, "stream failed over");
    let reason = ctx.sel.last_reason();
    g.stream.record_failover(index, url, &reason);
    true
}

pub fn error_while_proxy(
    app: &App,
    session: &Session,
    ctx: &mut RequestCtx,
    mut e: Box<Error>,
) -> Box<Error> {
    if ctx.committed || session.response_written().is_some() {
        e.set_retry(false);
        return e;
    }
    if !std::mem::take(&mut ctx.sel.wants_retry) {
        // Reset, timeout or garbage before a usable header: this source failed.
        app.metrics.upstream_error(match e.etype() {
            ErrorType::ReadTimedout => UpstreamErrorKind::Timeout,
            _ => UpstreamErrorKind::Read,
        });
        tracing::warn!(stream_id = ?ctx.stream_id, source = ctx.sel.pos, error = ?e.etype(), "source failed before the first byte");
        ctx.sel
            .fail(SourceFailure::Failed, format!("{:?}", e.etype()));
    }
    e.set_retry(can_continue(ctx));
    e
}
