//! A real webhook receiver for integration tests (DESIGN.md "Testing and
//! benchmarks"): a hyper 1 HTTP/1.1 server on `127.0.0.1:0` standing in for
//! m3u-editor's `/api/m3u-proxy/webhooks`. It records every request (path,
//! headers, JSON body, arrival time) and has knobs to fail, delay or hang,
//! so tests can check R5 from the receiver's side: the envelope, retries,
//! signatures, and that a dead receiver delays nobody else.
//!
//! It owns no proxy assertions; tests read what it recorded. Waiting is by
//! bounded polling ([`super::eventually`]), never by guessed sleeps.
//!
//! Answers (any method, any path): the status of [`WebhookReceiver::set_status`]
//! (default 200) with m3u-editor's body `{"status":"ok"}`, except
//! - the first `n` requests after [`WebhookReceiver::fail_first`] get 500;
//! - with [`WebhookReceiver::never_answer`] on, requests are held unanswered
//!   until it is turned off again (or the client gives up, or the receiver
//!   is dropped);
//! - [`WebhookReceiver::set_delay`] waits before every answer.
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::watch;

use super::eventually::eventually;

/// One request as the receiver got it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// Header name (lowercase) → value; repeated headers joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// The raw body (what a signature covers).
    pub raw: Bytes,
    /// The body parsed as JSON; `Value::Null` when it is not JSON.
    pub body: Value,
    /// When the request (with its body) had arrived.
    pub at: Instant,
}

impl Received {
    /// A header value by (any-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// `body.event_type` as a string (`""` when absent).
    pub fn event_type(&self) -> &str {
        self.body["event_type"].as_str().unwrap_or("")
    }

    /// `body.stream_id` as a string (`""` when absent).
    pub fn stream_id(&self) -> &str {
        self.body["stream_id"].as_str().unwrap_or("")
    }

    /// Whether `X-M3U-Edge-Signature` is `sha256=` + the hex HMAC-SHA256 of
    /// the raw body under `secret` (checked in constant time).
    pub fn signature_valid(&self, secret: &str) -> bool {
        use hmac::{Hmac, Mac};
        let Some(hex_mac) = self
            .header("x-m3u-edge-signature")
            .and_then(|s| s.strip_prefix("sha256="))
        else {
            return false;
        };
        let Ok(expected) = hex::decode(hex_mac) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
            return false;
        };
        mac.update(&self.raw);
        mac.verify_slice(&expected).is_ok()
    }
}

struct State {
    addr: SocketAddr,
    received: Mutex<Vec<Received>>,
    fail_first: AtomicUsize,
    status: AtomicU16,
    delay: Mutex<Duration>,
    /// `true` holds requests; turning it off releases the held ones.
    hold: watch::Sender<bool>,
    answered: AtomicUsize,
}

/// The loopback webhook receiver. Dropping it stops the listener and every
/// connection (held requests included).
pub struct WebhookReceiver {
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    /// Binds `127.0.0.1:0` and starts serving on the current tokio runtime.
    pub async fn start() -> WebhookReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("webhook receiver: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("webhook receiver: local_addr");
        let (hold, _) = watch::channel(false);
        let state = Arc::new(State {
            addr,
            received: Mutex::new(Vec::new()),
            fail_first: AtomicUsize::new(0),
            status: AtomicU16::new(200),
            delay: Mutex::new(Duration::ZERO),
            hold,
            answered: AtomicUsize::new(0),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, state.clone(), shutdown_rx));
        WebhookReceiver {
            state,
            shutdown,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// `http://127.0.0.1:PORT/path` (a missing leading `/` is added).
    pub fn url(&self, path: &str) -> String {
        if path.starts_with('/') {
            format!("http://{}{}", self.state.addr, path)
        } else {
            format!("http://{}/{}", self.state.addr, path)
        }
    }

    /// Every request so far, in arrival order (held ones included).
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().clone()
    }

    /// Requests received so far.
    pub fn count(&self) -> usize {
        self.state.received.lock().len()
    }

    /// Requests answered so far (any status).
    pub fn answered(&self) -> usize {
        self.state.answered.load(Ordering::SeqCst)
    }

    /// The JSON bodies of the requests whose `event_type` is `event_type`
    /// (`"stream_stopped"`), in arrival order. Retries appear once per try.
    pub fn events_of(&self, event_type: &str) -> Vec<Value> {
        self.state
            .received
            .lock()
            .iter()
            .filter(|r| r.event_type() == event_type)
            .map(|r| r.body.clone())
            .collect()
    }

    /// Forgets the recorded requests (knobs and counters are kept).
    pub fn clear(&self) {
        self.state.received.lock().clear();
    }

    /// Answers 500 to the next `n` requests, then the normal status.
    pub fn fail_first(&self, n: usize) {
        self.state.fail_first.store(n, Ordering::SeqCst);
    }

    /// The status of normal answers (default 200).
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Waits this long before every answer (default none).
    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock() = delay;
    }

