//! HLS through the proxy. Playlists come from the shared fetcher (one provider
//! fetch for all viewers) with every URI a signed `{root}/hls/{id}/playlist.m3u8?t=`
//! or `…/segment.ts?t=` reference (m3u-editor's nginx forwards only those two
//! names, API-COMPAT.md §5); one rendering per playlist generation is shared
//! by all viewers, and each viewer's answer adds its `client_id` after every
//! reference, so a viewer stays one client. There is no endpoint that fetches
//! a URL a client wrote: a request names a token, and only URLs a playlist of
//! that stream referenced have one.
//!
//! The rewrite runs on the cached upstream playlist in `request_filter` rather
//! than in Pingora's response body filter: a body filter runs once per client
//! request, and R2 wants one provider fetch shared by every viewer. Segments
//! are written as they arrive from the shared fetch (or streamed through for
//! objects too big to share), never buffered whole first.
//!
//! Media playlists are written through the timeline of the playlist URL the
//! player follows (`hls/timeline.rs`): across a failover or a provider that
//! restarted its media sequence, the numbers a player sees keep going up, with
//! one discontinuity, and its LL-HLS `_HLS_msn` is translated back.

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
use crate::hls::fetch::{
    FetchError, Flight, Opened, Playlist, Read, SegmentHead, SegmentSource, MSN_DIRECTIVE,
    PART_DIRECTIVE,
};
use crate::hls::render::{self, View};
use crate::hls::rewrite::{self, Kind};
use crate::hls::timeline::Mapping;
use crate::hls::token::Claims;
use crate::metrics::HlsLimit;
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
    crate::hls::render::prefix(&app.config)
}

fn idle_for(playlist: Option<&Playlist>) -> Duration {
    let target = playlist
        .and_then(|p| p.info.target_duration)
        .map(|t| Duration::from_secs_f64((t * 3.0).clamp(0.0, 120.0)))
        .unwrap_or(MIN_IDLE);
    target.max(MIN_IDLE)
}

/// Writes a response header: `len` as Content-Length, or chunked when the
/// length is not known yet. Returns whether a body follows (not for HEAD).
async fn start(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    content_type: &str,
    extra: &[(http::HeaderName, String)],
    len: Option<usize>,
) -> Result<bool> {
    let mut resp = ResponseHeader::build(status, Some(6))?;
    resp.insert_header(header::CONTENT_TYPE, content_type)?;
    match len {
        Some(n) => resp.insert_header(header::CONTENT_LENGTH, n)?,
        None => resp.insert_header(header::TRANSFER_ENCODING, "chunked")?,
    }
    respond::open_cors(&mut resp)?;
    for (k, v) in extra {
        resp.insert_header(k.clone(), v.as_str())?;
    }
    let head = session.req_header().method == http::Method::HEAD;
    ctx.local_status = Some(status);
    session
        .write_response_header(Box::new(resp), head || len == Some(0))
        .await?;
    Ok(!head && len != Some(0))
}

/// A whole response with a body known in full (the in-memory HLS of a
/// transcode).
pub(crate) async fn write(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    content_type: &str,
    extra: &[(http::HeaderName, String)],
    body: Bytes,
) -> Result<()> {
    if start(session, ctx, status, content_type, extra, Some(body.len())).await? {
        send(app, session, ctx, body, true).await?;
    }
    Ok(())
}

