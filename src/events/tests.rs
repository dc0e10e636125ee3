//! Component tests of the event bus and webhook delivery, over real HTTP on
//! loopback: a small hyper receiver ([`Receiver`]) stands in for m3u-editor.
//! No assertion is on elapsed time; waits are bounded polls, and "not
//! delayed" is shown by what arrived while something else was still hanging.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::*;
use crate::metrics::{Metrics, WebhookResult};

/// Generous bound for things that take milliseconds.
const T: Duration = Duration::from_secs(10);

/// Fast retries so retry tests take milliseconds.
fn fast() -> DeliverySettings {
    DeliverySettings {
        retry_base: Duration::from_millis(10),
        retry_cap: Duration::from_millis(50),
        hook_queue: 1024,
        // Ample for loopback on a loaded machine; tests with a hanging
        // receiver shorten it (`hanging()`), since they always wait it out.
        flush_timeout: Duration::from_secs(3),
    }
}

/// Settings for tests whose receiver never answers.
fn hanging() -> DeliverySettings {
    DeliverySettings {
        flush_timeout: Duration::from_millis(100),
        ..fast()
    }
}

#[derive(Clone, Debug)]
struct Got {
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("webhook body is JSON")
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct ReceiverState {
    got: Mutex<Vec<Got>>,
    /// Answer 500 to this many requests first.
    fail_first: AtomicUsize,
    /// Hold every request without answering.
    hang: std::sync::atomic::AtomicBool,
    answered: AtomicUsize,
}

/// A webhook receiver on 127.0.0.1:0; stops when dropped (the runtime ends).
struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(ReceiverState::default());
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { addr, state }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn got(&self) -> Vec<Got> {
        self.state.got.lock().clone()
    }

    fn count(&self) -> usize {
        self.state.got.lock().len()
    }

    async fn wait_for(&self, n: usize) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + T;
        while self.count() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "receiver got {} of {n} requests",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.got()
    }
}

async fn handle(st: Arc<ReceiverState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    st.got.lock().push(Got {
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        body,
    });
    if st.hang.load(Ordering::SeqCst) {
        // Never answer: the sender's timeout has to end it.
        std::future::pending::<()>().await;
    }
    let fail = st
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    st.answered.fetch_add(1, Ordering::SeqCst);
    let status = if fail { 500 } else { 200 };
    let mut resp = Response::new(Full::new(Bytes::from_static(b"{\"status\":\"ok\"}")));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
    resp
}

/// A started events service; shuts it down (with flush) on `stop`.
struct Running {
    events: Arc<Events>,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(queue: usize, hooks: Vec<Webhook>, settings: DeliverySettings) -> Running {
        let metrics = Metrics::new();
        let events = Events::with_settings(queue, hooks, metrics.clone(), settings);
        let service = events.service();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(async move { service.run(shutdown).await });
        Running {
            events,
            metrics,
            stop,
            task,
        }
    }

    fn deliveries(&self, r: WebhookResult) -> u64 {
        self.metrics
            .webhook_deliveries
            .with_label_values(&[r.as_str()])
            .get()
    }

    async fn wait_deliveries(&self, r: WebhookResult, n: u64) {
        let deadline = tokio::time::Instant::now() + T;
        while self.deliveries(r) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{r:?} deliveries: {} of {n}",
                self.deliveries(r)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(T, self.task)
            .await
            .expect("service stops")
            .expect("no panic");
    }
}

