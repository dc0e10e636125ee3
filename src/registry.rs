//! The stream registry: every stream m3u-edge can serve, its connected clients and
//! its counters, with the m3u-proxy 0.4.x semantics m3u-editor relies on
//! (../shared/API-COMPAT.md §3, §5, §8).
//!
//! Streams come from the YAML (`Origin::Config`, read-only, never expire) or from
//! `POST /streams` (`Origin::Api`, persisted by `state`, expire when unwatched).
//! The registry knows nothing about HTTP or Pingora: the API and the proxy call it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU8;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use md5::{Digest, Md5};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::conn::caps::{Caps, Slot};
use crate::events::{EventType, Events};

/// Lowercase md5 hex of a URL exactly as sent: m3u-proxy's stream id, which
/// m3u-editor stores and sends back.
pub fn stream_id_for(url: &str) -> String {
    hex::encode(Md5::digest(url.as_bytes()))
}

/// Told when a client appears on or leaves a stream of this node, instead
/// of the registry emitting `client_connected` / `client_disconnected`
/// itself (cluster mode: the cluster-wide tracker decides which node
/// emits). Called with locks released; must not block.
pub trait ClientWatcher: Send + Sync {
    fn joined(&self, stream: &Stream, client: &Arc<Client>);
    fn left(&self, stream: &Stream, client: &Arc<Client>, reason: &str);
    /// Resolves once every join and leave told so far is processed (the
    /// shutdown path waits for it, bounded).
    fn flushed(&self) -> tokio::sync::oneshot::Receiver<()>;
}

/// The registry's watcher, shared by its streams; set once.
#[derive(Default)]
pub struct WatcherSlot(OnceLock<Arc<dyn ClientWatcher>>);

impl std::fmt::Debug for WatcherSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Watched"
        } else {
            "Unwatched"
        })
    }
}

/// Where a stream was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `streams:` in the YAML: read-only, never expires, not persisted.
    Config,
    /// `POST /streams`: persisted in the state file, expires when unwatched.
    Api,
    /// An entry of a `playlists:` import: read-only for the API, never
    /// expires, added, updated and removed by the playlist's refreshes.
    Playlist,
}

impl Origin {
    /// Declared by the operator (YAML or an imported playlist): the API may
    /// neither replace nor delete it.
    pub fn read_only(self) -> bool {
        self != Origin::Api
    }
}

/// What [`Registry::upsert_playlist`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Added,
    /// The spec changed (metadata, user agent...): swapped in place, so
    /// viewers and the live channel stay.
    Updated,
    Unchanged,
    /// The id belongs to a YAML or API stream, which is left as it is.
    Taken,
    /// `limits.max_streams` reached.
    Full,
}

/// What a stream is: everything the client sent or the YAML declared.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamSpec {
    pub url: String,
    #[serde(default)]
    pub failover_urls: Vec<String>,
    #[serde(default)]
    pub failover_resolver_url: Option<String>,
    /// The stream's own user agent; `None` falls back to the provider's, then
    /// `upstream.user_agent`.
    #[serde(default)]
    pub user_agent: Option<String>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// `None`: decided from the first upstream response and the URL.
    #[serde(default)]
    pub live: Option<bool>,
    #[serde(default)]
    pub sticky: bool,
    #[serde(default)]
    pub strict_live_ts: bool,
    /// The provider named in the YAML; API streams are matched by host.
    #[serde(default)]
    pub provider: Option<String>,
    /// A transcoded channel (`POST /transcode`): ffmpeg over another stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcode: Option<TranscodeSpec>,
    /// A page URL turned into media by streamlink or yt-dlp (`POST /transcode`
    /// with `resolver`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolver: Option<crate::resolvers::ResolverSpec>,
    /// `enable_silence_detection` and its thresholds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silence: Option<crate::silence::SilenceSpec>,
}

/// What a transcoded stream runs: ffmpeg with `args`, fed from the live
/// channel of stream `source` (one more viewer of it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscodeSpec {
    pub source: String,
    pub args: Vec<String>,
    /// The profile's name, or `custom` for a template.
    pub profile: String,
    /// The template asked for HLS output.
    #[serde(default)]
    pub hls: bool,
    /// HLS segment length (seconds) and playlist length, for HLS output.
    #[serde(default)]
    pub hls_time: Option<f64>,
    #[serde(default)]
    pub hls_list_size: Option<usize>,
}

/// Failover position of a stream, as `GET /streams` reports it.
#[derive(Debug, Clone)]
pub struct FailoverState {
    /// -1 = primary, else the index into `failover_urls` (m3u-proxy numbering).
    pub index: i64,
    pub attempts: u64,
    pub last_time: Option<DateTime<Utc>>,
    pub current_url: String,
    /// `current_url` parsed once per switch, not once per playlist poll.
    pub current: Option<url::Url>,
}

/// Health of one source, as `GET /streams/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceHealth {
    /// m3u-proxy numbering: -1 primary, 0.. failover_urls, then resolver URLs.
    pub index: i64,
    /// "ok", "failing" or "untried".
    pub state: &'static str,
    pub failing_since: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub failures: u32,
    #[serde(skip)]
    pub retry_at: Option<Instant>,
}

