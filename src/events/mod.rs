//! The event system (DESIGN.md R5): a bounded event bus that request and hub
//! code emit into without ever waiting, and the webhooks those events are
//! delivered to.
//!
//! This module owns the event vocabulary ([`EventType`], [`Event`]), the
//! webhook list ([`Webhook`]: from the YAML `events.webhooks`, from the
//! management API, and restored from the state file) and the bus itself
//! ([`Events`]). Delivery — one bounded queue and worker per webhook, retries,
//! signatures, the shutdown flush — lives in [`webhook`] and runs as the
//! Pingora background service [`EventsService`].
//!
//! Who calls what:
//! - `main.rs` builds one [`Events`] (see [`Events::from_config`]), restores
//!   the state file's webhooks with [`Events::restore`], and adds
//!   `background_service("events", events.service())` to the server.
//! - the hub, the proxy phases and the API call [`Events::emit`]; it never
//!   blocks or awaits (a full queue drops the event and counts it).
//! - the webhook routes of the API call [`Events::add_webhook`],
//!   [`Events::remove_webhook`], [`Events::webhooks`], [`Events::test`], and
//!   persist [`Events::api_webhooks`].
//!
//! The wire format is m3u-proxy 0.4.5's (API-COMPAT.md §6): a POST of
//! `{event_id, event_type, stream_id, timestamp, data}` with the user agent
//! `M3U-Proxy-Webhook/1.0`, so m3u-editor's receiver works unchanged.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

pub mod webhook;

#[cfg(test)]
mod tests;

pub use webhook::EventsService;

/// What happened. Serialized as m3u-proxy's snake_case names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    StreamStarted,
    StreamStopped,
    StreamFailed,
    ClientConnected,
    ClientDisconnected,
    FailoverTriggered,
}

impl EventType {
    /// Every event type, in m3u-proxy's order (the default subscription).
    pub const ALL: [EventType; 6] = [
        EventType::StreamStarted,
        EventType::StreamStopped,
        EventType::StreamFailed,
        EventType::ClientConnected,
        EventType::ClientDisconnected,
        EventType::FailoverTriggered,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            EventType::StreamStarted => "stream_started",
            EventType::StreamStopped => "stream_stopped",
            EventType::StreamFailed => "stream_failed",
            EventType::ClientConnected => "client_connected",
            EventType::ClientDisconnected => "client_disconnected",
            EventType::FailoverTriggered => "failover_triggered",
        }
    }

    /// The type named exactly `s` (`"stream_started"`), as the API and the
    /// config write it.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// One bit per type, for the "is anybody subscribed" mask.
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event, exactly the JSON body a webhook receives (and, in cluster
/// mode, an entry of the shared `events` stream).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// A random UUID (v4), as m3u-proxy sends.
    pub event_id: String,
    pub event_type: EventType,
    pub stream_id: String,
    /// Naive UTC ISO-8601, like Python's `datetime.utcnow().isoformat()`:
    /// `2026-11-27T05:00:00.123456` (no offset; no fraction when it is 0).
    pub timestamp: String,
    pub data: serde_json::Value,
}

impl Event {
    /// A new event stamped now.
    pub fn new(event_type: EventType, stream_id: &str, data: serde_json::Value) -> Event {
        Event {
            event_id: uuid::Uuid::new_v4().to_string(),
            event_type,
            stream_id: stream_id.to_owned(),
            timestamp: python_utc_timestamp(chrono::Utc::now().naive_utc()),
            data,
        }
    }
}

/// Python's `isoformat()` of a naive datetime: microseconds only when non-zero.
pub(crate) fn python_utc_timestamp(t: chrono::NaiveDateTime) -> String {
    use chrono::Timelike;
    if t.nanosecond() / 1000 == 0 {
        t.format("%Y-%m-%dT%H:%M:%S").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
    }
}

/// m3u-proxy's default per-try timeout, seconds (API-COMPAT.md §2).
pub const DEFAULT_TIMEOUT_SECS: f64 = 10.0;
/// m3u-proxy's default number of retries after the first try.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 3;
/// The shortest per-try timeout accepted, seconds (m3u-proxy: `ge=1`).
pub const MIN_TIMEOUT_SECS: f64 = 1.0;

