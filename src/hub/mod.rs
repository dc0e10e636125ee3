//! The live hub: one provider connection per live channel, shared by every
//! viewer (R1, R2), clean joins at PAT/PMT + keyframe (R6), slow viewers
//! dropped without slowing anyone (ring cursors), teardown the moment the last
//! viewer leaves (R3), and failover while viewers stay connected (R4).
//!
//! `Hub` owns the channels; `reader` is the one upstream task per channel;
//! `ring` the shared chunk buffer; a [`Viewer`] is one client's cursor. The
//! proxy writes what a `Viewer` yields; nothing here touches a `Session`.

pub(crate) mod reader;
pub mod ring;
pub mod sources;
pub mod spool;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::provider::{Full, Lease};
use crate::registry::Stream;
use ring::{Read, Ring};

/// Where a channel is in its life, as viewers waiting to start see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The first upstream connection is being made.
    Connecting,
    /// Bytes flow (or the hub is failing over while viewers wait).
    Live,
    /// The first response was a file (it has a length): not for the hub.
    File,
    /// The first response was an HLS playlist: served by the HLS path.
    Hls,
    /// The stream's provider is at its connection limit.
    Full(Full),
    /// Every source failed for `live.give_up_after`, or the stream was deleted.
    Ended(String),
    /// Every source failed before a byte flowed: the status for the viewers
    /// waiting (404 when every source said not found, else 502).
    Unavailable(u16),
}

/// Why a viewer could not join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    File,
    Hls,
    Full(Full),
    Failed(String),
    /// No source could be opened; the status to answer.
    Unavailable(u16),
}

pub struct Channel {
    pub stream: Arc<Stream>,
    ring: RwLock<Ring>,
    seq_tx: watch::Sender<u64>,
    phase_tx: watch::Sender<Phase>,
    /// Changed only under the hub's channel-map lock.
    viewers: AtomicUsize,
    cancel: CancellationToken,
    /// The provider lease of the open upstream connection.
    lease: Mutex<Option<Lease>>,
    /// Provider of the current source, for freeing idle channels.
    provider: Mutex<Option<String>>,
    /// Woken by `POST /streams/{id}/failover`.
    force_switch: Notify,
    pub created: Instant,
    pub failovers: AtomicU64,
    pub dropped_viewers: AtomicU64,
    /// Source switches seen by viewers: (gap in ms) of the last one.
    pub last_gap_ms: AtomicU64,
    /// Why the next switch is asked for (`force_switch`), when not the API.
    switch_reason: Mutex<Option<String>>,
    /// Counts connections served, so helpers see the source change.
    source_epoch: AtomicU64,
}

impl Channel {
    fn new(app: &App, stream: Arc<Stream>) -> Self {
        let live = &app.config.live;
        Channel {
            stream,
            ring: RwLock::new(new_ring(live)),
            seq_tx: watch::Sender::new(0),
            phase_tx: watch::Sender::new(Phase::Connecting),
            viewers: AtomicUsize::new(0),
            cancel: CancellationToken::new(),
            lease: Mutex::new(None),
            provider: Mutex::new(None),
            force_switch: Notify::new(),
            created: Instant::now(),
            failovers: AtomicU64::new(0),
            dropped_viewers: AtomicU64::new(0),
            last_gap_ms: AtomicU64::new(0),
            switch_reason: Mutex::new(None),
            source_epoch: AtomicU64::new(0),
        }
    }

    /// Asks the reader to switch to the next source now, for `reason` (as
    /// `failover_triggered` and the failover metric name it).
    pub fn request_failover(&self, reason: &str) {
        *self.switch_reason.lock() = Some(reason.to_string());
        self.force_switch.notify_one();
    }

    /// Why the pending forced switch was asked for (`None`: the API).
    fn take_switch_reason(&self) -> Option<String> {
        self.switch_reason.lock().take()
    }

    /// Changes each time the reader starts serving a connection.
    pub fn source_epoch(&self) -> u64 {
        self.source_epoch.load(Ordering::Acquire)
    }

    /// Cancelled when the channel closes.
    pub(crate) fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Resolves when the channel closes.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Follows the channel's phase.
    pub fn phase_watch(&self) -> watch::Receiver<Phase> {
        self.phase_tx.subscribe()
    }

