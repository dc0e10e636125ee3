//! Stream events once across the cluster (CLUSTER.md "Events once").
//!
//! A stream's viewing session lives in `sess:{s}` (HASH): `h:{node}` = that
//! node's session token for every node with viewers of the stream (its
//! "holders"), `started` (ms) once a provider connection opened, `meta` (the
//! stream's metadata JSON) and `transcoded`, so whoever ends the session can
//! still send m3u-editor the `provider_profile_id` it acts on.
//! - `stream_started`: `HSETNX started`; only the node that sets it emits
//!   (a take-over or a second node's connection emits nothing).
//! - `stream_stopped`: a node whose last viewer left removes its holder
//!   field; when no live holder is left it sets `stop_sent`, deletes the
//!   session and emits. A holder whose node session died (kill -9) counts as
//!   gone, and the delivery leader sweeps sessions left with dead holders
//!   only: `stream_stopped` with reason `node_lost`.
//! - `failover_triggered` / `stream_failed`: only from the node recorded in
//!   `own:{s}` (or when nobody owns the stream, e.g. per-viewer VOD), never
//!   from a fenced node.
//!
//! All of it runs in one task per node, in order, off every request path:
//! `Events::emit` only queues.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::Mutex;
use redis::Script;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::session::SETTLED_LUA;
use super::{Cluster, ClusterError};
use crate::events::{Event, EventType};

/// Ops waiting beyond this are dropped (Redis down for long).
const OPS_QUEUE: usize = 65_536;
/// How long an op is retried while Redis is unavailable before it is given
/// up (a stop is then sent anyway: a duplicate is harmless to m3u-editor, a
/// lost stop leaks its provider slot).
const GIVE_UP: Duration = Duration::from_secs(30);
/// A session with no holder at all (its `started` came without a join) is
/// ended by the sweep after this.
const ORPHAN_GRACE_MS: i64 = 10_000;
/// Sessions one sweep ends at most (the rest: the next second).
const SWEEP_BATCH: usize = 32;
/// Deduplicates the stop of a stream removed without any session.
const TOMB_MS: i64 = 60_000;

/// Shared Lua helpers: prune dead holders, end a session.
const LIB: &str = r#"
local function live_holders(key, prefix)
  local f = redis.call('HGETALL', key)
  local t = redis.call('TIME')
  local ok = settled(prefix, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  local live, dead = 0, 0
  for i = 1, #f, 2 do
    local n = f[i]
    if string.sub(n, 1, 2) == 'h:' then
      -- Right after a stall a holder whose session is gone or new counts as
      -- live: its node is about to join again under its new session.
      if not ok or redis.call('GET', prefix .. 'node:' .. string.sub(n, 3)) == f[i + 1] then
        live = live + 1
      else
        redis.call('HDEL', key, n)
        dead = dead + 1
      end
    end
  end
  return live, dead
end
local function finish(key, sessions, stream, tomb)
  redis.call('HSET', key, 'stop_sent', '1')
  local v = redis.call('HMGET', key, 'started', 'meta', 'transcoded')
  redis.call('DEL', key)
  redis.call('SREM', sessions, stream)
  redis.call('SET', tomb, '1', 'PX', ARGV[#ARGV])
  return {v[1] or '', v[2] or '', v[3] or ''}
end
"#;

/// For JOIN and STARTED (KEYS: sess, sessions, tomb; ARGV[1]: stream): what
/// a session record holds from whichever comes first, its listing in
/// `sessions`, and the end of the tombstone of the stream's last session.
const OPEN_SESSION: &str = r#"
local function open_session(meta, transcoded, created)
  redis.call('HSETNX', KEYS[1], 'meta', meta)
  redis.call('HSETNX', KEYS[1], 'transcoded', transcoded)
  redis.call('HSETNX', KEYS[1], 'created', created)
  redis.call('PEXPIRE', KEYS[1], 86400000)
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3])
end
"#;

/// KEYS: sess, sessions, tomb, own. ARGV: stream, node, token, meta,
/// transcoded, now. Returns 2 when this join begins a new session of a
/// channel that kept running after its last session ended (swept while its
/// holders were cut off): the joining node sends its `stream_started`, as
/// the owner's provider connection never closed and will not start again.
const JOIN: &str = r#"
local resumed = redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[3]) == 1
  and redis.call('EXISTS', KEYS[4]) == 1