/// A webhook subscription. Deserializing applies m3u-proxy's defaults for
/// absent fields, so a `POST /webhooks` body can be read straight into it
/// (then checked with [`Webhook::validated`] or [`Events::add_webhook`]).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct Webhook {
    /// Normalized by [`normalize_url`] once registered.
    pub url: String,
    /// Default: all six.
    #[serde(default = "all_events")]
    pub events: Vec<EventType>,
    /// Sent with every delivery (after our own headers, so they may replace
    /// `Content-Type` or `User-Agent`, never the signature).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Per-try timeout in seconds, at least 1; default 10.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
    /// Retries after the first try; default 3.
    #[serde(default = "default_retry_attempts")]
    pub retry_attempts: u32,
    /// When set, deliveries carry `X-M3U-Edge-Signature: sha256=<hex>`, the
    /// HMAC-SHA256 of the body under this key. An m3u-edge extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

fn all_events() -> Vec<EventType> {
    EventType::ALL.to_vec()
}

fn default_timeout() -> f64 {
    DEFAULT_TIMEOUT_SECS
}

fn default_retry_attempts() -> u32 {
    DEFAULT_RETRY_ATTEMPTS
}

// Hand-written so logs never show the secret or header values (they are
// usually credentials of the receiver).
impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &redact_url(&self.url))
            .field("events", &self.events)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("retry_attempts", &self.retry_attempts)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Webhook {
    /// A subscription to every event with m3u-proxy's defaults.
    pub fn new(url: &str) -> Webhook {
        Webhook {
            url: url.to_owned(),
            events: all_events(),
            headers: BTreeMap::new(),
            timeout: DEFAULT_TIMEOUT_SECS,
            retry_attempts: DEFAULT_RETRY_ATTEMPTS,
            secret: None,
        }
    }

    /// Checks every field and normalizes: the URL ([`normalize_url`]), the
    /// event list (duplicates removed, order kept). The error is one
    /// user-facing line naming the field, for a 422.
    pub fn validated(mut self) -> Result<Webhook, String> {
        self.url = normalize_url(&self.url).map_err(|e| format!("url: {e}"))?;
        let mut seen = HashSet::new();
        self.events.retain(|t| seen.insert(*t));
        if !(self.timeout.is_finite() && self.timeout >= MIN_TIMEOUT_SECS) {
            return Err(format!(
                "timeout: must be at least {MIN_TIMEOUT_SECS} second, got {}",
                self.timeout
            ));
        }
        if Duration::try_from_secs_f64(self.timeout).is_err() {
            return Err(format!("timeout: {} seconds is too long", self.timeout));
        }
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!("headers: invalid header name {name:?}"));
            }
            if http::HeaderValue::from_str(value).is_err() {
                return Err(format!("headers: invalid value for header {name:?}"));
            }
        }
        if self.secret.as_deref() == Some("") {
            return Err("secret: must not be empty".to_owned());
        }
        Ok(self)
    }

    /// The per-try timeout as a `Duration` (10 s if the field is unusable,
    /// which [`Webhook::validated`] prevents).
    pub fn timeout_duration(&self) -> Duration {
        Duration::try_from_secs_f64(self.timeout)
            .unwrap_or(Duration::from_secs_f64(DEFAULT_TIMEOUT_SECS))
    }

    pub fn wants(&self, event_type: EventType) -> bool {
        self.events.contains(&event_type)
    }

    /// The object `GET /webhooks` lists, in m3u-proxy's shape
    /// `{url, events, timeout, retry_attempts}`: headers and secret are left
    /// out because they are the receiver's credentials. A whole-number
    /// timeout is written as an integer, as m3u-proxy does.
    pub fn public_json(&self) -> serde_json::Value {
        let timeout = if self.timeout.fract() == 0.0 && self.timeout.abs() < 1e15 {
            serde_json::json!(self.timeout as i64)
        } else {
            serde_json::json!(self.timeout)
        };
        serde_json::json!({
            "url": self.url,
            "events": self.events,
            "timeout": timeout,
            "retry_attempts": self.retry_attempts,
        })
    }

    fn mask(&self) -> u8 {
        self.events.iter().fold(0, |m, t| m | t.bit())
    }
}