    /// `true`: hold every request unanswered (a hung receiver); `false`:
    /// answer normally, releasing the requests held so far.
    pub fn never_answer(&self, on: bool) {
        self.state.hold.send_replace(on);
    }

    /// Waits until at least `count` requests arrived; `false` on timeout.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> bool {
        eventually(timeout, || self.count() >= count).await
    }

    /// Waits until at least `count` requests with this `event_type`
    /// arrived, and returns those bodies (fewer on timeout: assert the
    /// length).
    pub async fn wait_for_events(
        &self,
        event_type: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<Value> {
        eventually(timeout, || self.events_of(event_type).len() >= count).await;
        self.events_of(event_type)
    }

    /// Polls `cond(self)` every 10 ms until true or `timeout`.
    pub async fn wait_until<F: Fn(&WebhookReceiver) -> bool>(
        &self,
        timeout: Duration,
        cond: F,
    ) -> bool {
        eventually(timeout, || cond(self)).await
    }
}

impl Drop for WebhookReceiver {
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
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let st = state.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(handle(st, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        });
    }
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let raw = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers = super::header_map(&parts.headers);
    st.received.lock().push(Received {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned()),
        headers,
        body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
        raw,
        at: Instant::now(),
    });

    let mut hold = st.hold.subscribe();
    let _ = hold.wait_for(|on| !*on).await;
    let delay = *st.delay.lock();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let fail = st
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::from_u16(st.status.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK)
    };
    st.answered.fetch_add(1, Ordering::SeqCst);
    let mut resp = Response::new(Full::new(Bytes::from_static(b"{\"status\":\"ok\"}")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The receiver behaves as documented (its own tests live here so the
/// support module stays self-contained).
#[cfg(test)]
mod selftest {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_and_answers() {
        let r = WebhookReceiver::start().await;
        let body =
            serde_json::json!({"event_type": "stream_stopped", "stream_id": "abc", "data": {}});
        let resp = client()
            .post(r.url("/api/m3u-proxy/webhooks?x=1"))
            .header("X-Test", "1")
            .json(&body)
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.expect("body"), "{\"status\":\"ok\"}");
        let got = r.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].method, "POST");
        assert_eq!(got[0].path, "/api/m3u-proxy/webhooks?x=1");
        assert_eq!(got[0].header("x-test"), Some("1"));
        assert_eq!(got[0].body, body);
        assert_eq!(got[0].stream_id(), "abc");
        assert_eq!(r.events_of("stream_stopped"), [body]);
        assert!(r.events_of("stream_started").is_empty());
        assert!(r.wait_for(1, T).await);
        assert!(!r.wait_for(2, Duration::from_millis(50)).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fail_first_then_status() {
        let r = WebhookReceiver::start().await;
        r.fail_first(2);
        let c = client();
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(
                c.post(r.url("/"))
                    .send()
                    .await
                    .expect("answer")
                    .status()
                    .as_u16(),
            );
        }
        assert_eq!(statuses, [500, 500, 200]);
        r.set_status(404);
        assert_eq!(
            c.post(r.url("/")).send().await.expect("answer").status(),
            404
        );
        assert_eq!(r.answered(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_answer_holds_until_released() {
        let r = WebhookReceiver::start().await;
        r.never_answer(true);
        let c = client();
        let err = c
            .post(r.url("/"))
            .timeout(Duration::from_millis(200))
            .send()
            .await
            .expect_err("held past the client's timeout");
        assert!(err.is_timeout(), "{err}");
        assert_eq!(r.count(), 1);
        assert_eq!(r.answered(), 0);

        let pending = tokio::spawn({
            let url = r.url("/");
            async move { c.post(url).send().await.map(|r| r.status().as_u16()) }
        });
        assert!(r.wait_for(2, T).await);
        r.never_answer(false);
        let status = tokio::time::timeout(T, pending)
            .await
            .expect("released")
            .expect("no panic")
            .expect("answered");
        assert_eq!(status, 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delay_is_applied_after_recording() {
        let r = WebhookReceiver::start().await;
        r.set_delay(Duration::from_secs(30));
        let c = client();
        let req = tokio::spawn({
            let url = r.url("/slow");
            async move {
                c.post(url)
                    .timeout(Duration::from_millis(300))
                    .send()
                    .await
                    .is_err()
            }
        });
        // Recorded at once, answered only after the delay (here: never,
        // the client gives up first).
        assert!(r.wait_for(1, T).await);
        assert!(req.await.expect("no panic"), "the client timed out");
        assert_eq!(r.answered(), 0);
    }

    #[test]
    fn signature_check() {
        use hmac::{Hmac, Mac};
        let raw = Bytes::from_static(b"{\"a\":1}");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"k").expect("key");
        mac.update(&raw);
        let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let mut headers = BTreeMap::new();
        headers.insert("x-m3u-edge-signature".to_owned(), sig);
        let r = Received {
            method: "POST".into(),
            path: "/".into(),
            headers,
            body: Value::Null,
            raw,
            at: Instant::now(),
        };
        assert!(r.signature_valid("k"));
        assert!(!r.signature_valid("other"));
    }
}
