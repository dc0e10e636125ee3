//! A real loopback IPTV provider for integration tests (DESIGN.md "Testing and
//! benchmarks"): a hyper 1 HTTP/1.1 server on `127.0.0.1:0`, one tokio task per
//! connection, serving `../shared/fixtures` the way real providers do — Range VOD,
//! endless paced MPEG-TS, flaky and stalling sources, redirects, status codes — and
//! recording what the proxy sent so tests can count provider connections from the
//! provider's side (R1–R3) and check header hygiene (R7).
//!
//! It owns no proxy assertions; tests read its counters. Everything is observable
//! without timing: counters change when sockets and response bodies really go away.
//!
//! Routes (GET and HEAD; HEAD sends the same headers without a body, other methods 405):
//!
//! | path | answer |
//! |---|---|
//! | `/files/{name}` | fixture `{FIXTURES}/{name}` (subdirs allowed, `..` refused with 404); Range (RFC 7233, one range), If-Range, ETag, Last-Modified |
//! | `/status/{code}` | that status, body `PROVIDER-BODY-SECRET {code}` |
//! | `/redirect/{n}/{rest}` | 302 → `/redirect/{n-1}/{rest}`; at 0 → `/{rest}` (root-relative Locations) |
//! | `/self/{port}/{name}` | 302 → `http://127.0.0.1:{port}/stream/{md5 of this URL}`: a stream that points back at the proxy |
//! | `/redirect-abs/{n}/{rest}` | the same with absolute `http://127.0.0.1:PORT/...` Locations |
//! | `/redirect-rel/{rest}` | 302 with a relative Location without leading slash: one `../` per segment of `{rest}`, then `files/{rest}`; it resolves (RFC 3986 §5.2) to `/files/{rest}`. E.g. `/redirect-rel/sample.mp4` → `../files/sample.mp4`, `/redirect-rel/hls_ts/v0/index.m3u8` → `../../../files/hls_ts/v0/index.m3u8` |
//! | `/loop/a`, `/loop/b` | 302 to each other forever |
//! | `/live/{name}.ts` | endless chunked MPEG-TS (loops `sample.ts`), query knobs `kbps`, `drop_after`, `stall_after`, `delay_ms` (see [`LiveOpts`]) |
//! | `/hls-live/{dir}/index.m3u8` | live sliding window over the VOD playlist `{FIXTURES}/{dir}/index.m3u8` (e.g. `hls_ts/v0`, `hls_fmp4`, `hls_aes`), see [`live_playlist`]; knobs `seg_ms` (default 2000), `window` (default 3) |
//! | `/hls-live/{dir}/{file}` | the fixture `{dir}/{file}` (segments, keys, init maps), like `/files/` |
//! | `/hls-ll/{dir}/index.m3u8` | the live window of `/hls-live/` as an LL-HLS playlist (RFC 8216bis): CAN-BLOCK-RELOAD, `parts` (default 4) EXT-X-PARTs per segment and a preload hint, trailing parts of the segment being made; `_HLS_msn`/`_HLS_part` requests are held until that part exists (400 when more than two segments ahead), see [`ll_playlist`]; knobs `seg_ms`, `window`, `parts` |
//! | `/hls-ll/{dir}/{file}` | the fixture `{dir}/{file}`, like `/files/` |
//! | `/hls-lagging/{dir}/index.m3u8` | 302 to `/hls-live/{dir}/index.m3u8`, every other time with `lag=3` (or `?lag_by=N`): backends whose live windows lag (query knobs passed on) |
//! | `/slow/{ms}/{rest}` | sleeps `ms`, then answers `/{rest}` |
//! | `/echo-headers` | 200 JSON object of the request headers |
//! | anything else | 404 `PROVIDER-BODY-SECRET 404` |
//!
//! Redirects keep the request's query string. Every answer except `/echo-headers` carries
//! the provider-identifying headers of [`PROVIDER_HEADERS`], which the proxy must strip.
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use md5::{Digest, Md5};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use super::eventually::eventually;
use super::FIXTURES;

/// Headers a real provider leaks; the proxy must never pass them to a client (R7).
pub const PROVIDER_HEADERS: &[(&str, &str)] = &[
    ("server", "ProviderServer/1.0"),
    ("set-cookie", "provider_session=SECRET123; Path=/"),
    ("via", "1.1 provider-cache"),
    ("x-provider-token", "tok-SECRET"),
    ("x-powered-by", "provider"),
];

/// Marker in every provider error body: a client must never see it through the proxy.
pub const SECRET_BODY_MARKER: &str = "PROVIDER-BODY-SECRET";

/// Fixed Last-Modified of every `/files/` answer (If-Range accepts it too).
pub const LAST_MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";

/// MPEG-TS packet size (ISO/IEC 13818-1 §2.4.3.2).
pub const TS_PACKET: usize = 188;

