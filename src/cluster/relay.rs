//! The source of a live channel on a cluster node: it either owns the
//! channel (the one provider connection cluster-wide, through the hub's
//! reader as on a single node) or relays it from the owner over ONE
//! internal connection (`GET /_cluster/live/{id}?epoch=N`, serve_live.rs),
//! its bytes fed into the local ring like a provider's, so local viewers,
//! clean joins and slow-viewer handling are the same either way.
//!
//! Placement is local-first: the first local viewer makes this node try
//! `ownership::take`. When a relay breaks: a new owner → relay from it; no
//! live owner → take the channel after `rank × 150 ms` (ketama order among
//! the live nodes, so the next node in ring order usually takes it alone)
//! and open the provider; the same live owner → retry with backoff. Every
//! change of source goes through the reader's switch path (discontinuity,
//! PAT/PMT re-sent): viewers stay connected through the gap.
//!
//! An owner gives the channel up when fenced or when `own:{s}` names
//! someone else (owner.rs), and releases it when the channel closes (its
//! last local viewer and last relay gone) or at shutdown, after its
//! provider socket is closed, publishing `Released`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::owner::{self, Owned, Yield};
use super::ownership::{self, Owner, Take};
use super::registry::SharedSource;
use super::session::FENCE_MARGIN;
use super::{Bus, Cluster};
use crate::app::App;
use crate::hub::reader::{PeerBody, PeerEnd, Reader};
use crate::hub::{Channel, Phase};
use crate::provider::Full;
use crate::registry::FailoverState;

/// Take-over order after an owner is lost: each rank waits this much longer
/// (CLUSTER.md), so the next node in ring order usually takes it alone.
const RANK_STEP: Duration = Duration::from_millis(150);
/// Retrying the same live owner: first wait, doubled per failure up to MAX.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Waiting for the owner's response header: an owner answers from its ring
/// at once, or (still connecting) as soon as its provider does.
const PEER_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause while Redis is unreachable or the node is fenced.
const REDIS_WAIT: Duration = Duration::from_millis(500);
/// A relay that delivers nothing valid for this long (at least; the
/// channel's `stall_timeout` when longer) is checked against `own:{s}`.
const PEER_STALL_MIN: Duration = Duration::from_secs(2);
/// Added to `node_ttl` for the shortest time a channel waits for a source:
/// a dead owner's session must expire and a node take over first.
const GIVE_UP_SLACK: Duration = Duration::from_secs(5);
/// How long a new channel waits for a closing channel of the same stream on
/// this node to give its ownership record back.
const HANDOFF_WAIT: Duration = Duration::from_secs(3);

/// Channels owned and relayed by this node, for `/stats` and `/health`.
pub fn counts(app: &App) -> (usize, usize) {
    app.cluster.as_ref().map_or((0, 0), |c| c.table().counts())
}