impl SourceHealth {
    pub fn new(index: i64) -> Self {
        SourceHealth {
            index,
            state: "untried",
            failing_since: None,
            last_error: None,
            failures: 0,
            retry_at: None,
        }
    }

    pub fn available(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| t <= now)
    }
}

/// A connected client: one player, possibly with several requests in flight.
#[derive(Debug)]
pub struct Client {
    pub id: String,
    pub stream_id: String,
    pub user_agent: String,
    pub ip: String,
    pub username: Option<String>,
    pub created_at: DateTime<Utc>,
    last_access: Mutex<DateTime<Utc>>,
    pub bytes: AtomicU64,
    pub segments: AtomicU64,
    /// Requests of this client in flight; the client is listed while > 0.
    connections: AtomicU64,
    /// Cancelled when the API drops this client: every request of it ends.
    pub cancel: CancellationToken,
    /// HLS viewers have no connection to watch: they stay listed until they
    /// have asked for nothing for this long.
    pub idle_timeout: Option<Duration>,
    /// Counted against the per-address caps while this client exists.
    _slots: Vec<Slot<String>>,
}

impl Client {
    pub fn last_access(&self) -> DateTime<Utc> {
        *self.last_access.lock()
    }

    pub fn touch(&self) {
        *self.last_access.lock() = Utc::now();
    }

    pub fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Stream {
    pub id: String,
    pub origin: Origin,
    spec: RwLock<Arc<StreamSpec>>,
    pub created_at: DateTime<Utc>,
    last_access: Mutex<DateTime<Utc>>,
    pub bytes: AtomicU64,
    pub segments: AtomicU64,
    pub errors: AtomicU64,
    failover: Mutex<FailoverState>,
    clients: Mutex<HashMap<String, Arc<Client>>>,
    /// Cancelled when the stream is deleted: every request of it ends.
    pub closed: CancellationToken,
    /// Live or file, once an upstream response told (0 = not known yet).
    detected: AtomicU8,
    /// Per-source health of the live hub, for `GET /streams/{id}`.
    pub health: Mutex<Vec<SourceHealth>>,
    events: EventSink,
    session: Mutex<Session>,
    watcher: Arc<WatcherSlot>,
}

/// Where a stream's events go (none in unit tests).
struct EventSink(Option<Arc<Events>>);

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "EventSink"
        } else {
            "NoEvents"
        })
    }
}

/// Event bookkeeping of a stream: `stream_started` once per provider session,
/// `stream_stopped` exactly once after it (m3u-editor frees its provider slot
/// on that event, so it must always come).
#[derive(Debug, Default)]
struct Session {
    started: Option<Instant>,
    stop_sent: bool,
}

impl Stream {
    fn new(
        id: String,
        origin: Origin,
        spec: impl Into<Arc<StreamSpec>>,
        created_at: DateTime<Utc>,
        events: Option<Arc<Events>>,
        watcher: Arc<WatcherSlot>,
    ) -> Self {
        let spec = spec.into();
        let current_url = spec.url.clone();
        let current = url::Url::parse(&current_url).ok();
        Stream {
            id,
            origin,
            spec: RwLock::new(spec),
            created_at,
            last_access: Mutex::new(Utc::now()),
            bytes: AtomicU64::new(0),
            segments: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            failover: Mutex::new(FailoverState {
                index: -1,
                attempts: 0,
                last_time: None,
                current_url,
                current,
            }),
            clients: Mutex::new(HashMap::new()),
            closed: CancellationToken::new(),
            detected: AtomicU8::new(0),
            health: Mutex::new(Vec::new()),
            events: EventSink(events),
            session: Mutex::new(Session::default()),
            watcher,
        }
    }

    /// An API stream outside any registry: how a cluster node shows (or
    /// reports the end of) a stream it does not hold.
    pub fn detached(
        id: String,
        spec: StreamSpec,
        created_at: DateTime<Utc>,
        events: Option<Arc<Events>>,
    ) -> Self {
        Self::new(id, Origin::Api, spec, created_at, events, Arc::default())
    }

    /// A provider session of this stream started here and has not stopped.
    pub fn session_started(&self) -> bool {
        self.session.lock().started.is_some()
    }

    /// Emits an event of this stream; `data` gets the stream's metadata, which
    /// m3u-editor reads on every event.
    pub fn emit(&self, event_type: EventType, mut data: Value) {
        let Some(events) = &self.events.0 else {
            return;
        };
        if !events.wants(event_type) {
            return;
        }
        if let Value::Object(m) = &mut data {
            m.insert("metadata".into(), json!(self.spec().metadata));
        }
        events.emit(event_type, &self.id, data);
    }

    /// The stream's first viewer on this node (cluster mode: this node
    /// holds the stream's session until its last viewer leaves).
    fn joined(&self) {
        if let Some(events) = &self.events.0 {
            let spec = self.spec();
            events.session_joined(&self.id, &json!(spec.metadata), spec.transcode.is_some());
        }
    }

