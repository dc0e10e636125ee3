//! One provider fetch shared by every viewer (R2). Playlists are single-flight
//! with a short cache: a live media playlist is asked for at most once per half
//! target duration per stream, however many viewers poll. Segments, keys and
//! init maps are single-flight with a bounded in-memory cache, so N viewers at
//! the live edge cost one provider fetch per segment.
//!
//! Also here, because they are about which bytes a playlist request gets:
//! sticky backends (keep refetching from where a redirect led) and monotonic
//! playlists (never serve a live playlist whose media sequence is lower than
//! one already served: lagging backends make players loop).
//!
//! Requests to the provider carry the stream's user agent and headers and
//! nothing of the client's (R7); redirects are followed here.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use parking_lot::Mutex;
use url::Url;

use super::rewrite::{self, PlaylistInfo};
use crate::app::App;
use crate::metrics::{CacheResult, Metrics};
use crate::registry::StreamSpec;

/// Master and VOD (ENDLIST) playlists do not change: keep them this long.
const STATIC_PLAYLIST_TTL: Duration = Duration::from_secs(10);
/// Bounds of a live playlist's cache life (half its target duration).
const MIN_LIVE_TTL: Duration = Duration::from_millis(500);
const MAX_LIVE_TTL: Duration = Duration::from_secs(5);
/// Segments larger than this are relayed but not cached (a VOD file behind a
/// playlist would evict the whole live edge).
const MAX_CACHED_SEGMENT_FRACTION: usize = 4;
/// LL-HLS blocking-reload query parameters (RFC 8216bis §6.2.5.2).
pub const MSN_DIRECTIVE: &str = "_HLS_msn";
pub const PART_DIRECTIVE: &str = "_HLS_part";
/// Upper bound of one segment body held in memory.
const MAX_SEGMENT_BYTES: usize = 256 * 1024 * 1024;

/// `url` without blocking-reload directives: what a redirect kept of them
/// must not stick to the backend or the base of relative URIs.
fn without_directives(url: &Url) -> Url {
    let Some(query) = url.query() else {
        return url.clone();
    };
    // Piece by piece, so the provider's own parameters keep their exact encoding.
    let is_directive = |piece: &&str| {
        let name = piece.split('=').next().unwrap_or("");
        name == MSN_DIRECTIVE || name == PART_DIRECTIVE
    };
    let kept: Vec<&str> = query.split('&').filter(|p| !is_directive(p)).collect();
    let mut out = url.clone();
    out.set_query((!kept.is_empty()).then(|| kept.join("&")).as_deref());
    out
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect to the source")]
    Connect,
    #[error("the source timed out")]
    Timeout,
    #[error("the source answered HTTP {0}")]
    Status(u16),
    #[error("the source's response is too large (over {0} bytes)")]
    TooLarge(usize),
    #[error("the source's playlist is not valid HLS: {0}")]
    Malformed(String),
    #[error("reading from the source failed")]
    Read,
}

impl FetchError {
    /// Status for the client when this is the final answer.
    pub fn client_status(&self) -> u16 {
        match self {
            FetchError::Status(404 | 410) => 404,
            _ => 502,
        }
    }
}

/// A raw provider response.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: u16,
    pub body: Bytes,
    pub content_type: Option<String>,
    pub content_range: Option<String>,
    /// The URL after redirects: the base for relative URIs.
    pub final_url: Url,
}

/// A cached upstream playlist (raw bytes: rewriting is per viewer).
#[derive(Debug, Clone)]
pub struct Playlist {
    /// Distinct per fetch: a viewer's rewritten copy is reused while it holds.
    pub generation: u64,
    pub body: Bytes,
    pub base: Url,
    pub info: PlaylistInfo,
    pub content_type: Option<String>,
    fetched: Instant,
    ttl: Duration,
}

impl Playlist {
    fn is_fresh(&self) -> bool {
        self.fetched.elapsed() < self.ttl
    }
}

#[derive(Default)]
struct PlaylistSlot {
    /// The playlist viewers are served. Read without waiting: at thousands of
    /// polls per second an async lock on every hit costs wake-ups (perf).
    current: parking_lot::RwLock<Option<Arc<Playlist>>>,
    /// Held while fetching: concurrent viewers wait here instead of fetching.
    fill: tokio::sync::Mutex<()>,
    /// One lock per blocking-reload target (segment, part): viewers waiting
    /// for the same part share one held provider request, and a viewer
    /// asking further ahead does not delay the others.
    holds: Mutex<HashMap<ReloadTarget, Arc<tokio::sync::Mutex<()>>>>,
    /// The backend a redirect led to, for sticky streams.
    sticky: Mutex<Option<Url>>,
}

/// (`_HLS_msn`, `_HLS_part`) of a blocking reload.
type ReloadTarget = (u64, Option<u64>);