/// Writes (and accounts) a piece of the body.
async fn send(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    body: Bytes,
    last: bool,
) -> Result<()> {
    if !ctx.first_byte && !body.is_empty() {
        ctx.first_byte = true;
        app.metrics
            .join_seconds
            .observe(ctx.started.elapsed().as_secs_f64());
    }
    let n = body.len() as u64;
    app.metrics.bytes_out.inc_by(n);
    ctx.bytes_out += n;
    if let Some(g) = &ctx.guard {
        g.client.add_bytes(n);
        g.stream.bytes.fetch_add(n, Ordering::Relaxed);
    }
    session.write_response_body(Some(body), last).await
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
    if stream.spec().resolver.is_some() {
        // Its URL is a page for streamlink or yt-dlp, not a playlist.
        ctx.local_status = Some(404);
        let msg = format!("A resolver stream is MPEG-TS: play /stream/{}", stream.id);
        respond::error(session, 404, &msg).await?;
        return Ok(true);
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
    // The playlist URL this player follows: its numbering stays monotonic
    // whatever source or provider epoch feeds it (hls/timeline.rs).
    let lane = claims.as_ref().map_or("", |c| c.url.as_str());
    let map = |p: &Playlist| {
        if p.info.is_master {
            Mapping::default()
        } else {
            app.hls.lanes.map(&stream.id, lane, &p.source, &p.facts())
        }
    };
    let mapping = map(&p);
    let (p, mapping) =
        match hold_for_reload(app, session, stream, &spec, &url, p.clone(), &mapping).await {
            Ok(Some(later)) => {
                let m = map(&later);
                (later, m)
            }
            Ok(None) => (p, mapping),
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
    // Viewers that join a lane after a switch (they never saw the old
    // source) still get a discontinuity at the top for a while; a lane that
    // saw the switch has its own, exactly before the first new segment.
    let recently_switched = !mapping.continued
        && !p.info.is_master
        && stream
            .last_failover_time()
            .is_some_and(|t| (chrono::Utc::now() - t).to_std().unwrap_or_default() < SWITCH_WINDOW);
    // One rendering per playlist generation for every viewer (issue #14 d);
    // the viewer's identity is a suffix spliced in while writing.
    let suffix = render::viewer_suffix(&client.id, client.username.as_deref());
    let view = View {
        suffix: &suffix,
        discontinuity: mapping.discontinuity || recently_switched,
        msn_delta: mapping.msn_delta,
        discontinuity_sequence: mapping.discontinuity_sequence,
    };
    let len = p.rendered.len_for(&view);
    let max = app.config.hls.rendered_max_bytes;
    if len > max {
        app.metrics.hls_limit(HlsLimit::RenderedBytes);
        let e = FetchError::Limit(format!(
            "rewritten playlist too large ({len} bytes, hls.rendered_max_bytes is {max})"
        ));
        return refuse(session, ctx, stream, &e).await;
    }
    let headers = [(header::CACHE_CONTROL, "no-cache".to_string())];
    if start(session, ctx, 200, PLAYLIST_TYPE, &headers, Some(len)).await? {
        let mut pieces = p.rendered.pieces(&view).peekable();
        while let Some(piece) = pieces.next() {
            let last = pieces.peek().is_none();
            send(app, session, ctx, piece, last).await?;
        }
    }
    Ok(true)
}

/// An LL-HLS blocking reload (RFC 8216bis §6.2.5.2): `_HLS_msn`/`_HLS_part`
/// hold the request until the playlist has that segment or part. Players only
/// send them because the provider's playlist advertised CAN-BLOCK-RELOAD (it
/// reaches them unchanged), so without that the query is ignored. `_HLS_msn`
/// is in the numbering the player was served (`mapping`), translated to the
/// provider's here. Errors are the §6.2.5.2 client errors, answered 400.
/// `Ok(Some)` is a later playlist to serve instead of `p`.
async fn hold_for_reload(
    app: &App,
    session: &Session,
    stream: &Stream,
    spec: &crate::registry::StreamSpec,
    url: &Url,
    p: Arc<Playlist>,
    mapping: &Mapping,
) -> std::result::Result<Option<Arc<Playlist>>, &'static str> {
    if !p.info.can_block_reload || p.info.is_master || p.info.endlist {
        return Ok(None);
    }
    let msn = request::query_param(session, MSN_DIRECTIVE);
    let part = request::query_param(session, PART_DIRECTIVE);
    let (msn, part) = match (msn, part) {
        (None, None) => return Ok(None),
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
    // Before this epoch of the lane: the playlist has it.
    let Some(msn) = mapping.to_provider(msn) else {
        return Ok(None);
    };
    if p.info.has(msn, part) {
        return Ok(None);
    }
    // §6.2.5.2: more than two segments past the playlist's last one.
    if msn > p.info.next_msn().saturating_add(1) {
        return Err("_HLS_msn is more than two segments ahead of the live playlist");
    }
    Ok(app
        .hls
        .playlist_at(app, &stream.id, spec, url, p.source.epoch, msn, part)
        .await)
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
    let detail = format!("{e} (stream {})", stream.id);
    match e {
        FetchError::Full {
            provider,
            max_connections,
        } => {
            let body = serde_json::json!({
                "detail": detail,
                "provider": provider,
                "max_connections": max_connections,
            });
            respond::json(session, code, &body).await?;
        }
        _ => respond::error(session, code, &detail).await?,
    }
    Ok(true)
}

pub(crate) fn default_type(kind: Kind, url: &Url) -> &'static str {
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
    // A segment that fails before its first byte is tried once more on the
    // same source; then the stream fails over.
    let mut last = FetchError::Connect;
    for attempt in 0..2 {
        let source = app
            .hls
            .segment(app, &stream.id, &spec, &url, range.as_deref())
            .await;
        let direct = match source {
            Err(e) => Err(e),
            Ok(SegmentSource::Direct(o)) => Ok(*o),
            Ok(SegmentSource::Shared(f)) => match f.head().await {
                Ok(Read::Head(h)) => {
                    count_segment(ctx, stream);
                    let ct = h
                        .content_type
                        .clone()
                        .unwrap_or_else(|| default_type(c.kind, &url).to_string());
                    serve_shared(app, session, ctx, &f, &h, &ct, range.as_deref()).await?;
                    return Ok(true);
                }
                Ok(Read::Direct) => {
                    crate::hls::fetch::open(
                        app,
                        &stream.id,
                        &spec,
                        &url,
                        range.as_deref(),
                        app.config.hls.header_timeout,
                    )
                    .await
                }
                Err(e) => Err(e),
            },
        };
        match direct {
            Ok(o) if o.resp.status().as_u16() < 300 || o.resp.status().as_u16() == 416 => {
                count_segment(ctx, stream);
                let ct = header_value(&o.resp, header::CONTENT_TYPE)
                    .unwrap_or_else(|| default_type(c.kind, &url).to_string());
                serve_direct(app, session, ctx, o, &ct, range.is_none()).await?;
                return Ok(true);
            }
            Ok(o) => last = FetchError::Status(o.resp.status().as_u16()),
            Err(e) => last = e,
        }
        let retry = last.is_source_failure() && !matches!(last, FetchError::Status(s) if s < 500);
        if attempt == 0 && retry {
            continue;
        }
        break;
    }
    if last.is_source_failure() {
        fail_over_after_segment(stream);
    }
    refuse(session, ctx, stream, &last).await
}

fn count_segment(ctx: &RequestCtx, stream: &Stream) {
    if let Some(g) = &ctx.guard {
        g.client.segments.fetch_add(1, Ordering::Relaxed);
    }
    stream.segments.fetch_add(1, Ordering::Relaxed);
}

fn header_value(resp: &reqwest::Response, name: http::HeaderName) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// A single `bytes=a-b`, `bytes=a-` or `bytes=-n` range over `total` bytes:
/// `None` to answer the whole object (no range, several, or not understood,
/// RFC 9110 §14.2 lets a server ignore it), `Some(None)` when unsatisfiable.
fn byte_range(value: &str, total: usize) -> Option<Option<(usize, usize)>> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: usize = b.parse().ok()?;
        if n == 0 || total == 0 {
            return Some(None);
        }
        return Some(Some((total.saturating_sub(n), total - 1)));
    }
    let first: usize = a.parse().ok()?;
    let last = if b.is_empty() {
        usize::MAX
    } else {
        let l: usize = b.parse().ok()?;
        if l < first {
            return None;
        }
        l
    };
    if first >= total {
        return Some(None);
    }
    Some(Some((first, last.min(total - 1))))
}