fn hook(url: &str) -> Webhook {
    Webhook::new(url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_the_m3u_proxy_envelope() {
    let r = Receiver::start().await;
    let mut h = hook(&r.url("/api/m3u-proxy/webhooks"));
    h.headers
        .insert("Authorization".into(), "Bearer abc".into());
    let run = Running::start(16, vec![h], fast());
    let data =
        json!({"reason": "last_client_disconnected", "metadata": {"provider_profile_id": "5"}});
    run.events
        .emit(EventType::StreamStopped, "0123abcd", data.clone());

    let got = r.wait_for(1).await;
    let g = &got[0];
    assert_eq!(g.path, "/api/m3u-proxy/webhooks");
    assert_eq!(g.header("content-type"), Some("application/json"));
    assert_eq!(g.header("user-agent"), Some("M3U-Proxy-Webhook/1.0"));
    assert_eq!(g.header("authorization"), Some("Bearer abc"));
    assert_eq!(
        g.header(webhook::SIGNATURE_HEADER),
        None,
        "no secret, no signature"
    );
    let body = g.json();
    let obj = body.as_object().expect("object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["data", "event_id", "event_type", "stream_id", "timestamp"]
    );
    let id = uuid::Uuid::parse_str(body["event_id"].as_str().expect("string id")).expect("uuid");
    assert_eq!(id.get_version_num(), 4);
    assert_eq!(body["event_type"], "stream_stopped");
    assert_eq!(body["stream_id"], "0123abcd");
    assert_eq!(body["data"], data);
    let ts = body["timestamp"].as_str().expect("timestamp");
    assert!(!ts.ends_with('Z') && !ts.contains('+'), "naive: {ts}");
    chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%dT%H:%M:%S%.f").expect("ISO timestamp");

    run.wait_deliveries(WebhookResult::Ok, 1).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_until_delivered() {
    let r = Receiver::start().await;
    r.state.fail_first.store(2, Ordering::SeqCst);
    let mut h = hook(&r.url("/h"));
    h.retry_attempts = 3;
    let run = Running::start(16, vec![h], fast());
    run.events.emit(EventType::StreamStarted, "s", json!({}));

    run.wait_deliveries(WebhookResult::Ok, 1).await;
    let got = r.got();
    assert_eq!(got.len(), 3, "two failures then the delivery");
    let ids: Vec<Value> = got.iter().map(|g| g.json()["event_id"].clone()).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "the same event each try");
    assert_eq!(run.deliveries(WebhookResult::Retry), 2);
    assert_eq!(run.deliveries(WebhookResult::Failed), 0);
    run.stop().await;
    assert_eq!(r.count(), 3, "nothing sent after the delivery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_after_retry_attempts() {
    let r = Receiver::start().await;
    r.state.fail_first.store(usize::MAX, Ordering::SeqCst);
    let mut h = hook(&r.url("/h"));
    h.retry_attempts = 2;
    let run = Running::start(16, vec![h], fast());
    run.events.emit(EventType::StreamStarted, "s", json!({}));

    run.wait_deliveries(WebhookResult::Failed, 1).await;
    assert_eq!(r.count(), 3, "retry_attempts + 1 tries");
    assert_eq!(run.deliveries(WebhookResult::Retry), 2);
    assert_eq!(run.deliveries(WebhookResult::Ok), 0);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_receiver_does_not_delay_another_webhook() {
    let dead = Receiver::start().await;
    dead.state.hang.store(true, Ordering::SeqCst);
    let live = Receiver::start().await;
    let mut slow = hook(&dead.url("/dead"));
    slow.timeout = 60.0;
    // Registered first: a global FIFO (m3u-proxy) would serve it first.
    let run = Running::start(64, vec![slow, hook(&live.url("/live"))], hanging());
    for i in 0..20 {
        run.events.emit(
            EventType::ClientConnected,
            &format!("s{i}"),
            json!({ "i": i }),
        );
    }

    let got = live.wait_for(20).await;
    // Every event reached the live hook while the dead one still holds its
    // first request unanswered (its timeout is a minute away).
    assert_eq!(dead.count(), 1);
    assert_eq!(dead.state.answered.load(Ordering::SeqCst), 0);
    assert_eq!(run.deliveries(WebhookResult::Failed), 0);
    let order: Vec<Value> = got.iter().map(|g| g.json()["data"]["i"].clone()).collect();
    assert_eq!(order, (0..20).map(|i| json!(i)).collect::<Vec<_>>());
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_is_kept_per_webhook_across_retries() {
    let r = Receiver::start().await;
    r.state.fail_first.store(3, Ordering::SeqCst);
    let run = Running::start(256, vec![hook(&r.url("/h"))], fast());
    for i in 0..50 {
        run.events
            .emit(EventType::StreamStarted, &format!("s{i}"), json!({}));
    }
    run.wait_deliveries(WebhookResult::Ok, 50).await;
    let delivered: Vec<String> = r
        .got()
        .iter()
        .map(|g| g.json()["stream_id"].as_str().unwrap_or("").to_owned())
        .collect();
    let mut dedup = delivered.clone();
    dedup.dedup();
    assert_eq!(dedup, (0..50).map(|i| format!("s{i}")).collect::<Vec<_>>());
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_never_blocks_and_counts_overflow() {
    let metrics = Metrics::new();
    let events = Events::with_settings(
        16,
        vec![hook("http://127.0.0.1:9/")],
        metrics.clone(),
        fast(),
    );
    // No service runs: a blocking emit would hang this test forever.
    for i in 0..100_000u32 {
        events.emit(EventType::ClientConnected, "s", json!({ "i": i }));
    }
    assert_eq!(events.dropped(), 100_000 - 16);
    assert_eq!(metrics.events_dropped.get(), 100_000 - 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_webhook_queue_drops_and_counts() {
    let dead = Receiver::start().await;
    dead.state.hang.store(true, Ordering::SeqCst);
    let settings = DeliverySettings {
        hook_queue: 2,
        ..hanging()
    };
    let mut h = hook(&dead.url("/dead"));
    h.timeout = 60.0;
    let run = Running::start(64, vec![h], settings);
    for _ in 0..10 {
        run.events.emit(EventType::StreamStarted, "s", json!({}));
    }
    // One in flight, two queued (three if the worker had not taken the
    // first yet), the rest dropped.
    run.wait_deliveries(WebhookResult::Dropped, 7).await;
    assert!(run.deliveries(WebhookResult::Dropped) <= 8);
    assert_eq!(run.events.dropped(), 0, "the bus itself never overflowed");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_verifies() {
    use hmac::{Hmac, Mac};
    let r = Receiver::start().await;
    let mut signed = hook(&r.url("/signed"));
    signed.secret = Some("k3y".into());
    // A hook header must not be able to forge the signature.
    signed
        .headers
        .insert("X-M3U-Edge-Signature".into(), "sha256=forged".into());
    let run = Running::start(16, vec![signed], fast());
    run.events
        .emit(EventType::FailoverTriggered, "s", json!({"new_url": "x"}));
    let got = r.wait_for(1).await;
    let g = &got[0];
    let sig = g.header("x-m3u-edge-signature").expect("signature header");
    let hex_mac = sig.strip_prefix("sha256=").expect("sha256= prefix");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"k3y").expect("key");
    mac.update(&g.body);
    mac.verify_slice(&hex::decode(hex_mac).expect("hex"))
        .expect("HMAC of the received body");
    let ts: u64 = g
        .header("x-m3u-edge-timestamp")
        .expect("timestamp header")
        .parse()
        .expect("unix seconds");
    assert!(ts > 1_600_000_000);
    assert_eq!(g.headers.get_all("x-m3u-edge-signature").iter().count(), 1);
    run.stop().await;
}

#[test]
fn signature_is_hmac_sha256_hex() {
    // RFC 4231 test case 2.
    assert_eq!(
        webhook::signature("Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_webhook_gets_only_its_events() {
    let a = Receiver::start().await;
    let b = Receiver::start().await;
    let mut only_stops = hook(&a.url("/a"));
    only_stops.events = vec![EventType::StreamStopped];
    let run = Running::start(16, vec![only_stops, hook(&b.url("/b"))], fast());
    run.events.emit(EventType::StreamStarted, "s", json!({}));
    run.events.emit(EventType::StreamStopped, "s", json!({}));
    run.events.emit(EventType::ClientConnected, "s", json!({}));

    let got_b = b.wait_for(3).await;
    let types: Vec<Value> = got_b
        .iter()
        .map(|g| g.json()["event_type"].clone())
        .collect();
    assert_eq!(
        types,
        [
            json!("stream_started"),
            json!("stream_stopped"),
            json!("client_connected")
        ]
    );
    run.wait_deliveries(WebhookResult::Ok, 4).await;
    let got_a = a.got();
    assert_eq!(got_a.len(), 1);
    assert_eq!(got_a[0].json()["event_type"], "stream_stopped");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_nobody_wants_are_not_queued() {
    let metrics = Metrics::new();
    let mut h = hook("http://127.0.0.1:9/");
    h.events = vec![EventType::StreamStopped];
    let events = Events::with_settings(1, vec![h], metrics, fast());
    assert!(events.wants(EventType::StreamStopped));
    assert!(!events.wants(EventType::ClientConnected));
    for _ in 0..10 {
        events.emit(EventType::ClientConnected, "s", json!({}));
    }
    assert_eq!(events.dropped(), 0);
    events.emit(EventType::StreamStopped, "s", json!({}));
    events.emit(EventType::StreamStopped, "s", json!({}));
    assert_eq!(events.dropped(), 1, "queue of one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_added_and_removed_at_runtime() {
    let r = Receiver::start().await;
    let keep = Receiver::start().await;
    let run = Running::start(16, vec![], fast());
    run.events
        .emit(EventType::StreamStarted, "before", json!({}));
    let (stored, created) = run
        .events
        .add_webhook(hook(&r.url("/late")))
        .expect("valid");
    assert!(created);
    run.events
        .add_webhook(hook(&keep.url("/keep")))
        .expect("valid");
    run.events
        .emit(EventType::StreamStarted, "after", json!({}));
    let got = r.wait_for(1).await;
    assert_eq!(
        got[0].json()["stream_id"],
        "after",
        "nothing from before it existed"
    );

    assert!(run.events.remove_webhook(&stored.url));
    run.events
        .emit(EventType::StreamStarted, "removed", json!({}));
    // Once `keep` has it, the dispatcher has routed it (not to `r`).
    keep.wait_for(2).await;
    run.events
        .add_webhook(hook(&r.url("/late")))
        .expect("valid");
    run.events
        .emit(EventType::StreamStarted, "again", json!({}));
    keep.wait_for(3).await;
    let got = r.wait_for(2).await;
    assert_eq!(got[1].json()["stream_id"], "again");
    run.stop().await;
    assert_eq!(r.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_queued_events() {
    let r = Receiver::start().await;
    let run = Running::start(64, vec![hook(&r.url("/h"))], fast());
    for i in 0..10 {
        run.events
            .emit(EventType::StreamStopped, &format!("s{i}"), json!({}));
    }
    run.stop().await;
    assert_eq!(r.count(), 10, "queued events sent before the service ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_by_a_dead_receiver() {
    let dead = Receiver::start().await;
    dead.state.hang.store(true, Ordering::SeqCst);
    let mut h = hook(&dead.url("/dead"));
    h.timeout = 600.0;
    let run = Running::start(16, vec![h], hanging());
    run.events.emit(EventType::StreamStopped, "s", json!({}));
    dead.wait_for(1).await;
    // `stop` waits at most T; the flush gives up after 100 ms.
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_event_goes_to_a_registered_webhook() {
    let r = Receiver::start().await;
    let metrics = Metrics::new();
    let events = Events::with_settings(16, vec![], metrics, fast());
    assert_eq!(events.test(&r.url("/h")).await, Err(TestError::NotFound));
    let mut h = hook(&r.url("/h"));
    h.secret = Some("s".into());
    events.add_webhook(h).expect("valid");
    let outcome = events.test(&r.url("/h")).await.expect("answered");
    assert_eq!(outcome.status, 200);
    let got = r.wait_for(1).await;
    let body = got[0].json();
    assert_eq!(body["event_id"], outcome.event_id.as_str());
    assert_eq!(body["event_type"], "stream_started");
    assert_eq!(body["stream_id"], "test_stream_123");
    assert_eq!(body["data"]["test"], true);
    assert!(got[0].header("x-m3u-edge-signature").is_some());

    r.state.fail_first.store(1, Ordering::SeqCst);
    assert_eq!(events.test(&r.url("/h")).await.map(|o| o.status), Ok(500));

    // Nothing listens on port 9 (discard) of loopback here.
    let mut gone = hook("http://127.0.0.1:9/x");
    gone.timeout = 2.0;
    events.add_webhook(gone).expect("valid");
    match events.test("http://127.0.0.1:9/x").await {
        Err(TestError::Failed { error, .. }) => {
            assert!(!error.contains("127.0.0.1:9/x"), "{error}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn normalize_url_table() {
    let cases = [
        ("http://Example.COM", "http://example.com/"),
        ("HTTP://EXAMPLE.com:80/Hook", "http://example.com/Hook"),
        ("https://example.com:443/a?b=C", "https://example.com/a?b=C"),
        ("https://example.com:8443", "https://example.com:8443/"),
        ("http://example.com/a#frag", "http://example.com/a"),
        (" http://example.com/a ", "http://example.com/a"),
        ("http://user:pw@example.com/", "http://user:pw@example.com/"),
        ("http://[::1]:8080", "http://[::1]:8080/"),
    ];
    for (raw, want) in cases {
        assert_eq!(normalize_url(raw).as_deref(), Ok(want), "{raw}");
    }
    for bad in [
        "ftp://example.com/",
        "example.com/hook",
        "",
        "http://",
        "file:///etc/passwd",
    ] {
        assert!(normalize_url(bad).is_err(), "{bad}");
    }
}

#[test]
fn add_dedupes_on_the_normalized_url_and_updates_in_place() {
    let events = Events::with_settings(
        4,
        vec![hook("http://config.example/")],
        Metrics::new(),
        fast(),
    );
    let (first, created) = events
        .add_webhook(hook("http://Editor.example:80/api/m3u-proxy/webhooks"))
        .expect("valid");
    assert!(created);
    assert_eq!(first.url, "http://editor.example/api/m3u-proxy/webhooks");

    let mut again = hook("HTTP://EDITOR.EXAMPLE/api/m3u-proxy/webhooks");
    again.events = vec![EventType::StreamStopped, EventType::StreamStopped];
    again.timeout = 5.0;
    again.retry_attempts = 2;
    let (second, created) = events.add_webhook(again).expect("valid");
    assert!(!created, "same normalized URL: updated, not duplicated");
    assert_eq!(
        second.events,
        [EventType::StreamStopped],
        "duplicates removed"
    );

    let all = events.webhooks();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].url, "http://config.example/");
    assert_eq!(all[1], second);
    assert_eq!(
        events.api_webhooks(),
        std::slice::from_ref(&second),
        "config hooks are not persisted"
    );

    assert!(events.remove_webhook("http://EDITOR.example:80/api/m3u-proxy/webhooks"));
    assert!(!events.remove_webhook("http://editor.example/api/m3u-proxy/webhooks"));
    assert_eq!(events.webhooks().len(), 1);

    // The state file round trip.
    let saved = serde_json::to_string(std::slice::from_ref(&second)).expect("serialize");
    let fresh = Events::with_settings(4, vec![], Metrics::new(), fast());
    fresh.restore(serde_json::from_str(&saved).expect("deserialize"));
    assert_eq!(fresh.api_webhooks(), [second]);
}

#[test]
fn invalid_webhooks_are_refused() {
    let events = Events::with_settings(4, vec![], Metrics::new(), fast());
    let bad = |f: &dyn Fn(&mut Webhook)| {
        let mut h = hook("http://r.example/");
        f(&mut h);
        events.add_webhook(h).expect_err("refused")
    };
    assert!(bad(&|h| h.url = "ftp://r.example/".into()).starts_with("url: "));
    assert!(bad(&|h| h.timeout = 0.5).starts_with("timeout: must be at least 1"));
    assert!(bad(&|h| h.timeout = f64::NAN).starts_with("timeout:"));
    assert!(bad(&|h| h.timeout = 1e300).starts_with("timeout:"));
    assert!(bad(&|h| {
        h.headers.insert("Bad Name".into(), "x".into());
    })
    .starts_with("headers: invalid header name"));
    assert!(bad(&|h| {
        h.headers.insert("X-A".into(), "a\nb".into());
    })
    .starts_with("headers: invalid value"));
    assert!(bad(&|h| h.secret = Some(String::new())).starts_with("secret:"));
    assert!(events.webhooks().is_empty());
}

#[test]
fn api_body_defaults_are_m3u_proxys() {
    let h: Webhook = serde_json::from_value(json!({"url": "http://r.example/x", "extra": 1}))
        .expect("unknown fields ignored");
    assert_eq!(h.events, EventType::ALL);
    assert!(h.headers.is_empty());
    assert_eq!(h.timeout, 10.0);
    assert_eq!(h.retry_attempts, 3);
    assert_eq!(h.secret, None);
    // What m3u-editor sends.
    let h: Webhook = serde_json::from_value(json!({
        "url": "http://editor/api/m3u-proxy/webhooks",
        "events": ["client_connected", "client_disconnected", "stream_started", "stream_stopped"],
        "headers": {}, "timeout": 5, "retry_attempts": 2
    }))
    .expect("editor body");
    assert_eq!(h.timeout, 5.0);
    assert_eq!(
        h.public_json(),
        json!({
            "url": "http://editor/api/m3u-proxy/webhooks",
            "events": ["client_connected", "client_disconnected", "stream_started", "stream_stopped"],
            "timeout": 5, "retry_attempts": 2
        })
    );
    assert!(
        serde_json::from_value::<Webhook>(json!({"url": "http://r/", "events": ["nope"]})).is_err()
    );
    assert!(
        serde_json::from_value::<Webhook>(json!({"url": "http://r/", "retry_attempts": -1}))
            .is_err()
    );
    // Secrets and header values never reach logs.
    let mut h = hook("http://r.example/p?token=SECRET");
    h.secret = Some("SECRET".into());
    h.headers.insert("Authorization".into(), "SECRET".into());
    assert!(!format!("{h:?}").contains("SECRET"), "{h:?}");
}

#[test]
fn event_type_names() {
    for t in EventType::ALL {
        assert_eq!(EventType::parse(t.as_str()), Some(t));
        assert_eq!(serde_json::to_value(t).expect("ser"), json!(t.as_str()));
        assert_eq!(t.to_string(), t.as_str());
    }
    assert_eq!(EventType::parse("Stream_Started"), None);
}

#[test]
fn timestamps_read_like_python_isoformat() {
    let t = chrono::NaiveDate::from_ymd_opt(2026, 11, 27)
        .and_then(|d| d.and_hms_micro_opt(5, 0, 0, 123_456))
        .expect("date");
    assert_eq!(python_utc_timestamp(t), "2026-11-27T05:00:00.123456");
    let t = chrono::NaiveDate::from_ymd_opt(2026, 11, 27)
        .and_then(|d| d.and_hms_micro_opt(5, 0, 0, 0))
        .expect("date");
    assert_eq!(python_utc_timestamp(t), "2026-11-27T05:00:00");
    let t = chrono::NaiveDate::from_ymd_opt(2026, 1, 2)
        .and_then(|d| d.and_hms_micro_opt(3, 4, 5, 60))
        .expect("date");
    assert_eq!(python_utc_timestamp(t), "2026-01-02T03:04:05.000060");
}

#[test]
fn backoff_doubles_is_capped_and_jittered() {
    let s = DeliverySettings::default();
    for _ in 0..100 {
        let d0 = webhook::backoff(&s, 0).as_secs_f64();
        assert!((0.8..=1.2).contains(&d0), "{d0}");
        let d2 = webhook::backoff(&s, 2).as_secs_f64();
        assert!((3.2..=4.8).contains(&d2), "{d2}");
        let d9 = webhook::backoff(&s, 9).as_secs_f64();
        assert!((24.0..=36.0).contains(&d9), "{d9}");
        let dmax = webhook::backoff(&s, u32::MAX).as_secs_f64();
        assert!((24.0..=36.0).contains(&dmax), "{dmax}");
    }
}

#[test]
fn redacted_urls_drop_query_and_userinfo() {
    assert_eq!(
        redact_url("https://u:p@h.example:8443/p/a?token=x#f"),
        "https://h.example:8443/p/a"
    );
    assert_eq!(redact_url("not a url"), "<invalid url>");
}

#[test]
fn a_reload_replaces_the_config_webhooks_and_keeps_the_api_ones() {
    let events = Events::with_settings(
        4,
        vec![hook("http://old.example/"), hook("http://kept.example/")],
        Metrics::new(),
        fast(),
    );
    events
        .add_webhook(hook("http://api.example/"))
        .expect("valid");
    events
        .add_webhook(hook("http://moved.example/"))
        .expect("valid");
    let (added, removed) = events.replace_config_webhooks(vec![
        hook("http://kept.example/"),
        hook("http://new.example/"),
        hook("http://moved.example/"),
    ]);
    assert_eq!((added, removed), (2, 1));
    let urls: Vec<String> = events.webhooks().into_iter().map(|h| h.url).collect();
    assert_eq!(
        urls,
        [
            "http://kept.example/",
            "http://new.example/",
            "http://moved.example/",
            "http://api.example/",
        ],
        "YAML ones first, then the API ones"
    );
    // Only API ones are persisted; one now in the YAML comes from the YAML.
    let api: Vec<String> = events.api_webhooks().into_iter().map(|h| h.url).collect();
    assert_eq!(api, ["http://api.example/"]);
    assert!(events.wants(EventType::StreamStopped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_outlives_pingoras_shutdown_until_finish() {
    use pingora::services::background::BackgroundService;
    let rx = Receiver::start().await;
    let events = Events::with_settings(16, vec![hook(&rx.url("/h"))], Metrics::new(), fast());
    let service = events.service();
    // Pingora's shutdown is already broadcast when the viewers are cut.
    let (_pingora, shutdown) = watch::channel(true);
    let run = tokio::spawn(async move { service.start(shutdown).await });
    events.emit(
        EventType::StreamStopped,
        "s1",
        json!({"reason": "shutdown"}),
    );
    assert!(events.finish(T).await, "the service did not finish");
    let got = rx.wait_for(1).await;
    assert_eq!(got[0].json()["data"]["reason"], "shutdown");
    tokio::time::timeout(T, run)
        .await
        .expect("the service ended")
        .expect("no panic");
    // After finish, emits are refused (counted), not queued forever.
    events.emit(EventType::StreamStopped, "s2", json!({}));
    assert_eq!(events.dropped(), 1);
}