/// Default live bitrate: 8 Mbit/s, about 10x `sample.ts`; faster than real time is fine
/// for tests and keeps them short.
pub const DEFAULT_LIVE_KBPS: u64 = 8000;

/// Live pacing tick: a send every 10 ms means a vanished client is noticed within a
/// few ticks, well inside the 100 ms teardown budget of R3.
const LIVE_TICK: Duration = Duration::from_millis(10);

/// The first live chunk goes out at once (7 packets, the classic UDP/RTP TS payload),
/// so a client sees bytes without waiting for the pacing budget to build up.
const LIVE_FIRST_CHUNK: usize = 7 * TS_PACKET;

/// Upper bound of one live chunk whatever `kbps` asks for (aligned to 188).
const LIVE_MAX_CHUNK: usize = 5577 * TS_PACKET; // ~1 MiB

/// Bound on waiting for hyper to flush a `drop_after` body before the error frame that
/// ends it (an error makes hyper drop its write buffer); only a client that stopped
/// reading makes it expire.
const DROP_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Status of refused live requests when `set_max_connections` is exceeded (509 is what
/// several Xtream-style panels send; the exact code does not matter to the proxy).
pub const TOO_MANY_STATUS: u16 = 509;

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// One request as the provider received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Provider-side TCP connection id (1, 2, ... in accept order).
    pub conn_id: u64,
    pub method: String,
    /// Path and query, as sent (`/live/a.ts?kbps=100`).
    pub path: String,
    /// Header name (lowercase) → value; repeated headers are joined with `", "`.
    pub headers: BTreeMap<String, String>,
}

impl RecordedRequest {
    /// A header value by (any-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The path without the query string.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or(&self.path)
    }
}

/// The knobs of `/live/{name}.ts`, parsed from its query string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveOpts {
    /// `?kbps=N`: paced bitrate in kbit/s (default [`DEFAULT_LIVE_KBPS`]).
    pub kbps: u64,
    /// `?drop_after=BYTES`: send that many bytes, then abort the connection (the client
    /// sees a truncated chunked body).
    pub drop_after: Option<u64>,
    /// `?stall_after=BYTES`: send that many bytes, then nothing while keeping the
    /// connection open until the client goes away.
    pub stall_after: Option<u64>,
    /// `?delay_ms=N`: wait before sending the response head.
    pub delay_ms: u64,
}

impl LiveOpts {
    fn parse(query: Option<&str>) -> Self {
        let mut opts = LiveOpts {
            kbps: DEFAULT_LIVE_KBPS,
            drop_after: None,
            stall_after: None,
            delay_ms: 0,
        };
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let Ok(n) = v.parse::<u64>() else { continue };
            match &*k {
                "kbps" => opts.kbps = n.max(1),
                "drop_after" => opts.drop_after = Some(n),
                "stall_after" => opts.stall_after = Some(n),
                "delay_ms" => opts.delay_ms = n,
                _ => {}
            }
        }
        opts
    }
}

struct State {
    addr: SocketAddr,
    /// Alternates `/hls-lagging/` redirects between an up-to-date and a lagging backend.
    lag_flip: AtomicU64,
    /// Clock of `/hls-live/` windows.
    started: tokio::time::Instant,
    requests: Mutex<Vec<RecordedRequest>>,
    next_conn: AtomicU64,
    connections_total: AtomicUsize,
    connections_open: AtomicUsize,
    next_stream: AtomicU64,
    /// Live responses being written: stream id → request path (without query).
    streams: Mutex<HashMap<u64, String>>,
    /// Exact path (without query) → status to answer instead of the route.
    overrides: Mutex<HashMap<String, u16>>,
    max_connections: Mutex<Option<usize>>,
    refused: AtomicUsize,
    /// Fixture bytes by name, read once.
    files: Mutex<HashMap<String, Bytes>>,
}

