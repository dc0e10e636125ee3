//! `/hls/{id}/…` of a transcode that asked for HLS: the playlist and
//! segments of its in-memory packager (`transcode::packager`), with segment
//! references signed like any HLS (never a path or a URL a client wrote).

use std::sync::Arc;
use std::time::Duration;

use http::header;
use pingora::prelude::*;
use pingora::proxy::Session;

use super::ctx::RequestCtx;
use super::hls::{attach, prefix, write, Asked};
use super::{request, respond};
use crate::app::App;
use crate::hls::rewrite::Kind;
use crate::hls::token::Claims;
use crate::registry::{Stream, TranscodeSpec};
use crate::transcode::template::DEFAULT_HLS_TIME;

const PLAYLIST_TYPE: &str = "application/vnd.apple.mpegurl";
/// The references name segments by this pseudo-URL, signed; it is never fetched.
const SEGMENT_BASE: &str = "http://packaged.m3u-edge.invalid/segment/";
/// Segments the first playlist waits for: one, so a player starts as soon
/// as there is anything to play (later playlists list up to hls_list_size).
const FIRST_PLAYLIST: u64 = 1;

pub async fn serve(
    app: &Arc<App>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    stream: &Arc<Stream>,
    asked: Asked,
    t: &TranscodeSpec,
) -> Result<bool> {
    let claims = match request::query_param(session, "t") {
        Some(tok) => match app.signer.verify(&stream.id, &tok) {
            Ok(c) => Some(c),
            Err(e) => {
                return refuse(session, ctx, 403, &format!("Invalid stream reference: {e}")).await
            }
        },
        None => None,
    };
    let target = t.hls_time.unwrap_or(DEFAULT_HLS_TIME);
    let idle = Duration::from_secs_f64((target * 3.0).clamp(6.0, 120.0));
    let guard = match attach(app, session, stream, claims.as_ref(), idle) {
        Ok(g) => g,
        Err(why) => {
            respond::refused(app, session, ctx, why).await?;
            return Ok(true);
        }
    };
    let client_id = guard.client.id.clone();
    let username = guard.client.username.clone();
    ctx.guard = Some(guard);
    let packager = app
        .packagers
        .get_or_start(app, stream, target, t.hls_list_size);
    match (asked, claims) {
        (Asked::Segment, Some(c)) if c.kind == Kind::Segment => {
            let seg = c
                .url
                .strip_prefix(SEGMENT_BASE)
                .and_then(|s| s.strip_suffix(".ts"))
                .and_then(|s| s.parse::<u64>().ok())
                .and_then(|seq| packager.segment(seq));
            let Some(seg) = seg else {
                return refuse(session, ctx, 404, "Segment no longer available").await;
            };
            let headers = [(header::CACHE_CONTROL, "max-age=60".to_string())];
            write(app, session, ctx, 200, "video/mp2t", &headers, seg.data).await?;
            Ok(true)
        }
        (Asked::Playlist, None) => {
            // A cold start: the source, ffmpeg and two segments.
            let wait = app.config.upstream.connect_timeout
                + app.config.upstream.read_timeout
                + Duration::from_secs_f64(target * (FIRST_PLAYLIST as f64 + 1.0));
            // Not ready: the packager keeps running while this client is
            // listed, and a player that retries gets the playlist when it is there.
            let ready = packager.ready(FIRST_PLAYLIST, wait).await;
            if ready {
                stream.started(|| serde_json::json!({ "mode": "transcode_hls" }));
            }
            let root = prefix(app);
            let id = stream.id.clone();
            let signer = &app.signer;
            let body = ready.then(|| {
                packager.playlist(|seq| {
                    let tok = signer.mint(&Claims {
                        stream_id: id.clone(),
                        url: format!("{SEGMENT_BASE}{seq}.ts"),
                        kind: Kind::Segment,
                        client_id: Some(client_id.clone()),
                        username: username.clone(),
                    });
                    format!("{root}/hls/{id}/segment.ts?t={tok}")
                })
            });
            let Some(body) = body.flatten() else {
                return refuse(
                    session,
                    ctx,
                    503,
                    "Transcoded HLS is starting; retry shortly",
                )
                .await;
            };
            let headers = [(header::CACHE_CONTROL, "no-cache".to_string())];
            write(app, session, ctx, 200, PLAYLIST_TYPE, &headers, body.into()).await?;
            Ok(true)
        }
        _ => {
            refuse(
                session,
                ctx,
                403,
                "Reference is for another kind of resource",
            )
            .await
        }
    }
}

async fn refuse(session: &mut Session, ctx: &mut RequestCtx, code: u16, msg: &str) -> Result<bool> {
    ctx.local_status = Some(code);
    respond::error(session, code, msg).await?;
    Ok(true)
}
