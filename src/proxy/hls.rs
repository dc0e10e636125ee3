//! HLS through the proxy. Playlists come from the shared fetcher (one provider
//! fetch for all viewers) and are rewritten per viewer: every URI becomes a
//! signed `{root}/hls/{id}/playlist.m3u8?t=` or `…/segment.ts?t=` reference
//! (m3u-editor's nginx forwards only those two names, API-COMPAT.md §5). There
//! is no endpoint that fetches a URL a client wrote: a request names a token,
//! and only URLs a playlist of that stream referenced have one.
//!
//! The rewrite runs on the cached upstream playlist in `request_filter` rather
//! than in Pingora's response body filter: a body filter runs once per client
//! request, and R2 wants one provider fetch shared by every viewer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use url::Url;

use super::ctx::RequestCtx;
use super::{request, respond};
use crate::app::App;
use crate::hls::fetch::{FetchError, Playlist, MSN_DIRECTIVE, PART_DIRECTIVE};
use crate::hls::rewrite::{self, Kind};
use crate::hls::token::Claims;
use crate::registry::{ClientGuard, Refused, Stream};
use crate::upstream::sources;

const PLAYLIST_TYPE: &str = "application/vnd.apple.mpegurl";
/// An HLS viewer that asked for nothing for this long has left (no socket to
/// watch): a few target durations, so a stop is reported within seconds.
const MIN_IDLE: Duration = Duration::from_secs(6);
/// After a source switch, media playlists carry an EXT-X-DISCONTINUITY at the
/// top for this long, so viewers of the old source resync (RFC 8216 §4.3.2.3).
const SWITCH_WINDOW: Duration = Duration::from_secs(30);

/// Which resource a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    Playlist,
    Segment,
}

/// `{public_url}{root_path}` or `{root_path}`: the prefix of minted URIs.
pub(super) fn prefix(app: &App) -> String {
    let root = &app.config.server.root_path;
    match &app.config.server.public_url {
        Some(u) => format!("{}{}", u.as_str().trim_end_matches('/'), root),
        None => root.clone(),
    }
}

fn idle_for(playlist: Option<&Playlist>) -> Duration {
    let target = playlist
        .and_then(|p| p.info.target_duration)
        .map(|t| Duration::from_secs_f64((t * 3.0).clamp(0.0, 120.0)))
        .unwrap_or(MIN_IDLE);
    target.max(MIN_IDLE)
}

