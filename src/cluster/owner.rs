//! The live channels this node owns or relays (node-local), and the duties
//! of an owner while it holds a channel: give it up at once when fenced or
//! when `own:{s}` names someone else (checked each second), and keep the
//! stream's shared fields (`detected`, failover position) in `stream:{s}`,
//! written only under its epoch. Nothing here is on a viewer's path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::registry::SharedSource;
use super::{Cluster, ClusterError};
use crate::hub::{Channel, Phase};
use crate::registry::Stream;

/// How often an owner re-reads `own:{s}` and its session (CLUSTER.md:
/// owners re-check each 1 s and yield on mismatch).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Whether this node may open a provider connection now: never with under
/// [`super::session::FENCE_MARGIN`] of session left (it might have to give
/// the channel up before it could close the connection).
pub fn may_open_provider(c: &Cluster) -> bool {
    c.session_left() >= super::session::FENCE_MARGIN
}

/// A channel this node owns.
#[derive(Clone)]
pub struct Owned {
    pub epoch: u64,
    pub ch: Arc<Channel>,
    /// Cancelled when this node stops owning it: relays it serves end, so
    /// their nodes look for the new owner at once.
    pub served: CancellationToken,
    /// Cancelled to make the owner give the channel up (shutdown).
    pub give_up: CancellationToken,
}

/// Node-local: owned and relayed channels.
#[derive(Default)]
pub struct Table {
    owned: Mutex<HashMap<String, Owned>>,
    /// Channels fed from another node: stream → open relay connections
    /// (one, but a closing channel may overlap a new one for a moment).
    relayed: Mutex<HashMap<String, usize>>,
    /// Shutting down: take nothing any more.
    draining: AtomicBool,
    /// The bus listener of owned channels runs (started once).
    listener: std::sync::OnceLock<()>,
}

impl Table {
    pub fn own(&self, stream: &str, o: Owned) {
        if let Some(old) = self.owned.lock().insert(stream.to_string(), o) {
            old.served.cancel();
        }
    }

    /// Forgets the owned entry of `ch` (not a newer channel's).
    pub fn disown(&self, stream: &str, ch: &Arc<Channel>) {
        let mut owned = self.owned.lock();
        if owned.get(stream).is_some_and(|o| Arc::ptr_eq(&o.ch, ch)) {
            owned.remove(stream);
        }
    }

    /// Waits (up to `max`) until no other channel of `stream` on this node
    /// owns it: a channel that just closed releases its record first, so
    /// the new one does not adopt a record about to be deleted.
    pub async fn wait_handoff(&self, stream: &str, ch: &Arc<Channel>, max: Duration) {
        let end = tokio::time::Instant::now() + max;
        while self
            .owned
            .lock()
            .get(stream)
            .is_some_and(|o| !Arc::ptr_eq(&o.ch, ch))
            && tokio::time::Instant::now() < end
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn owned(&self, stream: &str) -> Option<Owned> {
        self.owned.lock().get(stream).cloned()
    }

    pub fn owned_streams(&self) -> Vec<(String, Owned)> {
        self.owned
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// A relay connection of `stream` opened (`true`) or ended.
    pub fn set_relayed(&self, stream: &str, open: bool) {
        let mut r = self.relayed.lock();
        if open {
            *r.entry(stream.to_string()).or_default() += 1;
        } else if let Some(n) = r.get_mut(stream) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                r.remove(stream);
            }
        }
    }

    /// Whether a channel of `stream` on this node may hold a provider
    /// connection (it is not relayed from another node).
    pub fn is_sourced_here(&self, stream: &str) -> bool {
        !self.relayed.lock().contains_key(stream)
    }

    /// (owned, relayed) channel counts.
    pub fn counts(&self) -> (usize, usize) {
        (self.owned.lock().len(), self.relayed.lock().len())
    }

    /// Runs `start` the first time only.
    pub fn start_listener(&self, start: impl FnOnce()) {
        self.listener.get_or_init(start);
    }

    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// Why an owner gave its channel up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Yield {
    /// The node lost (or is about to lose) its session.
    Fenced,
    /// `own:{s}` names another owner or epoch.
    Lost,
    /// The node is shutting down: the channel is handed over.
    Draining,
}

/// Watches over an owned channel until it must be given up (returns why),
/// and meanwhile shares its detection and failover position. Runs beside
/// the provider reader; the caller stops the reader on return.
pub async fn watch(c: &Cluster, ch: &Arc<Channel>, epoch: u64) -> Yield {
    let mut fence = c.fence_changes();
    fence.borrow_and_update();
    let mut fence_open = true;
    let mut shared = Shared::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = fence.changed(), if fence_open => {
                if r.is_ok() {
                    return Yield::Fenced;
                }
                fence_open = false;
            }
            _ = tick.tick() => {}
        }
        if !c.holds_session() {
            return Yield::Fenced;
        }
        // Redis unreachable (Err): the session fence decides.
        if let Ok(false) = super::ownership::still_mine(c, &ch.stream.id, epoch).await {
            return Yield::Lost;
        }
        shared.write(c, ch, epoch).await;
    }
}

/// What this owner last wrote to `stream:{s}`.
#[derive(Default)]
struct Shared {
    detected: Option<&'static str>,
    /// current_url and failover_attempts.
    source: Option<(String, u64)>,
}

