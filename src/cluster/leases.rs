//! Provider connection limits across the cluster (CLUSTER.md "Provider
//! limits"): `plc:{provider}` is a HASH node → connections that node holds.
//! Taking a lease runs one script that sums the fields of live nodes only
//! (and deletes the others: a crashed node's leases free themselves once its
//! session key expires) and writes this node's new count if the sum stays
//! within `max_connections`.
//!
//! Each node writes only its own field and always writes its absolute local
//! count (under a per-provider lock), so a lost or reordered write heals at
//! the next one, and a periodic write puts back a field that was pruned while
//! this node was cut off from Redis. Releases never block: `Lease::drop`
//! sends the provider's name to a task that writes the lower count and
//! publishes `provider_freed`, which wakes the joins waiting for that
//! provider on every node.
//!
//! Redis down (or this node fenced) → no lease: the caller answers 503 with
//! the reason instead of risking more connections than the account allows.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::Mutex;
use redis::Script;
use tokio::sync::mpsc;

use super::{Bus, Cluster, ClusterError};
use crate::provider::{Full, Slot};

/// How often this node re-writes its counts and re-reads the totals.
const REFRESH: Duration = Duration::from_secs(1);
/// A waiting acquire re-asks at least this often (a `provider_freed`
/// message may be lost while the bus reconnects).
const POLL: Duration = Duration::from_millis(500);

/// KEYS: plc. ARGV: key prefix, node, our count after taking, max.
/// Returns {1 taken | 0 full, total}.
const TAKE: &str = r#"
local f = redis.call('HGETALL', KEYS[1])
local others = 0
for i = 1, #f, 2 do
  local n = f[i]
  if n ~= ARGV[2] then
    if redis.call('EXISTS', ARGV[1] .. 'node:' .. n) == 1 then
      others = others + (tonumber(f[i + 1]) or 0)
    else
      redis.call('HDEL', KEYS[1], n)
    end
  end
end
local want = tonumber(ARGV[3])
if others + want > tonumber(ARGV[4]) then
  return {0, others + want - 1}
end
redis.call('HSET', KEYS[1], ARGV[2], want)
return {1, others + want}
"#;

/// KEYS: plc of every provider. ARGV: key prefix, node, then our count per
/// key. Writes our counts, prunes dead nodes, returns the totals in order.
const SYNC: &str = r#"
local out = {}
for k = 1, #KEYS do
  local mine = tonumber(ARGV[k + 2])
  if mine > 0 then
    redis.call('HSET', KEYS[k], ARGV[2], mine)
  else
    redis.call('HDEL', KEYS[k], ARGV[2])
  end
  local f = redis.call('HGETALL', KEYS[k])
  local total = 0
  for i = 1, #f, 2 do
    local n = f[i]
    if n == ARGV[2] or redis.call('EXISTS', ARGV[1] .. 'node:' .. n) == 1 then
      total = total + (tonumber(f[i + 1]) or 0)
    else
      redis.call('HDEL', KEYS[k], n)
    end
  end
  out[k] = total
end
return out
"#;

static TAKE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(TAKE));
static SYNC_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SYNC));

struct Provider {
    slot: Arc<Slot>,
    /// Serializes this node's writes of its field, so the absolute count
    /// written last is the newest.
    write: tokio::sync::Mutex<()>,
    /// Cluster-wide connections as last read (None before the first read).
    total: Mutex<Option<u32>>,
    /// Our count as last written, to tell a release (publish
    /// `provider_freed`) from a take.
    written: Mutex<u32>,
}

/// The cluster side of [`crate::provider::Leases`].
pub struct ClusterLeases {
    cluster: Arc<Cluster>,
    providers: HashMap<String, Arc<Provider>>,
    /// Names of providers whose local count changed.
    changed_tx: mpsc::UnboundedSender<String>,
    changed_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
}

impl ClusterLeases {
    pub fn new(cluster: Arc<Cluster>, slots: Vec<Arc<Slot>>) -> Arc<ClusterLeases> {
        let (changed_tx, changed_rx) = mpsc::unbounded_channel();
        let providers = slots
            .into_iter()
            .map(|slot| {
                (
                    slot.name.clone(),
                    Arc::new(Provider {
                        slot,
                        write: tokio::sync::Mutex::new(()),
                        total: Mutex::new(None),
                        written: Mutex::new(0),
                    }),
                )
            })
            .collect();
        Arc::new(ClusterLeases {
            cluster,
            providers,
            changed_tx,
            changed_rx: Mutex::new(Some(changed_rx)),
        })
    }

    /// Starts the background work (once, after the cluster started).
    pub fn start(self: &Arc<Self>) {
        let Some(rx) = self.changed_rx.lock().take() else {
            return;
        };
        let me = self.clone();
        self.cluster.spawn(async move { me.run(rx).await });
    }

    /// The `Full::reason` of a synchronous attempt on a limited provider.
    pub fn needs_round_trip(&self) -> String {
        "cluster mode takes limited leases only through Leases::acquire".to_owned()
    }

