//! One provider fetch shared by every viewer (R2). Playlists are single-flight
//! with a short cache: a live media playlist is asked for at most once per half
//! target duration per stream, however many viewers poll, and is rewritten once
//! per fetch into the rendering every viewer shares ([`super::render`]).
//! Segments, keys and init maps are [`Flight`]s: one provider fetch that any
//! number of viewers read while it arrives, whole or by Range, kept in a
//! bounded in-memory cache once complete. Objects too big to share are
//! streamed through per request ([`SegmentSource::Direct`]).
//!
//! Also here, because they are about which bytes a playlist request gets:
//! sticky backends (keep refetching from where a redirect led) and monotonic
//! playlists: a live playlist whose media sequence went down is judged by
//! [`super::reset`]: lag (a backend behind, refused: players would loop) or
//! a provider reset (accepted once confirmed, as a new epoch the timeline
//! maps onto what players already saw, [`super::timeline`]).
//!
//! Requests to the provider ([`open`]) carry the stream's user agent and
//! headers and nothing of the client's (R7); redirects are followed here, hop
//! by hop, each hop checked against `security.deny_private_upstreams` and
//! holding a lease of the provider it connects to; sockets are closed after
//! each fetch. Every size and time bound of the `hls:` section is enforced
//! here and counted in `m3u_edge_hls_limits_total`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use parking_lot::Mutex;
use url::Url;

use super::render::{self, RenderError, Rendered};
use super::reset::{self, Verdict};
use super::rewrite::{self, PlaylistInfo};
use super::timeline::{self, Facts, Source};
use crate::app::App;
use crate::metrics::{CacheResult, HlsLimit, Metrics};
use crate::provider::Lease;
use crate::registry::StreamSpec;
use crate::upstream::guard;

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
    /// `security.deny_private_upstreams` refused the address.
    #[error("{0}")]
    Private(String),
    #[error("the source's redirect was not followed: {0}")]
    Redirect(&'static str),
    #[error("provider {provider} is at its connection limit ({max_connections})")]
    Full {
        provider: String,
        max_connections: u32,
    },
    /// A size or time limit of the `hls:` section cut the request.
    #[error("{0}")]
    Limit(String),
}

impl FetchError {
    /// Status for the client when this is the final answer.
    pub fn client_status(&self) -> u16 {
        match self {
            FetchError::Status(404 | 410) => 404,
            FetchError::Full { .. } => 503,
            _ => 502,
        }
    }

    /// Whether the source itself failed (worth another try or a failover),
    /// rather than a policy of this proxy refusing it.
    pub fn is_source_failure(&self) -> bool {
        !matches!(
            self,
            FetchError::Private(_) | FetchError::Full { .. } | FetchError::Limit(_)
        )
    }

    fn from_reqwest(e: &reqwest::Error) -> FetchError {
        match guard::find_refused(e) {
            Some(r) => FetchError::Private(r.to_string()),
            None if e.is_timeout() => FetchError::Timeout,
            None => FetchError::Connect,
        }
    }
}

/// A raw provider response.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: u16,
    pub body: Bytes,
    pub content_type: Option<String>,
    /// The URL after redirects: the base for relative URIs.
    pub final_url: Url,
}

/// A cached upstream playlist: the raw bytes (for variant mapping) and the
/// rendering every viewer of this generation shares.
#[derive(Debug, Clone)]
pub struct Playlist {
    /// Distinct per fetch.
    pub generation: u64,
    pub body: Bytes,
    pub base: Url,
    pub info: PlaylistInfo,
    pub content_type: Option<String>,
    pub rendered: Arc<Rendered>,
    /// The provider playlist URL (the slot's) and its reset epoch.
    pub source: Source,
    fetched: Instant,
    ttl: Duration,
}

impl Playlist {
    fn is_fresh(&self) -> bool {
        self.fetched.elapsed() < self.ttl
    }