/// The loopback provider. Dropping it stops the listener and every connection.
pub struct Provider {
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Provider {
    /// Binds `127.0.0.1:0` and starts serving on the current tokio runtime.
    pub async fn start() -> Provider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("provider: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("provider: local_addr");
        let state = Arc::new(State {
            addr,
            lag_flip: AtomicU64::new(0),
            started: tokio::time::Instant::now(),
            requests: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(1),
            connections_total: AtomicUsize::new(0),
            connections_open: AtomicUsize::new(0),
            next_stream: AtomicU64::new(1),
            streams: Mutex::new(HashMap::new()),
            overrides: Mutex::new(HashMap::new()),
            max_connections: Mutex::new(None),
            refused: AtomicUsize::new(0),
            files: Mutex::new(HashMap::new()),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, state.clone(), shutdown_rx));
        Provider {
            state,
            shutdown,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    pub fn port(&self) -> u16 {
        self.state.addr.port()
    }

    /// `http://127.0.0.1:PORT`
    pub fn base(&self) -> String {
        format!("http://{}", self.state.addr)
    }

    /// `http://127.0.0.1:PORT/path` (a missing leading `/` is added).
    pub fn url(&self, path: &str) -> String {
        if path.starts_with('/') {
            format!("http://{}{}", self.state.addr, path)
        } else {
            format!("http://{}/{}", self.state.addr, path)
        }
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().clone()
    }

    /// Requests whose path (with query) starts with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> Vec<RecordedRequest> {
        self.state
            .requests
            .lock()
            .iter()
            .filter(|r| r.path.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Number of requests whose path starts with `prefix`.
    pub fn hits(&self, prefix: &str) -> usize {
        self.state
            .requests
            .lock()
            .iter()
            .filter(|r| r.path.starts_with(prefix))
            .count()
    }

    /// Forgets recorded requests (counters are kept).
    pub fn clear_requests(&self) {
        self.state.requests.lock().clear();
    }

    /// TCP connections accepted so far.
    pub fn connections_total(&self) -> usize {
        self.state.connections_total.load(Ordering::SeqCst)
    }

    /// TCP connections whose task is still running (peer not gone, server not done).
    pub fn connections_open(&self) -> usize {
        self.state.connections_open.load(Ordering::SeqCst)
    }

    /// Live responses (`/live/...`) currently being written whose path starts with
    /// `prefix`; one drops as soon as its body send fails (client gone).
    pub fn open_streams(&self, prefix: &str) -> usize {
        self.state
            .streams
            .lock()
            .values()
            .filter(|p| p.starts_with(prefix))
            .count()
    }

    /// Answers `path` (exact match on the path, query ignored) with `code` and the
    /// usual `PROVIDER-BODY-SECRET {code}` body, whatever the route.
    pub fn set_status(&self, path: &str, code: u16) {
        self.state.overrides.lock().insert(path.to_string(), code);
    }

    /// Removes the override of one path.
    pub fn clear_status(&self, path: &str) {
        self.state.overrides.lock().remove(path);
    }

    /// Removes every status override.
    pub fn clear_overrides(&self) {
        self.state.overrides.lock().clear();
    }

    /// Limits concurrently open live streams; beyond it new live requests get
    /// [`TOO_MANY_STATUS`] with `PROVIDER-BODY-SECRET too many connections`.
    pub fn set_max_connections(&self, max: Option<usize>) {
        *self.state.max_connections.lock() = max;
    }

    /// Live requests refused because of `set_max_connections`.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Polls `cond(self)` every 10 ms until true or `timeout`; returns whether it held.
    pub async fn wait_until<F: Fn(&Provider) -> bool>(&self, timeout: Duration, cond: F) -> bool {
        eventually(timeout, || cond(self)).await
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            // EMFILE and friends: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let conn_id = state.next_conn.fetch_add(1, Ordering::SeqCst);
        state.connections_total.fetch_add(1, Ordering::SeqCst);
        state.connections_open.fetch_add(1, Ordering::SeqCst);
        let guard = ConnGuard(state.clone());
        let mut shutdown = shutdown.clone();
        let st = state.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let _ = stream.set_nodelay(true);
            let unflushed = Arc::new(AtomicBool::new(false));
            let io = FlushTracked {
                inner: stream,
                unflushed: unflushed.clone(),
            };
            let service = hyper::service::service_fn(move |req| {
                let st = st.clone();
                let unflushed = unflushed.clone();
                async move { Ok::<_, Infallible>(handle(st, conn_id, unflushed, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        });
    }
}

/// The connection's socket, noting when hyper has written out everything it buffered:
/// hyper calls `poll_flush` on the IO only once its write buffer is empty
/// (hyper 1 `proto/h1/io.rs`, `Buffered::poll_flush`). [`ChannelBody`] sets the flag
/// when it hands hyper a chunk; a successful flush clears it.
struct FlushTracked {
    inner: tokio::net::TcpStream,
    unflushed: Arc<AtomicBool>,
}

impl tokio::io::AsyncRead for FlushTracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for FlushTracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.unflushed.store(false, Ordering::SeqCst);
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Decrements `connections_open` when a connection task ends, however it ends.
struct ConnGuard(Arc<State>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Keeps one live response in `open_streams` while it exists.
struct StreamGuard {
    state: Arc<State>,
    id: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.state.streams.lock().remove(&self.id);
    }
}

async fn handle(
    st: Arc<State>,
    conn_id: u64,
    unflushed: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Response<Body> {
    let headers = super::header_map(req.headers());
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    st.requests.lock().push(RecordedRequest {
        conn_id,
        method: req.method().to_string(),
        path: path_and_query,
        headers: headers.clone(),
    });

    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", false),
    };
    let mut path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);

    let overridden = st.overrides.lock().get(&path).copied();
    if let Some(code) = overridden {
        return status_page(code, head);
    }

    // `/slow/{ms}/{rest}`, possibly nested: sleep, then route `/{rest}`.
    while let Some(tail) = path.strip_prefix("/slow/") {
        let (ms, rest) = tail.split_once('/').unwrap_or((tail, ""));
        let Ok(ms) = ms.parse::<u64>() else {
            return status_page(404, head);
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        path = format!("/{rest}");
    }

    let query = query.as_deref();
    if let Some(name) = path.strip_prefix("/files/") {
        serve_file(&st, name, req.headers(), head).await
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code.parse::<u16>() {
            Ok(code) => status_page(code, head),
            Err(_) => status_page(404, head),
        }
    } else if let Some(tail) = path.strip_prefix("/redirect/") {
        redirect_chain(tail, "/redirect", "", query, head)
    } else if let Some(tail) = path.strip_prefix("/redirect-abs/") {
        let origin = format!("http://{}", st.addr);
        redirect_chain(tail, "/redirect-abs", &origin, query, head)
    } else if let Some(rest) = path.strip_prefix("/redirect-rel/") {
        let ups = "../".repeat(rest.split('/').count());
        redirect(&with_query(&format!("{ups}files/{rest}"), query), head)
    } else if let Some(tail) = path.strip_prefix("/self/") {
        // `/self/{port}/{name}`: 302 to `http://127.0.0.1:{port}/stream/{id}`
        // where id is the md5 of this very URL, i.e. the m3u-edge stream
        // registered with it: a provider pointing a stream back at the proxy.
        let port = tail.split('/').next().unwrap_or("");
        let own = format!("http://{}{}", st.addr, path);
        let id = hex::encode(<md5::Md5 as md5::Digest>::digest(own.as_bytes()));
        redirect(&format!("http://127.0.0.1:{port}/stream/{id}"), head)
    } else if path == "/loop/a" {
        redirect(&with_query("/loop/b", query), head)
    } else if path == "/loop/b" {
        redirect(&with_query("/loop/a", query), head)
    } else if path.starts_with("/live/") && path.len() > "/live/.ts".len() && path.ends_with(".ts")
    {
        live(st.clone(), &path, LiveOpts::parse(query), unflushed, head).await
    } else if let Some(dir) = path
        .strip_prefix("/hls-lagging/")
        .and_then(|p| p.strip_suffix("/index.m3u8"))
    {
        // A load balancer in front of backends whose live windows lag: every
        // other request lands on a backend 3 segments behind.
        let n = st.lag_flip.fetch_add(1, Ordering::SeqCst);
        let behind = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == "lag_by")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(3);
        let lag = if n % 2 == 0 { 0 } else { behind };
        let q = query.map(|q| format!("&{q}")).unwrap_or_default();
        redirect(&format!("/hls-live/{dir}/index.m3u8?lag={lag}{q}"), head)
    } else if let Some(name) = path.strip_prefix("/hls-ll/") {
        match name.strip_suffix("/index.m3u8") {
            Some(dir) => hls_ll(&st, dir, query, head).await,
            None => serve_file(&st, name, req.headers(), head).await,
        }
    } else if let Some(name) = path.strip_prefix("/hls-live/") {
        match name.strip_suffix("/index.m3u8") {
            Some(dir) => hls_live(&st, dir, query, head).await,
            None => serve_file(&st, name, req.headers(), head).await,
        }
    } else if path == "/echo-headers" {
        let json = serde_json::to_vec(&headers).unwrap_or_default();
        let b = Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, json.len());
        finish(b, Bytes::from(json), head)
    } else {
        status_page(404, head)
    }
}

fn with_query(location: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{location}?{q}"),
        None => location.to_string(),
    }
}

/// `{prefix}/{n}/{rest}` → 302 to `{origin}{prefix}/{n-1}/{rest}`, at 0 to `{origin}/{rest}`.
fn redirect_chain(
    tail: &str,
    prefix: &str,
    origin: &str,
    query: Option<&str>,
    head: bool,
) -> Response<Body> {
    let (n, rest) = tail.split_once('/').unwrap_or((tail, ""));
    let Ok(n) = n.parse::<u64>() else {
        return status_page(404, head);
    };
    let location = if n == 0 {
        format!("{origin}/{rest}")
    } else {
        format!("{origin}{prefix}/{}/{rest}", n - 1)
    };
    redirect(&with_query(&location, query), head)
}

fn redirect(location: &str, head: bool) -> Response<Body> {
    let body = format!("{SECRET_BODY_MARKER} 302");
    let b = with_provider_headers(Response::builder())
        .status(StatusCode::FOUND)
        .header(header::LOCATION, location)
        .header(header::CONTENT_TYPE, "text/plain")
        .header(header::CONTENT_LENGTH, body.len());
    finish(b, Bytes::from(body), head)
}

fn status_page(code: u16, head: bool) -> Response<Body> {
    let status = match StatusCode::from_u16(code) {
        // 1xx cannot be a final answer; hyper would mangle it.
        Ok(s) if code >= 200 => s,
        _ => StatusCode::BAD_REQUEST,
    };
    text_with_provider_headers(status, &format!("{SECRET_BODY_MARKER} {code}"), head)
}

fn text(status: StatusCode, body: &str, head: bool) -> Response<Body> {
    let b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .header(header::CONTENT_LENGTH, body.len());
    finish(b, Bytes::from(body.to_string()), head)
}

fn text_with_provider_headers(status: StatusCode, body: &str, head: bool) -> Response<Body> {
    let b = with_provider_headers(Response::builder())
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .header(header::CONTENT_LENGTH, body.len());
    finish(b, Bytes::from(body.to_string()), head)
}

fn with_provider_headers(mut b: hyper::http::response::Builder) -> hyper::http::response::Builder {
    for (k, v) in PROVIDER_HEADERS {
        b = b.header(*k, *v);
    }
    b
}

fn full(bytes: Bytes) -> Body {
    if bytes.is_empty() {
        Empty::new().map_err(|never| match never {}).boxed_unsync()
    } else {
        Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync()
    }
}

/// Builds the response (no body for HEAD, headers unchanged); a builder error (impossible
/// with our own header values) becomes a 500 instead of a panic that would leave the
/// client hanging.
fn finish(b: hyper::http::response::Builder, body: Bytes, head: bool) -> Response<Body> {
    let body = if head { Bytes::new() } else { body };
    b.body(full(body)).unwrap_or_else(|e| {
        let mut r = Response::new(full(Bytes::from(format!("provider: {e}"))));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext {
        "ts" => "video/mp2t",
        "mp4" => "video/mp4",
        "mkv" => "video/x-matroska",
        "webm" => "video/webm",
        "m3u8" => "application/vnd.apple.mpegurl",
        "m4s" => "video/iso.segment",
        "key" => "application/octet-stream",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

/// `"{len}-{first 8 hex of md5(name)}"`, quoted (a strong validator, RFC 7232 §2.3).
pub fn etag_for(name: &str, len: usize) -> String {
    let hash = hex::encode(Md5::digest(name.as_bytes()));
    format!("\"{len}-{}\"", &hash[..8])
}

/// The outcome of a `Range` header against a representation of `total` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable range (absent, malformed, several ranges): send the whole file, 200.
    Full,
    /// Inclusive byte positions, 206.
    Partial(u64, u64),
    /// 416 with `Content-Range: bytes */total`.
    Unsatisfiable,
}

/// One `bytes=` range (RFC 7233 §2.1): `a-b`, `a-`, `-n`. Syntactically invalid values and
/// multi-range requests are ignored (§3.1 allows it), so they give [`RangeAnswer::Full`].
pub fn parse_range(value: &str, total: u64) -> RangeAnswer {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix range: the last n bytes.
        let Ok(n) = b.parse::<u64>() else {
            return RangeAnswer::Full;
        };
        if n == 0 || total == 0 {
            return RangeAnswer::Unsatisfiable;
        }
        return RangeAnswer::Partial(total.saturating_sub(n), total - 1);
    }
    let Ok(first) = a.parse::<u64>() else {
        return RangeAnswer::Full;
    };
    let last = if b.is_empty() {
        None
    } else {
        match b.parse::<u64>() {
            Ok(l) if l >= first => Some(l),
            _ => return RangeAnswer::Full,
        }
    };
    if first >= total {
        return RangeAnswer::Unsatisfiable;
    }
    let last = last.map_or(total - 1, |l| l.min(total - 1));
    RangeAnswer::Partial(first, last)
}

async fn load_fixture(st: &State, name: &str) -> Option<Bytes> {
    if let Some(b) = st.files.lock().get(name) {
        return Some(b.clone());
    }
    let data = Bytes::from(tokio::fs::read(format!("{FIXTURES}/{name}")).await.ok()?);
    st.files.lock().insert(name.to_string(), data.clone());
    Some(data)
}

async fn serve_file(st: &State, name: &str, req: &HeaderMap, head: bool) -> Response<Body> {
    if name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name
            .split('/')
            .any(|s| s == ".." || s == "." || s.is_empty())
    {
        return status_page(404, head);
    }
    let Some(data) = load_fixture(st, name).await else {
        return status_page(404, head);
    };
    let total = data.len() as u64;
    let etag = etag_for(name, data.len());

    let range = req.get(header::RANGE).and_then(|v| v.to_str().ok());
    let if_range_ok = match req.get(header::IF_RANGE).map(HeaderValue::to_str) {
        None => true,
        Some(Ok(v)) => v.trim() == etag || v.trim() == LAST_MODIFIED,
        Some(Err(_)) => false,
    };
    let answer = match range {
        Some(r) if if_range_ok => parse_range(r, total),
        _ => RangeAnswer::Full,
    };

    let b = with_provider_headers(Response::builder())
        .header(header::CONTENT_TYPE, content_type(name))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, etag.as_str())
        .header(header::LAST_MODIFIED, LAST_MODIFIED);
    match answer {
        RangeAnswer::Full => {
            let b = b
                .status(StatusCode::OK)
                .header(header::CONTENT_LENGTH, total);
            finish(b, data, head)
        }
        RangeAnswer::Partial(first, last) => {
            let slice = data.slice(first as usize..=last as usize);
            let b = b
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_LENGTH, slice.len())
                .header(
                    header::CONTENT_RANGE,
                    format!("bytes {first}-{last}/{total}"),
                );
            finish(b, slice, head)
        }
        RangeAnswer::Unsatisfiable => {
            let b = b
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{total}"))
                .header(header::CONTENT_LENGTH, 0);
            finish(b, Bytes::new(), false)
        }
    }
}

/// Default `/hls-live/` segment period: the fixtures' 2 s segments.
pub const DEFAULT_HLS_SEG_MS: u64 = 2000;

/// Default `/hls-live/` window length in segments (RFC 8216 §6.2.2: at least three target
/// durations should stay available).
pub const DEFAULT_HLS_WINDOW: u64 = 3;

/// A live media playlist (RFC 8216 §4.3.3) over the segments of the VOD playlist `vod`.
///
/// Media sequence `seq` is the first segment in the window; segment number `k` plays
/// the VOD's segment `k % n`, written as its URI plus `?seq=k` so every live segment has its
/// own URL. Header tags of the VOD (VERSION, TARGETDURATION, KEY, MAP, ...) are kept, its
/// MEDIA-SEQUENCE, PLAYLIST-TYPE and ENDLIST dropped; each wrap to segment 0 is marked
/// with EXT-X-DISCONTINUITY and counted in EXT-X-DISCONTINUITY-SEQUENCE.
pub fn live_playlist(vod: &str, seq: u64, window: u64) -> String {
    let mut header = Vec::new();
    let mut segments: Vec<(String, String)> = Vec::new();
    let mut extinf: Option<String> = None;
    for line in vod.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("#EXTINF") {
            extinf = Some(line.to_string());
        } else if !line.starts_with('#') {
            let inf = extinf.take().unwrap_or_else(|| "#EXTINF:2.0,".to_string());
            segments.push((inf, line.to_string()));
        } else if segments.is_empty()
            && extinf.is_none()
            && !line.starts_with("#EXT-X-MEDIA-SEQUENCE")
            && !line.starts_with("#EXT-X-PLAYLIST-TYPE")
            && !line.starts_with("#EXT-X-ENDLIST")
        {
            header.push(line.to_string());
        }
    }
    let mut out = String::new();
    for line in &header {
        out.push_str(line);
        out.push('\n');
    }
    let n = segments.len() as u64;
    if n == 0 {
        return out;
    }
    out.push_str(&format!("#EXT-X-MEDIA-SEQUENCE:{seq}\n"));
    // Discontinuities before the window: wraps at k = n, 2n, ... with k <= seq.
    out.push_str(&format!("#EXT-X-DISCONTINUITY-SEQUENCE:{}\n", seq / n));
    for k in seq..seq + window.max(1) {
        let (inf, uri) = &segments[(k % n) as usize];
        if k % n == 0 && k > seq {
            out.push_str("#EXT-X-DISCONTINUITY\n");
        }
        let sep = if uri.contains('?') { '&' } else { '?' };
        out.push_str(&format!("{inf}\n{uri}{sep}seq={k}\n"));
    }
    out
}

/// The VOD playlist `{dir}/index.m3u8` a live window is made from.
async fn vod_playlist(st: &State, dir: &str) -> Option<Bytes> {
    if dir
        .split('/')
        .any(|s| s == ".." || s == "." || s.is_empty())
    {
        return None;
    }
    load_fixture(st, &format!("{dir}/index.m3u8")).await
}

fn live_playlist_response(body: String, head: bool) -> Response<Body> {
    let b = with_provider_headers(Response::builder())
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/vnd.apple.mpegurl")
        .header(header::CACHE_CONTROL, "no-cache")
        .header(header::CONTENT_LENGTH, body.len());
    finish(b, Bytes::from(body), head)
}

async fn hls_live(st: &State, dir: &str, query: Option<&str>, head: bool) -> Response<Body> {
    let Some(vod) = vod_playlist(st, dir).await else {
        return status_page(404, head);
    };
    let mut seg_ms = DEFAULT_HLS_SEG_MS;
    let mut window = DEFAULT_HLS_WINDOW;
    let mut lag = 0;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match (&*k, v.parse::<u64>()) {
            ("seg_ms", Ok(n)) => seg_ms = n.max(1),
            ("window", Ok(n)) => window = n.max(1),
            ("lag", Ok(n)) => lag = n,
            _ => {}
        }
    }
    let seq = (st.started.elapsed().as_millis() as u64 / seg_ms).saturating_sub(lag);
    let body = live_playlist(&String::from_utf8_lossy(&vod), seq, window);
    live_playlist_response(body, head)
}

/// An LL-HLS media playlist: the live window of [`live_playlist`] whose last
/// complete segment is `complete - 1`, then `trailing` EXT-X-PARTs of segment
/// `complete` and a preload hint for the next part.
pub fn ll_playlist(vod: &str, complete: u64, trailing: u64, window: u64, part_s: f64) -> String {
    let seq = complete.saturating_sub(window.max(1));
    let body = live_playlist(vod, seq, complete - seq);
    let (first, rest) = body.split_once('\n').unwrap_or((&body, ""));
    // Parts are named after the last segment's file; nothing fetches them here.
    let file = rest
        .lines()
        .rev()
        .find(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split('?').next().unwrap_or(l).to_string())
        .unwrap_or_else(|| "part.ts".into());
    let mut out = format!(
        "{first}\n#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={:.3}\n#EXT-X-PART-INF:PART-TARGET={part_s:.3}\n{rest}",
        part_s * 3.0
    );
    for j in 0..trailing {
        out.push_str(&format!(
            "#EXT-X-PART:DURATION={part_s:.3},URI=\"{file}?seq={complete}&part={j}\"\n"
        ));
    }
    out.push_str(&format!(
        "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"{file}?seq={complete}&part={trailing}\"\n"
    ));
    out
}

async fn hls_ll(st: &State, dir: &str, query: Option<&str>, head: bool) -> Response<Body> {
    let Some(vod) = vod_playlist(st, dir).await else {
        return status_page(404, head);
    };
    let (mut seg_ms, mut window, mut parts) = (DEFAULT_HLS_SEG_MS, DEFAULT_HLS_WINDOW, 4u64);
    let (mut msn, mut part) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match (&*k, v.parse::<u64>()) {
            ("seg_ms", Ok(n)) => seg_ms = n.max(1),
            ("window", Ok(n)) => window = n.max(1),
            ("parts", Ok(n)) => parts = n.max(1),
            ("_HLS_msn", Ok(n)) => msn = Some(n),
            ("_HLS_part", Ok(n)) => part = Some(n),
            _ => {}
        }
    }
    let part_ms = (seg_ms / parts).max(1);
    // Parts made so far; the window is full from the start.
    let made = |now: tokio::time::Instant| {
        now.duration_since(st.started).as_millis() as u64 / part_ms + window * parts
    };
    if let Some(m) = msn {
        let complete = made(tokio::time::Instant::now()) / parts;
        if m > complete + 1 {
            return status_page(400, head);
        }
        // Part `p` of segment `m` exists once m * parts + p + 1 parts were made.
        let needed = match part {
            Some(p) => m * parts + p + 1,
            None => (m + 1) * parts,
        };
        let at =
            st.started + Duration::from_millis((needed.saturating_sub(window * parts)) * part_ms);
        if at > tokio::time::Instant::now() + Duration::from_millis(3 * seg_ms) {
            return status_page(503, head);
        }
        tokio::time::sleep_until(at).await;
    }
    let total = made(tokio::time::Instant::now());
    let body = ll_playlist(
        &String::from_utf8_lossy(&vod),
        total / parts,
        total % parts,
        window,
        part_ms as f64 / 1000.0,
    );
    live_playlist_response(body, head)
}

/// A response body fed by the pacing task; dropping it (hyper gives up on the
/// connection) makes the task's next send fail.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
    unflushed: Arc<AtomicBool>,
    /// Data chunks handed to hyper so far (compared with the producer's count).
    taken: Arc<AtomicU64>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let item = ready!(self.rx.poll_recv(cx));
        if matches!(item, Some(Ok(_))) {
            // Set before hyper buffers the chunk (its next completed flush clears it),
            // and before `taken` moves, so a producer seeing `taken` also sees this.
            self.unflushed.store(true, Ordering::SeqCst);
            self.taken.fetch_add(1, Ordering::SeqCst);
        }
        Poll::Ready(item.map(|r| r.map(Frame::data)))
    }
}