    pub fn viewers(&self) -> usize {
        self.viewers.load(Ordering::Acquire)
    }

    pub fn phase(&self) -> Phase {
        self.phase_tx.borrow().clone()
    }

    pub(crate) fn set_phase(&self, p: Phase) {
        self.phase_tx.send_replace(p);
    }

    fn publish(&self, data: Bytes, rap: Option<usize>, psi: Option<Bytes>) {
        let next = {
            let mut ring = self.ring.write();
            ring.push(data, rap, psi);
            ring.next_seq()
        };
        self.seq_tx.send_replace(next);
    }

    /// Stops the reader and frees the provider lease now; the socket closes as
    /// soon as the reader task wakes.
    fn close(&self) {
        self.cancel.cancel();
        self.lease.lock().take();
    }

    pub fn is_closed(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The channel no longer has a provider connection of its own (its
    /// source moved to another node).
    pub(crate) fn clear_provider(&self) {
        self.provider.lock().take();
    }

    /// The provider of the current source, if it has one.
    pub fn provider_name(&self) -> Option<String> {
        self.provider.lock().clone()
    }
}

#[derive(Default)]
pub struct Hub {
    channels: Mutex<HashMap<String, Arc<Channel>>>,
    pub slow_viewers_dropped: AtomicU64,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn channel(&self, stream_id: &str) -> Option<Arc<Channel>> {
        self.channels.lock().get(stream_id).cloned()
    }

    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.channels.lock().values().cloned().collect()
    }

    /// Joins the stream's channel, opening it (and its one provider connection)
    /// when this is the first viewer. Waits until bytes can flow.
    pub async fn join(
        self: &Arc<Self>,
        app: &Arc<App>,
        stream: &Arc<Stream>,
    ) -> Result<Viewer, JoinError> {
        self.join_with(app, stream, None).await
    }

    /// Joins `ch` if it is still the stream's open channel (`None` when it is
    /// not): another node's relay keeps an owned channel open, never opens one.
    pub async fn join_open(
        self: &Arc<Self>,
        app: &Arc<App>,
        ch: &Arc<Channel>,
    ) -> Option<Result<Viewer, JoinError>> {
        match self.channel(&ch.stream.id) {
            Some(c) if Arc::ptr_eq(&c, ch) && !c.is_closed() => {}
            _ => return None,
        }
        let stream = ch.stream.clone();
        Some(self.join_with(app, &stream, Some(ch)).await)
    }

    async fn join_with(
        self: &Arc<Self>,
        app: &Arc<App>,
        stream: &Arc<Stream>,
        only: Option<&Arc<Channel>>,
    ) -> Result<Viewer, JoinError> {
        let ch = {
            let mut map = self.channels.lock();
            match map.get(&stream.id) {
                Some(c)
                    if !c.is_closed()
                        && Arc::ptr_eq(&c.stream, stream)
                        && only.is_none_or(|o| Arc::ptr_eq(o, c)) =>
                {
                    c.viewers.fetch_add(1, Ordering::AcqRel);
                    c.clone()
                }
                _ if only.is_some() => {
                    return Err(JoinError::Failed("channel closed".into()));
                }
                _ => {
                    let c = Arc::new(Channel::new(app, stream.clone()));
                    c.viewers.store(1, Ordering::Release);
                    map.insert(stream.id.clone(), c.clone());
                    if app.cluster.is_some() {
                        // Owner or relay of the channel: cluster/relay.rs decides.
                        tokio::spawn(crate::cluster::relay::run(app.clone(), c.clone()));
                    } else {
                        tokio::spawn(reader::run(app.clone(), c.clone()));
                    }
                    tracing::info!(stream_id = %stream.id, "live channel opened");
                    c
                }
            }
        };
        let mut viewer = Viewer {
            hub: self.clone(),
            counted: true,
            linger: app.config.live.linger,
            seq_rx: ch.seq_tx.subscribe(),
            phase_rx: ch.phase_tx.subscribe(),
            ch,
            cursor: 0,
            first: None,
            awaiting_keyframe: None,
        };
        loop {
            let phase = viewer.phase_rx.borrow_and_update().clone();
            match phase {
                Phase::Live => break,
                Phase::Connecting => {
                    if viewer.phase_rx.changed().await.is_err() {
                        return Err(JoinError::Failed("channel closed".into()));
                    }
                }
                Phase::File => return Err(JoinError::File),
                Phase::Hls => return Err(JoinError::Hls),
                Phase::Full(f) => return Err(JoinError::Full(f)),
                Phase::Ended(why) => return Err(JoinError::Failed(why)),
                Phase::Unavailable(code) => return Err(JoinError::Unavailable(code)),
            }
        }
        let join = viewer.ch.ring.read().join(KEYFRAME_WAIT);
        viewer.first = join.first;
        viewer.cursor = join.cursor;
        viewer.awaiting_keyframe = join.await_keyframe.then(Instant::now);
        Ok(viewer)
    }

    /// A cursor at the live edge of a live channel that is not a viewer: it
    /// neither keeps the channel open nor shows in its counts (the silence
    /// check reads through one). `None` unless the channel is live.
    pub fn tap(self: &Arc<Self>, ch: &Arc<Channel>) -> Option<Viewer> {
        if ch.is_closed() || ch.phase() != Phase::Live {
            return None;
        }
        let (first, cursor) = {
            let ring = ch.ring.read();
            let join = ring.join(KEYFRAME_WAIT);
            // A tap reads audio: it need not wait for a keyframe.
            let first = join.first.or_else(|| ring.psi());
            (first, join.cursor)
        };
        Some(Viewer {
            hub: self.clone(),
            counted: false,
            ch: ch.clone(),
            linger: std::time::Duration::ZERO,
            cursor,
            first,
            awaiting_keyframe: None,
            seq_rx: ch.seq_tx.subscribe(),
            phase_rx: ch.phase_tx.subscribe(),
        })
    }

    /// Closes channels of `provider` nobody watches (lingering), so their
    /// leases go to a channel someone wants now. Returns how many.
    pub fn free_idle(&self, provider: &str, except: &str) -> usize {
        let mut map = self.channels.lock();
        let idle: Vec<String> = map
            .iter()
            .filter(|(id, c)| {
                id.as_str() != except
                    && c.viewers() == 0
                    && c.provider.lock().as_deref() == Some(provider)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &idle {
            if let Some(c) = map.remove(id) {
                tracing::info!(stream_id = %id, provider, "idle channel closed to free its provider lease");
                c.close();
            }
        }
        idle.len()
    }

    /// Closes a stream's channel (stream deleted): its viewers end.
    pub fn close(&self, stream_id: &str) {
        if let Some(c) = self.channels.lock().remove(stream_id) {
            c.set_phase(Phase::Ended("stream deleted".into()));
            c.close();
        }
    }

    /// Asks a running channel to switch source now. False when none runs.
    pub fn force_failover(&self, stream_id: &str) -> bool {
        match self.channel(stream_id) {
            Some(c) if !c.is_closed() => {
                c.force_switch.notify_one();
                true
            }
            _ => false,
        }
    }

    fn leave(self: &Arc<Self>, ch: &Arc<Channel>, linger: std::time::Duration) {
        let mut map = self.channels.lock();
        let left = ch.viewers.fetch_sub(1, Ordering::AcqRel) - 1;
        if left > 0 {
            return;
        }
        if linger.is_zero() {
            if map.get(&ch.stream.id).is_some_and(|c| Arc::ptr_eq(c, ch)) {
                map.remove(&ch.stream.id);
            }
            drop(map);
            tracing::info!(stream_id = %ch.stream.id, "last viewer left: live channel closed");
            ch.close();
            return;
        }
        drop(map);
        let (hub, ch) = (self.clone(), ch.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(linger).await;
                let mut map = hub.channels.lock();
                if ch.viewers() == 0 {
                    if map.get(&ch.stream.id).is_some_and(|c| Arc::ptr_eq(c, &ch)) {
                        map.remove(&ch.stream.id);
                    }
                    drop(map);
                    tracing::info!(stream_id = %ch.stream.id, "linger over: live channel closed");
                    ch.close();
                }
            });
        } else {
            ch.close();
        }
    }
}

/// How long a viewer's socket may accept nothing before the viewer is
/// dropped as stuck (so also the longest it holds a span of the spool).
pub fn write_timeout(live: &crate::config::LiveConfig) -> std::time::Duration {
    live.ring_seconds.max(std::time::Duration::from_secs(2))
}

/// How long a viewer that joined between keyframes (a GOP longer than the
/// ring) waits for the next one before it is started without: a source that
/// stopped sending recognisable keyframes must not leave it without bytes.
const KEYFRAME_WAIT: std::time::Duration = std::time::Duration::from_secs(12);

/// A channel's ring, kept in an in-memory file when the system has one.
fn new_ring(live: &crate::config::LiveConfig) -> Ring {
    let ring = Ring::new(live.ring_bytes, live.ring_seconds);
    match spool::Spool::new() {
        Ok(s) => ring.with_spool(Arc::new(s)),
        Err(e) => {
            tracing::debug!(error = %e, "no live spool: viewers are written from memory");
            ring
        }
    }
}

/// What a viewer gets next.
#[derive(Debug)]
pub enum Next {
    Data(Bytes),
    /// The next bytes as a span of the channel's spool, for sendfile().
    Span(spool::Span),
    /// Fell behind the ring: too slow, dropped.
    Lagged,
    /// The channel ended (every source failed, or the stream was deleted).
    Ended,
}

/// One client's cursor into a channel. Dropping it leaves the channel.
pub struct Viewer {
    hub: Arc<Hub>,
    /// A viewer (false: a tap, see [`Hub::tap`]).
    counted: bool,
    ch: Arc<Channel>,
    linger: std::time::Duration,
    cursor: u64,
    first: Option<Bytes>,
    /// Joined between keyframes: since when it waits for the next one.
    awaiting_keyframe: Option<Instant>,
    seq_rx: watch::Receiver<u64>,
    phase_rx: watch::Receiver<Phase>,
}

impl Viewer {
    pub fn channel(&self) -> &Arc<Channel> {
        &self.ch
    }