    /// The numbers the timeline maps.
    pub fn facts(&self) -> Facts {
        let i = &self.info;
        Facts {
            media_sequence: i.media_sequence.unwrap_or(0),
            // The segment whose parts are trailing has its number already.
            next_msn: i.next_msn().saturating_add(u64::from(i.trailing_parts > 0)),
            discontinuity_sequence: i.discontinuity_sequence.unwrap_or(0),
            discontinuities: self.rendered.discontinuities,
            first_tagged: self.rendered.first_tagged,
            generation: self.generation,
        }
    }

    fn target(&self) -> Duration {
        Duration::from_secs_f64(self.info.target_duration.unwrap_or(6.0).clamp(0.1, 60.0))
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
    /// Segments seen, and a possible reset being confirmed.
    history: Mutex<reset::History>,
}

/// (epoch, `_HLS_msn`, `_HLS_part`) of a blocking reload.
type ReloadTarget = (u64, u64, Option<u64>);

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

/// Segment fetches being shared, and finished ones kept as the cache: a
/// bounded FIFO by bytes.
#[derive(Default)]
struct SegmentStore {
    slots: HashMap<String, Arc<Flight>>,
    order: VecDeque<(String, usize)>,
    bytes: usize,
    /// URLs recently found too big to share: requests for them go straight
    /// to the provider instead of first starting a shared fetch that is
    /// abandoned at its Content-Length (one provider request each, not two).
    oversize: VecDeque<String>,
}

/// How many too-big-to-share URLs are remembered.
const OVERSIZE_REMEMBERED: usize = 256;

pub struct HlsFetcher {
    /// stream id → playlist URL → slot; nested so a lookup allocates nothing.
    playlists: Mutex<HashMap<String, HashMap<String, Arc<PlaylistSlot>>>>,
    segments: Mutex<SegmentStore>,
    segment_cache_bytes: usize,
    /// Bytes held by segment fetches being shared right now.
    inflight_bytes: AtomicUsize,
    /// Live playlists not served because their media sequence went backwards
    /// over segments already seen: lagging backends (hits and misses are
    /// counted in `m3u_edge_hls_cache_total`).
    pub sequence_regressions: AtomicU64,
    /// Confirmed provider resets (a new epoch of a playlist).
    pub sequence_resets: AtomicU64,
    /// The timeline of every playlist players follow.
    pub lanes: timeline::Lanes,
    metrics: Arc<Metrics>,
}

impl HlsFetcher {
    pub fn new(segment_cache_bytes: usize, metrics: Arc<Metrics>) -> Self {
        HlsFetcher {
            metrics,
            playlists: Mutex::new(HashMap::new()),
            segments: Mutex::new(SegmentStore::default()),
            segment_cache_bytes,
            inflight_bytes: AtomicUsize::new(0),
            sequence_regressions: AtomicU64::new(0),
            sequence_resets: AtomicU64::new(0),
            lanes: timeline::Lanes::default(),
        }
    }

    /// Forgets a stream's playlists (stream deleted).
    pub fn forget(&self, stream_id: &str) {
        self.playlists.lock().remove(stream_id);
        self.lanes.forget(stream_id);
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
        let limits = Limits::of(app);
        let fetched = match &sticky_from {
            Some(backend) => match fetch_playlist(app, stream_id, spec, backend, &limits).await {
                Ok(f) => Ok(f),
                // The sticky backend failed: back to the original URL.
                Err(_) => {
                    *slot.sticky.lock() = None;
                    fetch_playlist(app, stream_id, spec, url, &limits).await
                }
            },
            None => fetch_playlist(app, stream_id, spec, url, &limits).await,
        }?;
        let info =
            rewrite::inspect(&fetched.body).map_err(|e| FetchError::Malformed(e.to_string()))?;
        self.store(app, &slot, stream_id, spec, url, fetched, info)
            .map(|(p, _)| p)
    }