/// A viewer's place at a blocking-reload target; the last one out removes it,
/// also when its request is cancelled.
struct Hold<'a> {
    slot: &'a PlaylistSlot,
    key: ReloadTarget,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> Hold<'a> {
    fn new(slot: &'a PlaylistSlot, key: ReloadTarget) -> Self {
        let lock = slot.holds.lock().entry(key).or_default().clone();
        Hold { slot, key, lock }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut holds = self.slot.holds.lock();
        // The map's reference and ours: nobody else is waiting.
        if Arc::strong_count(&self.lock) == 2 {
            holds.remove(&self.key);
        }
    }
}

impl PlaylistSlot {
    fn fresh(&self) -> Option<Arc<Playlist>> {
        self.current
            .read()
            .as_ref()
            .filter(|p| p.is_fresh())
            .cloned()
    }
}

#[derive(Default)]
struct SegmentSlot {
    entry: tokio::sync::Mutex<Option<Fetched>>,
}

/// Bounded FIFO of cached segments by bytes.
#[derive(Default)]
struct SegmentStore {
    slots: HashMap<String, Arc<SegmentSlot>>,
    order: VecDeque<(String, usize)>,
    bytes: usize,
}

pub struct HlsFetcher {
    /// stream id → playlist URL → slot; nested so a lookup allocates nothing.
    playlists: Mutex<HashMap<String, HashMap<String, Arc<PlaylistSlot>>>>,
    segments: Mutex<SegmentStore>,
    segment_cache_bytes: usize,
    playlist_max_bytes: usize,
    /// Live playlists not served because their media sequence went backwards
    /// (hits and misses are counted in `m3u_edge_hls_cache_total`).
    pub sequence_regressions: AtomicU64,
    metrics: Arc<Metrics>,
}

impl HlsFetcher {
    pub fn new(
        segment_cache_bytes: usize,
        playlist_max_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        HlsFetcher {
            metrics,
            playlists: Mutex::new(HashMap::new()),
            segments: Mutex::new(SegmentStore::default()),
            segment_cache_bytes,
            playlist_max_bytes,
            sequence_regressions: AtomicU64::new(0),
        }
    }

    /// Forgets a stream's playlists (stream deleted).
    pub fn forget(&self, stream_id: &str) {
        self.playlists.lock().remove(stream_id);
    }

    fn playlist_slot(&self, stream_id: &str, url: &Url) -> Arc<PlaylistSlot> {
        let mut all = self.playlists.lock();
        if let Some(slot) = all.get(stream_id).and_then(|m| m.get(url.as_str())) {
            return slot.clone();
        }
        all.entry(stream_id.to_string())
            .or_default()
            .entry(url.to_string())
            .or_default()
            .clone()
    }

    /// The playlist at `url` for `stream_id`, shared by all viewers.
    pub async fn playlist(
        &self,
        app: &App,
        stream_id: &str,
        spec: &StreamSpec,
        url: &Url,
    ) -> Result<Arc<Playlist>, FetchError> {
        let slot = self.playlist_slot(stream_id, url);
        if let Some(p) = slot.fresh() {
            self.metrics.hls_cache_result(CacheResult::Hit);
            return Ok(p);
        }
        let _filling = slot.fill.lock().await;
        // Whoever held the lock before may have just fetched it.
        if let Some(p) = slot.fresh() {
            self.metrics.hls_cache_result(CacheResult::Hit);
            return Ok(p);
        }
        let sticky_from = spec.sticky.then(|| slot.sticky.lock().clone()).flatten();
        self.metrics.hls_cache_result(CacheResult::Miss);
        let fetched = match &sticky_from {
            Some(backend) => match fetch(app, spec, backend, None, self.playlist_max_bytes).await {
                Ok(f) if f.status < 300 => Ok(f),
                // The sticky backend failed: back to the original URL.
                _ => {
                    *slot.sticky.lock() = None;
                    fetch(app, spec, url, None, self.playlist_max_bytes).await
                }
            },
            None => fetch(app, spec, url, None, self.playlist_max_bytes).await,
        }?;
        if fetched.status >= 300 {
            return Err(FetchError::Status(fetched.status));
        }
        let info =
            rewrite::inspect(&fetched.body).map_err(|e| FetchError::Malformed(e.to_string()))?;
        Ok(self.store(&slot, stream_id, spec, url, fetched, info))
    }

