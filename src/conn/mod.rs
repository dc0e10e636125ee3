//! The front door: every client connection passes here before Pingora reads
//! a byte of it.
//!
//! Pingora 0.9 has no connection caps, times out each header read but not a
//! header as a whole, and accepts headers up to 1 MiB; unauthenticated
//! clients could hold the process at its open-files limit (slow-loris) or
//! make it buffer a megabyte per connection. [`FrontDoor`] wraps Pingora's
//! HTTP/1 proxy app: a connection takes a slot (in all and per address),
//! and each request's header must arrive whole, within its deadline and its
//! caps ([`head`]), before it is handed to Pingora unchanged.

pub mod caps;
pub mod head;
pub mod selfloop;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;

use crate::app::App;
use crate::metrics::LimitCut;
use crate::proxy::Edge;
use caps::{Caps, Full};
use head::{Head, HeadLimits};

/// Open client connections: in all and per address.
pub type ConnCaps = Caps<IpAddr>;

/// How long a refusal may take to write before the connection is dropped
/// anyway (the client may not be reading).
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// Upper bound of the automatic `limits.max_connections`.
const AUTO_MAX_CONNECTIONS: usize = 50_000;

pub struct FrontDoor {
    proxy: Arc<HttpProxy<Edge>>,
    app: Arc<App>,
}

impl FrontDoor {
    pub fn new(proxy: HttpProxy<Edge>, app: Arc<App>) -> Self {
        FrontDoor {
            proxy: Arc::new(proxy),
            app,
        }
    }

    fn head_limits(&self, first: bool) -> HeadLimits {
        let l = &self.app.config.limits;
        HeadLimits {
            // A new connection must start its request within the header
            // deadline; a kept-alive one may idle for the keep-alive time.
            idle: if first {
                l.header_timeout
            } else {
                l.keepalive_timeout
            },
            deadline: l.header_timeout,
            max_bytes: l.max_header_bytes,
            max_lines: l.max_headers,
        }
    }

    /// Reads the next request header; `Some(stream)` with the header put
    /// back, or None when the connection is done (refusal written).
    ///
    /// Pipelined requests (several in one write) are handed to Pingora one at
    /// a time: `pending` keeps the bytes of the next ones for the next call,
    /// so each is answered, in order.
    async fn next_request(
        &self,
        mut stream: Stream,
        first: bool,
        pending: &mut Vec<u8>,
    ) -> Option<Stream> {
        // Only a plain TCP/Unix stream can take bytes back; anything else
        // goes to Pingora as it is, with Pingora's own limits.
        if !stream.as_any().is::<L4Stream>() {
            return Some(stream);
        }
        if !pending.is_empty() {
            let mut l4 = stream.into_any().downcast::<L4Stream>().ok()?;
            l4.rewind(pending);
            pending.clear();
            stream = l4;
        }
        let head = head::read(&mut stream, self.head_limits(first)).await;
        let m = &self.app.metrics;
        let refusal = match head {
            Head::Complete(bytes) => {
                let mut l4 = stream.into_any().downcast::<L4Stream>().ok()?;
                match head::pipelined_split(&bytes) {
                    Some(end) => {
                        l4.rewind(&bytes[..end]);
                        pending.extend_from_slice(&bytes[end..]);
                    }
                    None => l4.rewind(&bytes),
                }
                return Some(l4);
            }
            Head::Closed | Head::Truncated => return None,
            Head::Idle if first => {
                m.cut(LimitCut::HeaderTimeout);
                return None;
            }
            Head::Idle => {
                m.cut(LimitCut::KeepaliveIdle);
                return None;
            }
            Head::TimedOut => {
                m.cut(LimitCut::HeaderTimeout);
                (
                    408,
                    "Request Timeout",
                    "request header not received in time",
                )
            }
            Head::TooLarge => {
                m.cut(LimitCut::HeaderBytes);
                (
                    431,
                    "Request Header Fields Too Large",
                    "request header too large",
                )
            }
            Head::TooManyLines => {
                m.cut(LimitCut::HeaderLines);
                (
                    431,
                    "Request Header Fields Too Large",
                    "too many request header fields",
                )
            }
        };
        refuse(&mut stream, refusal).await;
        None
    }
}