async fn live(
    st: Arc<State>,
    path: &str,
    opts: LiveOpts,
    unflushed: Arc<AtomicBool>,
    head: bool,
) -> Response<Body> {
    let headers = |b: hyper::http::response::Builder| {
        with_provider_headers(b)
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "video/mp2t")
            .header(header::CACHE_CONTROL, "no-cache")
    };
    if head {
        if opts.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(opts.delay_ms)).await;
        }
        return finish(headers(Response::builder()), Bytes::new(), true);
    }
    let Some(data) = load_fixture(&st, "sample.ts").await else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "no sample.ts", false);
    };

    // Check the limit and register under one lock, so two racing requests cannot both
    // take the last slot.
    let guard = {
        let mut streams = st.streams.lock();
        let max = *st.max_connections.lock();
        if let Some(max) = max {
            let open = streams.values().filter(|p| p.starts_with("/live/")).count();
            if open >= max {
                drop(streams);
                st.refused.fetch_add(1, Ordering::SeqCst);
                return text_with_provider_headers(
                    StatusCode::from_u16(TOO_MANY_STATUS).unwrap_or(StatusCode::FORBIDDEN),
                    &format!("{SECRET_BODY_MARKER} too many connections"),
                    false,
                );
            }
        }
        let id = st.next_stream.fetch_add(1, Ordering::SeqCst);
        streams.insert(id, path.to_string());
        StreamGuard {
            state: st.clone(),
            id,
        }
    };
    if opts.delay_ms > 0 {
        // If the client leaves meanwhile hyper drops this future, and the guard with it.
        tokio::time::sleep(Duration::from_millis(opts.delay_ms)).await;
    }
    let (tx, rx) = mpsc::channel(4);
    let taken = Arc::new(AtomicU64::new(0));
    let flush = FlushWatch {
        unflushed: unflushed.clone(),
        taken: taken.clone(),
    };
    tokio::spawn(pace_live(tx, data, opts, flush, guard));
    let body = ChannelBody {
        rx,
        unflushed,
        taken,
    };
    headers(Response::builder())
        .body(body.boxed_unsync())
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "builder", false))
}

