//! Webhook delivery: the [`EventsService`] background service.
//!
//! One dispatcher task reads the event bus and fans each event out to every
//! webhook subscribed to its type, each through its **own bounded queue and
//! worker task**. So a slow or dead receiver only delays (and at worst
//! drops, counted) its own events, never another webhook's and never the
//! emitters — the failure of m3u-proxy's single global FIFO worker
//! (API-COMPAT.md §6). A worker delivers sequentially, which keeps the order
//! of events per webhook (and so per stream).
//!
//! A delivery is a POST of the event JSON; a status below 400 counts as
//! delivered (m3u-proxy's rule, redirects not followed). Anything else —
//! status, timeout, connection error — is retried `retry_attempts` times with
//! exponential backoff (1 s, 2 s, 4 s, … capped at 30 s, ±20 % jitter so a
//! receiver coming back is not hit by every proxy at once), each try bounded
//! by the webhook's `timeout`.
//!
//! On shutdown the bus is drained into the queues and the workers get
//! [`DeliverySettings::flush_timeout`] to send what they hold, one try each;
//! whatever is left then is abandoned.
//!
//! In cluster mode the bus feeds the cluster's `events` stream instead, and
//! the queues are fed from that stream while this node is the elected
//! delivery leader; each entry is acknowledged there once every webhook's
//! outcome is final (`crate::cluster::delivery`). A job abandoned at
//! shutdown stays unacknowledged, so the next leader sends it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rand::Rng;
use sha2::Sha256;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{redact_url, DeliverySettings, Event, EventType, Events, Webhook};
use crate::cluster::delivery::{Ack, Delivery, Leader, Writer};
use crate::metrics::{Metrics, WebhookResult};

/// m3u-proxy's user agent; receivers written for it may check it.
pub const WEBHOOK_USER_AGENT: &str = "M3U-Proxy-Webhook/1.0";
/// `sha256=<hex HMAC-SHA256(secret, body)>` when the webhook has a secret.
pub const SIGNATURE_HEADER: &str = "x-m3u-edge-signature";
/// Unix seconds at sending time, sent with the signature. The body itself
/// (`event_id`, `timestamp`) is what the signature covers, so a receiver
/// detects replays by `event_id`.
pub const TIMESTAMP_HEADER: &str = "x-m3u-edge-timestamp";

/// The HTTP client for deliveries: no environment proxy (like the rest of
/// m3u-edge's upstream traffic) and no redirects, because m3u-proxy's httpx
/// does not follow them either and counts a 3xx as delivered. Names resolve
/// through `security.deny_private_upstreams` (see `upstream::guard`).
pub(super) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .dns_resolver(std::sync::Arc::new(crate::upstream::guard::Resolver))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(WEBHOOK_USER_AGENT)
        .build()
        .unwrap_or_default()
}

/// The JSON body of an event. Serializing a `Value` tree and strings cannot
/// fail; the fallback only keeps this infallible without a panic.
pub(super) fn body(event: &Event) -> Bytes {
    serde_json::to_vec(event)
        .map(Bytes::from)
        .unwrap_or_default()
}

/// `sha256=<hex>` of the HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length; the error case cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The request headers of one delivery.
fn headers(hook: &Webhook, body: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(USER_AGENT, HeaderValue::from_static(WEBHOOK_USER_AGENT));
    // As m3u-proxy's `{**defaults, **webhook.headers}`: the hook's win.
    for (name, value) in &hook.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => {
                h.insert(n, v);
            }
            // Registration validates headers; skip rather than fail a
            // delivery over one that slipped through.
            _ => tracing::debug!(header = %name, "invalid webhook header skipped"),
        }
    }
    // Last, so the hook's own headers cannot forge them.
    if let Some(secret) = &hook.secret {
        if let Ok(v) = HeaderValue::from_str(&signature(secret, body)) {
            h.insert(HeaderName::from_static(SIGNATURE_HEADER), v);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        h.insert(
            HeaderName::from_static(TIMESTAMP_HEADER),
            HeaderValue::from(now),
        );
    }
    h
}

