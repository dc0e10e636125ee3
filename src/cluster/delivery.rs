//! Webhook delivery by one elected node (CLUSTER.md "Events once").
//!
//! Every node appends its events to the `events` STREAM (batched `XADD`,
//! `MAXLEN ~ 100000`) instead of delivering them. One node, the holder of
//! `leader:delivery` (`SET NX PX 5000`, renewed every second on its session),
//! reads the stream with `XREADGROUP` (group `delivery`, consumer = its node
//! id) into the usual per-webhook queues and `XACK`s an entry once every
//! webhook's outcome is final (delivered, or given up after its retries). A
//! new leader first claims every pending entry with `XAUTOCLAIM`, so what a
//! dead leader had read but not finished is delivered by the next one
//! (at least once: a leader killed mid-POST may have sent that one already).
//! The leader also runs the session sweep (`super::events`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamMaxlen};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Script};
use tokio::sync::{mpsc, watch};

use super::events::ClusterEvents;
use super::{Cluster, ClusterError};
use crate::events::Event;

const GROUP: &str = "delivery";
/// The stream keeps about this many entries.
pub(super) const MAXLEN: usize = 100_000;
/// Entries per `XADD` pipeline / per read.
const BATCH: usize = 256;
/// Leadership lifetime in Redis; renewed every [`RENEW`].
const LEADER_TTL: Duration = Duration::from_secs(5);
const RENEW: Duration = Duration::from_secs(1);
/// How often an idle leader looks for new entries.
const POLL: Duration = Duration::from_millis(200);
/// The leader re-claims entries of its own stuck this long (a dispatch that
/// never reached a worker).
const RECLAIM_IDLE: Duration = Duration::from_secs(120);

/// KEYS: leader. ARGV: value, ttl ms. 1 while the leadership is ours.
const RENEW_LEADER: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// KEYS: leader. ARGV: value.
const RESIGN: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LEADER));
static RESIGN_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RESIGN));

/// Acknowledges one stream entry once every webhook job made of it is final.
/// It starts with one outstanding part, the dispatch itself: the dispatcher
/// [`Ack::add`]s one per queued job and completes its own part at the end.
pub struct Ack {
    id: String,
    remaining: AtomicUsize,
    done: mpsc::UnboundedSender<String>,
}

impl Ack {
    /// One more job to wait for.
    pub fn add(&self) {
        self.remaining.fetch_add(1, Ordering::AcqRel);
    }

    /// One part's outcome is final.
    pub fn complete(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.done.send(self.id.clone());
        }
    }
}

/// An entry read from the stream, for the dispatcher.
pub type Delivery = (Event, Arc<Ack>);

/// The writer: moves this node's events into the stream.
pub struct Writer {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn spawn(cluster: Arc<Cluster>, rx: mpsc::Receiver<Event>) -> Writer {
        let stop = watch::Sender::new(false);
        let task = cluster.spawn(write_loop(cluster.clone(), rx, stop.subscribe()));
        Writer { stop, task }
    }

    /// Closes the queue, writes what it holds (at most `timeout`).
    pub async fn finish(self, timeout: Duration) {
        self.stop.send_replace(true);
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            tracing::warn!(
                "events not yet written to the cluster stream were abandoned at shutdown"
            );
        }
    }
}

