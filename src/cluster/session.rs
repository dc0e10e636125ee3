//! The node's session in Redis and self-fencing (CLUSTER.md "Ownership").
//!
//! `node:{n}` holds a random token with PX `node_ttl`, renewed every
//! `heartbeat` by a script that renews only a token that is still ours. The
//! node treats itself as alive only until `send time of its last successful
//! renewal + node_ttl − 1 s` on its monotonic clock: Redis cannot expire the
//! session earlier, so no other node can take its channels while it still
//! acts as their owner. When that moment passes (Redis down or hung, the
//! process paused) the node fences: it bumps `fence_changes`, and owners close
//! their provider connections; a new session is opened as soon as Redis
//! answers again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::Script;
use tokio::sync::watch;

use super::Cluster;

/// How long before the session could expire in Redis a node stops acting on
/// it: covers clock-rate drift and the renewal's own round trip.
pub const FENCE_MARGIN: Duration = Duration::from_secs(1);

/// KEYS: node, nodes, nodeinfo, up. ARGV: token, ttl ms, node id, addr,
/// version, started ms, create (1: open a new session, replacing whatever
/// an older session of ours left), stall ms.
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local beat = tonumber(redis.call('HGET', KEYS[4], 'beat'))
if not beat or now - beat > tonumber(ARGV[8]) then
  redis.call('HSET', KEYS[4], 'since', now)
end
redis.call('HSET', KEYS[4], 'beat', now, 'ttl', ARGV[2], 'stall', ARGV[8])
local cur = redis.call('GET', KEYS[1])
if ARGV[7] ~= '1' and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('HSET', KEYS[3], 'addr', ARGV[4], 'version', ARGV[5], 'started', ARGV[6], 'session', ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 1
"#;

/// Lua, for scripts that judge a node dead because its session key is gone
/// or new (`prefix` is the key prefix): `settled(prefix, now)` is false
/// until renewals have come without a stall (no renewal by any node for
/// two heartbeats: Redis hung or restarted, or every node was cut off) for
/// one `node_ttl`. Right after such a stall every session has expired at
/// once while the nodes are alive and about to open new sessions and join
/// again; judging then would end every stream session and drop every
/// client (`stream_stopped` / `client_disconnected` with `node_lost`,
/// followed by the same viewers joining again).
pub const SETTLED_LUA: &str = r#"
local function settled(prefix, now)
  local u = redis.call('HMGET', prefix .. 'up', 'since', 'ttl', 'beat', 'stall')
  local since, ttl = tonumber(u[1]), tonumber(u[2])
  local beat, stall = tonumber(u[3]), tonumber(u[4])
  -- No renewal lately: a stall is under way, or Redis just woke up and runs
  -- the scripts queued meanwhile before any node renewed.
  if beat and stall and now - beat > stall then return false end
  if not since then return true end
  return now - since >= (ttl or 0)
end
"#;

pub(super) struct Session {
    state: Mutex<State>,
    fence_tx: watch::Sender<u64>,
    session_tx: watch::Sender<u64>,
}

struct State {
    token: String,
    /// Until when this node may act on `token`; `None`: no session.
    valid_until: Option<Instant>,
}

fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl Session {
    pub(super) fn new() -> Session {
        Session {
            state: Mutex::new(State {
                token: new_token(),
                valid_until: None,
            }),
            fence_tx: watch::Sender::new(0),
            session_tx: watch::Sender::new(0),
        }
    }

    pub(super) fn token(&self) -> String {
        self.state.lock().token.clone()
    }

    pub(super) fn left(&self) -> Duration {
        self.state.lock().valid_until.map_or(Duration::ZERO, |v| {
            v.saturating_duration_since(Instant::now())
        })
    }

    pub(super) fn fence_changes(&self) -> watch::Receiver<u64> {
        self.fence_tx.subscribe()
    }

    pub(super) fn session_changes(&self) -> watch::Receiver<u64> {
        self.session_tx.subscribe()
    }

    /// Drops the session if it has run out: the node fences.
    fn check_expired(&self, cluster: &Cluster, why: &str) {
        let mut st = self.state.lock();
        let Some(until) = st.valid_until else {
            return;
        };
        if Instant::now() < until && why == "expired" {
            return;
        }
        st.valid_until = None;
        st.token = new_token();
        drop(st);
        cluster.metrics.fenced.inc();
        tracing::warn!(
            node = cluster.node_id(),
            reason = why,
            "cluster session lost: fencing (provider connections of owned channels close; viewers wait)"
        );
        self.fence_tx.send_modify(|n| *n += 1);
    }
}

/// Renews the session every `heartbeat`; opens a new one when there is none.
pub(super) async fn heartbeat(cluster: Arc<Cluster>) {
    let script = Script::new(RENEW);
    let cfg = cluster.config();
    let ttl_ms = cfg.node_ttl.as_millis().to_string();
    // No renewal from any node for two of our heartbeats: a stall.
    let stall_ms = (cfg.heartbeat.as_millis() * 2).to_string();
    let mut was_up = true;
    loop {
        let sent = Instant::now();
        let (token, create) = {
            let st = cluster.session.state.lock();
            (st.token.clone(), st.valid_until.is_none())
        };
        let mut conn = cluster.conn.clone();
        let mut invocation = script.key(cluster.keys.node(cluster.node_id()));
        invocation
            .key(cluster.keys.nodes())
            .key(cluster.keys.nodeinfo(cluster.node_id()))
            .key(cluster.keys.up())
            .arg(&token)
            .arg(&ttl_ms)
            .arg(cluster.node_id())
            .arg(cfg.advertise.to_string())
            .arg(crate::app::VERSION)
            .arg(cluster.started_ms)
            .arg(if create { "1" } else { "0" })
            .arg(&stall_ms);
        let call = invocation.invoke_async::<i64>(&mut conn);
        let result = tokio::time::timeout(cfg.heartbeat.max(super::COMMAND_TIMEOUT), call).await;
        match result {
            Ok(Ok(1)) => {
                let mut st = cluster.session.state.lock();
                if st.token == token {
                    st.valid_until = Some(sent + cfg.node_ttl - FENCE_MARGIN);
                }
                drop(st);
                cluster.set_up(true);
                if !was_up {
                    cluster.recovered.send_modify(|n| *n += 1);
                }
                was_up = true;
                if create {
                    tracing::info!(node = cluster.node_id(), "cluster session opened");
                    cluster.session.session_tx.send_modify(|n| *n += 1);
                }
            }
            Ok(Ok(_)) => {
                // Our token was replaced: the session expired while we were
                // away (paused, or Redis lost its data), or another node runs
                // with our node_id.
                cluster.session.check_expired(&cluster, "replaced");
                continue;
            }
            Ok(Err(e)) => {
                cluster.note_error(&e.to_string());
                was_up = false;
            }
            Err(_) => {
                cluster.note_error("heartbeat timed out");
                was_up = false;
            }
        }
        tokio::time::sleep_until((sent + cfg.heartbeat).into()).await;
    }
}

/// Fences the moment the session runs out, between heartbeats too.
pub(super) async fn watchdog(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        cluster.session.check_expired(&cluster, "expired");
        cluster
            .metrics
            .session_ok
            .set(i64::from(cluster.session.left() > Duration::ZERO));
    }
}
