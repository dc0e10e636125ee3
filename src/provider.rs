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
/// it closes.
pub struct Leases {
    slots: HashMap<String, Arc<Slot>>,
}

struct Slot {
    max: Option<u32>,
    used: Mutex<u32>,
    freed: Notify,
}

/// One open provider connection. Dropping it frees the slot.
pub struct Lease {
    slot: Option<Arc<Slot>>,
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
        }
    }
}

/// A provider at its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full {
    pub provider: String,
    pub max_connections: u32,
}

impl Leases {
    pub fn new(list: &[ProviderConfig]) -> Self {
        let slots = list
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    Arc::new(Slot {
                        max: p.max_connections,
                        used: Mutex::new(0),
                        freed: Notify::new(),
                    }),
                )
            })
            .collect();
        Leases { slots }
    }

    /// Takes a lease now, or says the provider is full. Streams without a
    /// provider are unlimited.
    pub fn try_acquire(&self, provider: Option<&str>) -> Result<Lease, Full> {
        let Some(slot) = provider.and_then(|p| self.slots.get(p)) else {
            return Ok(Lease { slot: None });
        };
        let mut used = slot.used.lock();
        match slot.max {
            Some(max) if *used >= max => Err(Full {
                provider: provider.unwrap_or_default().to_string(),
                max_connections: max,
            }),
            _ => {
                *used += 1;
                Ok(Lease {
                    slot: Some(slot.clone()),
                })
            }
        }
    }

    /// Like `try_acquire`, waiting up to `wait` for a lease to be released:
    /// a player that zaps may open the new channel a moment before the proxy
    /// sees it close the old one.
    pub async fn acquire(&self, provider: Option<&str>, wait: Duration) -> Result<Lease, Full> {
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

    /// (in use, limit) per provider, for `/stats` and metrics.
    pub fn usage(&self) -> Vec<(String, u32, Option<u32>)> {
        let mut v: Vec<_> = self
            .slots
            .iter()
            .map(|(n, s)| (n.clone(), *s.used.lock(), s.max))
            .collect();
        v.sort();
        v
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
