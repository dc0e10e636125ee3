//! URL → Pingora `HttpPeer`, with DNS resolved on the async runtime (never
//! `HttpPeer::new` with a hostname, which blocks a worker thread) and the
//! timeouts Pingora leaves unset by default (DESIGN.md, Pingora facts).

use std::net::SocketAddr;
use std::time::Duration;

use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use url::Url;

use super::guard;

/// How long an idle pooled provider connection is kept for reuse.
const POOL_IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("unsupported URL scheme {0:?}")]
    Scheme(String),
    #[error("URL has no host")]
    NoHost,
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error(transparent)]
    Refused(#[from] guard::Refused),
}

/// Resolves the URL's host without blocking (IP literals skip the resolver)
/// to an address `security.deny_private_upstreams` allows: this is the
/// address connected to.
pub async fn resolve(url: &Url) -> Result<SocketAddr, PeerError> {
    let tls = match url.scheme() {
        "http" => false,
        "https" => true,
        other => return Err(PeerError::Scheme(other.to_string())),
    };
    let port = url.port().unwrap_or(if tls { 443 } else { 80 });
    let addr = match url.host() {
        Some(url::Host::Ipv4(ip)) => SocketAddr::new(ip.into(), port),
        Some(url::Host::Ipv6(ip)) => SocketAddr::new(ip.into(), port),
        Some(url::Host::Domain(host)) => {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| PeerError::Resolve {
                    host: host.to_string(),
                    reason: e.to_string(),
                })?
                .collect();
            // The first address the policy allows; the first refusal if none.
            let first = *addrs.first().ok_or_else(|| PeerError::Resolve {
                host: host.to_string(),
                reason: "no addresses".into(),
            })?;
            addrs
                .into_iter()
                .find(|a| guard::check_addr(*a).is_ok())
                .unwrap_or(first)
        }
        None => return Err(PeerError::NoHost),
    };
    guard::check_addr(addr)?;
    Ok(addr)
}

/// A peer for `url` with every timeout set.
pub async fn peer_for(url: &Url, timeouts: Timeouts) -> Result<HttpPeer, PeerError> {
    let addr = resolve(url).await?;
    let tls = url.scheme() == "https";
    let sni = url.host_str().unwrap_or_default().to_string();
    let mut peer = HttpPeer::new(addr, tls, sni);
    let o = &mut peer.options;
    o.connection_timeout = Some(timeouts.connect);
    // TCP + TLS handshake together.
    o.total_connection_timeout = Some(timeouts.connect * 2);
    o.read_timeout = Some(timeouts.read);
    o.write_timeout = Some(timeouts.read);
    o.idle_timeout = Some(POOL_IDLE);
    o.alpn = ALPN::H1;
    Ok(peer)
}
