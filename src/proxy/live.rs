//! Serving a live channel from the hub: the response is written from
//! `request_filter` (no per-client upstream), one large write per batch, and
//! the client's departure is noticed at once by waiting on its socket while
//! waiting for data (DESIGN.md, Pingora facts).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::header;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use serde_json::json;

use super::ctx::RequestCtx;
use super::{request, respond};
use crate::app::App;
use crate::hub::{JoinError, Next};
use crate::metrics::DropReason;
use crate::registry::Stream;

/// Bytes handed to one viewer per write: large writes keep the send() count,
/// which dominates fan-out cost, low (DESIGN.md).
const BATCH: usize = 64 * 1024;

/// How a request for `/stream/{id}` is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Shared live hub.
    Hub,
    /// Per-client proxying (files).
    Proxy,
    /// HLS: rewritten playlists and shared segments.
    Hls,
}

/// The live-or-file rule: the stream's `live` flag wins; else what an earlier
/// upstream response showed; else the URL: file extensions and Xtream VOD
/// paths are files, `.m3u8` is relayed, and anything else goes to the hub,
/// whose first response decides (a response with a Content-Length is a file).
pub fn mode(stream: &Stream) -> Mode {
    if stream.is_detected_hls() {
        return Mode::Hls;
    }
    let spec = stream.spec();
    let path = url::Url::parse(&spec.url)
        .map(|u| u.path().to_ascii_lowercase())
        .unwrap_or_default();
    if path.ends_with(".m3u8") || path.ends_with(".m3u") {
        return Mode::Hls;
    }
    match stream.is_live() {
        Some(true) => return Mode::Hub,
        Some(false) => return Mode::Proxy,
        None => {}
    }
    let file_ext = [
        ".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".mp3", ".aac",
    ];
    let vod_path = ["/movie/", "/series/", "/timeshift/"];
    if file_ext.iter().any(|e| path.ends_with(e)) || vod_path.iter().any(|p| path.contains(p)) {
        Mode::Proxy
    } else {
        Mode::Hub
    }
}

fn live_header() -> Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(200, Some(6))?;
    resp.insert_header(header::CONTENT_TYPE, "video/mp2t")?;
    resp.insert_header(header::CACHE_CONTROL, "no-cache, no-store")?;
    resp.insert_header(header::ACCEPT_RANGES, "none")?;
    // Close-delimited body: no chunk framing per write (DESIGN.md measured it cheaper).
    resp.insert_header(header::CONNECTION, "close")?;
    Ok(resp)
}

/// Serves a live viewer. `Ok(false)` hands the request to per-client proxying
/// (the channel turned out to be a file).
pub async fn serve(
    app: &Arc<App>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    stream: &Arc<Stream>,
) -> Result<bool> {
    if session.req_header().method == http::Method::HEAD {
        // A probe opens nothing at the provider (R1).
        ctx.local_status = Some(200);
        session
            .write_response_header(Box::new(live_header()?), true)
            .await?;
        return Ok(true);
    }
    let guard = app.registry.attach(stream, &request::hello(session));
    let client = guard.client.clone();
    ctx.guard = Some(guard);
    let mut viewer = match app.hub.join(app, stream).await {
        Ok(v) => v,
        Err(JoinError::File) => return Ok(false),
        Err(JoinError::Hls) => {
            ctx.guard = None;
            return super::hls::serve(app, session, ctx, stream, super::hls::Asked::Playlist).await;
        }
        Err(JoinError::Full(full)) => {
            ctx.local_status = Some(503);
            app.metrics
                .provider_rejections
                .with_label_values(&[full.provider.as_str()])
                .inc();
            let body = json!({
                "detail": format!(
                    "Provider {} is at its connection limit ({})",
                    full.provider, full.max_connections
                ),
                "provider": full.provider,
                "max_connections": full.max_connections,
            });
            respond::json(session, 503, &body).await?;
            return Ok(true);
        }
        Err(JoinError::Unavailable(code)) => {
            ctx.local_status = Some(code);
            let msg = if code == 404 {
                "Stream source not found"
            } else {
                "Every source of the stream failed"
            };
            respond::error(session, code, &format!("{msg} (stream {})", stream.id)).await?;
            return Ok(true);
        }
        Err(JoinError::Failed(why)) => {
            tracing::warn!(stream_id = %stream.id, reason = %why, "live join failed");
            ctx.local_status = Some(502);
            respond::error(
                session,
                502,
                &format!("Every source of the stream failed (stream {})", stream.id),
            )
            .await?;
            return Ok(true);
        }
    };
    ctx.local_status = Some(200);
    // A viewer whose socket accepts nothing for this long is as good as gone.
    let write_timeout = app.config.live.ring_seconds.max(Duration::from_secs(2));
    session
        .as_downstream_mut()
        .set_write_timeout(Some(write_timeout));
    session
        .write_response_header(Box::new(live_header()?), false)
        .await?;
    let cancel = client.cancel.clone();
    loop {
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                app.metrics.client_drop(DropReason::Api);
                break;
            }
            // Any read outcome (FIN, error, stray bytes) means the player is done.
            _ = session.as_downstream_mut().read_body_or_idle(true) => break,
            n = viewer.next(BATCH) => n,
        };
        match next {
            Next::Data(b) => {
                let n = b.len() as u64;
                if let Err(e) = session.write_response_body(Some(b), false).await {
                    if matches!(e.etype(), ErrorType::WriteTimedout) {
                        // The socket took nothing for the whole window: a stuck player.
                        viewer.count_slow_drop();
                        app.metrics.client_drop(DropReason::Slow);
                        tracing::warn!(stream_id = %stream.id, client = %client.id, "viewer too slow: write timed out, dropped");
                    }
                    break;
                }
                if !ctx.first_byte {
                    ctx.first_byte = true;
                    app.metrics
                        .join_seconds
                        .observe(ctx.started.elapsed().as_secs_f64());
                }
                ctx.bytes_out += n;
                app.metrics.bytes_out.inc_by(n);
                client.add_bytes(n);
                stream.bytes.fetch_add(n, Ordering::Relaxed);
            }
            Next::Lagged => {
                app.metrics.client_drop(DropReason::Slow);
                tracing::warn!(stream_id = %stream.id, client = %client.id, "viewer too slow: fell behind the ring, dropped");
                break;
            }
            Next::Ended => {
                app.metrics.client_drop(DropReason::Ended);
                break;
            }
        }
    }
    Ok(true)
}