    /// A lease of `name` was taken or dropped here. Never blocks.
    pub fn changed(&self, name: &str) {
        let _ = self.changed_tx.send(name.to_owned());
    }

    /// Cluster-wide connections of `name` as last read.
    pub fn total(&self, name: &str) -> Option<u32> {
        *self.providers.get(name)?.total.lock()
    }

    /// Takes a lease of the limited provider of `slot` (counted into
    /// `slot` on success), waiting up to `wait` for one to be freed anywhere
    /// in the cluster.
    pub async fn acquire(&self, slot: &Arc<Slot>, wait: Duration) -> Result<(), Full> {
        let full = |reason: Option<String>| Full {
            provider: slot.name.clone(),
            max_connections: slot.max.unwrap_or(0),
            reason,
        };
        let Some(p) = self.providers.get(&slot.name) else {
            return Err(full(Some("unknown provider".into())));
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = slot.freed.notified();
            match self.take(p).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(provider = %slot.name, error = %e, "provider lease refused: cluster store unavailable");
                    return Err(full(Some(e.to_string())));
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(full(None));
            }
            let until = deadline.min(now + POLL);
            let _ = tokio::time::timeout_at(until, notified).await;
        }
    }

    /// One attempt: true when taken.
    async fn take(&self, p: &Provider) -> Result<bool, ClusterError> {
        if !self.cluster.holds_session() {
            return Err(ClusterError::Fenced);
        }
        let c = &self.cluster;
        let _w = p.write.lock().await;
        let want = p.slot.used() + 1;
        let reply: Vec<i64> = c
            .run(
                TAKE_SCRIPT
                    .key(c.keys().plc(&p.slot.name))
                    .arg(c.keys().prefix())
                    .arg(c.node_id())
                    .arg(want)
                    .arg(p.slot.max.unwrap_or(u32::MAX))
                    .invoke_async(&mut c.redis().await?),
            )
            .await?;
        let [ok, total] = reply[..] else {
            return Err(ClusterError::Protocol(format!(
                "unexpected lease reply {reply:?}"
            )));
        };
        *p.total.lock() = u32::try_from(total).ok();
        if ok == 1 {
            p.slot.add_one();
            *p.written.lock() = want;
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes changed counts, refreshes totals every second, wakes waiters
    /// on `provider_freed` from other nodes.
    async fn run(self: Arc<Self>, mut changed: mpsc::UnboundedReceiver<String>) {
        let mut bus = self.cluster.subscribe();
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                name = changed.recv() => {
                    let Some(name) = name else { return };
                    let mut names = vec![name];
                    while let Ok(n) = changed.try_recv() {
                        if !names.contains(&n) {
                            names.push(n);
                        }
                    }
                    self.sync(&names).await;
                }
                msg = bus.recv() => match msg {
                    Ok(env) => match env.msg {
                        Bus::ProviderFreed { provider } if env.from != self.cluster.node_id() => {
                            if let Some(p) = self.providers.get(&provider) {
                                p.slot.freed.notify_waiters();
                            }
                        }
                        Bus::Resync => self.sync_all().await,
                        _ => {}
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        for p in self.providers.values() {
                            p.slot.freed.notify_waiters();
                        }
                    }
                    Err(_) => return,
                },
                _ = tick.tick() => self.sync_all().await,
            }
        }
    }

    async fn sync_all(&self) {
        let names: Vec<String> = self.providers.keys().cloned().collect();
        self.sync(&names).await;
    }

    /// Writes our absolute count of each of `names` and reads the totals;
    /// publishes `provider_freed` for limited providers whose count fell.
    async fn sync(&self, names: &[String]) {
        let c = &self.cluster;
        let ps: Vec<&Arc<Provider>> = names.iter().filter_map(|n| self.providers.get(n)).collect();
        if ps.is_empty() {
            return;
        }
        let mut guards = Vec::with_capacity(ps.len());
        for p in &ps {
            guards.push(p.write.lock().await);
        }
        let counts: Vec<u32> = ps.iter().map(|p| p.slot.used()).collect();
        let mut inv = SYNC_SCRIPT.prepare_invoke();
        for p in &ps {
            inv.key(c.keys().plc(&p.slot.name));
        }
        inv.arg(c.keys().prefix()).arg(c.node_id());
        for n in &counts {
            inv.arg(*n);
        }
        let Ok(mut conn) = c.redis().await else {
            return;
        };
        let totals: Vec<i64> = match c.run(inv.invoke_async(&mut conn)).await {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "provider lease counts not written (retried)");
                return;
            }
        };
        drop(guards);
        for ((p, mine), total) in ps.iter().zip(counts).zip(totals) {
            *p.total.lock() = u32::try_from(total).ok();
            let fell = {
                let mut w = p.written.lock();
                let fell = mine < *w;
                *w = mine;
                fell
            };
            if fell && p.slot.max.is_some() {
                c.publish(Bus::ProviderFreed {
                    provider: p.slot.name.clone(),
                });
            }
        }
    }
}
