//! Serving a live channel from the hub: the response is written from
//! `request_filter` (no per-client upstream), one large write per batch, and
//! the client's departure is noticed at once by waiting on its socket while
//! waiting for data (DESIGN.md, Pingora facts).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::header;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ctx::RequestCtx;
use super::response::Access;
use super::{request, respond};
use crate::app::App;
use crate::hub::{JoinError, Next, Viewer};
use crate::metrics::DropReason;
use crate::registry::{ClientGuard, Stream as RegStream};

/// Bytes handed to one viewer per write: one ring chunk (hub/reader.rs), or
/// several small ones joined when the viewer is behind.
const BATCH: usize = 128 * 1024;

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
pub fn mode(stream: &RegStream) -> Mode {
    if stream.is_detected_hls() {
        return Mode::Hls;
    }
    let spec = stream.spec();
    if spec.resolver.is_some() {
        // A page for streamlink or yt-dlp: the hub plays what it resolves to.
        return Mode::Hub;
    }
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
    respond::open_cors(&mut resp)?;
    Ok(resp)
}

/// Serves a live viewer. `Ok(false)` hands the request to per-client proxying
/// (the channel turned out to be a file).
pub async fn serve(
    app: &Arc<App>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    stream: &Arc<RegStream>,
) -> Result<bool> {
    if session.req_header().method == http::Method::HEAD {
        // A probe opens nothing at the provider (R1).
        ctx.local_status = Some(200);
        session
            .write_response_header(Box::new(live_header()?), true)
            .await?;
        return Ok(true);
    }
    let guard = match app.registry.attach(stream, &request::hello(session)) {
        Ok(g) => g,
        Err(why) => {
            respond::refused(app, session, ctx, why).await?;
            return Ok(true);
        }
    };
    ctx.guard = Some(guard);
    let viewer = match app.hub.join(app, stream).await {
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
                "detail": full.detail(),
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
    session
        .write_response_header(Box::new(live_header()?), false)
        .await?;
    let Some(guard) = ctx.guard.take() else {
        return Err(Error::explain(
            InternalError,
            "live viewer without a client",
        ));
    };
    let mut access = Access::of(session, ctx);
    access.client = Some(guard.client.id.clone());
    access.status = 200;
    let Some(io) = detach(session).await else {
        ctx.guard = Some(guard);
        return Err(Error::explain(
            InternalError,
            "live channels are served over plain HTTP/1 on TCP only",
        ));
    };
    ctx.detached = true;
    // The front door's slot for this connection ends with Pingora's session;
    // the viewer keeps the socket, so it keeps a slot of its own.
    let peer = io.peer_addr().ok().map(|a| a.ip());
    let delivery = Delivery {
        _conn: app.conns.take_anyway(peer),
        app: app.clone(),
        stream: stream.clone(),
        guard,
        viewer,
        // A viewer whose socket accepts nothing for this long is as good as gone.
        write_timeout: crate::hub::write_timeout(&app.config.live),
        access,
    };
    tokio::spawn(delivery.run(io));
    Ok(true)
}

/// Takes the client connection out of Pingora's session, leaving an empty
/// placeholder that Pingora finishes and drops at once. A live viewer then
/// costs only its socket and the small task below, not a whole Pingora
/// request (its futures, header buffers and session: ~35 KiB per viewer,
/// measured with heaptrack), which matters at a thousand viewers per box.
/// The socket comes back as a plain tokio `TcpStream` (a duplicate of
/// Pingora's descriptor, which is closed) so the hub's spool can be
/// sendfile()d to it. The response header is flushed first.
pub(crate) async fn detach(session: &mut Session) -> Option<TcpStream> {
    if !matches!(*session.downstream_session, ServerSession::H1(_)) {
        return None;
    }
    let placeholder = ServerSession::new_http1(Box::new(std::io::Cursor::new(Vec::new())));
    let ServerSession::H1(h1) =
        *std::mem::replace(&mut session.downstream_session, Box::new(placeholder))
    else {
        // Checked above.
        return None;
    };
    let mut io = h1.into_inner();
    io.flush().await.ok()?;
    let l4 = io
        .as_any()
        .downcast_ref::<pingora::protocols::l4::stream::Stream>()?;
    // SAFETY: the descriptor belongs to `io`, which is alive for the whole
    // borrow; the borrow is only used to duplicate it.
    let fd = unsafe { BorrowedFd::borrow_raw(l4.as_raw_fd()) };
    let dup = std::net::TcpStream::from(fd.try_clone_to_owned().ok()?);
    dup.set_nonblocking(true).ok()?;
    let sock = TcpStream::from_std(dup).ok()?;
    drop(io);
    Some(sock)
}

/// One live viewer off its Pingora session: hub bytes in, one large write per
/// batch out, until the viewer, the channel or the API ends it.
struct Delivery {
    /// Counted as an open client connection while the viewer watches.
    _conn: crate::conn::caps::Slot<std::net::IpAddr>,
    app: Arc<App>,
    stream: Arc<RegStream>,
    /// Listed as a client until this is dropped (client_disconnected).
    guard: ClientGuard,
    viewer: Viewer,
    write_timeout: Duration,
    access: Access,
}

impl Delivery {
    async fn run(mut self, mut io: TcpStream) {
        let app = self.app.clone();
        let client = self.guard.client.clone();
        let cancel = client.cancel.clone();
        // Any read outcome (FIN, error, stray bytes) means the player is done;
        // a GET has no body to wait for.
        let mut probe = [0u8; 16];
        loop {
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    app.metrics.client_drop(DropReason::Api);
                    break;
                }
                _ = io.read(&mut probe) => break,
                n = self.viewer.next(BATCH) => n,
            };
            let n = match &next {
                Next::Data(b) => b.len(),
                Next::Span(span) => span.len(),
                Next::Lagged => {
                    app.metrics.client_drop(DropReason::Slow);
                    tracing::warn!(stream_id = %self.stream.id, client = %client.id, "viewer too slow: fell behind the ring, dropped");
                    break;
                }
                Next::Ended => {
                    app.metrics.client_drop(DropReason::Ended);
                    break;
                }
            };
            let n = n as u64;
            let wrote = tokio::time::timeout(self.write_timeout, async {
                match &next {
                    Next::Span(span) => span.send(&io).await,
                    Next::Data(b) => io.write_all(b).await,
                    Next::Lagged | Next::Ended => Ok(()),
                }
            })
            .await;
            match wrote {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    // The socket took nothing for the whole window: a stuck player.
                    self.viewer.count_slow_drop();
                    app.metrics.client_drop(DropReason::Slow);
                    tracing::warn!(stream_id = %self.stream.id, client = %client.id, "viewer too slow: write timed out, dropped");
                    break;
                }
            }
            if self.access.bytes == 0 {
                app.metrics
                    .join_seconds
                    .observe(self.access.started.elapsed().as_secs_f64());
            }
            self.access.bytes += n;
            app.metrics.bytes_out.inc_by(n);
            client.add_bytes(n);
            self.stream.bytes.fetch_add(n, Ordering::Relaxed);
        }
        self.finish(io).await;
    }

    /// A close-delimited body ends with the connection: close it cleanly,
    /// leave the channel and the client list, and log the request.
    async fn finish(self, mut io: TcpStream) {
        let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
        drop(io);
        let Delivery {
            app,
            viewer,
            guard,
            access,
            ..
        } = self;
        drop(viewer);
        drop(guard);
        access.write(&app);
    }
}