    /// An LL-HLS blocking reload (RFC 8216bis §6.2.5.2): the playlist once it
    /// holds segment `msn` (or part `part` of it, or later), in the
    /// numbering of provider epoch `epoch`. The provider is asked with the
    /// same directives, one request per part, so however many viewers wait
    /// for the next part it holds one request, and the answer is the shared
    /// playlist for everybody. A reset of the provider while requests are
    /// held answers them with the new epoch's playlist (confirmed with a
    /// second poll right away). `None` when the provider did not deliver:
    /// the caller serves what it has, since a viewer's query must never fail
    /// the stream over.
    #[allow(clippy::too_many_arguments)]
    pub async fn playlist_at(
        &self,
        app: &App,
        stream_id: &str,
        spec: &StreamSpec,
        url: &Url,
        epoch: u64,
        msn: u64,
        part: Option<u64>,
    ) -> Option<Arc<Playlist>> {
        let slot = self.playlist_slot(stream_id, url);
        let ready = || {
            let current = slot.current.read();
            current
                .as_ref()
                .filter(|p| p.source.epoch != epoch || p.info.has(msn, part))
                .cloned()
        };
        if let Some(p) = ready() {
            self.metrics.hls_cache_result(CacheResult::Hit);
            return Some(p);
        }
        let hold = Hold::new(&slot, (epoch, msn, part));
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
        // §6.2.5.2: an origin answers within three target durations; that
        // bounds both the header and the whole fetch here.
        let limit = Duration::from_secs_f64((target * 3.0).clamp(1.0, 60.0) + 1.0);
        let limits = Limits {
            header: limit,
            total: limit,
            ..Limits::of(app)
        };
        let fetched = fetch_playlist(app, stream_id, spec, &asked, &limits).await;
        match fetched {
            Ok(mut f) => {
                f.final_url = without_directives(&f.final_url);
                let got = rewrite::inspect(&f.body).ok()?;
                let progress = |i: &PlaylistInfo| (i.next_msn(), i.trailing_parts);
                let current = slot.current.read().clone();
                if let Some(cur) = current.filter(|c| {
                    progress(&c.info) >= progress(&got)
                        && got.media_sequence >= c.info.media_sequence
                }) {
                    // A request for a later part came back first: keep the newer playlist.
                    return Some(cur);
                }
                let (p, verdict) = self.store(app, &slot, stream_id, spec, url, f, got).ok()?;
                if verdict != Verdict::Pending {
                    return Some(p);
                }
                // Maybe a reset: the second poll that confirms (or not) it now,
                // rather than at the next reload of players that are waiting.
                let again = fetch_playlist(app, stream_id, spec, url, &Limits::of(app))
                    .await
                    .ok()?;
                let info = rewrite::inspect(&again.body).ok()?;
                self.store(app, &slot, stream_id, spec, url, again, info)
                    .ok()
                    .map(|(p, _)| p)
            }
            Err(why) => {
                tracing::debug!(stream_id, msn, part, error = %why, "blocking playlist reload failed; serving the cached playlist");
                None
            }
        }
    }

