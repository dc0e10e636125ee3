//! Keeps this node's cache of the shared registry honest and does the
//! cluster-wide sweeps, on the cluster's runtime:
//! - bus: `StreamChanged` re-reads a cached spec, `StreamDeleted` drops
//!   the local copy (its viewers here are cut), `ClientDrop` closes a
//!   client held here, `Resync` re-checks everything cached;
//! - every second: streams watched here (clients or a live channel) are
//!   re-checked against Redis (pub/sub drops messages while disconnected),
//!   their `last_access` moved, and clients of dead nodes swept;
//! - every expiry interval, on one node (`leader:expiry`): API streams
//!   nobody watched for `server.stream_idle_ttl` are deleted once.
//!
//! Redis unavailable: nothing here removes anything, viewers keep watching.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::broadcast::error::RecvError;

use super::continuity::Continuity;
use super::{clients, invoke, items, lua, streams, text, webhooks};
use crate::app::App;
use crate::cluster::{Bus, Cluster, ClusterError};
use crate::registry::Origin;

/// A cached API stream nobody here used for this long is forgotten (read
/// again from Redis if asked for).
const CACHE_IDLE: Duration = Duration::from_secs(60);

/// Starts the upkeep loops and the client tracker; waits up to `wait` for
/// the shared HLS key (references minted before it would not verify on
/// the other nodes).
pub fn start(app: &Arc<App>, c: &Arc<Cluster>, wait: Duration) {
    clients::start(app, c);
    let continuity = Arc::new(Continuity::default());
    c.spawn(bus_loop(app.clone(), c.clone(), continuity.clone()));
    c.spawn(second_loop(app.clone(), c.clone(), continuity));
    c.spawn(expiry_loop(app.clone(), c.clone()));
    let (tx, rx) = std::sync::mpsc::channel();
    c.spawn(hls_key_loop(app.clone(), c.clone(), tx));
    if rx.recv_timeout(wait).is_err() {
        tracing::warn!("cluster: shared HLS key not read yet; HLS references minted here verify only here until it is");
    }
}

