//! Providers from the YAML: which URLs belong to which provider (by host), the
//! user agent and headers that provider wants, and its connection leases.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use url::Url;

use crate::config::ProviderConfig;
use crate::registry::StreamSpec;

pub struct Providers {
    list: Vec<ProviderConfig>,
}

impl Providers {
    pub fn new(list: &[ProviderConfig]) -> Self {
        Providers {
            list: list.to_vec(),
        }
    }

    pub fn all(&self) -> &[ProviderConfig] {
        &self.list
    }

    pub fn by_name(&self, name: &str) -> Option<&ProviderConfig> {
        self.list.iter().find(|p| p.name == name)
    }

    /// The provider serving `url`: hosts match case-insensitively, and
    /// `*.example.com` matches every subdomain (not the bare domain).
    pub fn by_url(&self, url: &Url) -> Option<&ProviderConfig> {
        let host = url.host_str()?.to_ascii_lowercase();
        self.list
            .iter()
            .find(|p| p.hosts.iter().any(|h| host_matches(h, &host)))
    }

    /// The stream's named provider, else the one its URL belongs to.
    pub fn for_stream(&self, spec: &StreamSpec, url: &Url) -> Option<&ProviderConfig> {
        spec.provider
            .as_deref()
            .and_then(|n| self.by_name(n))
            .or_else(|| self.by_url(url))
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
        None => pattern == host,
    }
}

/// Connection leases per provider (`providers[].max_connections`). A lease is
/// taken when an upstream connection opens and released (dropped) the moment
/// it closes. In cluster mode the limit holds across every node: the counts
/// live in Redis (`crate::cluster::leases`) and a limited provider's lease is
/// taken only by [`Leases::acquire`] (one Redis round trip).
pub struct Leases {
    slots: HashMap<String, Arc<Slot>>,
    cluster: Option<Arc<crate::cluster::leases::ClusterLeases>>,
}

/// One provider's leases on this node.
pub struct Slot {
    pub name: String,
    pub max: Option<u32>,
    used: Mutex<u32>,
    /// Woken when a lease of this provider is freed (here, or on another
    /// node in cluster mode).
    pub freed: Notify,
}

impl Slot {
    /// Leases open on this node.
    pub fn used(&self) -> u32 {
        *self.used.lock()
    }
}

/// One open provider connection. Dropping it frees the slot.
pub struct Lease {
    slot: Option<Arc<Slot>>,
    /// Cluster mode: told (without blocking) so the shared count follows.
    cluster: Option<Arc<crate::cluster::leases::ClusterLeases>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(s) = &self.slot {
            let mut used = s.used.lock();
            *used = used.saturating_sub(1);
            drop(used);
            s.freed.notify_waiters();
            if let Some(c) = &self.cluster {
                c.changed(&s.name);
            }
        }
    }
}

/// A provider at its limit (or, in cluster mode, whose limit cannot be
/// checked: then `reason` says why and nothing is opened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full {
    pub provider: String,
    pub max_connections: u32,
    pub reason: Option<String>,
}

impl Full {
    /// The `detail` of the 503 a client gets.
    pub fn detail(&self) -> String {
        match &self.reason {
            Some(r) => format!(
                "Provider {} not connected: its connection limit ({}) cannot be checked: {r}",
                self.provider, self.max_connections
            ),
            None => format!(
                "Provider {} is at its connection limit ({})",
                self.provider, self.max_connections
            ),
        }
    }
}

impl Leases {
    pub fn new(list: &[ProviderConfig]) -> Self {
        Self::with_cluster(list, None)
    }