redis.call('HSET', KEYS[1], 'h:' .. ARGV[2], ARGV[3])
open_session(ARGV[4], ARGV[5], ARGV[6])
if resumed and redis.call('HSETNX', KEYS[1], 'started', ARGV[6]) == 1 then
  redis.call('HSET', KEYS[1], 'started_by', ARGV[2])
  return 2
end
return 1
"#;

/// KEYS: sess, sessions, tomb. ARGV: stream, node, now, meta, transcoded.
const STARTED: &str = r#"
local won = redis.call('HSETNX', KEYS[1], 'started', ARGV[3])
if won == 1 then
  redis.call('HSET', KEYS[1], 'started_by', ARGV[2])
  open_session(ARGV[4], ARGV[5], ARGV[3])
end
return won
"#;

/// KEYS: sess, sessions, tomb. ARGV: key prefix, stream, node, force, tomb ms.
/// {0}: nothing to send; {1, started, meta, transcoded}: we ended it;
/// {2}: no session, first stop of a removed stream.
const STOP: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HDEL', KEYS[1], 'h:' .. ARGV[3])
  if redis.call('HEXISTS', KEYS[1], 'stop_sent') == 1 then return {0} end
  local live = live_holders(KEYS[1], ARGV[1])
  if live > 0 then return {0} end
  local r = finish(KEYS[1], KEYS[2], ARGV[2], KEYS[3])
  return {1, r[1], r[2], r[3]}
end
if ARGV[4] == '1' and redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[5]) then
  return {2}
end
return {0}
"#;

/// KEYS: sessions, events. ARGV: key prefix, now, orphan grace ms, event
/// timestamp, events MAXLEN, event ids (one per session it may end), tomb ms.
/// Writes the `stream_stopped` of every session it ends into the events
/// stream itself, in the same step as the end: a reply lost to a timeout
/// (Redis hung and ran the sweep when it woke up) cannot lose the stop.
/// Returns flat {stream, reason}*.
const SWEEP: &str = r#"
local out = {}
local ids = {}
for i = 6, #ARGV - 1 do ids[#ids + 1] = ARGV[i] end
local now = tonumber(ARGV[2])
for _, s in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if #out / 2 >= #ids then break end
  local key = ARGV[1] .. 'sess:' .. s
  if redis.call('EXISTS', key) == 0 then
    redis.call('SREM', KEYS[1], s)
  elseif redis.call('HEXISTS', key, 'stop_sent') == 0 then
    local live, dead = live_holders(key, ARGV[1])
    if live == 0 then
      local created = tonumber(redis.call('HGET', key, 'created')) or 0
      if dead > 0 or now - created > tonumber(ARGV[3]) then
        local r = finish(key, KEYS[1], s, ARGV[1] .. 'sess:' .. s .. ':stopped')
        local reason = 'last_client_disconnected'
        if dead > 0 then reason = 'node_lost' end
        local duration = cjson.null
        local started = tonumber(r[1])
        if started then duration = math.max(0, now - started) / 1000 end
        -- The metadata goes in as stored (JSON from serde), not through
        -- cjson, which would round big ids and turn [] into {}.
        local meta = r[2]
        if not pcall(cjson.decode, meta) then meta = '{}' end
        -- What every node served of an API stream (reported each second);
        -- YAML streams have no shared counter.
        local bytes = tonumber(redis.call('HGET', ARGV[1] .. 'stream:' .. s, 'bytes')) or 0
        local ev = cjson.encode({
          event_id = ids[#out / 2 + 1], event_type = 'stream_stopped', stream_id = s,
          timestamp = ARGV[4],
          data = {reason = reason, duration_seconds = duration, bytes_served = bytes,
                  was_transcoded = r[3] == '1', metadata = '\0meta\0'}})
        ev = string.gsub(ev, '"\\u0000meta\\u0000"', function() return meta end, 1)
        redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'e', ev)
        table.insert(out, s)
        table.insert(out, reason)
      end
    end
  end