    /// Makes a fetched (and parsed) playlist the shared one for `slot`, or keeps
    /// the one it has when the new one went backwards (lag, or a reset not
    /// confirmed yet); returns what viewers get and the verdict. The shared
    /// rendering is made here, once per generation.
    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        app: &App,
        slot: &PlaylistSlot,
        stream_id: &str,
        spec: &StreamSpec,
        url: &Url,
        fetched: Fetched,
        info: PlaylistInfo,
    ) -> Result<(Arc<Playlist>, Verdict), FetchError> {
        if spec.sticky && fetched.final_url != *url {
            *slot.sticky.lock() = Some(fetched.final_url.clone());
        }
        let rendered = Rendered::new(
            &fetched.body,
            &fetched.final_url,
            &app.signer,
            &render::prefix(&app.config),
            stream_id,
            app.config.hls.rendered_max_bytes,
        )
        .map_err(|e| {
            let limit = match &e {
                RenderError::TooLarge(..) => Some(HlsLimit::RenderedBytes),
                RenderError::Rewrite(rewrite::RewriteError::UriTooLong { .. }) => {
                    Some(HlsLimit::UriLength)
                }
                RenderError::Rewrite(_) => None,
            };
            match limit {
                Some(l) => {
                    self.metrics.hls_limit(l);
                    FetchError::Limit(e.to_string())
                }
                None => FetchError::Malformed(e.to_string()),
            }
        })?;
        // Monotonic: a lagging backend must not move viewers backwards, and
        // a provider that restarted must not stall them forever.
        let prev = slot.current.read().clone();
        let (verdict, epoch) = {
            let mut history = slot.history.lock();
            let served = prev
                .as_ref()
                .filter(|p| !p.info.is_master)
                .and_then(|p| p.info.media_sequence);
            let window = reset::Window {
                media_sequence: info.media_sequence,
                endlist: info.endlist,
                ids: &rendered.segment_ids,
            };
            let target = prev.as_ref().map_or(Duration::from_secs(6), |p| p.target());
            let v = history.judge(served, &window, target, Instant::now());
            (v, history.epoch)
        };
        if let (Some(prev), Verdict::Lag | Verdict::Pending) = (prev, verdict) {
            let old = prev.info.media_sequence;
            let new = info.media_sequence;
            if verdict == Verdict::Lag {
                self.sequence_regressions.fetch_add(1, Ordering::Relaxed);
                self.metrics.hls_lag_refusals.inc();
                tracing::debug!(
                    stream_id,
                    old,
                    new,
                    "playlist went backwards over segments already seen (lag): served the newer one"
                );
            } else {
                tracing::info!(
                    stream_id,
                    old,
                    new,
                    "playlist went backwards to segments never seen: a reset if the next poll confirms it"
                );
            }
            let mut kept = (*prev).clone();
            kept.fetched = Instant::now();
            let kept = Arc::new(kept);
            *slot.current.write() = Some(kept.clone());
            return Ok((kept, verdict));
        }
        if verdict == Verdict::Reset {
            self.sequence_resets.fetch_add(1, Ordering::Relaxed);
            self.metrics.hls_sequence_resets.inc();
            tracing::warn!(
                stream_id,
                epoch,
                media_sequence = info.media_sequence,
                "the provider restarted its media sequence: serving it as a new epoch"
            );
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
            rendered: Arc::new(rendered),
            source: Source {
                url: Arc::from(url.as_str()),
                epoch,
            },
            fetched: Instant::now(),
            ttl,
        });
        *slot.current.write() = Some(p.clone());
        Ok((p, verdict))
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

    /// Largest object fetched once and shared (and cached): a quarter of the
    /// cache, so a VOD file behind a playlist cannot evict the live edge.
    fn shareable(&self, app: &App) -> usize {
        (self.segment_cache_bytes / MAX_CACHED_SEGMENT_FRACTION)
            .min(app.config.hls.segment_max_bytes)
    }

    /// A segment, key or init map: a shared fetch (running or finished) that
    /// viewers read as it arrives, whole or by Range; or, for objects too big
    /// to share, the provider's answer to stream through for this request alone.
    pub async fn segment(
        &self,
        app: &Arc<App>,
        stream_id: &str,
        spec: &StreamSpec,
        url: &Url,
        range: Option<&str>,
    ) -> Result<SegmentSource, FetchError> {
        let limits = Limits::of(app);
        let direct = || async {
            open(app, stream_id, spec, url, range, limits.header)
                .await
                .map(|o| SegmentSource::Direct(Box::new(o)))
        };
        if self.segment_cache_bytes == 0 {
            return direct().await;
        }
        let key = url.to_string();
        let oversize = self.segments.lock().oversize.contains(&key);
        if oversize {
            return direct().await;
        }
        let flight = {
            let mut store = self.segments.lock();
            match store.slots.get(&key) {
                Some(f) => {
                    let result = if f.is_complete() {
                        CacheResult::Hit
                    } else {
                        CacheResult::Coalesced
                    };
                    self.metrics.hls_cache_result(result);
                    return Ok(SegmentSource::Shared(f.clone()));
                }
                None if self.inflight_bytes.load(Ordering::Relaxed)
                    >= app.config.hls.inflight_max_bytes =>
                {
                    None
                }
                None => {
                    let f = Arc::new(Flight::default());
                    store.slots.insert(key.clone(), f.clone());
                    Some(f)
                }
            }
        };
        let Some(flight) = flight else {
            self.metrics.hls_limit(HlsLimit::InflightBytes);
            return direct().await;
        };
        self.metrics.hls_cache_result(CacheResult::Miss);
        let task = FlightTask {
            app: app.clone(),
            flight: flight.clone(),
            key,
            stream_id: stream_id.to_string(),
            spec: spec.clone(),
            url: url.clone(),
            shareable: self.shareable(app),
            counted: 0,
        };
        tokio::spawn(task.run());
        Ok(SegmentSource::Shared(flight))
    }

