//! Clients cluster-wide. The hot path only queues a note (a client joined
//! or left this node); a background tracker turns notes into Redis scripts
//! in order, and emits `client_connected` only when its `ZADD` created the
//! member and `client_disconnected` only when its `ZREM` removed it, so a
//! player served by three nodes yields one of each. Once a second the
//! tracker renews this node's holds (HLS clients: until they have been
//! idle for their timeout plus [`HOLD_SLACK`]) and counters.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{hash, invoke, items, lua, text};
use crate::app::App;
use crate::cluster::{once, Bus, Cluster, ClusterError};
use crate::events::EventType;
use crate::registry::{Client, ClientWatcher, Stream, StreamSpec};

/// How much longer than its idle timeout an HLS client's hold lasts in
/// Redis: covers the renewal period, so a player moving between nodes
/// never looks gone in between.
pub const HOLD_SLACK: Duration = Duration::from_secs(2);

/// Notes kept for a retry while Redis is unreachable; beyond it the oldest
/// are dropped (the next renewal re-joins whoever is still here).
const MAX_PENDING: usize = 100_000;

/// Clients renewed per script call.
const TOUCH_BATCH: usize = 200;

#[derive(Debug)]
enum Note {
    Join {
        stream: String,
        spec: Arc<StreamSpec>,
        client: Arc<Client>,
    },
    Leave {
        stream: String,
        spec: Arc<StreamSpec>,
        client: Arc<Client>,
        reason: String,
    },
    /// Answered once every note before it is processed.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The registry's [`ClientWatcher`] in cluster mode: queues, never waits.
pub struct Tracker {
    tx: mpsc::UnboundedSender<Note>,
}

impl ClientWatcher for Tracker {
    fn joined(&self, stream: &Stream, client: &Arc<Client>) {
        let _ = self.tx.send(Note::Join {
            stream: stream.id.clone(),
            spec: stream.spec(),
            client: client.clone(),
        });
    }

    fn left(&self, stream: &Stream, client: &Arc<Client>, reason: &str) {
        let _ = self.tx.send(Note::Leave {
            stream: stream.id.clone(),
            spec: stream.spec(),
            client: client.clone(),
            reason: reason.to_owned(),
        });
    }

    fn flushed(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(Note::Flush(tx));
        rx
    }
}

/// Installs the tracker on the registry and runs it on the cluster's runtime.
pub fn start(app: &Arc<App>, c: &Arc<Cluster>) {
    let (tx, rx) = mpsc::unbounded_channel();
    app.registry.set_client_watcher(Arc::new(Tracker { tx }));
    c.spawn(run(app.clone(), c.clone(), rx));
}

/// The hold of a client in Redis: `inf` while a socket is open, else the
/// milliseconds left of its idle time (plus slack).
fn hold(client: &Client) -> String {
    match client.idle_timeout {
        None => "inf".into(),
        Some(idle) => {
            let idle_for = (Utc::now() - client.last_access())
                .to_std()
                .unwrap_or_default();
            (idle + HOLD_SLACK)
                .saturating_sub(idle_for)
                .as_millis()
                .to_string()
        }
    }
}

async fn run(app: Arc<App>, c: Arc<Cluster>, mut rx: mpsc::UnboundedReceiver<Note>) {
    // Each note with the reply key of its script, the same over its retries
    // (`crate::cluster::once`: a try that timed out may still have run);
    // made here, off the viewer's request path.
    let mut pending: VecDeque<(Note, String)> = VecDeque::new();
    let op = || once::new_key(c.keys());
    let mut missing_before: HashSet<(String, String)> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            note = rx.recv() => {
                let Some(note) = note else { return };
                pending.push_back((note, op()));
                while let Ok(n) = rx.try_recv() {
                    pending.push_back((n, op()));
                }
            }
            _ = tick.tick() => {
                renew(&app, &c, &mut missing_before).await;
            }
        }
        while let Some((note, once)) = pending.pop_front() {
            let note = match note {
                Note::Flush(tx) => {
                    let _ = tx.send(());
                    continue;
                }
                n => n,
            };
            if let Err(e) = apply(&app, &c, &note, &once).await {
                tracing::debug!(error = %e, "cluster: client note kept for a retry");
                pending.push_front((note, once));
                while pending.len() > MAX_PENDING {
                    pending.pop_front();
                }
                break;
            }
        }
    }
}

fn info_json(client: &Client) -> String {
    json!({
        "ip": client.ip,
        "ua": client.user_agent,
        "user": client.username,
    })
    .to_string()
}

/// `once`: the op's reply key (`crate::cluster::once`).
async fn join(
    c: &Cluster,
    stream: &str,
    client: &Client,
    once: &str,
) -> Result<(bool, u64), ClusterError> {
    let v = invoke(
        c,
        &lua::JOIN_SCRIPT,
        &[
            stream,
            &client.id,
            c.node_id(),
            &hold(client),
            &info_json(client),
            once,
        ],
    )
    .await?;
    let r = items(v);
    let added = r.first().map(text).is_some_and(|t| t == "1");
    let count = r.get(1).map(text).and_then(|t| t.parse().ok()).unwrap_or(0);
    Ok((added, count))
}