    /// A provider connection of this stream opened: `stream_started`, once per
    /// session (not per request, retry or POST).
    pub fn started(&self, data: impl FnOnce() -> Value) {
        {
            let mut s = self.session.lock();
            if s.started.is_some() {
                return;
            }
            s.started = Some(Instant::now());
            s.stop_sent = false;
        }
        self.emit(EventType::StreamStarted, data());
    }

    /// `stream_stopped` with `reason`, unless one was already sent for this session.
    pub fn stopped(&self, reason: &str) {
        let duration = {
            let mut s = self.session.lock();
            if s.stop_sent {
                return;
            }
            s.stop_sent = true;
            s.started.take().map(|t| t.elapsed().as_secs_f64())
        };
        self.emit(
            EventType::StreamStopped,
            json!({
                "reason": reason,
                "duration_seconds": duration,
                "bytes_served": self.bytes.load(Ordering::Relaxed),
                "was_transcoded": self.spec().transcode.is_some(),
            }),
        );
    }

    fn client_left(&self, c: &Arc<Client>, reason: &str) {
        if let Some(w) = self.watcher.0.get() {
            w.left(self, c, reason);
            return;
        }
        self.emit(
            EventType::ClientDisconnected,
            json!({
                "client_id": c.id,
                "username": c.username,
                "bytes_served": c.bytes.load(Ordering::Relaxed),
                "segments_served": c.segments.load(Ordering::Relaxed),
                "duration_seconds": (Utc::now() - c.created_at).num_milliseconds() as f64 / 1000.0,
                "reason": reason,
            }),
        );
    }

    /// Live (`Some(true)`) or file, from the stream's `live` flag, else from
    /// what an upstream response showed.
    pub fn is_live(&self) -> Option<bool> {
        self.spec()
            .live
            .or(match self.detected.load(Ordering::Relaxed) {
                1 => Some(true),
                2 => Some(false),
                _ => None,
            })
    }

    /// An upstream response showed an HLS playlist.
    pub fn is_detected_hls(&self) -> bool {
        self.detected.load(Ordering::Relaxed) == 3
    }

    pub fn set_detected_hls(&self) {
        self.detected.store(3, Ordering::Relaxed);
    }

    pub fn set_detected_live(&self, live: bool) {
        self.detected
            .store(if live { 1 } else { 2 }, Ordering::Relaxed);
    }

    pub fn spec(&self) -> Arc<StreamSpec> {
        self.spec.read().clone()
    }

    pub fn last_access(&self) -> DateTime<Utc> {
        *self.last_access.lock()
    }

    pub fn touch(&self) {
        *self.last_access.lock() = Utc::now();
    }

    pub fn failover(&self) -> FailoverState {
        self.failover.lock().clone()
    }

    /// When the stream last switched sources (no copy of the whole state:
    /// every playlist poll asks).
    pub fn last_failover_time(&self) -> Option<DateTime<Utc>> {
        self.failover.lock().last_time
    }

    /// Records a switch to `url` (index -1 = primary).
    pub fn record_failover(&self, index: i64, url: &str, reason: &str) {
        let (from, old_url, attempts) = {
            let mut f = self.failover.lock();
            let from = f.index;
            let old = std::mem::replace(&mut f.current_url, url.to_string());
            f.current = url::Url::parse(url).ok();
            f.index = index;
            f.attempts += 1;
            f.last_time = Some(Utc::now());
            (from, old, f.attempts)
        };
        self.emit(
            EventType::FailoverTriggered,
            json!({
                "from_index": from,
                "to_index": index,
                "failover_index": index,
                "old_url": old_url,
                "new_url": url,
                "attempt_number": attempts,
                "reason": reason,
                "client_count": self.client_count(),
            }),
        );
    }

    /// Records which source is being served without counting a failover.
    pub fn set_current(&self, index: i64, url: &str) {
        let mut f = self.failover.lock();
        f.index = index;
        f.current_url = url.to_string();
        f.current = url::Url::parse(url).ok();
    }

    /// Takes over the failover position another node recorded (the
    /// channel's previous owner, or a failover forced through its API).
    pub fn adopt_source(
        &self,
        index: i64,
        url: &str,
        attempts: u64,
        last_time: Option<DateTime<Utc>>,
    ) {
        let mut f = self.failover.lock();
        f.index = index;
        f.current_url = url.to_string();
        f.current = url::Url::parse(url).ok();
        f.attempts = f.attempts.max(attempts);
        f.last_time = f.last_time.max(last_time);
    }

    /// The source the stream is on, parsed.
    pub fn current_source(&self) -> Option<url::Url> {
        self.failover.lock().current.clone()
    }