end
return out
"#;

/// KEYS: own. ARGV: node, session. 1 when this node may speak for the stream.
const OWNER_OK: &str = r#"
local o = redis.call('HMGET', KEYS[1], 'node', 'session')
if not o[1] then return 1 end
if o[1] == ARGV[1] and o[2] == ARGV[2] then return 1 end
return 0
"#;

/// `body` after the helpers it uses (`live_holders`, `finish`).
fn with_lib(body: &str) -> String {
    format!("{SETTLED_LUA}{LIB}\n{body}")
}

static JOIN_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| super::once::script(&format!("{OPEN_SESSION}{JOIN}")));
// Their replies decide who sends the event: once per op (`super::once`).
static STARTED_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| super::once::script(&format!("{OPEN_SESSION}{STARTED}")));
static STOP_SCRIPT: LazyLock<Script> = LazyLock::new(|| super::once::script(&with_lib(STOP)));
static SWEEP_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&with_lib(SWEEP)));
static OWNER_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(OWNER_OK));

/// What a node asks of the session task.
#[derive(Debug)]
enum Op {
    /// The stream got its first viewer on this node.
    Join {
        stream: String,
        meta: String,
        transcoded: bool,
    },
    Started(Event),
    Stopped(Event),
    /// `failover_triggered` / `stream_failed`: the owner's to send.
    Owner(Event),
}