    /// An LL-HLS blocking reload (RFC 8216bis §6.2.5.2): the playlist once it
    /// holds segment `msn` (or part `part` of it, or later). The provider is
    /// asked with the same directives, one request per part, so however many
    /// viewers wait for the next part it holds one request, and the answer
    /// is the shared playlist for everybody. `None` when the
    /// provider did not deliver: the caller serves what it has, since a
    /// viewer's query must never fail the stream over.
    pub async fn playlist_at(
        &self,
        app: &App,
        stream_id: &str,
        spec: &StreamSpec,
        url: &Url,
        msn: u64,
        part: Option<u64>,
    ) -> Option<Arc<Playlist>> {
        let slot = self.playlist_slot(stream_id, url);
        let ready = || {
            let current = slot.current.read();
            current.as_ref().filter(|p| p.info.has(msn, part)).cloned()
        };
        if let Some(p) = ready() {
            self.metrics.hls_cache_result(CacheResult::Hit);
            return Some(p);
        }
        let hold = Hold::new(&slot, (msn, part));
        let _held = hold.lock.lock().await;
        if let Some(p) = ready() {
            self.metrics.hls_cache_result(CacheResult::Hit);
            return Some(p);
        }
        self.metrics.hls_cache_result(CacheResult::Miss);
        let backend = spec.sticky.then(|| slot.sticky.lock().clone()).flatten();
        let mut asked = backend.unwrap_or_else(|| url.clone());
        {
            let mut q = asked.query_pairs_mut();
            q.append_pair(MSN_DIRECTIVE, &msn.to_string());
            if let Some(part) = part {
                q.append_pair(PART_DIRECTIVE, &part.to_string());
            }
        }
        let target = slot
            .current
            .read()
            .as_ref()
            .and_then(|p| p.info.target_duration)
            .unwrap_or(6.0);
        // §6.2.5.2: an origin answers within three target durations.
        let limit = Duration::from_secs_f64((target * 3.0).clamp(1.0, 60.0) + 1.0);
        let fetched = tokio::time::timeout(
            limit,
            fetch(app, spec, &asked, None, self.playlist_max_bytes),
        )
        .await;
        match fetched {
            Ok(Ok(mut f)) if f.status < 300 => {
                f.final_url = without_directives(&f.final_url);
                let got = rewrite::inspect(&f.body).ok()?;
                let progress = |i: &PlaylistInfo| (i.next_msn(), i.trailing_parts);
                let current = slot.current.read().clone();
                if let Some(cur) = current.filter(|c| progress(&c.info) >= progress(&got)) {
                    // A request for a later part came back first: keep the newer playlist.
                    return Some(cur);
                }
                Some(self.store(&slot, stream_id, spec, url, f, got))
            }
            other => {
                let why = match other {
                    Ok(Ok(f)) => FetchError::Status(f.status).to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => FetchError::Timeout.to_string(),
                };
                tracing::debug!(stream_id, msn, part, error = %why, "blocking playlist reload failed; serving the cached playlist");
                None
            }
        }
    }

    /// Makes a fetched (and parsed) playlist the shared one for `slot`, or keeps
    /// the one it has when the new one went backwards; returns what viewers get.
    fn store(
        &self,
        slot: &PlaylistSlot,
        stream_id: &str,
        spec: &StreamSpec,
        url: &Url,
        fetched: Fetched,
        info: PlaylistInfo,
    ) -> Arc<Playlist> {
        if spec.sticky && fetched.final_url != *url {
            *slot.sticky.lock() = Some(fetched.final_url.clone());
        }
        // Monotonic: a lagging backend must not move viewers backwards.
        let prev = slot.current.read().clone();
        if let Some(prev) = prev {
            if let (Some(old), Some(new)) = (prev.info.media_sequence, info.media_sequence) {
                if !info.endlist && new < old {
                    self.sequence_regressions.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        stream_id,
                        old,
                        new,
                        "playlist went backwards: served the newer one"
                    );
                    let mut kept = (*prev).clone();
                    kept.fetched = Instant::now();
                    let kept = Arc::new(kept);
                    *slot.current.write() = Some(kept.clone());
                    return kept;
                }
            }
        }
        let ttl = if info.is_master || info.endlist {
            STATIC_PLAYLIST_TTL
        } else {
            info.target_duration
                .map(|t| Duration::from_secs_f64((t / 2.0).clamp(0.0, 60.0)))
                .unwrap_or(MIN_LIVE_TTL)
                .clamp(MIN_LIVE_TTL, MAX_LIVE_TTL)
        };
        static GENERATION: AtomicU64 = AtomicU64::new(1);
        let p = Arc::new(Playlist {
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            body: fetched.body,
            base: fetched.final_url,
            info,
            content_type: fetched.content_type,
            fetched: Instant::now(),
            ttl,
        });
        *slot.current.write() = Some(p.clone());
        p
    }

    /// The last playlist served for `url`, if any (to map variants across a failover).
    pub fn cached_playlist(&self, stream_id: &str, url: &Url) -> Option<Arc<Playlist>> {
        let slot = self
            .playlists
            .lock()
            .get(stream_id)
            .and_then(|m| m.get(url.as_str()))
            .cloned()?;
        let p = slot.current.read().clone();
        p
    }

    /// A segment, key or init map. Range requests go straight to the provider;
    /// whole objects are single-flight and cached within the byte budget.
    pub async fn segment(
        &self,
        app: &App,
        spec: &StreamSpec,
        url: &Url,
        range: Option<&str>,
    ) -> Result<Fetched, FetchError> {
        if range.is_some() || self.segment_cache_bytes == 0 {
            return fetch(app, spec, url, range, MAX_SEGMENT_BYTES).await;
        }
        let key = url.to_string();
        let slot = self
            .segments
            .lock()
            .slots
            .entry(key.clone())
            .or_default()
            .clone();
        let mut entry = slot.entry.lock().await;
        if let Some(f) = entry.as_ref() {
            self.metrics.hls_cache_result(CacheResult::Hit);
            return Ok(f.clone());
        }
        self.metrics.hls_cache_result(CacheResult::Miss);
        let result = fetch(app, spec, url, None, MAX_SEGMENT_BYTES).await;
        match &result {
            Ok(f)
                if f.status == 200
                    && f.body.len() <= self.segment_cache_bytes / MAX_CACHED_SEGMENT_FRACTION =>
            {
                *entry = Some(f.clone());
                drop(entry);
                self.admit(key, f.body.len());
            }
            _ => {
                drop(entry);
                let mut store = self.segments.lock();
                if store.slots.get(&key).is_some_and(|s| {
                    Arc::ptr_eq(s, &slot) && !store.order.iter().any(|(k, _)| *k == key)
                }) {
                    store.slots.remove(&key);
                }
            }
        }
        result
    }

    /// Accounts a cached segment and evicts the oldest ones over the budget.
    fn admit(&self, key: String, len: usize) {
        let mut store = self.segments.lock();
        store.order.push_back((key, len));
        store.bytes += len;
        while store.bytes > self.segment_cache_bytes {
            let Some((old, n)) = store.order.pop_front() else {
                break;
            };
            store.bytes -= n;
            store.slots.remove(&old);
        }
    }

    pub fn cached_segment_bytes(&self) -> usize {
        self.segments.lock().bytes
    }
}