pub(super) async fn write(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    content_type: &str,
    extra: &[(http::HeaderName, String)],
    body: Bytes,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(6))?;
    resp.insert_header(header::CONTENT_TYPE, content_type)?;
    resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    respond::open_cors(&mut resp)?;
    for (k, v) in extra {
        resp.insert_header(k.clone(), v.as_str())?;
    }
    let head = session.req_header().method == http::Method::HEAD;
    ctx.local_status = Some(status);
    session.write_response_header(Box::new(resp), head).await?;
    if !head {
        if !ctx.first_byte {
            ctx.first_byte = true;
            app.metrics
                .join_seconds
                .observe(ctx.started.elapsed().as_secs_f64());
        }
        app.metrics.bytes_out.inc_by(body.len() as u64);
        ctx.bytes_out += body.len() as u64;
        if let Some(g) = &ctx.guard {
            g.client.add_bytes(body.len() as u64);
            g.stream
                .bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
        }
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

pub(super) fn attach(
    app: &App,
    session: &Session,
    stream: &Arc<Stream>,
    claims: Option<&Claims>,
    idle: Duration,
) -> Result<ClientGuard, Refused> {
    let id = request::client_id(session).or_else(|| claims.and_then(|c| c.client_id.clone()));
    if let Some(guard) = id.as_deref().and_then(|id| app.registry.rejoin(stream, id)) {
        return Ok(guard);
    }
    let mut hello = request::hello(session);
    if hello.explicit_id.is_none() {
        hello.explicit_id = id;
    }
    if hello.username.is_none() {
        hello.username = claims.and_then(|c| c.username.clone());
    }
    app.registry.attach_hls(stream, &hello, idle)
}

/// `GET /hls/{id}/playlist.m3u8[?t=]`, and `/stream/{id}` of an HLS stream.
pub async fn serve(
    app: &Arc<App>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    stream: &Arc<Stream>,
    asked: Asked,
) -> Result<bool> {
    if let Some(t) = stream.spec().transcode.as_ref().filter(|t| t.hls) {
        return super::packaged::serve(app, session, ctx, stream, asked, t).await;
    }
    let claims = match request::query_param(session, "t") {
        Some(t) => match app.signer.verify(&stream.id, &t) {
            Ok(c) => Some(c),
            Err(e) => {
                ctx.local_status = Some(403);
                respond::error(session, 403, &format!("Invalid stream reference: {e}")).await?;
                return Ok(true);
            }
        },
        None if asked == Asked::Segment => {
            ctx.local_status = Some(403);
            respond::error(session, 403, "A signed reference (?t=) is required").await?;
            return Ok(true);
        }
        None => None,
    };
    match (asked, claims.as_ref().map(|c| c.kind)) {
        (Asked::Playlist, None | Some(Kind::Playlist)) => {
            playlist(app, session, ctx, stream, claims).await
        }
        (Asked::Segment, Some(Kind::Segment | Kind::Key | Kind::Map)) => {
            segment(app, session, ctx, stream, claims).await
        }
        _ => {
            ctx.local_status = Some(403);
            respond::error(session, 403, "Reference is for another kind of resource").await?;
            Ok(true)
        }
    }
}

/// The Playlist-kind URIs of a master playlist, in document order.
fn variants(p: &Playlist) -> Vec<Url> {
    let mut out = Vec::new();
    let _ = rewrite::rewrite(&p.body, &p.base, &mut |u, kind, _| {
        if kind == Kind::Playlist {
            out.push(u.clone());
        }
        "x".into()
    });
    out
}

/// Fetches the stream's own playlist, failing over through its sources.
async fn main_playlist(
    app: &App,
    stream: &Arc<Stream>,
) -> std::result::Result<(Url, Arc<Playlist>), FetchError> {
    let spec = stream.spec();
    // The source the stream is on almost always answers (from the shared
    // cache): the other sources are parsed only when it does not.
    let current = stream.current_source();
    let others = || {
        sources::static_sources(&spec)
            .into_iter()
            .filter(|u| Some(u) != current.as_ref())
    };
    let candidates = current
        .clone()
        .into_iter()
        .chain(std::iter::once_with(others).flatten());
    let mut last = FetchError::Connect;
    let mut all_not_found = true;
    for (i, url) in candidates.enumerate() {
        match app.hls.playlist(app, &stream.id, &spec, &url).await {
            Ok(p) => {
                if i > 0 {
                    switch_to(stream, &spec, &url, &format!("playlist: {last}"));
                }
                return Ok((url, p));
            }
            Err(e) => {
                tracing::warn!(stream_id = %stream.id, error = %e, "HLS source failed");
                all_not_found &= matches!(e, FetchError::Status(404 | 410));
                stream.errors.fetch_add(1, Ordering::Relaxed);
                last = e;
            }
        }
    }
    stream.emit(
        crate::events::EventType::StreamFailed,
        serde_json::json!({ "error": last.to_string(), "error_type": "all_sources_failed", "mode": "hls" }),
    );
    if all_not_found {
        return Err(FetchError::Status(404));
    }
    Err(last)
}

/// Moves the stream to `url` (a source that answered) and starts the
/// discontinuity window.
fn switch_to(stream: &Stream, spec: &crate::registry::StreamSpec, url: &Url, reason: &str) {
    let index = if url.as_str() == spec.url {
        -1
    } else {
        spec.failover_urls
            .iter()
            .position(|u| u == url.as_str())
            .map_or(stream.failover().index + 1, |i| i as i64)
    };
    tracing::warn!(stream_id = %stream.id, index, "HLS stream failed over");
    stream.record_failover(index, url.as_str(), reason);
}

/// A variant of the current source at the same position as `old` had in the
/// previous source's master: how a viewer keeps playing across a failover.
async fn remap_variant(app: &App, stream: &Arc<Stream>, old: &Url) -> Option<(Url, Arc<Playlist>)> {
    let spec = stream.spec();
    let masters: Vec<Url> = sources::static_sources(&spec);
    let position = masters.iter().find_map(|m| {
        let p = app.hls.cached_playlist(&stream.id, m)?;
        variants(&p).iter().position(|v| v == old)
    })?;
    let (_, master) = main_playlist(app, stream).await.ok()?;
    let target = variants(&master).get(position).cloned()?;
    let p = app
        .hls
        .playlist(app, &stream.id, &spec, &target)
        .await
        .ok()?;
    Some((target, p))
}

async fn playlist(
    app: &Arc<App>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    stream: &Arc<Stream>,
    claims: Option<Claims>,
) -> Result<bool> {
    let spec = stream.spec();
    let fetched = match &claims {
        None => main_playlist(app, stream).await,
        Some(c) => match Url::parse(&c.url) {
            Err(_) => Err(FetchError::Malformed("bad reference".into())),
            Ok(u) => match app.hls.playlist(app, &stream.id, &spec, &u).await {
                Ok(p) => Ok((u, p)),
                Err(e) => {
                    // The variant's source failed: fail over the stream and
                    // serve the same variant of the next source.
                    tracing::warn!(stream_id = %stream.id, error = %e, "HLS variant failed");
                    match remap_variant(app, stream, &u).await {
                        Some(found) => Ok(found),
                        None => Err(e),
                    }
                }
            },
        },
    };
    let (url, p) = match fetched {
        Ok(x) => x,
        Err(e) => return refuse(session, ctx, stream, &e).await,
    };
    let p = match hold_for_reload(app, session, stream, &spec, &url, p).await {
        Ok(p) => p,
        Err(why) => {
            ctx.local_status = Some(400);
            respond::error(session, 400, why).await?;
            return Ok(true);
        }
    };
    stream.started(|| serde_json::json!({ "mode": "hls" }));
    let guard = match attach(app, session, stream, claims.as_ref(), idle_for(Some(&p))) {
        Ok(g) => g,
        Err(why) => {
            respond::refused(app, session, ctx, why).await?;
            return Ok(true);
        }
    };
    let client = guard.client.clone();
    ctx.guard = Some(guard);
    let recently_switched = stream
        .last_failover_time()
        .is_some_and(|t| (chrono::Utc::now() - t).to_std().unwrap_or_default() < SWITCH_WINDOW)
        && !p.info.is_master;
    let reuse = client
        .rendered
        .lock()
        .as_ref()
        .filter(|r| r.generation == p.generation && r.discontinuity == recently_switched)
        .map(|r| r.body.clone());
    if let Some(body) = reuse {
        let headers = [(header::CACHE_CONTROL, "no-cache".to_string())];
        write(app, session, ctx, 200, PLAYLIST_TYPE, &headers, body).await?;
        return Ok(true);
    }
    let client_id = client.id.clone();
    let username = client.username.clone();
    let root = prefix(app);
    let signer = &app.signer;
    let id = stream.id.clone();
    let mut mint = |u: &Url, kind: Kind, _: &str| {
        let t = signer.mint(&Claims {
            stream_id: id.clone(),
            url: u.to_string(),
            kind,
            client_id: Some(client_id.clone()),
            username: username.clone(),
        });
        format!("{root}/hls/{id}/{}?t={t}", kind.file_name())
    };
    let out = match rewrite::rewrite(&p.body, &p.base, &mut mint) {
        Ok(r) => r,
        Err(e) => {
            ctx.local_status = Some(502);
            respond::error(session, 502, &format!("Bad playlist from the source: {e}")).await?;
            return Ok(true);
        }
    };
    let mut body = out.body;
    if recently_switched {
        body = with_discontinuity(&body);
    }
    let body = Bytes::from(body);
    *client.rendered.lock() = Some(crate::registry::Rendered {
        generation: p.generation,
        discontinuity: recently_switched,
        body: body.clone(),
    });
    let headers = [(header::CACHE_CONTROL, "no-cache".to_string())];
    write(app, session, ctx, 200, PLAYLIST_TYPE, &headers, body).await?;
    Ok(true)
}

/// An LL-HLS blocking reload (RFC 8216bis §6.2.5.2): `_HLS_msn`/`_HLS_part`
/// hold the request until the playlist has that segment or part. Players only
/// send them because the provider's playlist advertised CAN-BLOCK-RELOAD (it
/// reaches them unchanged), so without that the query is ignored. Errors are
/// the §6.2.5.2 client errors, answered 400.
async fn hold_for_reload(
    app: &App,
    session: &Session,
    stream: &Stream,
    spec: &crate::registry::StreamSpec,
    url: &Url,
    p: Arc<Playlist>,
) -> std::result::Result<Arc<Playlist>, &'static str> {
    if !p.info.can_block_reload || p.info.is_master || p.info.endlist {
        return Ok(p);
    }
    let msn = request::query_param(session, MSN_DIRECTIVE);
    let part = request::query_param(session, PART_DIRECTIVE);
    let (msn, part) = match (msn, part) {
        (None, None) => return Ok(p),
        (Some(m), part) => {
            let m = m
                .parse::<u64>()
                .map_err(|_| "_HLS_msn must be a non-negative integer")?;
            let part = part
                .map(|v| v.parse::<u64>())
                .transpose()
                .map_err(|_| "_HLS_part must be a non-negative integer")?;
            (m, part)
        }
        (None, Some(_)) => return Err("_HLS_part needs _HLS_msn"),
    };
    if p.info.has(msn, part) {
        return Ok(p);
    }
    // §6.2.5.2: more than two segments past the playlist's last one.
    if msn > p.info.next_msn().saturating_add(1) {
        return Err("_HLS_msn is more than two segments ahead of the live playlist");
    }
    Ok(app
        .hls
        .playlist_at(app, &stream.id, spec, url, msn, part)
        .await
        .unwrap_or(p))
}