    /// Takes a finished flight's bytes into the cache and evicts the oldest
    /// entries over the budget.
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

    fn remember_oversize(&self, key: &str) {
        let mut store = self.segments.lock();
        if !store.oversize.iter().any(|k| k == key) {
            if store.oversize.len() >= OVERSIZE_REMEMBERED {
                store.oversize.pop_front();
            }
            store.oversize.push_back(key.to_string());
        }
    }

    /// Removes `flight` from the store unless the cache holds it.
    fn drop_flight(&self, key: &str, flight: &Arc<Flight>) {
        let mut store = self.segments.lock();
        if store.slots.get(key).is_some_and(|s| Arc::ptr_eq(s, flight))
            && !store.order.iter().any(|(k, _)| k == key)
        {
            store.slots.remove(key);
        }
    }

    pub fn cached_segment_bytes(&self) -> usize {
        self.segments.lock().bytes
    }
}

/// Where a segment request reads from.
pub enum SegmentSource {
    /// A fetch shared with other viewers (running, or finished and cached).
    Shared(Arc<Flight>),
    /// The provider's own answer for this request (objects too big to share).
    Direct(Box<Opened>),
}

/// What a shared fetch knows once the provider answered 200.
#[derive(Debug, Clone)]
pub struct SegmentHead {
    pub content_type: Option<String>,
    /// Content-Length, when the provider sent one.
    pub total: Option<usize>,
}

#[derive(Debug, Clone)]
enum FlightEnd {
    Done,
    Failed(FetchError),
    /// Too big to share: every reader fetches it for itself.
    Direct,
}

#[derive(Default)]
struct FlightState {
    head: Option<SegmentHead>,
    /// (offset, bytes), in order.
    chunks: Vec<(usize, Bytes)>,
    len: usize,
    end: Option<FlightEnd>,
}

/// One provider fetch of a segment that any number of viewers read while it
/// arrives (issue #14 e: the first byte reaches viewers before the last one
/// left the provider, and Range requests are slices of it). Finished and small
/// enough, it stays in the cache.
pub struct Flight {
    state: Mutex<FlightState>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for Flight {
    fn default() -> Self {
        Flight {
            state: Mutex::new(FlightState::default()),
            changed: tokio::sync::watch::channel(0).0,
        }
    }
}

/// A shared fetch's outcome as one reader sees it.
#[derive(Debug, Clone)]
pub enum Read {
    /// The provider's answer starts: stream it.
    Head(SegmentHead),
    /// The object is too big to share: fetch it for this request.
    Direct,
}

impl Flight {
    fn is_complete(&self) -> bool {
        matches!(self.state.lock().end, Some(FlightEnd::Done))
    }