/// Serves a shared fetch, whole or one range of it, as its bytes arrive.
pub(crate) async fn serve_shared(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    f: &Flight,
    h: &SegmentHead,
    content_type: &str,
    range: Option<&str>,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + app.config.hls.segment_timeout;
    let mut extra = vec![(header::CACHE_CONTROL, "no-cache".to_string())];
    let (status, from, to, len) = match range {
        None => {
            extra.push((header::ACCEPT_RANGES, "bytes".into()));
            (200, 0, usize::MAX, h.total)
        }
        Some(r) => {
            let total = match tokio::time::timeout_at(deadline, f.total()).await {
                Ok(Ok(t)) => t,
                _ => return Error::e_explain(ErrorType::ReadError, "segment fetch failed"),
            };
            match byte_range(r, total) {
                None => {
                    extra.push((header::ACCEPT_RANGES, "bytes".into()));
                    (200, 0, usize::MAX, Some(total))
                }
                Some(None) => {
                    extra.push((header::CONTENT_RANGE, format!("bytes */{total}")));
                    (416, 0, 0, Some(0))
                }
                Some(Some((a, b))) => {
                    extra.push((header::CONTENT_RANGE, format!("bytes {a}-{b}/{total}")));
                    (206, a, b + 1, Some(b + 1 - a))
                }
            }
        }
    };
    if !start(session, ctx, status, content_type, &extra, len).await? {
        return Ok(());
    }
    let mut pos = from;
    loop {
        let pieces = match tokio::time::timeout_at(deadline, f.next(pos, to)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "segment fetch failed mid-body");
                return Error::e_explain(ErrorType::ReadError, "segment fetch failed");
            }
            Err(_) => {
                app.metrics.hls_limit(HlsLimit::SegmentTimeout);
                return Error::e_explain(ErrorType::ReadTimedout, "hls.segment_timeout");
            }
        };
        if pieces.is_empty() {
            return session.write_response_body(None, true).await;
        }
        for piece in pieces {
            pos += piece.len();
            send(app, session, ctx, piece, false).await?;
        }
    }
}