/// Inserts `#EXT-X-DISCONTINUITY` before the first media segment (its EXTINF).
fn with_discontinuity(body: &[u8]) -> Vec<u8> {
    let needle = b"#EXTINF";
    let at = body
        .windows(needle.len())
        .position(|w| w == needle)
        .filter(|&i| i == 0 || body[i - 1] == b'\n');
    match at {
        Some(i) if !body[..i].ends_with(b"#EXT-X-DISCONTINUITY\n") => {
            let eol: &[u8] = if body[..i].ends_with(b"\r\n") {
                b"\r\n"
            } else {
                b"\n"
            };
            let mut out = Vec::with_capacity(body.len() + 24);
            out.extend_from_slice(&body[..i]);
            out.extend_from_slice(b"#EXT-X-DISCONTINUITY");
            out.extend_from_slice(eol);
            out.extend_from_slice(&body[i..]);
            out
        }
        _ => body.to_vec(),
    }
}

/// Answers a failed fetch with its status and a JSON error naming the stream.
async fn refuse(
    session: &mut Session,
    ctx: &mut RequestCtx,
    stream: &Stream,
    e: &FetchError,
) -> Result<bool> {
    let code = e.client_status();
    ctx.local_status = Some(code);
    respond::error(session, code, &format!("{e} (stream {})", stream.id)).await?;
    Ok(true)
}