/// One POST, bounded by the webhook's timeout. `Ok(status)` whenever the
/// receiver answered, whatever the status.
pub(super) async fn send_once(
    http: &reqwest::Client,
    hook: &Webhook,
    body: Bytes,
) -> Result<u16, String> {
    // A private IP literal is refused here (names by the client's resolver).
    if let Some(r) = url::Url::parse(&hook.url)
        .ok()
        .and_then(|u| crate::upstream::guard::check_url(&u).err())
    {
        return Err(r.to_string());
    }
    let headers = headers(hook, &body);
    let response = http
        .post(&hook.url)
        .headers(headers)
        .body(body)
        .timeout(hook.timeout_duration())
        .send()
        .await
        .map_err(describe)?;
    Ok(response.status().as_u16())
}

/// A short reason for logs, without the URL reqwest would include.
fn describe(e: reqwest::Error) -> String {
    if let Some(r) = crate::upstream::guard::find_refused(&e) {
        return r.to_string();
    }
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_request() {
        "request failed"
    } else {
        "error"
    };
    let mut msg = kind.to_owned();
    // The innermost cause says why (refused, reset, ...); reqwest's own
    // message repeats the URL, which may carry a token.
    let mut source = std::error::Error::source(&e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    if let Some(cause) = last {
        msg.push_str(": ");
        msg.push_str(&cause);
    }
    msg
}

/// The wait before retry number `retry` (0 = the first retry):
/// `base * 2^retry`, capped, then ±20 % jitter.
pub(super) fn backoff(settings: &DeliverySettings, retry: u32) -> Duration {
    let exp = settings
        .retry_base
        .saturating_mul(2u32.saturating_pow(retry.min(31)));
    let capped = exp.min(settings.retry_cap);
    capped.mul_f64(rand::thread_rng().gen_range(0.8..=1.2))
}

/// One event for one webhook: the hook as it was when the event was
/// dispatched (an update in place applies to later events), and the body
/// serialized once for all webhooks.
struct Job {
    hook: Arc<Webhook>,
    body: Bytes,
    event_type: EventType,
    stream_id: Arc<str>,
    /// Cluster mode: the stream entry to acknowledge once final.
    ack: Option<Arc<Ack>>,
}

/// Delivers one job with retries; returns when delivered or given up:
/// true when that outcome is final (false: given up only because the
/// shutdown flush allows one try, so another node may try again).
async fn deliver(
    http: &reqwest::Client,
    metrics: &Metrics,
    settings: &DeliverySettings,
    flushing: &CancellationToken,
    job: &Job,
) -> bool {
    let tries = job.hook.retry_attempts.saturating_add(1);
    let mut last_error = String::new();
    for attempt in 0..tries {
        match send_once(http, &job.hook, job.body.clone()).await {
            Ok(status) if status < 400 => {
                metrics.webhook_delivery(WebhookResult::Ok);
                tracing::debug!(
                    url = %redact_url(&job.hook.url),
                    event_type = %job.event_type,
                    stream_id = %job.stream_id,
                    status,
                    attempt = attempt + 1,
                    "webhook delivered"
                );
                return true;
            }
            Ok(status) => last_error = format!("status {status}"),
            Err(e) => last_error = e,
        }
        // During the shutdown flush every event gets one try: retrying one
        // would spend the time the others need.
        if attempt + 1 == tries || flushing.is_cancelled() {
            break;
        }
        metrics.webhook_delivery(WebhookResult::Retry);
        let wait = backoff(settings, attempt);
        tracing::debug!(
            url = %redact_url(&job.hook.url),
            event_type = %job.event_type,
            error = %last_error,
            attempt = attempt + 1,
            retry_in_ms = wait.as_millis() as u64,
            "webhook try failed"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = flushing.cancelled() => {}
        }
    }
    metrics.webhook_delivery(WebhookResult::Failed);
    tracing::warn!(
        url = %redact_url(&job.hook.url),
        event_type = %job.event_type,
        stream_id = %job.stream_id,
        error = %last_error,
        tries,
        "webhook gave up"
    );
    !flushing.is_cancelled()
}

/// A webhook's queue and the task draining it.
struct Worker {
    tx: mpsc::Sender<Job>,
    handle: JoinHandle<()>,
    /// Jobs dropped because this queue was full, for rate-limited logging.
    dropped: u64,
}

/// Fans events out to the workers; owned by the service's run loop.
struct Dispatcher {
    events: Arc<Events>,
    /// Generation of `routes`; `None` forces a refresh.
    generation: Option<u64>,
    /// The current webhooks, in registration order.
    routes: Vec<Arc<Webhook>>,
    /// By normalized URL.
    workers: HashMap<String, Worker>,
    flushing: CancellationToken,
}

impl Dispatcher {
    fn new(events: Arc<Events>) -> Self {
        Self {
            events,
            generation: None,
            routes: Vec::new(),
            workers: HashMap::new(),
            flushing: CancellationToken::new(),
        }
    }

    /// Re-reads the webhook list when it changed: starts workers for new
    /// URLs, stops those of removed ones (their queued events are dropped:
    /// the user no longer wants them delivered).
    fn refresh(&mut self) {
        if self.generation == Some(self.events.generation()) {
            return;
        }
        let (generation, hooks) = self.events.snapshot();
        self.workers.retain(|url, worker| {
            let keep = hooks.iter().any(|h| &h.url == url) && !worker.handle.is_finished();
            if !keep {
                worker.handle.abort();
            }
            keep
        });
        for hook in &hooks {
            if !self.workers.contains_key(&hook.url) {
                let worker = self.spawn_worker();
                self.workers.insert(hook.url.clone(), worker);
            }
        }
        self.routes = hooks;
        self.generation = Some(generation);
    }

    fn spawn_worker(&self) -> Worker {
        let (tx, mut rx) = mpsc::channel::<Job>(self.events.settings.hook_queue.max(1));
        let events = self.events.clone();
        let flushing = self.flushing.clone();
        let handle = tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let done = deliver(
                    &events.http,
                    &events.metrics,
                    &events.settings,
                    &flushing,
                    &job,
                )
                .await;
                if let (true, Some(ack)) = (done, &job.ack) {
                    ack.complete();
                }
            }
        });
        Worker {
            tx,
            handle,
            dropped: 0,
        }
    }

    fn dispatch(&mut self, event: Event) {
        self.dispatch_acked(event, None);
    }

    /// Like `dispatch`; `ack` completes once every job's outcome is final
    /// (a job dropped from a full queue is final: counted as dropped).
    fn dispatch_acked(&mut self, event: Event, ack: Option<Arc<Ack>>) {
        self.refresh();
        // Serialized once, and only if some webhook wants the event.
        let mut payload = None;
        let mut stream_id: Option<Arc<str>> = None;
        let mut stale = false;
        for hook in &self.routes {
            if !hook.wants(event.event_type) {
                continue;
            }
            let Some(worker) = self.workers.get_mut(&hook.url) else {
                continue;
            };
            let job = Job {
                hook: hook.clone(),
                body: payload.get_or_insert_with(|| body(&event)).clone(),
                event_type: event.event_type,
                stream_id: stream_id
                    .get_or_insert_with(|| Arc::from(event.stream_id.as_str()))
                    .clone(),
                ack: ack.clone(),
            };
            if let Some(a) = &ack {
                a.add();
            }
            match worker.tx.try_send(job) {
                Ok(()) => {}
                Err(e) => {
                    if let Some(a) = &ack {
                        a.complete();
                    }
                    let closed = matches!(e, mpsc::error::TrySendError::Closed(_));
                    // A closed queue means the worker task ended (it only
                    // does by panicking): respawn it on the next event.
                    stale |= closed;
                    worker.dropped += 1;
                    self.events.metrics.webhook_delivery(WebhookResult::Dropped);
                    if worker.dropped.is_power_of_two() {
                        tracing::warn!(
                            url = %redact_url(&hook.url),
                            event_type = %event.event_type,
                            dropped_total = worker.dropped,
                            "webhook queue {}: event dropped",
                            if closed { "closed" } else { "full (receiver slow or down)" }
                        );
                    }
                }
            }
        }
        if stale {
            self.generation = None;
        }
        if let Some(a) = ack {
            a.complete();
        }
    }

    /// Lets the workers send what they hold for at most `timeout`.
    async fn flush(mut self, timeout: Duration) {
        self.flushing.cancel();
        self.routes.clear();
        // Dropping the senders ends each worker once its queue is empty.
        let handles: Vec<JoinHandle<()>> = self.workers.drain().map(|(_, w)| w.handle).collect();
        if handles.is_empty() {
            return;
        }
        let aborts: Vec<_> = handles.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(timeout, futures::future::join_all(handles))
            .await
            .is_err()
        {
            let left = aborts.iter().filter(|a| !a.is_finished()).count();
            for a in &aborts {
                a.abort();
            }
            tracing::warn!(
                webhooks = left,
                "webhook deliveries still pending at shutdown were abandoned"
            );
        }
    }
}