impl Shared {
    async fn write(&mut self, c: &Cluster, ch: &Arc<Channel>, epoch: u64) {
        let detected = detected_of(ch);
        let f = ch.stream.failover();
        let source = (f.current_url.clone(), f.attempts);
        let source_changed = self.source.as_ref() != Some(&source) && ch.phase() == Phase::Live;
        if detected == self.detected && !source_changed {
            return;
        }
        let mut fields: Vec<(&str, String)> = Vec::new();
        if let Some(d) = detected {
            fields.push(("detected", d.to_string()));
        }
        if source_changed {
            // Every node's API shows these (`GET /streams`: m3u-editor reads
            // current_url and the failover fields wherever it asks).
            fields.extend(SharedSource::fields_of(&f));
        }
        if fields.is_empty() {
            return;
        }
        if write_fields(c, &ch.stream.id, epoch, &fields).await.is_ok() {
            self.detected = detected;
            if source_changed {
                self.source = Some(source);
            }
        }
    }
}

/// The stream's live/file/HLS detection as `stream:{s}.detected` holds it.
pub fn detected_of(ch: &Channel) -> Option<&'static str> {
    if ch.stream.is_detected_hls() {
        return Some("hls");
    }
    match ch.phase() {
        Phase::File => Some("file"),
        Phase::Hls => Some("hls"),
        Phase::Live => Some("live"),
        _ => None,
    }
}

/// Writes `stream:{s}` fields if `own:{s}` still holds `epoch` (one script:
/// a deposed owner's late write changes nothing).
pub async fn write_fields(
    c: &Cluster,
    stream: &str,
    epoch: u64,
    fields: &[(&str, String)],
) -> Result<bool, ClusterError> {
    let mut conn = c.redis().await?;
    let mut inv = WRITE_FIELDS_SCRIPT.key(c.keys().own(stream));
    inv.key(c.keys().stream(stream)).arg(epoch);
    for (k, v) in fields {
        inv.arg(*k).arg(v);
    }
    let done: i64 = c.run(inv.invoke_async(&mut conn)).await?;
    Ok(done == 1)
}

/// KEYS: own, stream. ARGV: epoch, then field, value pairs.
const WRITE_FIELDS: &str = r"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
";

static WRITE_FIELDS_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(WRITE_FIELDS));

/// Writes `stream:{s}` fields without an epoch (an API call's decision,
/// such as a forced failover, not an owner's).
pub async fn write_shared(
    c: &Cluster,
    stream: &str,
    fields: &[(&str, String)],
) -> Result<(), ClusterError> {
    let mut conn = c.redis().await?;
    let mut cmd = redis::cmd("HSET");
    cmd.arg(c.keys().stream(stream));
    for (k, v) in fields {
        cmd.arg(*k).arg(v);
    }
    let _: i64 = c.run(cmd.query_async(&mut conn)).await?;
    Ok(())
}

/// Records the channel's detection when it turned out not to be live
/// (file or HLS), so every node routes the stream alike.
pub async fn write_detected(c: &Cluster, ch: &Channel, epoch: u64) {
    if let Some(d) = detected_of(ch).filter(|d| *d != "live") {
        let _ = write_fields(c, &ch.stream.id, epoch, &[("detected", d.to_string())]).await;
    }
}

/// A new owner starts where the last one was: the shared source position
/// (no failover event for it) and detection. Best effort: without Redis
/// it starts at the stream's own position.
pub async fn adopt_shared(c: &Cluster, stream: &Stream) {
    let Some((detected, source)) = read_shared(c, &stream.id).await else {
        return;
    };
    apply_detected(stream, detected.as_deref());
    if let Some(src) = source {
        // Also when the URL is the same: the attempts and time recorded
        // there may be ahead of this copy's.
        if crate::upstream::sources::is_static_source(&stream.spec(), &src.url) {
            stream.adopt_source(src.index, &src.url, src.attempts, src.last_failover);
        }
    }
}

/// `stream:{s}` detected, and the source the last owner (or a forced
/// failover) recorded.
pub async fn read_shared(
    c: &Cluster,
    stream: &str,
) -> Option<(Option<String>, Option<SharedSource>)> {
    let mut conn = c.redis().await.ok()?;
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(c.keys().stream(stream))
        .arg("detected")
        .arg(&SharedSource::FIELDS[..]);
    let mut v: Vec<Option<String>> = c.run(cmd.query_async(&mut conn)).await.ok()?;
    v.resize(5, None);
    let text = |i: usize| v[i].clone().unwrap_or_default();
    let source = SharedSource::parse(&text(1), &text(2), &text(3), &text(4));
    Some((v[0].clone(), source))
}

/// Whether the owner at `epoch` recorded that the channel ended there
/// (every source failed): `stream:{s}.ended_epoch`.
pub async fn ended_under(c: &Cluster, stream: &str, epoch: u64) -> bool {
    let Ok(mut conn) = c.redis().await else {
        return false;
    };
    let mut cmd = redis::cmd("HGET");
    cmd.arg(c.keys().stream(stream)).arg("ended_epoch");
    let got: Result<Option<String>, _> = c.run(cmd.query_async(&mut conn)).await;
    matches!(got, Ok(Some(e)) if e == epoch.to_string())
}

/// Applies a shared detection to the local stream (file or HLS only: a
/// live channel is what the hub assumes anyway).
pub fn apply_detected(stream: &Stream, detected: Option<&str>) {
    match detected {
        Some("file") if stream.is_live().is_none() => stream.set_detected_live(false),
        Some("hls") => stream.set_detected_hls(),
        _ => {}
    }
}