fn default_type(kind: Kind, url: &Url) -> &'static str {
    match kind {
        Kind::Key => "application/octet-stream",
        Kind::Map => "video/mp4",
        _ => crate::upstream::headers::content_type_for(url),
    }
}

async fn segment(
    app: &Arc<App>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    stream: &Arc<Stream>,
    claims: Option<Claims>,
) -> Result<bool> {
    let Some(c) = claims else {
        return Ok(true);
    };
    let Ok(url) = Url::parse(&c.url) else {
        ctx.local_status = Some(403);
        respond::error(session, 403, "Invalid stream reference").await?;
        return Ok(true);
    };
    let spec = stream.spec();
    let guard = match attach(
        app,
        session,
        stream,
        Some(&c),
        MIN_IDLE.max(Duration::from_secs(10)),
    ) {
        Ok(g) => g,
        Err(why) => {
            respond::refused(app, session, ctx, why).await?;
            return Ok(true);
        }
    };
    ctx.guard = Some(guard);
    let range = session
        .req_header()
        .headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // A failed segment is tried once more on the same source.
    let mut result = app.hls.segment(app, &spec, &url, range.as_deref()).await;
    if result.as_ref().map_or(true, |f| f.status >= 500) {
        result = app.hls.segment(app, &spec, &url, range.as_deref()).await;
    }
    let f = match result {
        Ok(f) if f.status < 400 => f,
        result => {
            fail_over_after_segment(stream);
            let e = match result {
                Ok(f) => FetchError::Status(f.status),
                Err(e) => e,
            };
            return refuse(session, ctx, stream, &e).await;
        }
    };
    if let Some(g) = &ctx.guard {
        g.client.segments.fetch_add(1, Ordering::Relaxed);
    }
    stream.segments.fetch_add(1, Ordering::Relaxed);
    let ct = f
        .content_type
        .clone()
        .unwrap_or_else(|| default_type(c.kind, &url).to_string());
    let mut extra = vec![(header::CACHE_CONTROL, "no-cache".to_string())];
    if let Some(cr) = &f.content_range {
        extra.push((header::CONTENT_RANGE, cr.clone()));
    }
    if range.is_none() {
        extra.push((header::ACCEPT_RANGES, "bytes".into()));
    }
    write(app, session, ctx, f.status, &ct, &extra, f.body).await?;
    Ok(true)
}

/// A live segment that failed twice moves the stream to its next source; the
/// viewer's next playlist poll gets the new source with a discontinuity.
fn fail_over_after_segment(stream: &Arc<Stream>) {
    let spec = stream.spec();
    let f = stream.failover();
    let all = sources::static_sources(&spec);
    if all.len() < 2 {
        return;
    }
    let cur = all
        .iter()
        .position(|u| u.as_str() == f.current_url)
        .unwrap_or(0);
    let next = &all[(cur + 1) % all.len()];
    switch_to(stream, &spec, next, "segment failed twice");
}