/// Writes a complete `Connection: close` JSON error and shuts the stream.
async fn refuse(stream: &mut Stream, (status, reason, detail): (u16, &str, &str)) {
    let body = serde_json::json!({ "detail": detail }).to_string();
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        stream.write_all(text.as_bytes()).await.ok();
        stream.flush().await.ok();
    };
    tokio::time::timeout(REFUSAL_WRITE, write).await.ok();
    // Pingora's Shutdown trait: a clean FIN.
    pingora::protocols::Shutdown::shutdown(&mut **stream).await;
}

/// The client's address, when the stream knows it.
pub fn peer_ip(stream: &Stream) -> Option<IpAddr> {
    let digest = stream.get_socket_digest()?;
    digest.peer_addr()?.as_inet().map(|a| a.ip())
}

#[async_trait]
impl ServerApp for FrontDoor {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let ip = peer_ip(&stream);
        let _slot = match self.app.conns.take(ip) {
            Ok(slot) => slot,
            Err(full) => {
                let (cut, detail) = match full {
                    Full::Total(_) => (LimitCut::Connections, "too many connections"),
                    Full::PerKey(_) => (
                        LimitCut::ConnectionsPerAddress,
                        "too many connections from your address",
                    ),
                };
                self.app.metrics.cut(cut);
                refuse(&mut stream, (503, "Service Unavailable", detail)).await;
                return None;
            }
        };
        let keepalive = self.app.config.limits.keepalive_timeout.as_secs().max(1);
        let mut first = true;
        let mut settings = None;
        let mut pending = Vec::new();
        loop {
            let stream_in = self.next_request(stream, first, &mut pending).await?;
            let mut session = ServerSession::new_http1(stream_in);
            if *shutdown.borrow() {
                session.set_keepalive(None);
            } else {
                session.set_keepalive(Some(keepalive));
            }
            if let Some(s) = settings.take() {
                pingora::apps::HttpPersistentSettings::apply_to_session(s, &mut session);
            }
            let reused = self.proxy.process_new_http(session, shutdown).await?;
            let (next, next_settings) = reused.consume();
            stream = next;
            settings = next_settings;
            first = false;
        }
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

/// Raises the soft open-files limit to the hard one (a proxy holds a
/// descriptor per client and per provider connection) and returns the soft
/// limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            return Some(hard);
        }
        Some(soft)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// `limits.max_connections`, or when 0, three quarters of the open-files
/// limit (the rest is for provider connections, spools and files), at most
/// [`AUTO_MAX_CONNECTIONS`].
pub fn max_connections(configured: usize, open_files: Option<u64>) -> usize {
    if configured > 0 {
        return configured;
    }
    let files = open_files.map_or(4096, |n| usize::try_from(n).unwrap_or(usize::MAX));
    (files / 4 * 3).clamp(64, AUTO_MAX_CONNECTIONS)
}

/// Gives freed heap back to the OS. glibc keeps freed memory in its arenas;
/// after a burst of connections (an attack, a zapping storm) the process
/// would otherwise keep its peak RSS for good.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automatic_connection_cap_follows_the_open_files_limit() {
        assert_eq!(max_connections(10, Some(1_000_000)), 10);
        assert_eq!(max_connections(0, Some(1024)), 768);
        assert_eq!(max_connections(0, Some(65_536)), 49_152);
        assert_eq!(max_connections(0, Some(1 << 20)), AUTO_MAX_CONNECTIONS);
        assert_eq!(max_connections(0, Some(16)), 64);
        assert_eq!(max_connections(0, None), 3072);
    }
}