/// The Pingora background service delivering events to webhooks; made by
/// [`Events::service`].
pub struct EventsService {
    events: Arc<Events>,
    rx: Mutex<Option<mpsc::Receiver<Event>>>,
}

impl EventsService {
    pub(super) fn new(events: Arc<Events>, rx: mpsc::Receiver<Event>) -> Self {
        Self {
            events,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Runs until `shutdown` turns true (or its sender is dropped), then
    /// flushes. [`BackgroundService::start`] calls this; tests call it
    /// directly on their own runtime.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let Some(mut rx) = self.rx.lock().take() else {
            tracing::error!("events service started twice; the second start does nothing");
            return;
        };
        let mut dispatcher = Dispatcher::new(self.events.clone());
        if let Some(cluster) = self.events.cluster().cloned() {
            return self.run_cluster(cluster, rx, dispatcher, shutdown).await;
        }
        tracing::info!(
            webhooks = self.events.webhooks().len(),
            "events service started"
        );
        if !*shutdown.borrow() {
            loop {
                tokio::select! {
                    // Shutdown first: a busy bus must not delay the exit.
                    biased;
                    changed = shutdown.changed() => {
                        if changed.is_err() || *shutdown.borrow() {
                            break;
                        }
                    }
                    event = rx.recv() => match event {
                        Some(event) => dispatcher.dispatch(event),
                        None => break,
                    },
                }
            }
        }
        // Later emits fail fast (counted) instead of filling a dead queue.
        rx.close();
        while let Ok(event) = rx.try_recv() {
            dispatcher.dispatch(event);
        }
        dispatcher.flush(self.events.settings.flush_timeout).await;
        tracing::info!("events service stopped");
    }
}