/// `once`: the reply key of the note's script (`crate::cluster::once`).
async fn apply(app: &App, c: &Cluster, note: &Note, once: &str) -> Result<(), ClusterError> {
    match note {
        Note::Flush(_) => {}
        Note::Join {
            stream,
            spec,
            client,
        } => {
            let (added, count) = join(c, stream, client, once).await?;
            if added {
                super::emit(
                    app,
                    stream,
                    &spec.metadata,
                    EventType::ClientConnected,
                    json!({
                        "client_id": client.id,
                        "user_agent": client.user_agent,
                        "username": client.username,
                        "stream_client_count": count,
                    }),
                );
            }
        }
        Note::Leave {
            stream,
            spec,
            client,
            reason,
        } => {
            let v = invoke(
                c,
                &lua::LEAVE_SCRIPT,
                &[stream, &client.id, c.node_id(), once],
            )
            .await?;
            let mut r = items(v).into_iter();
            let removed = r.next().is_some_and(|v| text(&v) == "1");
            if removed {
                let h = r.next().map(hash).unwrap_or_default();
                let (bytes, segments) = totals(&h);
                super::emit(
                    app,
                    stream,
                    &spec.metadata,
                    EventType::ClientDisconnected,
                    json!({
                        "client_id": client.id,
                        "username": client.username,
                        "bytes_served": bytes.max(client.bytes.load(Ordering::Relaxed)),
                        "segments_served": segments.max(client.segments.load(Ordering::Relaxed)),
                        "duration_seconds": (Utc::now() - client.created_at).num_milliseconds() as f64 / 1000.0,
                        "reason": reason,
                    }),
                );
            }
        }
    }
    Ok(())
}

/// Bytes and segments of a client over every node that served it.
fn totals(h: &BTreeMap<String, String>) -> (u64, u64) {
    let sum = |prefix: &str| -> u64 {
        h.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum()
    };
    (sum("b:"), sum("g:"))
}

/// Renews the holds and counters of every client of this node. A client
/// Redis no longer has (dropped through the API, or swept while this node
/// was cut off) twice in a row is joined again, if it is still here.
async fn renew(app: &App, c: &Cluster, missing_before: &mut HashSet<(String, String)>) {
    let mut all: Vec<(String, Arc<Client>)> = Vec::new();
    for s in app.registry.list() {
        for cl in s.clients() {
            if !cl.cancel.is_cancelled() {
                all.push((s.id.clone(), cl));
            }
        }
    }
    let mut missing_now = HashSet::new();
    for batch in all.chunks(TOUCH_BATCH) {
        let mut args: Vec<String> = vec![c.node_id().to_owned()];
        for (s, cl) in batch {
            args.push(s.clone());
            args.push(cl.id.clone());
            args.push(hold(cl));
            args.push(cl.bytes.load(Ordering::Relaxed).to_string());
            args.push(cl.segments.load(Ordering::Relaxed).to_string());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let Ok(v) = invoke(c, &lua::TOUCH_CLIENTS_SCRIPT, &refs).await else {
            return;
        };
        for k in items(v) {
            let Some((s, cl)) = text(&k)
                .parse::<usize>()
                .ok()
                .and_then(|k| batch.get(k.wrapping_sub(1)))
            else {
                continue;
            };
            missing_now.insert((s.clone(), cl.id.clone()));
        }
    }
    for (s, cl) in &all {
        let key = (s.clone(), cl.id.clone());
        if missing_now.contains(&key) && missing_before.contains(&key) {
            if let Some(stream) = app.registry.get(s) {
                let note = Note::Join {
                    stream: s.clone(),
                    spec: stream.spec(),
                    client: cl.clone(),
                };
                let op = once::new_key(c.keys());
                if apply(app, c, &note, &op).await.is_ok() {
                    missing_now.remove(&key);
                }
            }
        }
    }
    *missing_before = missing_now;
}

/// Live clients (of one stream, or all), as client objects C.
pub async fn list(c: &Cluster, stream: Option<&str>) -> Result<Vec<Value>, ClusterError> {
    let args: Vec<&str> = match stream {
        Some(s) => vec!["stream", s],
        None => vec!["all"],
    };
    let v = invoke(c, &lua::CLIENTS_SCRIPT, &args).await?;
    let mut out: Vec<(i64, Value)> = items(v)
        .into_iter()
        .map(hash)
        .map(|h| {
            let created: i64 = h.get("created").and_then(|v| v.parse().ok()).unwrap_or(0);
            (created, client_json(&h))
        })
        .collect();
    out.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| a.1["client_id"].as_str().cmp(&b.1["client_id"].as_str()))
    });
    Ok(out.into_iter().map(|(_, v)| v).collect())
}