/// The source task of a live channel on a cluster node (in place of
/// `hub::reader::run`). Ends when the channel closes or ends.
pub async fn run(app: Arc<App>, ch: Arc<Channel>) {
    let Some(c) = app.cluster.clone() else {
        return;
    };
    let id = ch.stream.id.clone();
    c.table().start_listener(|| {
        c.spawn(listen(app.clone(), c.clone()));
    });
    // Another node may already know this is a file or HLS: route alike.
    if let Some((detected, _)) = owner::read_shared(&c, &id).await {
        owner::apply_detected(&ch.stream, detected.as_deref());
        match detected.as_deref() {
            Some("hls") => return ch.set_phase(Phase::Hls),
            Some("file") if ch.stream.spec().live.is_none() => return ch.set_phase(Phase::File),
            _ => {}
        }
    }
    c.table().wait_handoff(&id, &ch, HANDOFF_WAIT).await;
    let mut feed = Reader::new(app.clone(), ch.clone());
    let stall = app.config.live.stall_timeout.max(PEER_STALL_MIN);
    let mut next = Next::Take;
    let mut retry = RETRY_FIRST;
    // Since when no source (provider or relay) fed the channel: like a
    // provider outage, it ends after `live.give_up_after` (at least long
    // enough for a take-over).
    let give_up = app
        .config
        .live
        .give_up_after
        .max(c.config().node_ttl + GIVE_UP_SLACK);
    let mut sourceless: Option<Instant> = None;
    while !ch.is_closed() {
        if sourceless.is_some_and(|t| t.elapsed() >= give_up) {
            tracing::warn!(stream_id = %id, "cluster: no owner reachable and no provider for live.give_up_after: channel ended");
            ch.set_phase(if ch.phase() == Phase::Connecting {
                Phase::Unavailable(502)
            } else {
                Phase::Ended("no source for live.give_up_after".into())
            });
            break;
        }
        let step = match next.take() {
            Next::Take if c.table().draining() => Step::Wait(REDIS_WAIT),
            Next::Take => match take(&c, &ch).await {
                Some(t) => Step::Got(t),
                None => Step::Wait(REDIS_WAIT),
            },
            Next::Resolve { broken } => resolve(&c, &ch, broken.as_ref(), &mut retry).await,
        };
        match step {
            Step::Ended => {
                tracing::warn!(stream_id = %id, "cluster: every source failed on the channel's owner: channel ended");
                apply_final(
                    &ch,
                    Phase::Ended("every source failed on the channel's owner".into()),
                );
                break;
            }
            Step::Wait(d) => {
                sourceless.get_or_insert_with(Instant::now);
                sleep_or_closed(&ch, d).await;
                next = Next::Resolve { broken: None };
            }
            Step::Got(Take::Mine(o)) => {
                retry = RETRY_FIRST;
                match own(&c, &ch, &mut feed, o).await {
                    Owning::Ended | Owning::Closed => break,
                    Owning::Yielded => {
                        feed.note_switch();
                        sourceless = Some(Instant::now());
                        next = Next::Resolve { broken: None };
                    }
                }
            }
            Step::Got(Take::Theirs(o)) if o.kind == "hls" => {
                // Another node serves it as HLS (its first response was a
                // playlist): local viewers go to the HLS path too.
                apply_final(&ch, Phase::Hls);
                break;
            }
            Step::Got(Take::Theirs(o)) => match relay(&c, &ch, &mut feed, &o, stall).await {
                Relaying::Ended => break,
                Relaying::Broken { why, fed } => {
                    tracing::info!(stream_id = %id, owner = %o.node, reason = %why, "cluster: relay broke, looking for the owner");
                    if fed {
                        feed.note_switch();
                        sourceless = Some(Instant::now());
                    } else {
                        sourceless.get_or_insert_with(Instant::now);
                    }
                    next = Next::Resolve { broken: Some(o) };
                }
            },
        }
    }
    tracing::debug!(stream_id = %id, "cluster: channel source ended");
}

#[derive(Default)]
enum Next {
    /// The channel just opened here: try to own it (local-first).
    #[default]
    Take,
    /// Find the owner again (a relay broke, or ownership was given up).
    Resolve { broken: Option<Owner> },
}

impl Next {
    fn take(&mut self) -> Next {
        std::mem::take(self)
    }
}

enum Step {
    Got(Take),
    Wait(Duration),
    /// The channel ended on the owner it was relayed from.
    Ended,
}