impl From<&crate::config::WebhookConfig> for Webhook {
    fn from(c: &crate::config::WebhookConfig) -> Webhook {
        Webhook {
            url: c.url.to_string(),
            events: c.events.clone(),
            headers: c.headers.iter().cloned().collect(),
            timeout: c.timeout.as_secs_f64(),
            retry_attempts: c.retry_attempts,
            secret: c.secret.clone(),
        }
    }
}

/// The canonical form of a webhook URL, as pydantic's `HttpUrl` gives it in
/// m3u-proxy: http or https only, with a host; host lowercased, the default
/// port dropped, a bare host gets the path `/`; path and query kept as
/// written; the fragment (never sent over HTTP) dropped. Two registrations
/// with the same canonical URL are the same webhook.
pub fn normalize_url(raw: &str) -> Result<String, String> {
    let mut url = url::Url::parse(raw.trim()).map_err(|e| format!("invalid URL {raw:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "URL {raw:?} must use http or https, not {}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("URL {raw:?} has no host"));
    }
    // The url crate already lowercases the host of http(s) URLs, drops the
    // scheme's default port and gives an empty path "/" (WHATWG URL rules).
    url.set_fragment(None);
    Ok(url.to_string())
}

/// `scheme://host[:port]/path` of a URL, for logs: the query and any
/// userinfo often carry tokens (STYLE.md "Logging").
pub(crate) fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            match u.port() {
                Some(p) => format!("{}://{host}:{p}{}", u.scheme(), u.path()),
                None => format!("{}://{host}{}", u.scheme(), u.path()),
            }
        }
        Err(_) => "<invalid url>".to_owned(),
    }
}

/// Tuning of delivery. The defaults are the production values; tests
/// shrink the delays.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// The wait before the first retry; it doubles for each further retry.
    pub retry_base: Duration,
    /// Upper bound of one wait, so a long outage still gets a try every
    /// half minute.
    pub retry_cap: Duration,
    /// Capacity of each webhook's own queue. A receiver that is down for
    /// long loses the newest events beyond this (counted as `dropped`),
    /// instead of holding memory without bound.
    pub hook_queue: usize,
    /// How long the shutdown flush may take: Pingora's own grace period is
    /// short (DESIGN.md), and a dead receiver must not hold the exit.
    pub flush_timeout: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(30),
            hook_queue: 1024,
            flush_timeout: Duration::from_secs(2),
        }
    }
}

/// The default capacity of the event bus (`events.queue_size`).
pub const DEFAULT_QUEUE_SIZE: usize = 4096;

/// A registered webhook and where it came from.
#[derive(Debug, Clone)]
struct Entry {
    hook: Arc<Webhook>,
    /// Registered through the API or restored from the state file; only
    /// these are persisted (YAML ones come back from the YAML).
    from_api: bool,
}

/// Result of [`Events::test`]: the receiver answered (any status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestOutcome {
    pub event_id: String,
    pub status: u16,
}

/// Why [`Events::test`] sent nothing or got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TestError {
    /// No webhook with that URL is registered (m3u-proxy answers 404).
    #[error("webhook not found")]
    NotFound,
    /// The POST failed before any answer: connect error or timeout.
    #[error("test event {event_id} not delivered: {error}")]
    Failed { event_id: String, error: String },
}