/// GET `url` with the stream's identity (R7), redirects followed, body read
/// up to `max` bytes.
pub async fn fetch(
    app: &App,
    spec: &StreamSpec,
    url: &Url,
    range: Option<&str>,
    max: usize,
) -> Result<Fetched, FetchError> {
    let mut req = app
        .http
        .get(url.clone())
        .header(http::header::USER_AGENT, app.user_agent_for(spec, url))
        .header(http::header::ACCEPT_ENCODING, "identity");
    for (k, v) in app.headers_for(spec, url) {
        req = req.header(k, v);
    }
    if let Some(r) = range {
        req = req.header(http::header::RANGE, r);
    }
    let timeout = app.config.upstream.connect_timeout + app.config.upstream.read_timeout;
    let resp = tokio::time::timeout(timeout, req.send())
        .await
        .map_err(|_| FetchError::Timeout)?
        .map_err(|e| {
            if e.is_timeout() {
                FetchError::Timeout
            } else {
                FetchError::Connect
            }
        })?;
    let status = resp.status().as_u16();
    let header = |name: http::HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header(http::header::CONTENT_TYPE);
    let content_range = header(http::header::CONTENT_RANGE);
    let final_url = resp.url().clone();
    if resp.content_length().is_some_and(|n| n as usize > max) {
        return Err(FetchError::TooLarge(max));
    }
    let read_timeout = app.config.upstream.read_timeout;
    let mut body = BytesMut::new();
    let mut stream = resp.bytes_stream();
    loop {
        match tokio::time::timeout(read_timeout, stream.next()).await {
            Err(_) => return Err(FetchError::Timeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(FetchError::Read),
            Ok(Some(Ok(chunk))) => {
                if body.len() + chunk.len() > max {
                    return Err(FetchError::TooLarge(max));
                }
                body.extend_from_slice(&chunk);
            }
        }
    }
    app.metrics.bytes_in.inc_by(body.len() as u64);
    Ok(Fetched {
        status,
        body: body.freeze(),
        content_type,
        content_range,
        final_url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_are_dropped_and_the_rest_kept_byte_for_byte() {
        let u =
            Url::parse("http://p.test/live.m3u8?tok=a%2Bb+c&_HLS_msn=12&x=1&_HLS_part=3").unwrap();
        assert_eq!(
            without_directives(&u).as_str(),
            "http://p.test/live.m3u8?tok=a%2Bb+c&x=1"
        );
        let only = Url::parse("http://p.test/live.m3u8?_HLS_msn=12").unwrap();
        assert_eq!(
            without_directives(&only).as_str(),
            "http://p.test/live.m3u8"
        );
        let none = Url::parse("http://p.test/live.m3u8").unwrap();
        assert_eq!(without_directives(&none), none);
    }
}