    pub fn clients(&self) -> Vec<Arc<Client>> {
        let mut v: Vec<_> = self.clients.lock().values().cloned().collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    pub fn client_count(&self) -> usize {
        self.clients.lock().len()
    }

    pub fn client(&self, id: &str) -> Option<Arc<Client>> {
        self.clients.lock().get(id).cloned()
    }

    /// Drops a client from the stream and ends its requests. Returns it if it was there.
    pub fn disconnect_client(&self, id: &str) -> Option<Arc<Client>> {
        let c = self.clients.lock().remove(id);
        if let Some(c) = &c {
            c.cancel.cancel();
            self.client_left(c, "api");
        }
        c
    }

    /// Drops every client (their requests end) with `reason` in
    /// `client_disconnected`, then sends `stream_stopped` with `reason` if
    /// the session had not stopped yet. Returns how many clients.
    pub fn disconnect_all(&self, reason: &str) -> usize {
        let clients: Vec<_> = self.clients.lock().drain().map(|(_, c)| c).collect();
        for c in &clients {
            c.cancel.cancel();
            self.client_left(c, reason);
        }
        let started = self.session.lock().started.is_some();
        if !clients.is_empty() || started {
            self.stopped(reason);
        }
        clients.len()
    }

    /// m3u-proxy's S `stream_type` (API-COMPAT.md §3).
    pub fn display_type(&self) -> &'static str {
        let spec = self.spec();
        if spec.metadata.contains_key("transcoding") {
            return "Transcoding";
        }
        let path = url::Url::parse(&spec.url)
            .map(|u| u.path().to_ascii_lowercase())
            .unwrap_or_default();
        if path.ends_with(".m3u8") {
            "HLS"
        } else if [".mp4", ".mkv", ".webm", ".avi"]
            .iter()
            .any(|e| path.ends_with(e))
            || ["/timeshift/", "/movie/", "/series/"]
                .iter()
                .any(|p| path.contains(p))
        {
            "VOD"
        } else {
            "Live Continuous"
        }
    }
}

/// Keeps a client listed while one of its requests is in flight; dropping the
/// last guard of a client removes it from its stream.
#[derive(Debug)]
pub struct ClientGuard {
    pub stream: Arc<Stream>,
    pub client: Arc<Client>,
    /// True when this request made the client appear (its first connection).
    pub first: bool,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let left = self.client.connections.fetch_sub(1, Ordering::AcqRel) - 1;
        self.client.touch();
        self.stream.touch();
        // HLS clients leave by going idle (see `Registry::expire_idle_clients`).
        if left == 0 && self.client.idle_timeout.is_none() {
            let (removed, empty) = {
                let mut clients = self.stream.clients.lock();
                // Only remove our own entry: the id may have been reused since.
                let ours = clients
                    .get(&self.client.id)
                    .is_some_and(|c| Arc::ptr_eq(c, &self.client))
                    && self.client.connections.load(Ordering::Acquire) == 0;
                if ours {
                    clients.remove(&self.client.id);
                }
                (ours, clients.is_empty())
            };
            if removed {
                self.stream.client_left(&self.client, "disconnected");
                if empty {
                    self.stream.stopped("last_client_disconnected");
                }
            }
        }
    }
}

/// Who is asking, as the proxy saw it.
#[derive(Debug, Clone, Default)]
pub struct ClientHello {
    /// `client_id` from the query: wins when present.
    pub explicit_id: Option<String>,
    pub ip: String,
    pub user_agent: String,
    pub username: Option<String>,
}

/// Outcome of registering a stream.
#[derive(Debug)]
pub struct Registered {
    pub stream: Arc<Stream>,
    /// The stored record was replaced by (or created from) the request.
    pub replaced: bool,
}

/// A persisted API stream, as written to the state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedStream {
    pub id: String,
    pub spec: StreamSpec,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub total_bytes_served: u64,
    #[serde(default)]
    pub total_segments_served: u64,
}

/// Caps on streams and new clients (`limits.*` in the config); 0 = no cap.
#[derive(Debug, Clone, Copy, Default)]
pub struct RegistryLimits {
    pub max_streams: usize,
    pub per_stream: usize,
    pub per_address: usize,
    pub hls_per_stream: usize,
    pub hls_per_address: usize,
}

/// Why a new client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    ViewersPerStream,
    ViewersPerAddress,
    HlsPerStream,
    HlsPerAddress,
}

impl Refused {
    pub fn message(self) -> &'static str {
        match self {
            Refused::ViewersPerStream => "Too many viewers of this stream",
            Refused::ViewersPerAddress => "Too many viewers from your address",
            Refused::HlsPerStream => "Too many HLS clients of this stream",
            Refused::HlsPerAddress => "Too many HLS clients from your address",
        }
    }
}

pub struct Registry {
    streams: RwLock<HashMap<String, Arc<Stream>>>,
    events: Option<Arc<Events>>,
    /// Woken whenever the persisted part changes.
    pub changed: Notify,
    caps: RegistryLimits,
    /// Clients of every kind, and HLS clients, by address (as listed: the
    /// first `X-Forwarded-For` entry, else the peer).
    by_address: Arc<Caps<String>>,
    hls_by_address: Arc<Caps<String>>,
    watcher: Arc<WatcherSlot>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::with_caps(None, RegistryLimits::default())
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry whose streams and clients report to `events`.
    pub fn with_events(events: Arc<Events>) -> Self {
        Self::with_caps(Some(events), RegistryLimits::default())
    }