async fn write_loop(
    cluster: Arc<Cluster>,
    mut rx: mpsc::Receiver<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let key = cluster.keys().events();
    let mut batch: Vec<Event> = Vec::with_capacity(BATCH);
    let mut stopping = false;
    loop {
        if batch.is_empty() {
            if stopping {
                rx.close();
                while let Ok(e) = rx.try_recv() {
                    batch.push(e);
                }
                if batch.is_empty() {
                    return;
                }
            } else {
                tokio::select! {
                    e = rx.recv() => match e {
                        Some(e) => batch.push(e),
                        None => return,
                    },
                    _ = stop.changed() => {
                        stopping = true;
                        continue;
                    }
                }
            }
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let mut pipe = redis::pipe();
        for e in &batch {
            let body = serde_json::to_string(e).unwrap_or_default();
            pipe.xadd_maxlen(&key, StreamMaxlen::Approx(MAXLEN), "*", &[("e", body)])
                .ignore();
        }
        let r = match cluster.redis().await {
            Ok(mut conn) => cluster.run(pipe.query_async::<()>(&mut conn)).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => batch.clear(),
            Err(e) => {
                // Kept and retried: the local queue fills meanwhile and new
                // events are dropped and counted there.
                tracing::debug!(error = %e, events = batch.len(), "events not written to the cluster stream yet");
                if *stop.borrow() {
                    stopping = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => stopping = true,
                }
            }
        }
    }
}

/// The leadership loop: election, reading, acknowledging, the sweep.
pub struct Leader {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Leader {
    pub fn spawn(events: Arc<ClusterEvents>, out: mpsc::Sender<Delivery>) -> Leader {
        let stop = watch::Sender::new(false);
        let cluster = events.cluster().clone();
        let task = cluster.spawn(lead(events, out, stop.subscribe()));
        Leader { stop, task }
    }

    /// Stops reading (shutdown); acknowledgements still go out.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// After the webhook queues flushed: waits (at most `timeout`) for the
    /// last acknowledgements and the hand-over of the leadership.
    pub async fn finish(self, timeout: Duration) {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(timeout, self.task).await;
    }
}

struct State {
    cluster: Arc<Cluster>,
    key: String,
    leader_key: String,
    leading: Option<String>,
    /// Read and not acknowledged yet: not to be claimed again.
    in_flight: HashSet<String>,
    /// Dropped at shutdown, so the acknowledgement channel ends once the
    /// last job is done.
    done_tx: Option<mpsc::UnboundedSender<String>>,
    stop: watch::Receiver<bool>,
}

impl State {
    fn value(&self) -> String {
        format!("{} {}", self.cluster.node_id(), self.cluster.session())
    }

    /// Tries to become (or stay) the leader; true while leading.
    async fn lease(&mut self) -> bool {
        let c = self.cluster.clone();
        let Ok(mut conn) = c.redis().await else {
            return false;
        };
        if let Some(v) = self.leading.clone() {
            let kept: Result<i64, _> = c
                .run(
                    RENEW_SCRIPT
                        .key(&self.leader_key)
                        .arg(&v)
                        .arg(LEADER_TTL.as_millis() as u64)
                        .invoke_async(&mut conn),
                )
                .await;
            match kept {
                Ok(1) if c.holds_session() => return true,
                Ok(_) => {
                    tracing::info!(node = c.node_id(), "webhook delivery: leadership lost");
                    self.leading = None;
                }
                // Redis down: keep trying; the key expires on its own if
                // the outage is long, and a fenced node stops below.
                Err(_) => return c.holds_session(),
            }
        }
        if !c.holds_session() {
            return false;
        }
        let v = self.value();
        let got: Result<Option<String>, _> = c
            .run(
                redis::cmd("SET")
                    .arg(&self.leader_key)
                    .arg(&v)
                    .arg("NX")
                    .arg("PX")
                    .arg(LEADER_TTL.as_millis() as u64)
                    .query_async(&mut conn),
            )
            .await;
        if !matches!(got, Ok(Some(_))) {
            return false;
        }
        tracing::info!(node = c.node_id(), "webhook delivery: this node leads");
        self.leading = Some(v);
        self.ensure_group().await;
        true
    }

    /// Creates the consumer group (from the stream's start) unless it
    /// exists. Not through `Cluster::run`: "BUSYGROUP" is the usual answer
    /// and says nothing about Redis being unavailable.
    async fn ensure_group(&self) {
        let Ok(mut conn) = self.cluster.redis().await else {
            return;
        };
        let created = tokio::time::timeout(
            super::COMMAND_TIMEOUT,
            conn.xgroup_create_mkstream::<_, _, _, ()>(&self.key, GROUP, "0"),
        )
        .await;
        if let Ok(Err(e)) = created {
            if e.code() != Some("BUSYGROUP") {
                tracing::debug!(error = %e, "delivery group not created");
            }
        }
    }

    /// Claims pending entries idle at least `min_idle` (any consumer).
    async fn claim(
        &mut self,
        min_idle: Duration,
        out: &mpsc::Sender<Delivery>,
    ) -> Result<(), ClusterError> {
        let c = self.cluster.clone();
        let mut start = "0-0".to_owned();
        for _ in 0..1000 {
            let mut conn = c.redis().await?;
            let reply: StreamAutoClaimReply = c
                .run(conn.xautoclaim_options(
                    &self.key,
                    GROUP,
                    c.node_id(),
                    min_idle.as_millis() as u64,
                    &start,
                    StreamAutoClaimOptions::default().count(BATCH),
                ))
                .await?;
            if !reply.deleted_ids.is_empty() {
                // Trimmed before anyone delivered them: nothing to send.
                let _: Result<i64, _> =
                    c.run(conn.xack(&self.key, GROUP, &reply.deleted_ids)).await;
            }
            self.forward(reply.claimed, out).await;
            if reply.next_stream_id == "0-0" {
                break;
            }
            start = reply.next_stream_id;
        }
        Ok(())
    }

    /// New entries for this consumer; how many.
    async fn read(&mut self, out: &mpsc::Sender<Delivery>) -> Result<usize, ClusterError> {
        let c = self.cluster.clone();
        let mut conn = c.redis().await?;
        let opts = StreamReadOptions::default()
            .group(GROUP, c.node_id())
            .count(BATCH);
        let reply: Option<StreamReadReply> =
            match c.run(conn.xread_options(&[&self.key], &[">"], &opts)).await {
                Ok(r) => r,
                Err(e) if e.to_string().contains("NOGROUP") => {
                    // The stream or group was deleted under us.
                    self.ensure_group().await;
                    return Ok(0);
                }
                Err(e) => return Err(e),
            };
        let ids: Vec<StreamId> = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        let n = ids.len();
        self.forward(ids, out).await;
        Ok(n)
    }

    async fn forward(&mut self, ids: Vec<StreamId>, out: &mpsc::Sender<Delivery>) {
        let Some(done) = self.done_tx.clone() else {
            return;
        };
        for entry in ids {
            if *self.stop.borrow() {
                // Left pending: the next leader claims them.
                return;
            }
            if !self.in_flight.insert(entry.id.clone()) {
                continue;
            }
            let ack = Arc::new(Ack {
                id: entry.id.clone(),
                remaining: AtomicUsize::new(1),
                done: done.clone(),
            });
            let body: Option<String> = entry.get("e");
            match body.and_then(|b| serde_json::from_str::<Event>(&b).ok()) {
                Some(ev) => {
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        sent = out.send((ev, ack)) => if sent.is_err() {
                            return;
                        },
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
                None => {
                    tracing::warn!(id = %entry.id, "unreadable entry in the events stream skipped");
                    ack.complete();
                }
            }
        }
    }

    /// Acknowledges `ids` (dropped from `in_flight` either way: an entry
    /// whose XACK failed is claimed again later and delivered once more).
    async fn ack(&mut self, ids: Vec<String>) {
        for id in &ids {
            self.in_flight.remove(id);
        }
        let c = self.cluster.clone();
        let Ok(mut conn) = c.redis().await else {
            return;
        };
        if let Err(e) = c
            .run(conn.xack::<_, _, _, i64>(&self.key, GROUP, &ids))
            .await
        {
            tracing::debug!(error = %e, "webhook deliveries not acknowledged (they may be sent again)");
        }
    }

    async fn resign(&mut self) {
        let Some(v) = self.leading.take() else {
            return;
        };
        let c = self.cluster.clone();
        let Ok(mut conn) = c.redis().await else {
            return;
        };
        let _: Result<i64, _> = c
            .run(
                RESIGN_SCRIPT
                    .key(&self.leader_key)
                    .arg(&v)
                    .invoke_async(&mut conn),
            )
            .await;
    }
}

async fn lead(
    events: Arc<ClusterEvents>,
    out: mpsc::Sender<Delivery>,
    mut stop: watch::Receiver<bool>,
) {
    let cluster = events.cluster().clone();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut st = State {
        key: cluster.keys().events(),
        leader_key: cluster.keys().leader("delivery"),
        cluster: cluster.clone(),
        leading: None,
        in_flight: HashSet::new(),
        done_tx: Some(done_tx),
        stop: stop.clone(),
    };
    let mut lease_tick = tokio::time::interval(RENEW);
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut read_tick = tokio::time::interval(POLL);
    read_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_reclaim = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            id = done_rx.recv() => {
                let Some(id) = id else { break };
                let mut ids = vec![id];
                while let Ok(id) = done_rx.try_recv() {
                    ids.push(id);
                }
                st.ack(ids).await;
            }
            _ = lease_tick.tick() => {
                let was = st.leading.is_some();
                if st.lease().await {
                    if !was {
                        // Whatever the previous leader read and did not
                        // finish is ours now.
                        if let Err(e) = st.claim(Duration::ZERO, &out).await {
                            tracing::debug!(error = %e, "pending webhook deliveries not claimed yet");
                            st.leading = None;
                        }
                        last_reclaim = tokio::time::Instant::now();
                    } else if last_reclaim.elapsed() >= RECLAIM_IDLE {
                        let _ = st.claim(RECLAIM_IDLE, &out).await;
                        last_reclaim = tokio::time::Instant::now();
                    }
                    if let Err(e) = events.sweep().await {
                        tracing::debug!(error = %e, "session sweep skipped");
                    }
                }
            }
            _ = read_tick.tick(), if st.leading.is_some() => {
                // Keep reading while full batches come.
                while let Ok(n) = st.read(&out).await {
                    if n < BATCH {
                        break;
                    }
                }
            }
        }
    }
    // Shutdown: acknowledge what the webhook queues finish (the channel
    // ends when the last job is gone), then hand the leadership on.
    st.done_tx = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(id)) = tokio::time::timeout_at(deadline, done_rx.recv()).await {
        let mut ids = vec![id];
        while let Ok(id) = done_rx.try_recv() {
            ids.push(id);
        }
        st.ack(ids).await;
    }
    st.resign().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack() -> (Arc<Ack>, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let a = Arc::new(Ack {
            id: "1-0".into(),
            remaining: AtomicUsize::new(1),
            done: tx,
        });
        (a, rx)
    }

    #[test]
    fn an_entry_is_acknowledged_once_after_its_last_job() {
        let (a, mut rx) = ack();
        a.add();
        a.add();
        // A fast job may finish before the dispatch itself is done.
        a.complete();
        assert!(rx.try_recv().is_err());
        a.complete(); // the dispatch
        assert!(rx.try_recv().is_err());
        a.complete();
        assert_eq!(rx.try_recv().unwrap(), "1-0");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn an_entry_nobody_wants_is_acknowledged_at_once() {
        let (a, mut rx) = ack();
        a.complete();
        assert_eq!(rx.try_recv().unwrap(), "1-0");
    }
}