async fn sleep_or_closed(ch: &Channel, d: Duration) {
    tokio::select! {
        _ = ch.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// `ownership::take`, when the session has the margin to open a provider.
async fn take(c: &Cluster, ch: &Channel) -> Option<Take> {
    // A channel whose last viewer left while this node waited its turn
    // takes nothing: the record would only be written and released again.
    if ch.is_closed() || c.session_left() < FENCE_MARGIN {
        return None;
    }
    ownership::take(c, &ch.stream.id, "live")
        .await
        .map_err(
            |e| tracing::debug!(stream_id = %ch.stream.id, error = %e, "cluster: take refused"),
        )
        .ok()
}

/// After a relay broke or ownership was given up: who feeds the channel now.
async fn resolve(c: &Cluster, ch: &Channel, broken: Option<&Owner>, retry: &mut Duration) -> Step {
    if !c.holds_session() {
        return Step::Wait(REDIS_WAIT);
    }
    let draining = c.table().draining();
    match ownership::current(c, &ch.stream.id).await {
        Err(_) => Step::Wait(REDIS_WAIT),
        Ok(Some(o)) if o.node == c.node_id() => {
            // A record of ours that no channel here serves (a release that
            // failed): the take script hands it back to us.
            if draining {
                return Step::Wait(REDIS_WAIT);
            }
            take(c, ch).await.map_or(Step::Wait(REDIS_WAIT), Step::Got)
        }
        Ok(Some(o)) => {
            if broken.is_some_and(|b| b.node == o.node && b.epoch == o.epoch) {
                // The same owner, still alive in Redis: restarting, or dead
                // until its session expires.
                let wait = *retry;
                *retry = (*retry * 2).min(RETRY_MAX);
                sleep_or_closed(ch, wait).await;
            } else {
                *retry = RETRY_FIRST;
            }
            Step::Got(Take::Theirs(o))
        }
        Ok(None) if draining => Step::Wait(REDIS_WAIT),
        Ok(None) => {
            if let Some(b) = broken {
                if owner::ended_under(c, &ch.stream.id, b.epoch).await {
                    return Step::Ended;
                }
            }
            // No owner: take over in ring order among the live nodes.
            let rank = match c.live_nodes().await {
                Ok(nodes) => c.takeover_rank(&ch.stream.id, &nodes).min(nodes.len()),
                Err(_) => 0,
            };
            sleep_or_closed(ch, RANK_STEP * rank as u32).await;
            match take(c, ch).await {
                Some(t) => {
                    if matches!(t, Take::Mine(_)) {
                        c.metrics.takeovers.inc();
                    }
                    Step::Got(t)
                }
                None => Step::Wait(REDIS_WAIT),
            }
        }
    }
}

enum Owning {
    /// The channel ended here (every source failed, a file, HLS, full...).
    Ended,
    /// The channel closed (no viewer and no relay left).
    Closed,
    /// Given up (fenced, someone else owns it, shutdown): find the owner.
    Yielded,
}

/// Owns the channel: the provider reader runs until the channel closes or
/// ends, or until ownership must be given up; then the provider socket is
/// closed, and only then is the record released.
async fn own(c: &Arc<Cluster>, ch: &Arc<Channel>, feed: &mut Reader, o: Owner) -> Owning {
    let id = ch.stream.id.clone();
    let epoch = o.epoch;
    c.metrics.ownership_changes.inc();
    tracing::info!(stream_id = %id, epoch, "cluster: channel owned here, opening the provider");
    // Start where the last owner was (same source, no failover event).
    owner::adopt_shared(c, &ch.stream).await;
    let stop = ch.cancel_token().child_token();
    let give_up = CancellationToken::new();
    let served = CancellationToken::new();
    c.table().own(
        &id,
        Owned {
            epoch,
            ch: ch.clone(),
            served: served.clone(),
            give_up: give_up.clone(),
        },
    );
    let ended = {
        let provider = feed.run_provider(stop.clone());
        tokio::pin!(provider);
        tokio::select! {
            end = &mut provider => Some(end),
            why = async {
                tokio::select! {
                    why = owner::watch(c, ch, epoch) => why,
                    _ = give_up.cancelled() => Yield::Draining,
                }
            } => {
                tracing::warn!(stream_id = %id, epoch, reason = ?why, "cluster: giving the channel up; its provider connection closes");
                stop.cancel();
                let _ = (&mut provider).await;
                None
            }
        }
    };
    // Relays served end now: their nodes look for the new owner.
    served.cancel();
    ch.clear_provider();
    owner::write_detected(c, ch, epoch).await;
    if matches!(ended, Some(Some(_))) {
        // Every source failed (or the media ended): relaying nodes end
        // their viewers too instead of trying the provider again in turn.
        let _ = owner::write_fields(c, &id, epoch, &[("ended_epoch", epoch.to_string())]).await;
    }
    // The provider socket is closed (the reader returned): a successor can
    // open its own without overlap.
    match ownership::release(c, &id, epoch).await {
        Ok(true) => c.publish(Bus::Released { stream: id.clone() }),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(stream_id = %id, error = %e, "cluster: release failed; the record ends with this node's session")
        }
    }
    c.table().disown(&id, ch);
    // Given up or released: no longer this node's.
    c.metrics.ownership_changes.inc();
    match ended {
        None => Owning::Yielded,
        Some(_) if ch.is_closed() => Owning::Closed,
        // Gave up, played to its end, or not a live channel: its phase tells
        // the viewers; nothing to feed any more.
        Some(Some(_)) => Owning::Ended,
        Some(None) => match ch.phase() {
            Phase::Live | Phase::Connecting => Owning::Yielded,
            _ => Owning::Ended,
        },
    }
}

enum Relaying {
    /// The channel closed, or the owner said it is not a live channel.
    Ended,
    /// The connection broke (`fed`: after feeding the channel) or was
    /// refused: find the owner again.
    Broken { why: String, fed: bool },
}

/// Relays the channel from `o` until the connection breaks or the channel ends.
async fn relay(
    c: &Arc<Cluster>,
    ch: &Arc<Channel>,
    feed: &mut Reader,
    o: &Owner,
    stall: Duration,
) -> Relaying {
    let id = &ch.stream.id;
    let stop = ch.cancel_token();
    let opened = tokio::select! {
        _ = stop.cancelled() => return Relaying::Ended,
        r = open(c, id, o) => r,
        // A frozen owner accepts connections but never answers.
        _ = owner_gone(c, id, o) => Err(Refusal::Retry("the owner changed or was lost".into())),
    };
    let mut body = match opened {
        Ok(b) => b,
        Err(Refusal::Retry(why)) => return Relaying::Broken { why, fed: false },
        Err(Refusal::Final(phase)) => {
            apply_final(ch, phase);
            return Relaying::Ended;
        }
    };
    tracing::info!(stream_id = %id, owner = %o.node, epoch = o.epoch, "cluster: relaying the channel from its owner");
    c.table().set_relayed(id, true);
    c.metrics.relays_open.inc();
    let end = loop {
        match feed.run_peer(body, stall, &stop).await {
            PeerEnd::Stopped => break Relaying::Ended,
            PeerEnd::Broken(why) => break Relaying::Broken { why, fed: true },
            PeerEnd::Stalled(b) => {
                // Quiet: read on while it is still the owner (its provider
                // may be failing over); else look again.
                match ownership::current(c, id).await {
                    Ok(Some(now)) if now.node == o.node && now.epoch == o.epoch => body = b,
                    Err(_) => body = b,
                    Ok(_) => {
                        break Relaying::Broken {
                            why: "the owner changed or was lost".into(),
                            fed: true,
                        }
                    }
                }
            }
        }
    };
    c.metrics.relays_open.dec();
    c.table().set_relayed(id, false);
    end
}

/// Resolves once `o` is no longer the live owner of `id` (checked every
/// [`PEER_STALL_MIN`]; a Redis error counts as no change).
async fn owner_gone(c: &Cluster, id: &str, o: &Owner) {
    loop {
        tokio::time::sleep(PEER_STALL_MIN).await;
        match ownership::current(c, id).await {
            Ok(Some(now)) if now.node == o.node && now.epoch == o.epoch => {}
            Err(_) => {}
            Ok(_) => return,
        }
    }
}

/// Why the owner did not serve a relay.
enum Refusal {
    /// Look for the owner again (not owner, wrong epoch, unreachable).
    Retry(String),
    /// Not a channel to relay (a file, HLS, full, failed): this phase.
    Final(Phase),
}

async fn open(c: &Cluster, id: &str, o: &Owner) -> Result<PeerBody, Refusal> {
    let enc: String = url::form_urlencoded::byte_serialize(id.as_bytes()).collect();
    let path = format!("/_cluster/live/{enc}?epoch={}", o.epoch);
    let mut req = c.peer_http().get(format!("http://{}{path}", o.addr));
    for (k, v) in c.sign("GET", &path) {
        req = req.header(k, v);
    }
    let resp = match tokio::time::timeout(PEER_HEADER_TIMEOUT, req.send()).await {
        Err(_) => return Err(Refusal::Retry("the owner did not answer".into())),
        Ok(Err(e)) => {
            return Err(Refusal::Retry(format!(
                "owner unreachable: {}",
                e.without_url()
            )))
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status().as_u16();
    if status == 200 {
        return Ok(Box::pin(resp.bytes_stream()));
    }
    // A refusal is a small JSON body naming what the owner's viewers got.
    let body: serde_json::Value =
        match tokio::time::timeout(Duration::from_secs(2), resp.bytes()).await {
            Ok(Ok(b)) => serde_json::from_slice(&b).unwrap_or_default(),
            _ => serde_json::Value::Null,
        };
    let phase = match body["phase"].as_str() {
        Some("file") => Phase::File,
        Some("hls") => Phase::Hls,
        Some("full") => Phase::Full(Full {
            provider: body["provider"].as_str().unwrap_or_default().to_string(),
            max_connections: body["max_connections"]
                .as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(0),
            reason: body["reason"].as_str().map(str::to_owned),
        }),
        Some("unavailable") => Phase::Unavailable(match body["code"].as_u64() {
            Some(404) => 404,
            _ => 502,
        }),
        Some("ended") => Phase::Ended("every source failed on the channel's owner".into()),
        _ => return Err(Refusal::Retry(format!("owner answered HTTP {status}"))),
    };
    Err(Refusal::Final(phase))
}

/// The owner found the channel is a file, HLS, full or failed: local
/// viewers go where the owner's went.
fn apply_final(ch: &Channel, phase: Phase) {
    match &phase {
        Phase::File => ch.stream.set_detected_live(false),
        Phase::Hls => ch.stream.set_detected_hls(),
        _ => {}
    }
    let waiting = ch.phase() == Phase::Connecting;
    if waiting || matches!(phase, Phase::File | Phase::Hls | Phase::Ended(_)) {
        ch.set_phase(phase);
    } else {
        ch.set_phase(Phase::Ended("the channel ended on its owner".into()));
    }
}

/// SIGTERM: takes nothing any more and gives every owned channel up (its
/// provider closed first, then released and `Released` published) so
/// relaying nodes take over in ring order; local viewers are relayed from
/// the new owner for the rest of the grace period. Waits up to `within`.
pub async fn drain(app: &App, within: Duration) {
    let Some(c) = &app.cluster else {
        return;
    };
    let table = c.table();
    table.drain();
    let owned = table.owned_streams();
    if owned.is_empty() {
        return;
    }
    tracing::info!(
        channels = owned.len(),
        "shutdown: handing owned channels over to other nodes"
    );
    for (_, o) in &owned {
        o.give_up.cancel();
    }
    let end = Instant::now() + within;
    while Instant::now() < end && table.counts().0 > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bus messages for owned channels: `FailoverNow` from the node whose API
/// was asked to fail a stream over (the owner switches its provider).
async fn listen(app: Arc<App>, c: Arc<Cluster>) {
    let mut rx = c.subscribe();
    loop {
        let env = match rx.recv().await {
            Ok(env) => env,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if env.from == c.node_id() {
            continue;
        }
        if let Bus::FailoverNow { stream } = env.msg {
            let Some(o) = c.table().owned(&stream) else {
                continue;
            };
            // The API node recorded the new source in `stream:{s}`.
            owner::adopt_shared(&c, &o.ch.stream).await;
            if app.hub.force_failover(&stream) {
                tracing::info!(stream_id = %stream, from = %env.from, "cluster: failover asked by another node");
            }
        }
    }
}

/// `POST /streams/{id}/failover` on a cluster node: records the new source
/// in `stream:{s}` and tells the owner (wherever it runs) to switch to it.
pub async fn failover_everywhere(c: &Cluster, stream: &str, f: &FailoverState) {
    let fields = SharedSource::fields_of(f);
    if let Err(e) = owner::write_shared(c, stream, &fields).await {
        tracing::warn!(stream_id = %stream, error = %e, "cluster: could not share the forced failover");
    }
    c.publish(Bus::FailoverNow {
        stream: stream.to_string(),
    });
}