/// Client object C from a `client:{s}:{c}` hash.
fn client_json(h: &BTreeMap<String, String>) -> Value {
    let info: Value = h
        .get("info")
        .and_then(|i| serde_json::from_str(i).ok())
        .unwrap_or(Value::Null);
    let ms = |k: &str| super::ms_time(h.get(k).and_then(|v| v.parse().ok()).unwrap_or(0));
    let (bytes, segments) = totals(h);
    json!({
        "client_id": h.get("c"),
        "stream_id": h.get("s"),
        "user_agent": info["ua"].as_str().unwrap_or(""),
        "ip_address": info["ip"].as_str().unwrap_or(""),
        "username": info["user"],
        "bytes_served": bytes,
        "segments_served": segments,
        "created_at": crate::api::json::iso(ms("created")),
        "last_access": crate::api::json::iso(ms("last")),
        "is_connected": true,
    })
}

/// `client_disconnected` for a client removed from Redis by this node
/// (a deleted stream, the API, a dead node's sweep), from its hash.
pub fn emit_gone(
    app: &App,
    stream: &str,
    metadata: &BTreeMap<String, String>,
    h: &BTreeMap<String, String>,
    reason: &str,
) {
    let info: Value = h
        .get("info")
        .and_then(|i| serde_json::from_str(i).ok())
        .unwrap_or(Value::Null);
    let created: i64 = h.get("created").and_then(|v| v.parse().ok()).unwrap_or(0);
    let (bytes, segments) = totals(h);
    let client = h.get("c").cloned().unwrap_or_default();
    super::emit(
        app,
        stream,
        metadata,
        EventType::ClientDisconnected,
        json!({
            "client_id": client,
            "username": info["user"],
            "bytes_served": bytes,
            "segments_served": segments,
            "duration_seconds": (Utc::now().timestamp_millis() - created).max(0) as f64 / 1000.0,
            "reason": reason,
        }),
    );
}

/// Drops client `client` of `stream` wherever it is (the API): Redis first,
/// then its node over the bus. Returns whether it was there.
pub async fn drop(
    app: &App,
    c: &Cluster,
    stream: &str,
    client: &str,
) -> Result<bool, ClusterError> {
    let v = invoke(c, &lua::DROP_CLIENT_SCRIPT, &[stream, client]).await?;
    let mut r = items(v).into_iter();
    let removed = r.next().is_some_and(|v| text(&v) == "1");
    if removed {
        dropped(app, c, stream, r.next().map(hash).unwrap_or_default()).await;
    }
    Ok(removed)
}

/// A client this node removed from Redis through the API: its event, and
/// its node (this one too) closes its requests.
pub async fn dropped(app: &App, c: &Cluster, stream: &str, h: BTreeMap<String, String>) {
    let metadata = super::metadata_for(app, c, stream).await;
    emit_gone(app, stream, &metadata, &h, "api");
    if let Some(cid) = h.get("c") {
        c.publish(Bus::ClientDrop {
            stream: stream.to_owned(),
            client: cid.clone(),
        });
        if let Some(s) = app.registry.get(stream) {
            if s.disconnect_client(cid).is_some() {
                app.metrics.client_drop(crate::metrics::DropReason::Api);
            }
        }
    }
}

/// The dead-node sweep: clients held only by nodes whose session is gone
/// leave, with one `client_disconnected` each (from the node whose script
/// removed them). `ops`: per dead node, the op id of a sweep whose reply
/// did not come, tried again until one does (`crate::cluster::once`).
pub async fn sweep_dead_nodes(
    app: &App,
    c: &Cluster,
    ops: &mut HashMap<String, String>,
) -> Result<(), ClusterError> {
    let mut conn = c.redis().await?;
    let key = format!("{}cnodes", c.keys().prefix());
    let nodes: Vec<String> = c
        .run(async move { redis::cmd("SMEMBERS").arg(key).query_async(&mut conn).await })
        .await?;
    // A node whose sweep reply did not come is tried again with the same
    // op even when it left `cnodes`: that sweep may have run, and its reply
    // is the only record of the clients it removed.
    let mut todo: Vec<String> = ops.keys().cloned().collect();
    todo.extend(nodes.into_iter().filter(|n| !ops.contains_key(n)));
    for n in todo.iter().filter(|n| n.as_str() != c.node_id()) {
        let op = ops
            .entry(n.clone())
            .or_insert_with(|| once::new_key(c.keys()))
            .clone();
        let v = invoke(c, &lua::SWEEP_NODE_SCRIPT, &[n, &op]).await?;
        ops.remove(n);
        for gone in items(v) {
            let mut g = items(gone).into_iter();
            let (Some(s), Some(h)) = (g.next(), g.next()) else {
                continue;
            };
            let s = text(&s);
            let h = hash(h);
            let metadata = super::metadata_for(app, c, &s).await;
            tracing::info!(stream_id = %s, node = %n, "cluster: client of a lost node removed");
            emit_gone(app, &s, &metadata, &h, "node_lost");
        }
    }
    Ok(())
}