/// The session bookkeeping of one node; events that survive it go to
/// `queue` (the node's event bus, then the cluster's `events` stream).
pub struct ClusterEvents {
    cluster: Arc<Cluster>,
    queue: mpsc::Sender<Event>,
    ops: mpsc::Sender<Op>,
    ops_rx: Mutex<Option<mpsc::Receiver<Op>>>,
    /// Ops queued and not yet done, for the shutdown flush.
    pending: Arc<AtomicUsize>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl ClusterEvents {
    pub fn new(cluster: Arc<Cluster>, queue: mpsc::Sender<Event>) -> Arc<ClusterEvents> {
        let (ops, rx) = mpsc::channel(OPS_QUEUE);
        Arc::new(ClusterEvents {
            cluster,
            queue,
            ops,
            ops_rx: Mutex::new(Some(rx)),
            pending: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Starts the session task (once).
    pub fn start(self: &Arc<Self>) {
        let Some(rx) = self.ops_rx.lock().take() else {
            return;
        };
        let me = self.clone();
        self.cluster.spawn(async move { me.run(rx).await });
    }

    /// Takes the stream events that need a cluster-wide check; gives back
    /// the others (client events: the registry dedupes those) to be queued
    /// as they are.
    pub fn route(&self, event: Event) -> Option<Event> {
        let op = match event.event_type {
            EventType::StreamStarted => Op::Started(event),
            EventType::StreamStopped => Op::Stopped(event),
            EventType::FailoverTriggered | EventType::StreamFailed => Op::Owner(event),
            _ => return Some(event),
        };
        self.push(op);
        None
    }

    /// The stream got its first viewer on this node: this node holds the
    /// session until its last viewer leaves.
    pub fn joined(&self, stream: &str, metadata: &Value, transcoded: bool) {
        self.push(Op::Join {
            stream: stream.to_owned(),
            meta: metadata.to_string(),
            transcoded,
        });
    }

    fn push(&self, op: Op) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.ops.try_send(op) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(op = ?e.into_inner(), "cluster session op dropped: queue full");
        }
    }

    /// Waits (at most `timeout`) until every queued op is done: the
    /// shutdown path, before the event bus closes.
    pub async fn drain(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.pending.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn emit(&self, event: Event) {
        if self.queue.try_send(event).is_err() {
            tracing::warn!("cluster event dropped: event queue full or closed");
        }
    }

    async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Op>) {
        // Streams this node holds, to join again under a new session token
        // after fencing.
        let mut joined: HashMap<String, (String, bool)> = HashMap::new();
        let mut sessions = self.cluster.session_changes();
        let mut bus = self.cluster.subscribe();
        loop {
            tokio::select! {
                msg = bus.recv() => {
                    // A stream deleted anywhere cuts its viewers on every
                    // node: let go of its session even if the local removal
                    // does not report a stop (the last holder sends it).
                    let id = match msg {
                        Ok(super::Envelope { msg: super::Bus::StreamDeleted { id }, .. }) => id,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    };
                    let Some((meta, transcoded)) = joined.remove(&id) else {
                        continue;
                    };
                    let metadata: Value = serde_json::from_str(&meta).unwrap_or_else(|_| json!({}));
                    let ev = Event::new(
                        EventType::StreamStopped,
                        &id,
                        json!({
                            "reason": "manual_deletion",
                            "duration_seconds": null,
                            "bytes_served": 0,
                            "was_transcoded": transcoded,
                            "metadata": metadata,
                        }),
                    );
                    self.run_op(Op::Stopped(ev), true).await;
                }
                op = rx.recv() => {
                    let Some(op) = op else { return };
                    // Whether this node held the session being stopped.
                    let held = match &op {
                        Op::Join { stream, meta, transcoded } => {
                            joined.insert(stream.clone(), (meta.clone(), *transcoded));
                            false
                        }
                        Op::Stopped(ev) => joined.remove(&ev.stream_id).is_some(),
                        _ => false,
                    };
                    self.run_op(op, held).await;
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                }
                changed = sessions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    for (stream, (meta, transcoded)) in &joined {
                        let op = Op::Join {
                            stream: stream.clone(),
                            meta: meta.clone(),
                            transcoded: *transcoded,
                        };
                        self.run_op(op, false).await;
                    }
                }
            }
        }
    }

    /// Runs `op`, retrying while Redis is unavailable (bounded).
    async fn run_op(&self, op: Op, held: bool) {
        let deadline = tokio::time::Instant::now() + GIVE_UP;
        // One id over every retry: a try that timed out may still have run.
        let once = super::once::new_key(self.cluster.keys());
        loop {
            match self.try_op(&op, held, &once).await {
                Ok(()) => return,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(error = %e, op = ?op, "cluster session op given up");
                    if let Op::Stopped(ev) = op {
                        self.emit(ev);
                    }
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// `held`: a stop of a session this node had joined; if Redis no longer
    /// knows the session (it lost its data) the stop is still sent, once
    /// (the tombstone every ended session leaves makes a late one a no-op).
    /// `once`: the op's reply key (`super::once`).
    async fn try_op(&self, op: &Op, held: bool, once: &str) -> Result<(), ClusterError> {
        let c = &self.cluster;
        let k = c.keys();
        let sessions = sessions_key(c);
        match op {
            Op::Join {
                stream,
                meta,
                transcoded,
            } => {
                let resumed: i64 = c
                    .run(
                        JOIN_SCRIPT
                            .key(k.sess(stream))
                            .key(&sessions)
                            .key(tomb_key(c, stream))
                            .key(k.own(stream))
                            .arg(stream)
                            .arg(c.node_id())
                            .arg(c.session())
                            .arg(meta)
                            .arg(u8::from(*transcoded))
                            .arg(now_ms())
                            .arg(once)
                            .invoke_async(&mut c.redis().await?),
                    )
                    .await?;
                if resumed == 2 {
                    let metadata: Value = serde_json::from_str(meta).unwrap_or_else(|_| json!({}));
                    tracing::info!(stream_id = %stream, "cluster: a session of a running channel begins again");
                    self.emit(Event::new(
                        EventType::StreamStarted,
                        stream,
                        json!({ "resumed": true, "was_transcoded": transcoded, "metadata": metadata }),
                    ));
                }
            }
            Op::Started(ev) => {
                let won: i64 = c
                    .run(
                        STARTED_SCRIPT
                            .key(k.sess(&ev.stream_id))
                            .key(&sessions)
                            .key(tomb_key(c, &ev.stream_id))
                            .arg(&ev.stream_id)
                            .arg(c.node_id())
                            .arg(now_ms())
                            .arg(ev.data["metadata"].to_string())
                            .arg(0)
                            .arg(once)
                            .invoke_async(&mut c.redis().await?),
                    )
                    .await?;
                if won == 1 {
                    self.emit(ev.clone());
                }
            }
            Op::Stopped(ev) => {
                let force = held || ev.data["reason"] != "last_client_disconnected";
                let reply: Vec<String> = c
                    .run(
                        STOP_SCRIPT
                            .key(k.sess(&ev.stream_id))
                            .key(&sessions)
                            .key(tomb_key(c, &ev.stream_id))
                            .arg(k.prefix())
                            .arg(&ev.stream_id)
                            .arg(c.node_id())
                            .arg(u8::from(force))
                            .arg(TOMB_MS)
                            .arg(once)
                            .invoke_async(&mut c.redis().await?),
                    )
                    .await?;
                match reply.first().map(String::as_str) {
                    Some("1") => {
                        let mut ev = ev.clone();
                        if let Some(started) = reply.get(1).and_then(|s| s.parse::<i64>().ok()) {
                            ev.data["duration_seconds"] =
                                json!((now_ms() - started).max(0) as f64 / 1000.0);
                        }
                        self.emit(ev);
                    }
                    Some("2") => self.emit(ev.clone()),
                    _ => {}
                }
            }
            Op::Owner(ev) => {
                if !c.holds_session() {
                    tracing::debug!(stream_id = %ev.stream_id, event_type = %ev.event_type, "event not sent: node fenced");
                    return Ok(());
                }
                let ok: i64 = c
                    .run(
                        OWNER_SCRIPT
                            .key(k.own(&ev.stream_id))
                            .arg(c.node_id())
                            .arg(c.session())
                            .invoke_async(&mut c.redis().await?),
                    )
                    .await?;
                if ok == 1 {
                    self.emit(ev.clone());
                }
            }
        }
        Ok(())
    }

    /// Ends the sessions whose holders all died (`node_lost`) or that never
    /// had one; run by the delivery leader every second. The script itself
    /// writes their `stream_stopped` into the events stream.
    pub async fn sweep(&self) -> Result<usize, ClusterError> {
        let c = &self.cluster;
        let mut inv = SWEEP_SCRIPT.key(sessions_key(c));
        inv.key(c.keys().events())
            .arg(c.keys().prefix())
            .arg(now_ms())
            .arg(ORPHAN_GRACE_MS)
            .arg(crate::events::python_utc_timestamp(
                chrono::Utc::now().naive_utc(),
            ))
            .arg(super::delivery::MAXLEN);
        for _ in 0..SWEEP_BATCH {
            inv.arg(uuid::Uuid::new_v4().to_string());
        }
        inv.arg(TOMB_MS);
        let flat: Vec<String> = c.run(inv.invoke_async(&mut c.redis().await?)).await?;
        for s in flat.chunks_exact(2) {
            tracing::info!(stream_id = %s[0], reason = %s[1], "stream session ended by the cluster sweep");
        }
        Ok(flat.len() / 2)
    }
}

/// SET of stream ids with a session, for the sweep.
fn sessions_key(c: &Cluster) -> String {
    format!("{}sessions", c.keys().prefix())
}

/// Marks the stop of a stream removed without a session as sent.
fn tomb_key(c: &Cluster, stream: &str) -> String {
    format!("{}:stopped", c.keys().sess(stream))
}