    /// Leases counted across the cluster when `cluster` is set.
    pub fn with_cluster(
        list: &[ProviderConfig],
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Self {
        let slots: HashMap<String, Arc<Slot>> = list
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    Arc::new(Slot {
                        name: p.name.clone(),
                        max: p.max_connections,
                        used: Mutex::new(0),
                        freed: Notify::new(),
                    }),
                )
            })
            .collect();
        let cluster = cluster.map(|c| {
            crate::cluster::leases::ClusterLeases::new(c, slots.values().cloned().collect())
        });
        Leases { slots, cluster }
    }

    /// The cluster side, to start its background work (cluster mode only).
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::leases::ClusterLeases>> {
        self.cluster.as_ref()
    }

    fn lease(&self, slot: &Arc<Slot>) -> Lease {
        Lease {
            slot: Some(slot.clone()),
            cluster: self.cluster.clone(),
        }
    }

    /// Takes a lease now, or says the provider is full. Streams without a
    /// provider are unlimited. In cluster mode a limited provider needs a
    /// Redis round trip, which this never waits for: it answers `Full` with
    /// a reason, and callers that must connect use [`Leases::acquire`].
    pub fn try_acquire(&self, provider: Option<&str>) -> Result<Lease, Full> {
        let Some(slot) = provider.and_then(|p| self.slots.get(p)) else {
            return Ok(Lease {
                slot: None,
                cluster: None,
            });
        };
        if let (Some(c), Some(max)) = (&self.cluster, slot.max) {
            return Err(Full {
                provider: slot.name.clone(),
                max_connections: max,
                reason: Some(c.needs_round_trip()),
            });
        }
        let mut used = slot.used.lock();
        match slot.max {
            Some(max) if *used >= max => Err(Full {
                provider: slot.name.clone(),
                max_connections: max,
                reason: None,
            }),
            _ => {
                *used += 1;
                drop(used);
                if let Some(c) = &self.cluster {
                    // Unlimited: counted for /stats only.
                    c.changed(&slot.name);
                }
                Ok(self.lease(slot))
            }
        }
    }

    /// Like `try_acquire`, waiting up to `wait` for a lease to be released:
    /// a player that zaps may open the new channel a moment before the proxy
    /// sees it close the old one (on this node or, in cluster mode, another).
    pub async fn acquire(&self, provider: Option<&str>, wait: Duration) -> Result<Lease, Full> {
        if let (Some(c), Some(slot)) = (&self.cluster, provider.and_then(|p| self.slots.get(p))) {
            if slot.max.is_some() {
                c.acquire(slot, wait).await?;
                return Ok(self.lease(slot));
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let slot = provider.and_then(|p| self.slots.get(p)).cloned();
            let notified = slot.as_ref().map(|s| s.freed.notified());
            match self.try_acquire(provider) {
                Ok(l) => return Ok(l),
                Err(full) => {
                    let Some(n) = notified else {
                        return Err(full);
                    };
                    if tokio::time::timeout_at(deadline, n).await.is_err() {
                        return self.try_acquire(provider);
                    }
                }
            }
        }
    }

    /// (in use, limit) per provider, for `/stats` and metrics; in cluster
    /// mode in use on every node (as last read, at most ~1 s old).
    pub fn usage(&self) -> Vec<(String, u32, Option<u32>)> {
        let mut v: Vec<_> = self
            .slots
            .iter()
            .map(|(n, s)| {
                let used = match &self.cluster {
                    Some(c) => c.total(n).unwrap_or_else(|| s.used()),
                    None => s.used(),
                };
                (n.clone(), used, s.max)
            })
            .collect();
        v.sort();
        v
    }

    /// Leases open on this node, per provider.
    pub fn local_usage(&self) -> Vec<(String, u32)> {
        let mut v: Vec<_> = self
            .slots
            .iter()
            .map(|(n, s)| (n.clone(), s.used()))
            .collect();
        v.sort();
        v
    }
}

impl Slot {
    /// Counts one more lease here (the cluster side took it in Redis).
    pub(crate) fn add_one(&self) {
        *self.used.lock() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_hosts() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "aexample.com"));
        assert!(host_matches("example.com", "example.com"));
    }
}