    /// Counts this viewer as dropped for being too slow.
    pub fn count_slow_drop(&self) {
        self.ch.dropped_viewers.fetch_add(1, Ordering::Relaxed);
        self.hub
            .slow_viewers_dropped
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Up to about `max` bytes; waits for the reader when there is nothing new.
    pub async fn next(&mut self, max: usize) -> Next {
        if let Some(f) = self.first.take() {
            return Next::Data(f);
        }
        loop {
            self.seq_rx.borrow_and_update();
            if let Some(since) = self.awaiting_keyframe {
                let ring = self.ch.ring.read();
                match ring.seek_keyframe(self.cursor) {
                    ring::Seek::Found(first, next) => {
                        self.awaiting_keyframe = None;
                        self.cursor = next;
                        return Next::Data(first);
                    }
                    ring::Seek::Wait(next) => {
                        self.cursor = next;
                        if since.elapsed() >= KEYFRAME_WAIT {
                            // No keyframe came: start at the live edge anyway.
                            self.awaiting_keyframe = None;
                            if let Some(psi) = ring.psi() {
                                return Next::Data(psi);
                            }
                        }
                    }
                }
            }
            if self.awaiting_keyframe.is_some() {
                // Wait below for more data.
            } else {
                match self.ch.ring.read().read(self.cursor, max) {
                    Read::Data(b, next) => {
                        self.cursor = next;
                        return Next::Data(b);
                    }
                    Read::Span(span, next) => {
                        self.cursor = next;
                        return Next::Span(span);
                    }
                    Read::Lagged => {
                        if self.counted {
                            self.count_slow_drop();
                        }
                        return Next::Lagged;
                    }
                    Read::Empty => {}
                }
            }
            if matches!(
                *self.phase_rx.borrow(),
                Phase::Ended(_) | Phase::Unavailable(_)
            ) || self.ch.is_closed()
            {
                return Next::Ended;
            }
            tokio::select! {
                r = self.seq_rx.changed() => if r.is_err() { return Next::Ended },
                r = self.phase_rx.changed() => if r.is_err() { return Next::Ended },
            }
        }
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        if self.counted {
            self.hub.leave(&self.ch, self.linger);
        }
    }
}