    /// A registry with caps on new clients.
    pub fn with_caps(events: Option<Arc<Events>>, caps: RegistryLimits) -> Self {
        Registry {
            streams: RwLock::default(),
            events,
            changed: Notify::new(),
            caps,
            by_address: Caps::new(0, caps.per_address),
            hls_by_address: Caps::new(0, caps.hls_per_address),
            watcher: Arc::default(),
        }
    }

    /// Routes client appearances and departures to `w` from now on (once;
    /// later calls are ignored).
    pub fn set_client_watcher(&self, w: Arc<dyn ClientWatcher>) {
        let _ = self.watcher.0.set(w);
    }

    /// Waits (at most `timeout`) until the client watcher, if any, has
    /// processed every join and leave so far.
    pub async fn flush_clients(&self, timeout: Duration) {
        if let Some(w) = self.watcher.0.get() {
            let _ = tokio::time::timeout(timeout, w.flushed()).await;
        }
    }

    /// Caches an API stream stored elsewhere (cluster mode): added, or, when
    /// its spec changed, replaced (counters and created kept) if nobody
    /// watches it here, else swapped in place. A YAML or playlist stream
    /// with that id is left as it is. No cap: the store enforces it.
    pub fn cache_api(&self, id: &str, spec: StreamSpec, created_at: DateTime<Utc>) -> Arc<Stream> {
        if let Some(old) = self.streams.read().get(id) {
            if old.origin.read_only() || *old.spec() == spec {
                return old.clone();
            }
            if old.client_count() > 0 {
                *old.spec.write() = Arc::new(spec);
                return old.clone();
            }
        }
        let mut map = self.streams.write();
        if let Some(old) = map.get(id) {
            if old.origin.read_only() || *old.spec() == spec {
                return old.clone();
            }
        }
        let fresh = Stream::new(
            id.to_owned(),
            Origin::Api,
            spec,
            created_at,
            self.events.clone(),
            self.watcher.clone(),
        );
        if let Some(old) = map.get(id) {
            fresh
                .bytes
                .store(old.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
            fresh
                .segments
                .store(old.segments.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let fresh = Arc::new(fresh);
        map.insert(id.to_owned(), fresh.clone());
        fresh
    }

    /// Drops the local copy of an API stream deleted elsewhere: its
    /// requests here end, each client with `client_disconnected`
    /// (`stream_deleted`), and `stream_stopped` with `reason` only if a
    /// provider session of it ran here (the deleting node reports the rest).
    pub fn evict(&self, id: &str, reason: &str) -> Option<Arc<Stream>> {
        let s = {
            let mut map = self.streams.write();
            match map.get(id) {
                Some(s) if s.origin == Origin::Api => map.remove(id),
                _ => None,
            }
        }?;
        s.closed.cancel();
        let clients: Vec<_> = s.clients.lock().drain().map(|(_, c)| c).collect();
        for c in &clients {
            c.cancel.cancel();
            s.client_left(c, "stream_deleted");
        }
        // In cluster mode this node held the stream's session while it had
        // viewers here: it lets go, and the last holder sends the stop.
        if s.session_started() || !clients.is_empty() {
            s.stopped(reason);
        }
        Some(s)
    }

    /// Forgets a cached API stream nobody uses here (no event: it lives on
    /// in the cluster store).
    pub fn forget(&self, id: &str) {
        let mut map = self.streams.write();
        if map
            .get(id)
            .is_some_and(|s| s.origin == Origin::Api && s.client_count() == 0)
        {
            map.remove(id);
        }
    }

    /// Registered streams (API and YAML).
    pub fn len(&self) -> usize {
        self.streams.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a stream from the YAML. Config streams are read-only for the API.
    pub fn add_config(&self, id: String, spec: StreamSpec) -> Arc<Stream> {
        let s = Arc::new(Stream::new(
            id.clone(),
            Origin::Config,
            spec,
            Utc::now(),
            self.events.clone(),
            self.watcher.clone(),
        ));
        self.streams.write().insert(id, s.clone());
        s
    }

    /// `POST /streams`, with the re-POST rule of API-COMPAT.md §8: while a stream
    /// has clients it stays unchanged (only last_access moves); otherwise the
    /// request replaces it, keeping totals and `created_at`.
    ///
    /// A new stream beyond `limits.max_streams` is refused (`Err` with the cap).
    pub fn register(&self, spec: StreamSpec) -> Result<Registered, usize> {
        self.register_as(stream_id_for(&spec.url), spec)
    }

    /// [`Registry::register`] under an id of the caller's (a transcoded
    /// stream's id is keyed on its ffmpeg argv, not only its URL).
    pub fn register_as(&self, id: String, spec: StreamSpec) -> Result<Registered, usize> {
        let mut map = self.streams.write();
        if let Some(old) = map.get(&id).cloned() {
            old.touch();
            if old.origin.read_only() || old.client_count() > 0 || *old.spec() == spec {
                return Ok(Registered {
                    stream: old,
                    replaced: false,
                });
            }
            let fresh = Stream::new(
                id.clone(),
                Origin::Api,
                spec,
                old.created_at,
                self.events.clone(),
                self.watcher.clone(),
            );
            fresh
                .bytes
                .store(old.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
            fresh
                .segments
                .store(old.segments.load(Ordering::Relaxed), Ordering::Relaxed);
            let fresh = Arc::new(fresh);
            map.insert(id, fresh.clone());
            drop(map);
            self.changed.notify_one();
            return Ok(Registered {
                stream: fresh,
                replaced: true,
            });
        }
        let max = self.caps.max_streams;
        if max > 0 && map.len() >= max {
            return Err(max);
        }
        let s = Arc::new(Stream::new(
            id.clone(),
            Origin::Api,
            spec,
            Utc::now(),
            self.events.clone(),
            self.watcher.clone(),
        ));
        map.insert(id, s.clone());
        drop(map);
        self.changed.notify_one();
        Ok(Registered {
            stream: s,
            replaced: true,
        })
    }

    pub fn get(&self, id: &str) -> Option<Arc<Stream>> {
        self.streams.read().get(id).cloned()
    }

    /// Adds or updates a stream of an imported playlist. An existing
    /// playlist stream keeps its identity (clients, counters, live channel):
    /// only its spec is swapped, which takes effect at the next upstream
    /// connection; the URL, and thus the id, cannot change.
    pub fn upsert_playlist(&self, id: &str, spec: Arc<StreamSpec>) -> Upsert {
        if let Some(old) = self.streams.read().get(id) {
            return match old.origin {
                Origin::Playlist if *old.spec() == *spec => Upsert::Unchanged,
                Origin::Playlist => {
                    *old.spec.write() = spec;
                    Upsert::Updated
                }
                _ => Upsert::Taken,
            };
        }
        let mut map = self.streams.write();
        if map.contains_key(id) {
            // Raced with another writer: settle it next refresh.
            return Upsert::Taken;
        }
        let max = self.caps.max_streams;
        if max > 0 && map.len() >= max {
            return Upsert::Full;
        }
        let s = Stream::new(
            id.to_owned(),
            Origin::Playlist,
            spec,
            Utc::now(),
            self.events.clone(),
            self.watcher.clone(),
        );
        map.insert(id.to_owned(), Arc::new(s));
        Upsert::Added
    }

    /// All streams, oldest first.
    pub fn list(&self) -> Vec<Arc<Stream>> {
        let mut v: Vec<_> = self.streams.read().values().cloned().collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// Removes a stream and ends every request of it; `reason` goes into
    /// `stream_stopped` (m3u-proxy's reasons: manual_deletion, …).
    pub fn remove(&self, id: &str, reason: &str) -> Option<Arc<Stream>> {
        let s = self.streams.write().remove(id);
        if let Some(s) = &s {
            s.closed.cancel();
            let clients: Vec<_> = s.clients.lock().drain().map(|(_, c)| c).collect();
            for c in &clients {
                c.cancel.cancel();
                s.client_left(c, "stream_deleted");
            }
            s.stopped(reason);
            if s.origin == Origin::Api {
                self.changed.notify_one();
            }
        }
        s
    }

    /// API streams with no client whose last access is older than `ttl`.
    pub fn expired(&self, ttl: Duration) -> Vec<Arc<Stream>> {
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        let now = Utc::now();
        self.streams
            .read()
            .values()
            .filter(|s| s.origin == Origin::Api && s.client_count() == 0)
            .filter(|s| now.signed_duration_since(s.last_access()) > ttl)
            .cloned()
            .collect()
    }

    /// Attaches a request to a client of `stream`, creating the client when needed.
    /// The id is the explicit one, else derived as m3u-proxy does (API-COMPAT.md §5),
    /// with a random suffix when a different live connection already holds it.
    pub fn attach(
        &self,
        stream: &Arc<Stream>,
        hello: &ClientHello,
    ) -> Result<ClientGuard, Refused> {
        self.attach_with(stream, hello, None)
    }

    /// Like [`Registry::attach`] for an HLS request: the client stays listed
    /// between requests until it has been idle for `idle`.
    pub fn attach_hls(
        &self,
        stream: &Arc<Stream>,
        hello: &ClientHello,
        idle: Duration,
    ) -> Result<ClientGuard, Refused> {
        self.attach_with(stream, hello, Some(idle))
    }

    /// The client `id` of `stream` if it is listed: its next request, without
    /// building a [`ClientHello`] (HLS players poll several times a second).
    pub fn rejoin(&self, stream: &Arc<Stream>, id: &str) -> Option<ClientGuard> {
        let clients = stream.clients.lock();
        let guard = rejoin_locked(&clients, stream, id)?;
        drop(clients);
        stream.touch();
        Some(guard)
    }

    fn attach_with(
        &self,
        stream: &Arc<Stream>,
        hello: &ClientHello,
        idle_timeout: Option<Duration>,
    ) -> Result<ClientGuard, Refused> {
        stream.touch();
        let mut clients = stream.clients.lock();
        let id = match &hello.explicit_id {
            Some(id) => id.clone(),
            None => {
                let base = derived_client_id(hello, &stream.id);
                match clients.get(&base) {
                    Some(c) if c.ip != hello.ip || c.user_agent != hello.user_agent => {
                        format!("{base}_{:08x}", rand::random::<u32>())
                    }
                    _ => base,
                }
            }
        };
        if let Some(guard) = rejoin_locked(&clients, stream, &id) {
            return Ok(guard);
        }
        let slots = self.admit(&clients, hello, idle_timeout.is_some())?;
        if clients.is_empty() {
            // A new viewing session: its stop must be reported again.
            stream.session.lock().stop_sent = false;
            stream.joined();
        }
        let now = Utc::now();
        let c = Arc::new(Client {
            id: id.clone(),
            stream_id: stream.id.clone(),
            user_agent: hello.user_agent.clone(),
            ip: hello.ip.clone(),
            username: hello.username.clone(),
            created_at: now,
            last_access: Mutex::new(now),
            bytes: AtomicU64::new(0),
            segments: AtomicU64::new(0),
            connections: AtomicU64::new(1),
            cancel: stream.closed.child_token(),
            idle_timeout,
            _slots: slots,
        });
        clients.insert(id, c.clone());
        let count = clients.len();
        drop(clients);
        if let Some(w) = stream.watcher.0.get() {
            w.joined(stream, &c);
        } else {
            stream.emit(
                EventType::ClientConnected,
                json!({
                "client_id": c.id,
                "user_agent": c.user_agent,
                "username": c.username,
                "stream_client_count": count,
                }),
            );
        }
        Ok(ClientGuard {
            stream: stream.clone(),
            client: c,
            first: true,
        })
    }

    /// Checks the caps for a new client of a stream whose clients are
    /// `clients`; its per-address slots on success.
    fn admit(
        &self,
        clients: &HashMap<String, Arc<Client>>,
        hello: &ClientHello,
        hls: bool,
    ) -> Result<Vec<Slot<String>>, Refused> {
        let caps = self.caps;
        if caps.per_stream > 0 && clients.len() >= caps.per_stream {
            return Err(Refused::ViewersPerStream);
        }
        if hls && caps.hls_per_stream > 0 {
            let listed = clients
                .values()
                .filter(|c| c.idle_timeout.is_some())
                .count();
            if listed >= caps.hls_per_stream {
                return Err(Refused::HlsPerStream);
            }
        }
        let mut slots = Vec::with_capacity(2);
        if caps.per_address > 0 {
            let slot = self
                .by_address
                .take(Some(hello.ip.clone()))
                .map_err(|_| Refused::ViewersPerAddress)?;
            slots.push(slot);
        }
        if hls && caps.hls_per_address > 0 {
            let slot = self
                .hls_by_address
                .take(Some(hello.ip.clone()))
                .map_err(|_| Refused::HlsPerAddress)?;
            slots.push(slot);
        }
        Ok(slots)
    }

    /// Removes HLS clients idle past their timeout; returns them with their stream.
    pub fn expire_idle_clients(&self) -> Vec<(Arc<Stream>, Arc<Client>)> {
        let now = Utc::now();
        let mut gone = Vec::new();
        for s in self.list() {
            let mut clients = s.clients.lock();
            clients.retain(|_, c| {
                let idle = match c.idle_timeout {
                    Some(t) if c.connections.load(Ordering::Acquire) == 0 => t,
                    _ => return true,
                };
                let limit = chrono::Duration::from_std(idle).unwrap_or(chrono::Duration::MAX);
                let keep = now.signed_duration_since(c.last_access()) <= limit;
                if !keep {
                    gone.push((s.clone(), c.clone()));
                }
                keep
            });
            let empty = clients.is_empty();
            drop(clients);
            let mut any = false;
            for (gs, c) in gone.iter().filter(|(gs, _)| Arc::ptr_eq(gs, &s)) {
                gs.client_left(c, "idle");
                any = true;
            }
            if any && empty {
                s.stopped("last_client_disconnected");
            }
        }
        gone
    }

    /// Every connected client of every stream.
    pub fn all_clients(&self) -> Vec<Arc<Client>> {
        self.list().iter().flat_map(|s| s.clients()).collect()
    }

    /// The part of the registry that survives a restart.
    pub fn persisted(&self) -> Vec<PersistedStream> {
        self.list()
            .into_iter()
            .filter(|s| s.origin == Origin::Api)
            .map(|s| PersistedStream {
                id: s.id.clone(),
                spec: (*s.spec()).clone(),
                created_at: s.created_at,
                total_bytes_served: s.bytes.load(Ordering::Relaxed),
                total_segments_served: s.segments.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Restores streams from the state file; YAML streams with the same id win.
    pub fn restore(&self, items: Vec<PersistedStream>) -> usize {
        let mut map = self.streams.write();
        let mut n = 0;
        for p in items {
            if map.contains_key(&p.id) {
                continue;
            }
            let s = Stream::new(
                p.id.clone(),
                Origin::Api,
                p.spec,
                p.created_at,
                self.events.clone(),
                self.watcher.clone(),
            );
            s.bytes.store(p.total_bytes_served, Ordering::Relaxed);
            s.segments.store(p.total_segments_served, Ordering::Relaxed);
            map.insert(p.id, Arc::new(s));
            n += 1;
        }
        n
    }
}

/// One more connection of a listed (not cancelled) client.
fn rejoin_locked(
    clients: &HashMap<String, Arc<Client>>,
    stream: &Arc<Stream>,
    id: &str,
) -> Option<ClientGuard> {
    let c = clients.get(id).filter(|c| !c.cancel.is_cancelled())?;
    c.connections.fetch_add(1, Ordering::AcqRel);
    c.touch();
    Some(ClientGuard {
        stream: stream.clone(),
        client: c.clone(),
        first: false,
    })
}

/// `client_` + md5(`{ip}-{ua}-{stream_id}-{username}`)[:16], as m3u-proxy derives it.
fn derived_client_id(hello: &ClientHello, stream_id: &str) -> String {
    let username = hello.username.as_deref().unwrap_or("None");
    let raw = format!(
        "{}-{}-{}-{}",
        hello.ip, hello.user_agent, stream_id, username
    );
    let digest = hex::encode(Md5::digest(raw.as_bytes()));
    format!("client_{}", &digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> StreamSpec {
        StreamSpec {
            url: url.into(),
            ..Default::default()
        }
    }

    #[test]
    fn id_is_md5_of_url() {
        // printf %s abc | md5sum
        assert_eq!(stream_id_for("abc"), "900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn repost_with_clients_keeps_record() {
        let r = Registry::new();
        let a = r.register(spec("http://h/a.ts")).unwrap();
        let g = r.attach(&a.stream, &ClientHello::default()).unwrap();
        let mut changed = spec("http://h/a.ts");
        changed.user_agent = Some("x".into());
        let b = r.register(changed.clone()).unwrap();
        assert!(!b.replaced);
        assert!(b.stream.spec().user_agent.is_none());
        drop(g);
        let c = r.register(changed).unwrap();
        assert!(c.replaced);
        assert_eq!(c.stream.spec().user_agent.as_deref(), Some("x"));
        assert_eq!(c.stream.created_at, a.stream.created_at);
    }

    #[test]
    fn viewer_caps_per_stream_and_per_address_and_slots_come_back() {
        let r = Registry::with_caps(
            None,
            RegistryLimits {
                max_streams: 2,
                per_stream: 2,
                per_address: 3,
                ..Default::default()
            },
        );
        let a = r.register(spec("http://h/a.ts")).unwrap().stream;
        let b = r.register(spec("http://h/b.ts")).unwrap().stream;
        assert_eq!(r.register(spec("http://h/c.ts")).unwrap_err(), 2);
        let hello = |id: &str, ip: &str| ClientHello {
            explicit_id: Some(id.into()),
            ip: ip.into(),
            ..Default::default()
        };
        let a1 = r.attach(&a, &hello("1", "10.0.0.1")).unwrap();
        let a2 = r.attach(&a, &hello("2", "10.0.0.1")).unwrap();
        assert_eq!(
            r.attach(&a, &hello("3", "10.0.0.2")).unwrap_err(),
            Refused::ViewersPerStream
        );
        // A listed client rejoins past the cap.
        assert!(r.attach(&a, &hello("1", "10.0.0.1")).is_ok());
        let b1 = r.attach(&b, &hello("4", "10.0.0.1")).unwrap();
        assert_eq!(
            r.attach(&b, &hello("5", "10.0.0.1")).unwrap_err(),
            Refused::ViewersPerAddress
        );
        drop((a1, a2, b1));
        assert_eq!(a.client_count() + b.client_count(), 0);
        assert!(r.attach(&b, &hello("5", "10.0.0.1")).is_ok());
    }

    #[test]
    fn clients_leave_with_last_guard() {
        let r = Registry::new();
        let s = r.register(spec("http://h/a.ts")).unwrap().stream;
        let hello = ClientHello {
            explicit_id: Some("c1".into()),
            ..Default::default()
        };
        let g1 = r.attach(&s, &hello).unwrap();
        let g2 = r.attach(&s, &hello).unwrap();
        assert!(g1.first && !g2.first);
        assert_eq!(s.client_count(), 1);
        drop(g1);
        assert_eq!(s.client_count(), 1);
        drop(g2);
        assert_eq!(s.client_count(), 0);
    }

    #[test]
    fn derived_ids_match_python_shape() {
        let hello = ClientHello {
            explicit_id: None,
            ip: "1.2.3.4".into(),
            user_agent: "VLC".into(),
            username: None,
        };
        let id = derived_client_id(&hello, "abc");
        assert!(id.starts_with("client_") && id.len() == 7 + 16);
    }
}