/// Streams a provider answer through for this request alone (objects too big
/// to share): one piece in memory at a time.
pub(crate) async fn serve_direct(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    o: Opened,
    content_type: &str,
    whole: bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + app.config.hls.segment_timeout;
    let status = o.resp.status().as_u16();
    let mut extra = vec![(header::CACHE_CONTROL, "no-cache".to_string())];
    if let Some(cr) = header_value(&o.resp, header::CONTENT_RANGE) {
        extra.push((header::CONTENT_RANGE, cr));
    }
    if whole {
        extra.push((header::ACCEPT_RANGES, "bytes".into()));
    }
    let len = o.resp.content_length().map(|n| n as usize);
    if !start(session, ctx, status, content_type, &extra, len).await? {
        return Ok(());
    }
    let Opened { resp, lease, .. } = o;
    let _lease = lease;
    let read_timeout = app.config.upstream.read_timeout;
    let mut body = resp.bytes_stream();
    loop {
        let wait = (tokio::time::Instant::now() + read_timeout).min(deadline);
        match tokio::time::timeout_at(wait, futures::StreamExt::next(&mut body)).await {
            Ok(None) => return session.write_response_body(None, true).await,
            Ok(Some(Ok(chunk))) => {
                app.metrics.bytes_in.inc_by(chunk.len() as u64);
                send(app, session, ctx, chunk, false).await?;
            }
            Ok(Some(Err(_))) => {
                return Error::e_explain(ErrorType::ReadError, "segment read failed")
            }
            Err(_) => {
                if tokio::time::Instant::now() >= deadline {
                    app.metrics.hls_limit(HlsLimit::SegmentTimeout);
                }
                return Error::e_explain(ErrorType::ReadTimedout, "segment read timed out");
            }
        }
    }
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
