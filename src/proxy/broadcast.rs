//! `/broadcast/{id}/live.m3u8` and `/broadcast/{id}/segment/liveN.ts`: a
//! network's playlist (rendered by `broadcast::window`) and its segment
//! files. Open like m3u-proxy's (m3u-editor fetches the playlist and sends
//! players here for segments). The segment route serves only names
//! `live<digits>.ts` inside that network's own directory: no other name,
//! no path. Each request counts as a viewer of the network, listed and
//! evented like an HLS viewer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method};
use pingora::prelude::*;
use pingora::proxy::Session;

use super::ctx::RequestCtx;
use super::hls::write;
use super::{request, respond};
use crate::app::App;
use crate::broadcast::network::Network;

const PLAYLIST_TYPE: &str = "application/vnd.apple.mpegurl";
/// A viewer that asked for nothing for this long has left (a few segments).
const MIN_IDLE: Duration = Duration::from_secs(12);

async fn refuse(session: &mut Session, ctx: &mut RequestCtx, code: u16, msg: &str) -> Result<bool> {
    ctx.local_status = Some(code);
    respond::error(session, code, msg).await?;
    Ok(true)
}

/// Serves the playlist (`segment` None) or a segment of network `id`.
pub async fn serve(
    app: &Arc<App>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    id: &str,
    segment: Option<&str>,
) -> Result<bool> {
    let method = session.req_header().method.clone();
    if method != Method::GET && method != Method::HEAD {
        ctx.local_status = Some(405);
        respond::method_not_allowed(session, "GET, HEAD", respond::Cors::Open).await?;
        return Ok(true);
    }
    let Some(net) = app.broadcasts.get(id) else {
        return refuse(session, ctx, 404, "Broadcast not found").await;
    };
    match segment {
        None => {
            let Some(body) = net.playlist() else {
                return refuse(session, ctx, 404, "Playlist not available").await;
            };
            if !attach(app, session, ctx, &net).await? {
                return Ok(true);
            }
            let headers = [
                (
                    header::CACHE_CONTROL,
                    "no-cache, no-store, must-revalidate".to_string(),
                ),
                (header::PRAGMA, "no-cache".to_string()),
            ];
            write(app, session, ctx, 200, PLAYLIST_TYPE, &headers, body.into()).await?;
        }
        Some(name) => {
            let Some(path) = net.segment_path(name) else {
                return refuse(session, ctx, 404, "Segment not found").await;
            };
            let data = match tokio::fs::read(&path).await {
                Ok(d) => Bytes::from(d),
                Err(_) => return refuse(session, ctx, 404, "Segment not found").await,
            };
            if !attach(app, session, ctx, &net).await? {
                return Ok(true);
            }
            if let Some(g) = &ctx.guard {
                g.client
                    .segments
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            // Not cached: a fresh start (segment_start_number 0) reuses the
            // names live000000.ts... for new pictures.
            let headers = [(header::CACHE_CONTROL, "no-cache".to_string())];
            write(app, session, ctx, 200, "video/mp2t", &headers, data).await?;
        }
    }
    Ok(true)
}

/// Lists the request's viewer (a new one or one already listed); false
/// when a `limits.*` cap refused it (the 429 is sent).
async fn attach(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    net: &Network,
) -> Result<bool> {
    let viewers = &app.broadcasts.viewers;
    let stream = &net.viewers;
    let rejoined = request::client_id(session).and_then(|c| viewers.rejoin(stream, &c));
    let guard = match rejoined {
        Some(g) => Ok(g),
        None => viewers.attach_hls(stream, &request::hello(session), MIN_IDLE),
    };
    match guard {
        Ok(g) => {
            stream.started(|| serde_json::json!({ "mode": "broadcast" }));
            ctx.stream_id = Some(net.id.clone());
            ctx.guard = Some(g);
            Ok(true)
        }
        Err(why) => {
            respond::refused(app, session, ctx, why).await?;
            Ok(false)
        }
    }
}
