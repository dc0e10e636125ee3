//! `security.deny_private_upstreams` (issue #14 h): which addresses the proxy
//! may connect to on behalf of a stream, a playlist, a redirect, a failover
//! resolver, a webhook or `POST /test-connection`.
//!
//! With the option on, an address that is not public (loopback, RFC 1918,
//! link-local such as the cloud metadata service `169.254.169.254`, CGNAT,
//! unique-local IPv6, IPv4 embedded in IPv6, …) is refused unless it is in
//! `security.private_allowlist`. The check is made on the address actually
//! connected to, after DNS resolution: by [`check_addr`] where Pingora's peer is
//! chosen (`peer.rs`), by [`Resolver`] inside every reqwest client (a host name
//! resolving to 127.0.0.1 is refused, and only the public addresses of a name are
//! ever connected to, so DNS rebinding gains nothing), and by [`check_url`] for
//! URLs whose host is an IP literal (reqwest connects to those without asking a
//! resolver), before each request and on each redirect hop ([`redirect_policy`]);
//! and, for any reqwest connection, on the address it reached ([`CheckConnected`]).
//!
//! The option is off by default: many providers, and most home setups, are on a
//! LAN. The policy is process-wide ([`configure`], called once when the app is
//! built) so every HTTP client of the process applies the same one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use parking_lot::RwLock;
use url::Url;

use crate::config::SecurityConfig;

/// An allowlist entry: an address or a CIDR network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    /// `192.168.1.10`, `10.0.0.0/8`, `fd00::/8`, `::1`.
    pub fn parse(s: &str) -> Result<Net, String> {
        let bad = || format!("{s:?} is not an IP address or a network such as 10.0.0.0/8");
        let (ip, prefix) = match s.trim().split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Net { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Why a target was not connected to.
#[derive(Debug, Clone, thiserror::Error)]
#[error("refused: {0} is a private address (security.deny_private_upstreams)")]
pub struct Refused(pub IpAddr);

#[derive(Debug, Default)]
struct Policy {
    deny: bool,
    allow: Vec<Net>,
}

static POLICY: RwLock<Option<Arc<Policy>>> = RwLock::new(None);

/// Sets the process-wide policy from the config.
pub fn configure(config: &SecurityConfig) {
    *POLICY.write() = Some(Arc::new(Policy {
        deny: config.deny_private_upstreams,
        allow: config.private_allowlist.clone(),
    }));
}

fn policy() -> Option<Arc<Policy>> {
    POLICY.read().clone().filter(|p| p.deny)
}

/// Whether `security.deny_private_upstreams` is on.
pub fn denying() -> bool {
    policy().is_some()
}

/// IPv4 written inside IPv6 (mapped `::ffff:a.b.c.d`) is judged as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

fn v4_is_public(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || a >= 240
        // 100.64.0.0/10 shared address space (CGNAT, RFC 6598).
        || (a == 100 && (64..128).contains(&b))
        // 192.0.0.0/24 IETF protocol assignments, 198.18.0.0/15 benchmarking.
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b == 18 || b == 19)))
}

fn v6_is_public(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return false;
    }
    match s[0] {
        // fc00::/7 unique local, fe80::/10 link-local, fec0::/10 site-local.
        x if x & 0xfe00 == 0xfc00 || x & 0xffc0 == 0xfe80 || x & 0xffc0 == 0xfec0 => false,
        // 2002::/16 6to4 carries an IPv4 address in bits 16..48.
        0x2002 => v4_is_public(embedded_v4(s[1], s[2])),
        // 64:ff9b::/96 NAT64 and ::a.b.c.d (IPv4-compatible) end with one.
        0x0064 if s[1] == 0xff9b => v4_is_public(embedded_v4(s[6], s[7])),
        0 if s[..6].iter().all(|&x| x == 0) => v4_is_public(embedded_v4(s[6], s[7])),
        _ => true,
    }
}