/// `hls_key`: the first node's key wins (`SET NX`), every node signs with
/// it. `hls.token_key` in the config wins over both. Re-read every 5 s: if
/// Redis lost it (restarted without persistence), the key in use here is
/// offered again, so the nodes keep agreeing.
async fn hls_key_loop(app: Arc<App>, c: Arc<Cluster>, ready: std::sync::mpsc::Sender<()>) {
    if app.config.hls.token_key.is_some() {
        let _ = ready.send(());
        return;
    }
    let mut current = hex::encode(crate::hls::token::Signer::generate_key());
    let mut adopted = false;
    let key = c.keys().hls_key();
    loop {
        let (k, p) = (key.clone(), current.clone());
        let got: Result<Option<String>, ClusterError> = match c.redis().await {
            Ok(mut conn) => {
                c.run(async move {
                    let _: Option<String> = redis::cmd("SET")
                        .arg(&k)
                        .arg(&p)
                        .arg("NX")
                        .query_async(&mut conn)
                        .await?;
                    redis::cmd("GET").arg(&k).query_async(&mut conn).await
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Ok(Some(shared)) = got {
            match hex::decode(&shared).ok().filter(|b| b.len() >= 16) {
                Some(bytes) => {
                    if !adopted || shared != current {
                        app.signer.rekey(&bytes);
                        tracing::info!("cluster: HLS references signed with the shared key");
                        current = shared;
                        adopted = true;
                        let _ = ready.send(());
                    }
                }
                None => tracing::error!(
                    "cluster: hls_key in Redis is not a hex key of 16+ bytes; set hls.token_key or delete it"
                ),
            }
        }
        let every = if adopted { 5 } else { 1 };
        tokio::time::sleep(Duration::from_secs(every)).await;
    }
}

async fn bus_loop(app: Arc<App>, c: Arc<Cluster>, k: Arc<Continuity>) {
    let mut rx = c.subscribe();
    loop {
        let env = match rx.recv().await {
            Ok(env) => env,
            Err(RecvError::Lagged(_)) => {
                recheck(&app, &c, &k, true).await;
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let mine = env.from == c.node_id();
        match env.msg {
            Bus::StreamChanged { id } if !mine => refresh(&app, &c, &k, &id).await,
            Bus::StreamDeleted { id } if !mine => {
                // Checked against Redis: a POST on a third node may have
                // registered it again since (the bus orders per sender only).
                let gone = match super::one(&c, &id).await {
                    Ok(sh) => sh.spec.is_none() && k.check(&app, &c).await.unwrap_or(true),
                    Err(_) => true,
                };
                if gone && app.evict_stream(&id, "manual_deletion") {
                    tracing::info!(stream_id = %id, node = %env.from, "stream deleted on another node");
                }
            }
            Bus::ClientDrop { stream, client } if !mine => {
                if let Some(s) = app.registry.get(&stream) {
                    if s.disconnect_client(&client).is_some() {
                        app.metrics.client_drop(crate::metrics::DropReason::Api);
                        tracing::info!(stream_id = %stream, client, node = %env.from, "client dropped through another node");
                    }
                }
            }
            Bus::WebhooksChanged if !mine => webhooks::sync(&app, &c).await,
            // Redis may have come back empty: checked before mirroring.
            Bus::Resync if k.check(&app, &c).await.is_ok() => {
                recheck(&app, &c, &k, true).await;
                webhooks::sync(&app, &c).await;
            }
            _ => {}
        }
    }
}

/// Re-reads one cached API stream: gone → dropped here, changed → swapped.
async fn refresh(app: &App, c: &Cluster, k: &Continuity, id: &str) {
    if app.registry.get(id).is_none_or(|s| s.origin != Origin::Api) {
        return;
    }
    if let Ok(sh) = super::one(c, id).await {
        if sh.spec.is_some() || k.check(app, c).await == Ok(true) {
            apply(app, sh);
        }
    }
}

/// Caches a stream as Redis has it; one Redis no longer has is dropped
/// (the caller checked it was deleted, not lost).
fn apply(app: &App, sh: super::Shared) {
    match sh.spec {
        Some(spec) => {
            app.registry.cache_api(&sh.id, spec, sh.created);
        }
        None => {
            if app.evict_stream(&sh.id, "manual_deletion") {
                tracing::info!(stream_id = %sh.id, "stream no longer in the cluster store: removed here");
            }
        }
    }
}

/// Re-checks cached API streams against Redis: those watched here, or all
/// (`every`) after a bus reconnect.
async fn recheck(app: &App, c: &Cluster, k: &Continuity, every: bool) {
    let ids: Vec<String> = app
        .registry
        .list()
        .iter()
        .filter(|s| s.origin == Origin::Api)
        .filter(|s| every || s.client_count() > 0 || app.hub.channel(&s.id).is_some())
        .map(|s| s.id.clone())
        .collect();
    for chunk in ids.chunks(500) {
        let mut args = vec!["ids"];
        args.extend(chunk.iter().map(String::as_str));
        let Ok(found) = streams(c, &args).await else {
            return;
        };
        if found.iter().any(|sh| sh.spec.is_none()) && k.check(app, c).await != Ok(true) {
            // Redis lost them (now stored again), or cannot tell: keep all.
            return;
        }
        for sh in found {
            apply(app, sh);
        }
    }
}

async fn second_loop(app: Arc<App>, c: Arc<Cluster>, k: Arc<Continuity>) {
    let mut seen: HashMap<String, Reported> = HashMap::new();
    let mut sweep_ops: HashMap<String, String> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        // Every tick: notices a Redis that lost its data before anything
        // else acts on the emptiness.
        let _ = k.check(&app, &c).await;
        recheck(&app, &c, &k, false).await;
        touch_streams(&app, &c, &mut seen).await;
        super::totals::refresh(&app, &c).await;
        if let Err(e) = clients::sweep_dead_nodes(&app, &c, &mut sweep_ops).await {
            tracing::debug!(error = %e, "cluster: dead-node sweep skipped");
        }
        if n.is_multiple_of(5) {
            webhooks::sync(&app, &c).await;
            forget_idle(&app);
        }
    }
}

/// What this node last reported of a stream: its last access and counters.
#[derive(Default)]
struct Reported {
    access: Option<DateTime<Utc>>,
    bytes: u64,
    segments: u64,
}

/// Moves `last_access` in Redis of the API streams used here since the
/// last tick, and adds what they served here to their shared counters (at
/// most once a second per stream).
async fn touch_streams(app: &App, c: &Cluster, seen: &mut HashMap<String, Reported>) {
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut sent: Vec<(String, Reported)> = Vec::new();
    for s in app.registry.list() {
        if s.origin != Origin::Api {
            continue;
        }
        let la = s.last_access();
        let bytes = s.bytes.load(Ordering::Relaxed);
        let segments = s.segments.load(Ordering::Relaxed);
        let before = seen.get(&s.id);
        let moved = before.is_none_or(|r| r.access.is_none_or(|t| t < la)) || s.client_count() > 0;
        // A copy made anew (re-cached) counts from zero again.
        let (db, dg) = before.map_or((0, 0), |r| {
            (
                bytes.checked_sub(r.bytes).unwrap_or(bytes),
                segments.checked_sub(r.segments).unwrap_or(segments),
            )
        });
        if moved || db > 0 || dg > 0 {
            rows.push([
                s.id.clone(),
                if moved { "1" } else { "0" }.to_owned(),
                db.to_string(),
                dg.to_string(),
            ]);
            sent.push((
                s.id.clone(),
                Reported {
                    access: Some(la),
                    bytes,
                    segments,
                },
            ));
        }
    }
    for (chunk, reports) in rows.chunks(250).zip(sent.chunks(250)) {
        let args: Vec<&str> = chunk.iter().flatten().map(String::as_str).collect();
        if invoke(c, &lua::TOUCH_STREAMS_SCRIPT, &args).await.is_err() {
            // Not counted: sent again (with the deltas summed) next time.
            break;
        }
        for (id, r) in reports {
            seen.insert(
                id.clone(),
                Reported {
                    access: r.access,
                    bytes: r.bytes,
                    segments: r.segments,
                },
            );
        }
    }
    seen.retain(|id, _| app.registry.get(id).is_some());
}

/// Forgets cached API streams nobody used here for a while (no event: the
/// stream lives on in Redis).
fn forget_idle(app: &App) {
    let limit = chrono::Duration::from_std(CACHE_IDLE).unwrap_or(chrono::Duration::MAX);
    let now = Utc::now();
    for s in app.registry.list() {
        if s.origin == Origin::Api
            && s.client_count() == 0
            && app.hub.channel(&s.id).is_none()
            && now.signed_duration_since(s.last_access()) > limit
        {
            app.registry.forget(&s.id);
        }
    }
}

/// The expiry sweep, once per interval on the node that takes
/// `leader:expiry` for it.
async fn expiry_loop(app: Arc<App>, c: Arc<Cluster>) {
    let ttl = app.config.server.stream_idle_ttl;
    let every = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = expire(&app, &c, ttl, every).await {
            tracing::debug!(error = %e, "cluster: expiry sweep skipped");
        }
    }
}

async fn expire(
    app: &App,
    c: &Cluster,
    ttl: Duration,
    every: Duration,
) -> Result<(), ClusterError> {
    let mut conn = c.redis().await?;
    let key = c.keys().leader("expiry");
    let lease_ms = every
        .saturating_sub(Duration::from_millis(200))
        .as_millis()
        .max(500) as u64;
    let node = c.node_id().to_owned();
    let won: Option<String> = c
        .run(async move {
            redis::cmd("SET")
                .arg(key)
                .arg(node)
                .arg("NX")
                .arg("PX")
                .arg(lease_ms)
                .query_async(&mut conn)
                .await
        })
        .await?;
    if won.is_none() {
        return Ok(());
    }
    let v = invoke(c, &lua::EXPIRE_SCRIPT, &[&ttl.as_millis().to_string()]).await?;
    for d in items(v) {
        let mut d = items(d).into_iter();
        let (Some(id), Some(spec), Some(gone)) = (d.next(), d.next(), d.next()) else {
            continue;
        };
        let id = text(&id);
        let spec = super::parse_spec(&id, &text(&spec));
        tracing::info!(stream_id = %id, "stream expired (unwatched, cluster-wide)");
        super::deleted_here(app, c, &id, spec, items(gone), "inactive_timeout");
    }
    Ok(())
}