/// The event bus and the webhook list. Cheap to share (`Arc`); every method
/// is synchronous except [`Events::test`].
pub struct Events {
    tx: mpsc::Sender<Event>,
    /// Taken once by [`Events::service`].
    rx: Mutex<Option<mpsc::Receiver<Event>>>,
    hooks: RwLock<Vec<Entry>>,
    /// Bumped on every change of `hooks`, so the dispatcher re-reads the
    /// list only when it changed.
    generation: AtomicU64,
    /// Union of the event bits of all hooks: `emit` of a type nobody wants
    /// costs one atomic load and no allocation.
    subscribed: AtomicU8,
    dropped: AtomicU64,
    metrics: Arc<Metrics>,
    settings: DeliverySettings,
    /// For deliveries (used on the events service's runtime only).
    http: reqwest::Client,
    /// For [`Events::test`], which runs on an API request's runtime: a
    /// separate pool keeps connections from crossing runtimes.
    test_http: reqwest::Client,
    /// Set by [`Events::finish`]: the service drains, flushes and stops.
    /// Not Pingora's shutdown signal: the events of viewers cut at the end
    /// of the grace period must still go out.
    stop: tokio::sync::watch::Sender<bool>,
    /// Set by the service once it has flushed and stopped.
    done: tokio::sync::watch::Sender<bool>,
    /// Cluster mode: stream events are checked cluster-wide before they
    /// are queued, and queued events go to the shared stream.
    cluster: std::sync::OnceLock<Arc<crate::cluster::events::ClusterEvents>>,
}

impl Events {
    /// A bus of `queue_size` events (at least 1) with the YAML webhooks
    /// `config_hooks` and production delivery settings.
    pub fn new(
        queue_size: usize,
        config_hooks: Vec<Webhook>,
        metrics: Arc<Metrics>,
    ) -> Arc<Events> {
        Self::with_settings(
            queue_size,
            config_hooks,
            metrics,
            DeliverySettings::default(),
        )
    }

    /// Like [`Events::new`] from the `events:` config section.
    pub fn from_config(config: &crate::config::EventsConfig, metrics: Arc<Metrics>) -> Arc<Events> {
        let hooks = config.webhooks.iter().map(Webhook::from).collect();
        Self::new(config.queue_size, hooks, metrics)
    }

    /// Like [`Events::new`] with explicit delivery tuning (tests use short
    /// retry delays).
    pub fn with_settings(
        queue_size: usize,
        config_hooks: Vec<Webhook>,
        metrics: Arc<Metrics>,
        settings: DeliverySettings,
    ) -> Arc<Events> {
        let (tx, rx) = mpsc::channel(queue_size.max(1));
        let events = Events {
            tx,
            rx: Mutex::new(Some(rx)),
            hooks: RwLock::new(Vec::new()),
            generation: AtomicU64::new(0),
            subscribed: AtomicU8::new(0),
            dropped: AtomicU64::new(0),
            metrics,
            settings,
            http: webhook::client(),
            test_http: webhook::client(),
            stop: tokio::sync::watch::Sender::new(false),
            done: tokio::sync::watch::Sender::new(false),
            cluster: std::sync::OnceLock::new(),
        };
        for hook in config_hooks {
            if let Err(error) = events.insert(hook, false) {
                // The config was validated already; this is a bug, not a
                // user mistake, and must not stop the proxy.
                tracing::error!(%error, "configured webhook ignored");
            }
        }
        Arc::new(events)
    }

    /// The background service that delivers the events. Call it once and
    /// add the result to the Pingora server:
    /// `server.add_service(background_service("events", events.service()))`.
    ///
    /// # Panics
    /// When called a second time (the bus has one consumer).
    pub fn service(self: &Arc<Self>) -> EventsService {
        let rx = self
            .rx
            .lock()
            .take()
            .expect("Events::service() may be called only once");
        EventsService::new(self.clone(), rx)
    }