/// A public unicast address (not loopback, private, link-local, …).
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => v4_is_public(v4),
        IpAddr::V6(v6) => v6_is_public(v6),
    }
}

fn allowed(p: &Policy, ip: IpAddr) -> bool {
    is_public(ip) || p.allow.iter().any(|n| n.contains(ip))
}

/// Refuses `addr` when the policy is on and it is private.
pub fn check_addr(addr: SocketAddr) -> Result<(), Refused> {
    match policy() {
        Some(p) if !allowed(&p, addr.ip()) => Err(Refused(addr.ip())),
        _ => Ok(()),
    }
}

/// Refuses a URL whose host is a private IP literal (names are checked after
/// resolution, by [`Resolver`] and [`check_addr`]).
pub fn check_url(url: &Url) -> Result<(), Refused> {
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        _ => return Ok(()),
    };
    check_addr(SocketAddr::new(ip, 0))
}

/// The [`Refused`] somewhere in an error's source chain (reqwest wraps it).
pub fn find_refused<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// A reqwest DNS resolver that keeps only the addresses the policy allows; a
/// name with none left fails with [`Refused`].
#[derive(Debug, Default, Clone)]
pub struct Resolver;

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = match policy() {
                Some(p) => found
                    .iter()
                    .copied()
                    .filter(|a| allowed(&p, a.ip()))
                    .collect(),
                None => found.clone(),
            };
            match (kept.is_empty(), found.first()) {
                (true, Some(first)) => Err(Box::new(Refused(first.ip())) as _),
                _ => Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// Follows up to `max` redirects to http(s) URLs whose IP-literal hosts the
/// policy allows (names are checked by [`Resolver`]).
pub fn redirect_policy(max: usize) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > max {
            return attempt.error("too many redirects");
        }
        let url = attempt.url();
        if !matches!(url.scheme(), "http" | "https") {
            return attempt.error("redirect to a URL that is not http(s)");
        }
        match check_url(url) {
            Ok(()) => attempt.follow(),
            Err(refused) => attempt.error(refused),
        }
    })
}

/// A reqwest connector layer refusing a connection whose remote address the
/// policy does not allow. The resolver and the URL checks refuse before
/// connecting; this catches what reaches a connect without them (an IP
/// literal in a URL that no caller checked), right after the TCP handshake
/// and before any request byte is sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckConnected;

impl<S> tower_layer::Layer<S> for CheckConnected {
    type Service = Checked<S>;

    fn layer(&self, inner: S) -> Checked<S> {
        Checked(inner)
    }
}

/// The service of [`CheckConnected`].
#[derive(Debug, Clone)]
pub struct Checked<S>(S);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, R> tower_service::Service<R> for Checked<S>
where
    S: tower_service::Service<R>,
    S::Response: hyper_util::client::legacy::connect::Connection + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let connecting = self.0.call(req);
        Box::pin(async move {
            let conn = connecting.await.map_err(Into::into)?;
            if policy().is_some() {
                let mut extras = http::Extensions::new();
                hyper_util::client::legacy::connect::Connection::connected(&conn)
                    .get_extras(&mut extras);
                let info = extras.get::<hyper_util::client::legacy::connect::HttpInfo>();
                if let Some(info) = info {
                    check_addr(info.remote_addr())?;
                }
            }
            Ok(conn)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn private_and_public_addresses() {
        for private in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip(private)), "{private}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip(public)), "{public}");
        }
    }

    #[test]
    fn allowlist_networks() {
        let n = Net::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.200.1.1")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(n.contains(ip("::ffff:10.0.0.1")));
        let one = Net::parse("192.168.1.10").unwrap();
        assert!(one.contains(ip("192.168.1.10")));
        assert!(!one.contains(ip("192.168.1.11")));
        assert!(Net::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(Net::parse("0.0.0.0/0").unwrap().contains(ip("127.0.0.1")));
        for bad in [
            "",
            "x",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/x",
            "host.example",
        ] {
            assert!(Net::parse(bad).is_err(), "{bad}");
        }
    }
}
