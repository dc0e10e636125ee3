//! Pass 2 for `cluster:` (see `crate::cluster` and ../shared/CLUSTER.md).

use std::net::SocketAddr;
use std::time::Duration;

use super::super::raw::{spanned_at, RawCluster};
use super::super::{ClusterConfig, MetricsConfig, ServerConfig};
use super::{at_most, duration, socket_addr, Check, Validator};

/// HMAC-SHA256 wants a key as long as its output for full strength.
const MIN_SECRET: usize = 32;

impl Validator<'_> {
    pub(super) fn cluster(
        &mut self,
        raw: RawCluster,
        server: &ServerConfig,
        metrics: &MetricsConfig,
    ) -> ClusterConfig {
        let placeholder: SocketAddr = ([127, 0, 0, 1], 0).into();
        let name = self.leaf(&raw.name, "cluster.name", "m3u-edge".to_owned(), |s| {
            identifier(s, "cluster name")
        });
        let redis_url = self.spanned(&raw.redis_url, "cluster.redis_url", String::new(), |s| {
            redis_url(s)
        });
        let node_id = self.leaf(&raw.node_id, "cluster.node_id", host_name(), |s| {
            identifier(s, "node id")
        });
        let listen = self.spanned(&raw.listen, "cluster.listen", placeholder, |s| {
            let addr = socket_addr(s)?;
            if addr.port() == 0 {
                return Err("give a fixed port: peers connect to it".to_owned());
            }
            if addr == server.listen || Some(addr) == metrics.listen {
                return Err(format!(
                    "{addr} is already used by server.listen or metrics.listen; the internal \
                     listener needs a port of its own"
                ));
            }
            Ok(addr)
        });
        let advertise = match &raw.advertise {
            Some(a) => self.spanned(a, "cluster.advertise", placeholder, |s| {
                let addr = socket_addr(s)?;
                if addr.ip().is_unspecified() || addr.port() == 0 {
                    Err(
                        "peers must be able to connect to it: give this node's address and port, \
                         e.g. \"10.0.0.11:9090\""
                            .to_owned(),
                    )
                } else {
                    Ok(addr)
                }
            }),
            None => {
                if listen.ip().is_unspecified() {
                    self.report(
                        spanned_at(&raw.listen),
                        "cluster.advertise",
                        "required when cluster.listen is a wildcard address: set the address \
                         peers reach this node on, e.g. \"10.0.0.11:9090\"",
                    );
                }
                listen
            }
        };
        let secret = self.spanned(&raw.secret, "cluster.secret", Vec::new(), |s| {
            if s.len() < MIN_SECRET {
                Err(format!(
                    "{} bytes; use at least {MIN_SECRET} random bytes, the same on every node \
                     (e.g. `openssl rand -hex 32`)",
                    s.len()
                ))
            } else {
                Ok(s.as_bytes().to_vec())
            }
        });
        let node_ttl = self.leaf(
            &raw.node_ttl,
            "cluster.node_ttl",
            Duration::from_secs(5),
            |s| {
                let d = at_most(duration(s)?, Duration::from_secs(60))?;
                if d < Duration::from_secs(2) {
                    // Owners stop 1 s before their session could expire.
                    Err("at least 2s: a node fences itself 1s before its session expires".into())
                } else {
                    Ok(d)
                }
            },
        );
        let heartbeat = self.leaf(
            &raw.heartbeat,
            "cluster.heartbeat",
            Duration::from_secs(1),
            |s| {
                let d = duration(s)?;
                if d < Duration::from_millis(100) || d.saturating_mul(2) >= node_ttl {
                    Err(format!(
                        "between 100ms and half of cluster.node_ttl ({}): a session must \
                         survive a missed renewal",
                        humantime::format_duration(node_ttl)
                    ))
                } else {
                    Ok(d)
                }
            },
        );
        ClusterConfig {
            name,
            redis_url,
            node_id,
            listen,
            advertise,
            secret,
            node_ttl,
            heartbeat,
        }
    }
}

/// Names that end up in Redis keys and HTTP headers.
fn identifier(s: &str, what: &str) -> Check<String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "invalid {what} {s:?}: 1 to 64 of letters, digits, '.', '_' and '-'"
        ))
    }
}

fn redis_url(s: &str) -> Check<String> {
    let url = url::Url::parse(s).map_err(|e| {
        format!("invalid URL ({e}): expected redis://[:password@]host:port[/db] or rediss://...")
    })?;
    if !matches!(url.scheme(), "redis" | "rediss" | "valkey" | "valkeys") {
        return Err(format!(
            "scheme {:?}: use redis:// (or rediss:// for TLS)",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("no host: expected redis://host:port".to_owned());
    }
    redis::IntoConnectionInfo::into_connection_info(s)
        .map_err(|e| format!("not a Redis URL: {e}"))?;
    Ok(s.to_owned())
}

/// The machine's host name, cut to a valid node id.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if id.is_empty() {
        "node".to_owned()
    } else {
        id
    }
}
