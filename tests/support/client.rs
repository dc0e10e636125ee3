//! HTTP client helpers for tests: a reqwest client that never uses a system proxy and
//! never follows redirects (tests must see exactly what the proxy sends), plus bounded
//! one-call helpers — every helper that waits has a timeout and panics with what it
//! was waiting for instead of hanging.
//!
//! A fresh `reqwest::Client` per helper call: each `#[tokio::test]` has its own runtime
//! and a pooled connection from another (finished) runtime fails with "dispatch task is
//! gone". Build one with [`client`] and reuse it inside a test when keep-alive matters.
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, Response, StatusCode};

use super::edge::Edge;

/// Connect timeout of every client.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound of one helper call (response head, or whole body for finite answers).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The test client's builder: no proxy, no redirects, 5 s connect timeout, no total
/// timeout (streams are endless; helpers bound their own waits).
pub fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
}

pub fn client() -> reqwest::Client {
    builder().build().expect("reqwest client")
}

/// Sends `req` and waits (bounded) for the response head.
pub async fn send(req: RequestBuilder) -> Response {
    let what = format!("{req:?}");
    match tokio::time::timeout(CALL_TIMEOUT, req.send()).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => panic!("request failed: {e:#} ({what})"),
        Err(_) => panic!("no response head within {CALL_TIMEOUT:?} ({what})"),
    }
}

/// `GET url`, response head only (the body is left to the caller).
pub async fn get(url: &str) -> Response {
    send(client().get(url)).await
}

/// `GET url` with extra headers.
pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Response {
    let mut req = client().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(req).await
}

/// `HEAD url`.
pub async fn head(url: &str) -> Response {
    send(client().head(url)).await
}

/// The whole body of a finite response, bounded by [`CALL_TIMEOUT`]; panics on error.
pub async fn body(resp: Response) -> Bytes {
    match tokio::time::timeout(CALL_TIMEOUT, resp.bytes()).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => panic!("body failed: {e:#}"),
        Err(_) => panic!("body not complete within {CALL_TIMEOUT:?}"),
    }
}

/// `GET url` → (status, headers, whole body).
pub async fn get_body(url: &str) -> (StatusCode, HeaderMap, Bytes) {
    get_body_with(url, &[]).await
}

/// `GET url` with headers → (status, headers, whole body).
pub async fn get_body_with(url: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
    let resp = get_with(url, headers).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    (status, headers, body(resp).await)
}

/// How a body read by [`read_to_end`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyEnd {
    /// Clean end of body.
    Complete,
    /// The connection broke (truncated chunked body, reset, ...): the error text.
    Error(String),
    /// Still going when the timeout passed.
    Timeout,
}

/// Reads until end, error or `timeout`; returns the bytes received and how it ended.
/// For checking truncation (`drop_after`) and clean ends without panicking.
pub async fn read_to_end(resp: &mut Response, timeout: Duration) -> (Bytes, BodyEnd) {
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk),
            Ok(Ok(None)) => return (buf.freeze(), BodyEnd::Complete),
            Ok(Err(e)) => return (buf.freeze(), BodyEnd::Error(format!("{e:#}"))),
            Err(_) => return (buf.freeze(), BodyEnd::Timeout),
        }
    }
}

/// Reads exactly `n` bytes of a (possibly endless) body within `timeout`; the rest of
/// the last chunk is discarded, so use [`BodyReader`] to keep reading aligned data.
/// Panics if the body ends or breaks first, or on timeout, saying how far it got.
pub async fn read_n_bytes(resp: &mut Response, n: usize, timeout: Duration) -> Bytes {
    let mut buf = BytesMut::with_capacity(n);
    let deadline = tokio::time::Instant::now() + timeout;
    while buf.len() < n {
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.extend_from_slice(&chunk),
            Ok(Ok(None)) => panic!("body ended after {} of {n} bytes", buf.len()),
            Ok(Err(e)) => panic!("body broke after {} of {n} bytes: {e:#}", buf.len()),
            Err(_) => panic!("only {} of {n} bytes within {timeout:?}", buf.len()),
        }
    }
    buf.truncate(n);
    buf.freeze()
}

/// Reads a response body in exact pieces without losing bytes between reads (keeps the
/// unread remainder of a chunk), for endless live streams.
pub struct BodyReader {
    resp: Response,
    pending: BytesMut,
    /// Total bytes handed out by `read_n`/`try_read_n`.
    pub consumed: u64,
}

impl BodyReader {
    pub fn new(resp: Response) -> BodyReader {
        BodyReader {
            resp,
            pending: BytesMut::new(),
            consumed: 0,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.resp.status()
    }

    pub fn headers(&self) -> &HeaderMap {
        self.resp.headers()
    }

    /// Exactly `n` bytes, or panics (end, error, timeout) saying how far it got.
    pub async fn read_n(&mut self, n: usize, timeout: Duration) -> Bytes {
        match self.try_read_n(n, timeout).await {
            Ok(b) => b,
            Err((got, end)) => panic!("only {} of {n} bytes: {end:?}", got.len()),
        }
    }

    /// Exactly `n` bytes, or what arrived before the body ended/broke/timed out.
    pub async fn try_read_n(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> Result<Bytes, (Bytes, BodyEnd)> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.pending.len() < n {
            let end = match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    self.pending.extend_from_slice(&chunk);
                    continue;
                }
                Ok(Ok(None)) => BodyEnd::Complete,
                Ok(Err(e)) => BodyEnd::Error(format!("{e:#}")),
                Err(_) => BodyEnd::Timeout,
            };
            let got = self.pending.split().freeze();
            self.consumed += got.len() as u64;
            return Err((got, end));
        }
        self.consumed += n as u64;
        Ok(self.pending.split_to(n).freeze())
    }

    /// Gives the response back (unread pending bytes are lost).
    pub fn into_inner(self) -> Response {
        self.resp
    }
}

/// Calls the management API: `method path` on the edge with `X-API-Token: token` (if
/// any) and a JSON body (if any). Returns the status and the body as JSON — `Null` for
/// an empty body, a JSON string holding the raw text for a non-JSON body.
pub async fn api(
    edge: &Edge,
    method: Method,
    path: &str,
    token: Option<&str>,
    json: Option<&serde_json::Value>,
) -> (StatusCode, serde_json::Value) {
    let mut req = client().request(method, edge.url(path));
    if let Some(token) = token {
        req = req.header("X-API-Token", token);
    }
    if let Some(json) = json {
        req = req.json(json);
    }
    let resp = send(req).await;
    let status = resp.status();
    let bytes = body(resp).await;
    let value = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        })
    };
    (status, value)
}