impl EventsService {
    /// Cluster mode: this node's events go to the shared stream; the
    /// webhook queues are fed from it while this node leads delivery.
    async fn run_cluster(
        &self,
        cluster: Arc<crate::cluster::events::ClusterEvents>,
        rx: mpsc::Receiver<Event>,
        mut dispatcher: Dispatcher,
        mut shutdown: watch::Receiver<bool>,
    ) {
        cluster.start();
        let writer = Writer::spawn(cluster.cluster().clone(), rx);
        let (tx, mut from_stream) = mpsc::channel::<Delivery>(BATCH_IN_FLIGHT);
        let leader = Leader::spawn(cluster.clone(), tx);
        tracing::info!(
            webhooks = self.events.webhooks().len(),
            "events service started (cluster: delivered by the elected node)"
        );
        if !*shutdown.borrow() {
            loop {
                tokio::select! {
                    biased;
                    changed = shutdown.changed() => {
                        if changed.is_err() || *shutdown.borrow() {
                            break;
                        }
                    }
                    d = from_stream.recv() => match d {
                        Some((event, ack)) => dispatcher.dispatch_acked(event, Some(ack)),
                        None => break,
                    },
                }
            }
        }
        let timeout = self.events.settings.flush_timeout;
        writer.finish(timeout).await;
        leader.stop();
        // Entries read but not dispatched stay pending for the next leader.
        drop(from_stream);
        dispatcher.flush(timeout).await;
        leader.finish(timeout).await;
        tracing::info!("events service stopped");
    }
}

/// Entries read from the stream and waiting for the dispatcher.
const BATCH_IN_FLIGHT: usize = 512;

#[async_trait]
impl BackgroundService for EventsService {
    /// Runs until [`Events::finish`], not until Pingora's shutdown signal:
    /// the viewers cut after the grace period still have their
    /// `client_disconnected` and `stream_stopped` to send (m3u-editor frees
    /// its provider slot on `stream_stopped`).
    async fn start(&self, _shutdown: ShutdownWatch) {
        self.run(self.events.stop_signal()).await;
        self.events.set_done();
    }
}