    /// Cluster mode: events are sent once cluster-wide and delivered by the
    /// elected node (`crate::cluster::events`, `crate::cluster::delivery`).
    pub fn attach_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.cluster.set(crate::cluster::events::ClusterEvents::new(
            cluster,
            self.tx.clone(),
        ));
    }

    pub fn cluster(&self) -> Option<&Arc<crate::cluster::events::ClusterEvents>> {
        self.cluster.get()
    }

    /// A stream got its first viewer on this node (cluster mode: the node
    /// holds the stream's session until its last viewer leaves).
    pub fn session_joined(&self, stream_id: &str, metadata: &serde_json::Value, transcoded: bool) {
        if let Some(c) = self.cluster.get() {
            c.joined(stream_id, metadata, transcoded);
        }
    }

    /// The stop signal the Pingora service runs on ([`Events::finish`]).
    pub(crate) fn stop_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Called by the service when it has flushed and stopped.
    pub(crate) fn set_done(&self) {
        self.done.send_replace(true);
    }

    /// The shutdown path, once no more events are coming (viewers and
    /// channels closed): the service drains the queue, gives the webhooks
    /// up to its flush timeout (`server.shutdown_timeout`) and stops. Waits
    /// for that, at most `timeout`; false when it did not finish in time
    /// (or the service never ran).
    pub async fn finish(&self, timeout: Duration) -> bool {
        let mut done = self.done.subscribe();
        if let Some(c) = self.cluster.get() {
            // The last stops of this node's sessions are still being
            // checked in Redis: let them reach the queue first.
            c.drain(timeout / 2).await;
        }
        self.stop.send_replace(true);
        tokio::time::timeout(timeout, done.wait_for(|d| *d))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Queues an event for the webhooks subscribed to its type. Never
    /// blocks or awaits: when the queue is full the event is dropped and
    /// counted ([`Events::dropped`], `m3u_edge_events_dropped_total`).
    pub fn emit(&self, event_type: EventType, stream_id: &str, data: serde_json::Value) {
        if !self.wants(event_type) {
            return;
        }
        let mut event = Event::new(event_type, stream_id, data);
        if let Some(c) = self.cluster.get() {
            match c.route(event) {
                Some(e) => event = e,
                None => return,
            }
        }
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => self.count_drop(&event, "queue full"),
            // Only after the service stopped (shutdown): nothing will send it.
            Err(mpsc::error::TrySendError::Closed(event)) => {
                self.count_drop(&event, "events service stopped")
            }
        }
    }

    fn count_drop(&self, event: &Event, why: &'static str) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.events_dropped.inc();
        // Logging every drop would add log I/O exactly when the system is
        // overloaded; powers of two keep the count visible at O(log n) lines.
        if n.is_power_of_two() {
            tracing::warn!(
                event_type = %event.event_type,
                stream_id = %event.stream_id,
                dropped_total = n,
                "event dropped: {why}"
            );
        }
    }

    /// Whether any webhook subscribes to `event_type`: callers may skip
    /// building an expensive `data` value when not.
    pub fn wants(&self, event_type: EventType) -> bool {
        // In cluster mode the delivering node's webhooks decide, and the
        // session bookkeeping needs every stream event.
        if self.cluster.get().is_some() {
            return true;
        }
        self.subscribed.load(Ordering::Relaxed) & event_type.bit() != 0
    }

    /// Registers (or, when a webhook with the same normalized URL exists,
    /// updates in place) a webhook from the API. Returns the stored,
    /// normalized webhook and whether it is new. Errors are one line for a
    /// 422 (see [`Webhook::validated`]).
    pub fn add_webhook(&self, hook: Webhook) -> Result<(Webhook, bool), String> {
        self.insert(hook, true)
    }

    fn insert(&self, hook: Webhook, from_api: bool) -> Result<(Webhook, bool), String> {
        let hook = hook.validated()?;
        let created;
        {
            let mut hooks = self.hooks.write();
            let entry = Entry {
                hook: Arc::new(hook.clone()),
                from_api,
            };
            match hooks.iter_mut().find(|e| e.hook.url == hook.url) {
                Some(existing) => {
                    *existing = entry;
                    created = false;
                }
                None => {
                    hooks.push(entry);
                    created = true;
                }
            }
            self.changed(&hooks);
        }
        tracing::info!(
            url = %redact_url(&hook.url),
            events = ?hook.events,
            created,
            "webhook registered"
        );
        Ok((hook, created))
    }

    /// Removes the webhook with this URL (compared after normalization), a
    /// YAML one included (until the next start). Events already queued for
    /// it are discarded.
    pub fn remove_webhook(&self, url: &str) -> bool {
        let key = normalize_url(url).unwrap_or_else(|_| url.to_owned());
        let mut hooks = self.hooks.write();
        let before = hooks.len();
        hooks.retain(|e| e.hook.url != key);
        let removed = hooks.len() != before;
        if removed {
            self.changed(&hooks);
            tracing::info!(url = %redact_url(&key), "webhook removed");
        }
        removed
    }

    /// Every webhook, YAML ones first, in registration order.
    pub fn webhooks(&self) -> Vec<Webhook> {
        self.hooks
            .read()
            .iter()
            .map(|e| (*e.hook).clone())
            .collect()
    }

    /// The webhooks to persist in the state file: those registered through
    /// the API (YAML ones come back from the YAML).
    pub fn api_webhooks(&self) -> Vec<Webhook> {
        self.hooks
            .read()
            .iter()
            .filter(|e| e.from_api)
            .map(|e| (*e.hook).clone())
            .collect()
    }

    /// Replaces the webhooks that came from the YAML with `hooks` (a config
    /// reload, SIGHUP); API ones stay. A URL now in the YAML that was
    /// registered through the API becomes a YAML one. Returns (added,
    /// removed) counts.
    pub fn replace_config_webhooks(&self, hooks: Vec<Webhook>) -> (usize, usize) {
        let mut valid = Vec::new();
        for hook in hooks {
            match hook.validated() {
                Ok(h) => valid.push(h),
                Err(error) => tracing::error!(%error, "configured webhook ignored"),
            }
        }
        let mut hooks = self.hooks.write();
        let before: Vec<String> = hooks
            .iter()
            .filter(|e| !e.from_api)
            .map(|e| e.hook.url.clone())
            .collect();
        hooks.retain(|e| e.from_api && !valid.iter().any(|v| v.url == e.hook.url));
        let removed = before
            .iter()
            .filter(|u| !valid.iter().any(|v| &v.url == *u))
            .count();
        let added = valid.iter().filter(|v| !before.contains(&v.url)).count();
        // YAML ones first, as at start.
        let api: Vec<Entry> = std::mem::take(&mut *hooks);
        for hook in valid {
            hooks.push(Entry {
                hook: Arc::new(hook),
                from_api: false,
            });
        }
        hooks.extend(api);
        self.changed(&hooks);
        (added, removed)
    }

    /// Re-registers the state file's webhooks at start. An invalid entry (a
    /// hand-edited file) is logged and skipped.
    pub fn restore(&self, hooks: Vec<Webhook>) {
        for hook in hooks {
            if let Err(error) = self.insert(hook, true) {
                tracing::warn!(%error, "webhook from the state file ignored");
            }
        }
    }

    /// Events dropped because the bus was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// `POST /webhooks/test`: sends m3u-proxy's test event (a
    /// `stream_started` for `test_stream_123` with `data.test = true`) to
    /// the registered webhook `url` now, once, bounded by its timeout and
    /// with its headers and signature, bypassing the queue.
    pub async fn test(&self, url: &str) -> Result<TestOutcome, TestError> {
        let key = normalize_url(url).unwrap_or_else(|_| url.to_owned());
        let hook = self
            .hooks
            .read()
            .iter()
            .find(|e| e.hook.url == key)
            .map(|e| e.hook.clone())
            .ok_or(TestError::NotFound)?;
        let event = Event::new(
            EventType::StreamStarted,
            "test_stream_123",
            serde_json::json!({
                "test": true,
                "message": "This is a test webhook event",
                "primary_url": "http://example.com/test.m3u8",
            }),
        );
        let body = webhook::body(&event);
        match webhook::send_once(&self.test_http, &hook, body).await {
            Ok(status) => Ok(TestOutcome {
                event_id: event.event_id,
                status,
            }),
            Err(error) => Err(TestError::Failed {
                event_id: event.event_id,
                error,
            }),
        }
    }

    /// After any change of the list (write lock held).
    fn changed(&self, hooks: &[Entry]) {
        let mask = hooks.iter().fold(0, |m, e| m | e.hook.mask());
        self.subscribed.store(mask, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
        self.metrics.webhooks_registered.set(hooks.len() as i64);
    }

    /// The list and its generation, read together.
    fn snapshot(&self) -> (u64, Vec<Arc<Webhook>>) {
        let hooks = self.hooks.read();
        let generation = self.generation.load(Ordering::Acquire);
        (generation, hooks.iter().map(|e| e.hook.clone()).collect())
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}