/// What the pacing task sees of hyper's progress on its body.
struct FlushWatch {
    unflushed: Arc<AtomicBool>,
    taken: Arc<AtomicU64>,
}

impl FlushWatch {
    /// True once hyper took all `chunks` and then emptied its write buffer into the socket.
    fn all_written(&self, chunks: u64) -> bool {
        self.taken.load(Ordering::SeqCst) >= chunks && !self.unflushed.load(Ordering::SeqCst)
    }
}

/// Writes `data` in a loop at `opts.kbps`, 188-aligned, until the client goes away (the
/// send fails or the receiver is closed) or a `drop_after`/`stall_after` limit is hit.
async fn pace_live(
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    data: Bytes,
    opts: LiveOpts,
    flush: FlushWatch,
    _guard: StreamGuard,
) {
    if data.is_empty() {
        return;
    }
    let rate = opts.kbps.saturating_mul(1000) / 8; // bytes per second
    let limit = match (opts.drop_after, opts.stall_after) {
        (Some(d), Some(s)) => Some(d.min(s)),
        (d, s) => d.or(s),
    };
    let start = tokio::time::Instant::now();
    let mut sent: u64 = 0;
    let mut chunks: u64 = 0;
    let mut pos: usize = 0;
    loop {
        let elapsed = start.elapsed().as_micros();
        let due = (rate as u128 * elapsed / 1_000_000) as u64 + LIVE_FIRST_CHUNK as u64;
        let mut want = (due.saturating_sub(sent) as usize).min(LIVE_MAX_CHUNK);
        want -= want % TS_PACKET;
        if let Some(limit) = limit {
            want = want.min(limit.saturating_sub(sent) as usize);
        }
        if want > 0 {
            let mut chunk = BytesMut::with_capacity(want);
            while chunk.len() < want {
                let n = (want - chunk.len()).min(data.len() - pos);
                chunk.extend_from_slice(&data[pos..pos + n]);
                pos = (pos + n) % data.len();
            }
            if tx.send(Ok(chunk.freeze())).await.is_err() {
                return;
            }
            sent += want as u64;
            chunks += 1;
        }
        if limit.is_some_and(|l| sent >= l) {
            if opts.drop_after.is_some_and(|d| sent >= d) {
                // Wait until hyper took every chunk and wrote it to the socket, so the
                // client gets exactly `drop_after` bytes before the connection ends.
                let deadline = tokio::time::Instant::now() + DROP_FLUSH_TIMEOUT;
                while !flush.all_written(chunks) {
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                    }
                }
                let err = io::Error::new(io::ErrorKind::ConnectionAborted, "drop_after");
                let _ = tx.send(Err(err)).await;
            } else {
                // stall_after: keep the connection open, send nothing, until the client
                // goes away (hyper notices the EOF and drops the body).
                tx.closed().await;
            }
            return;
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(LIVE_TICK) => {}
        }
    }
}