    fn update(&self, f: impl FnOnce(&mut FlightState)) {
        f(&mut self.state.lock());
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Waits until `ready` says something about the state.
    async fn wait<T>(&self, ready: impl Fn(&FlightState) -> Option<T>) -> T {
        let mut rx = self.changed.subscribe();
        loop {
            if let Some(v) = ready(&self.state.lock()) {
                return v;
            }
            // The sender lives in `self`: this cannot fail while we wait.
            if rx.changed().await.is_err() {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Waits for the provider's answer.
    pub async fn head(&self) -> Result<Read, FetchError> {
        self.wait(|s| match (&s.head, &s.end) {
            (Some(h), _) => Some(Ok(Read::Head(h.clone()))),
            (None, Some(FlightEnd::Failed(e))) => Some(Err(e.clone())),
            (None, Some(FlightEnd::Direct)) => Some(Ok(Read::Direct)),
            (None, Some(FlightEnd::Done)) => Some(Err(FetchError::Read)),
            (None, None) => None,
        })
        .await
    }

    /// The whole length, once known (Content-Length, or the end).
    pub async fn total(&self) -> Result<usize, FetchError> {
        self.wait(|s| match (&s.head, &s.end) {
            (Some(SegmentHead { total: Some(n), .. }), _) => Some(Ok(*n)),
            (_, Some(FlightEnd::Done)) => Some(Ok(s.len)),
            (_, Some(FlightEnd::Failed(e))) => Some(Err(e.clone())),
            (_, Some(FlightEnd::Direct)) => Some(Err(FetchError::Read)),
            _ => None,
        })
        .await
    }

    /// The bytes from `pos` (up to `end`) as soon as there are any; empty at the end.
    pub async fn next(&self, pos: usize, end: usize) -> Result<Vec<Bytes>, FetchError> {
        self.wait(|s| {
            if pos < s.len && pos < end {
                let stop = s.len.min(end);
                let first = s.chunks.partition_point(|(off, b)| off + b.len() <= pos);
                let mut out = Vec::new();
                for (off, b) in &s.chunks[first..] {
                    if *off >= stop {
                        break;
                    }
                    let from = pos.saturating_sub(*off);
                    let to = (stop - off).min(b.len());
                    out.push(b.slice(from..to));
                }
                return Some(Ok(out));
            }
            match &s.end {
                _ if pos >= end => Some(Ok(Vec::new())),
                Some(FlightEnd::Done) => Some(Ok(Vec::new())),
                Some(FlightEnd::Failed(e)) => Some(Err(e.clone())),
                Some(FlightEnd::Direct) => Some(Err(FetchError::Read)),
                None => None,
            }
        })
        .await
    }
}

/// The task that fills a [`Flight`] from the provider.
struct FlightTask {
    app: Arc<App>,
    flight: Arc<Flight>,
    key: String,
    stream_id: String,
    spec: StreamSpec,
    url: Url,
    shareable: usize,
    /// Bytes added to the fetcher's in-flight count.
    counted: usize,
}

impl FlightTask {
    async fn run(mut self) {
        let limit = self.app.config.hls.segment_timeout;
        let end = match tokio::time::timeout(limit, self.fill()).await {
            Ok(Ok(end)) => end,
            Ok(Err(e)) => FlightEnd::Failed(e),
            Err(_) => {
                self.app.metrics.hls_limit(HlsLimit::SegmentTimeout);
                FlightEnd::Failed(FetchError::Limit(format!(
                    "segment not fetched within hls.segment_timeout ({limit:?})"
                )))
            }
        };
        let hls = &self.app.hls;
        hls.inflight_bytes
            .fetch_sub(self.counted, Ordering::Relaxed);
        let len = {
            let mut s = self.flight.state.lock();
            if matches!(end, FlightEnd::Done) && s.chunks.len() > 1 {
                // One buffer per cached object, not the transport's pieces.
                let mut all = BytesMut::with_capacity(s.len);
                for (_, b) in &s.chunks {
                    all.extend_from_slice(b);
                }
                s.chunks = vec![(0, all.freeze())];
            }
            s.len
        };
        let keep = matches!(end, FlightEnd::Done) && len <= self.shareable;
        if matches!(end, FlightEnd::Direct) || len > self.shareable {
            hls.remember_oversize(&self.key);
        }
        self.flight.update(|s| s.end = Some(end));
        if keep {
            hls.admit(self.key.clone(), len);
        } else {
            hls.drop_flight(&self.key, &self.flight);
        }
    }

    async fn fill(&mut self) -> Result<FlightEnd, FetchError> {
        let app = self.app.clone();
        let cfg = &app.config;
        let Opened { resp, lease, .. } = open(
            &app,
            &self.stream_id,
            &self.spec,
            &self.url,
            None,
            cfg.hls.header_timeout,
        )
        .await?;
        let _lease = lease;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(FetchError::Status(status));
        }
        let total = resp.content_length().map(|n| n as usize);
        if total.is_some_and(|n| n > self.shareable) {
            return Ok(FlightEnd::Direct);
        }
        let head = SegmentHead {
            content_type: header_str(resp.headers(), http::header::CONTENT_TYPE),
            total,
        };
        self.flight.update(|s| s.head = Some(head));
        let mut body = resp.bytes_stream();
        let mut shared = true;
        loop {
            let chunk = match tokio::time::timeout(cfg.upstream.read_timeout, body.next()).await {
                Err(_) => return Err(FetchError::Timeout),
                Ok(None) => break,
                Ok(Some(Err(_))) => return Err(FetchError::Read),
                Ok(Some(Ok(c))) => c,
            };
            let len = self.flight.state.lock().len + chunk.len();
            if len > cfg.hls.segment_max_bytes {
                app.metrics.hls_limit(HlsLimit::SegmentBytes);
                return Err(FetchError::Limit(format!(
                    "segment larger than hls.segment_max_bytes ({})",
                    cfg.hls.segment_max_bytes
                )));
            }
            if total.is_some_and(|t| len > t) {
                return Err(FetchError::Read);
            }
            app.metrics.bytes_in.inc_by(chunk.len() as u64);
            app.hls
                .inflight_bytes
                .fetch_add(chunk.len(), Ordering::Relaxed);
            self.counted += chunk.len();
            self.flight.update(|s| {
                s.chunks.push((s.len, chunk));
                s.len = len;
            });
            if shared && len > self.shareable {
                // No Content-Length and too big after all: the readers that
                // joined keep reading; new requests fetch for themselves.
                shared = false;
                app.hls.drop_flight(&self.key, &self.flight);
            }
        }
        if total.is_some_and(|t| self.flight.state.lock().len != t) {
            return Err(FetchError::Read);
        }
        Ok(FlightEnd::Done)
    }
}

fn header_str(h: &http::HeaderMap, name: http::HeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The time and size bounds of one fetch.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header: Duration,
    total: Duration,
    max_bytes: usize,
    max_lines: usize,
}

impl Limits {
    fn of(app: &App) -> Limits {
        let h = &app.config.hls;
        Limits {
            header: h.header_timeout,
            total: h.playlist_timeout,
            max_bytes: h.playlist_max_bytes,
            max_lines: h.playlist_max_lines,
        }
    }
}

/// How long an HLS fetch waits for a lease of a full provider: playlists and
/// segments are short requests, so a slot frees up soon.
const LEASE_WAIT: Duration = Duration::from_secs(5);

/// A provider's answer, with the lease of the provider connected to (held
/// until this is dropped) and the URL after redirects.
pub struct Opened {
    pub resp: reqwest::Response,
    pub final_url: Url,
    pub lease: Lease,
}

/// Takes a lease of `provider`, waiting for one within the limit (idle
/// lingering live channels of that provider are closed first).
async fn lease(app: &App, provider: Option<&str>, stream_id: &str) -> Result<Lease, FetchError> {
    match app.leases.acquire(provider, Duration::ZERO).await {
        Ok(l) => Ok(l),
        Err(_) => {
            if let Some(p) = provider {
                app.hub.free_idle(p, stream_id);
            }
            app.leases
                .acquire(provider, LEASE_WAIT)
                .await
                .map_err(|full| {
                    app.metrics
                        .provider_rejections
                        .with_label_values(&[full.provider.as_str()])
                        .inc();
                    FetchError::Full {
                        provider: full.provider,
                        max_connections: full.max_connections,
                    }
                })
        }
    }
}

/// GETs `url` with the stream's identity (R7) and `Connection: close` (an HLS
/// provider socket lives as long as its fetch, like the hub's: an idle stream
/// holds no provider slot). Redirects are followed here, hop by hop, so each
/// hop's address is checked (`security.deny_private_upstreams`) and the lease
/// is of the provider of the host actually connected to.
pub async fn open(
    app: &App,
    stream_id: &str,
    spec: &StreamSpec,
    url: &Url,
    range: Option<&str>,
    header_timeout: Duration,
) -> Result<Opened, FetchError> {
    let mut url = url.clone();
    for hop in 0..=app.config.upstream.max_redirects {
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(FetchError::Redirect(
                "it leads to a URL that is not http(s)",
            ));
        }
        guard::check_url(&url).map_err(|r| FetchError::Private(r.to_string()))?;
        let provider = if hop == 0 {
            app.providers.for_stream(spec, &url)
        } else {
            app.providers
                .by_url(&url)
                .or_else(|| app.providers.for_stream(spec, &url))
        };
        let provider = provider.map(|p| p.name.clone());
        let lease = lease(app, provider.as_deref(), stream_id).await?;
        let mut req = app
            .hls_http
            .get(url.clone())
            .header(http::header::USER_AGENT, app.user_agent_for(spec, &url))
            .header(http::header::ACCEPT_ENCODING, "identity")
            .header(http::header::CONNECTION, "close");
        for (k, v) in app.headers_for(spec, &url) {
            req = req.header(k, v);
        }
        if let Some(r) = range {
            req = req.header(http::header::RANGE, r);
        }
        let resp = match tokio::time::timeout(header_timeout, req.send()).await {
            Err(_) => {
                app.metrics.hls_limit(HlsLimit::HeaderTimeout);
                return Err(FetchError::Timeout);
            }
            Ok(Err(e)) => return Err(FetchError::from_reqwest(&e)),
            Ok(Ok(r)) => r,
        };
        if resp.status().is_redirection() {
            let next = resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|loc| url.join(loc.trim()).ok());
            drop(resp);
            drop(lease);
            match next {
                Some(next) => {
                    url = next;
                    continue;
                }
                None => return Err(FetchError::Redirect("it has no usable Location")),
            }
        }
        return Ok(Opened {
            resp,
            final_url: url,
            lease,
        });
    }
    Err(FetchError::Redirect("too many redirects"))
}

/// A playlist: [`open`], then the body within the size, line and time limits.
async fn fetch_playlist(
    app: &App,
    stream_id: &str,
    spec: &StreamSpec,
    url: &Url,
    limits: &Limits,
) -> Result<Fetched, FetchError> {
    let work = async {
        let Opened {
            resp,
            final_url,
            lease,
        } = open(app, stream_id, spec, url, None, limits.header).await?;
        let _lease = lease;
        let status = resp.status().as_u16();
        if status >= 300 {
            return Err(FetchError::Status(status));
        }
        let content_type = header_str(resp.headers(), http::header::CONTENT_TYPE);
        let max = limits.max_bytes;
        let too_large = || {
            app.metrics.hls_limit(HlsLimit::PlaylistBytes);
            FetchError::TooLarge(max)
        };
        if resp.content_length().is_some_and(|n| n as usize > max) {
            return Err(too_large());
        }
        let read_timeout = app.config.upstream.read_timeout;
        let mut body = BytesMut::new();
        let mut lines = 0usize;
        let mut stream = resp.bytes_stream();
        loop {
            match tokio::time::timeout(read_timeout, stream.next()).await {
                Err(_) => return Err(FetchError::Timeout),
                Ok(None) => break,
                Ok(Some(Err(_))) => return Err(FetchError::Read),
                Ok(Some(Ok(chunk))) => {
                    if body.len() + chunk.len() > max {
                        return Err(too_large());
                    }
                    lines += chunk.iter().filter(|&&b| b == b'\n').count();
                    if lines > limits.max_lines {
                        app.metrics.hls_limit(HlsLimit::PlaylistLines);
                        return Err(FetchError::Limit(format!(
                            "playlist has more than {} lines (hls.playlist_max_lines)",
                            limits.max_lines
                        )));
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
            final_url,
        })
    };
    match tokio::time::timeout(limits.total, work).await {
        Ok(r) => r,
        Err(_) => {
            app.metrics.hls_limit(HlsLimit::PlaylistTimeout);
            Err(FetchError::Limit(format!(
                "playlist not fetched within {:?}",
                limits.total
            )))
        }
    }
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
