//! The one upstream task of a live channel. It opens the provider connection
//! (holding a provider lease while it is open), cuts the bytes at packet
//! boundaries, tracks PAT/PMT and keyframes, publishes chunks to the ring, and
//! on error, EOF, stall or a forced switch moves to the next source while the
//! viewers stay attached. After a switch the first chunk re-sends PAT/PMT and
//! carries the discontinuity indicator so players resync (ISO/IEC 13818-1
//! §2.4.3.5).
//!
//! Two optional helpers run beside the pump: a warm standby (`live.standby`)
//! that keeps the next source connected and buffered from its latest keyframe,
//! so a failover is a handover instead of a reconnect; and the return to the
//! primary after `live.primary_cooldown`.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::sources::Picker;
use super::{Channel, Phase};
use crate::app::App;
use crate::events::EventType;
use crate::metrics::{FailoverReason, UpstreamErrorKind};
use crate::provider::{Full, Lease};
use crate::registry::StreamSpec;
use crate::ts::{Aligner, DiscontinuityMarker, Scanner, PACKET_LEN};
use crate::upstream::sources as static_sources;

/// Ring chunks aim at this size, and each viewer gets one write per chunk.
/// Per-write cost dominates fan-out (DESIGN.md): at 1000 viewers of an
/// 8 Mbit/s channel, 128 KiB writes took ~0.45 core where 64 KiB took ~0.58
/// (benches/fanout.rs); larger ones gained nothing more.
const CHUNK_TARGET: usize = 128 * 1024;
/// ...but never hold bytes back longer than this (128 KiB of an 8 Mbit/s
/// channel take ~130 ms), so low-bitrate channels are not delayed much. The
/// first bytes of a connection go out at once: a cold start waits for nothing.
const FLUSH_AFTER: Duration = Duration::from_millis(150);
/// How long a channel waits for a provider lease held by a closing channel.
const LEASE_WAIT: Duration = Duration::from_secs(2);
/// A provider that says "too many connections" right after we closed one has
/// usually not noticed the close yet: ask again this often, for this long,
/// before treating the source as failed.
const BUSY_RETRY_EVERY: Duration = Duration::from_millis(150);
const BUSY_RETRY_FOR: Duration = Duration::from_secs(3);
/// Pause between rounds when every source is backing off.
const IDLE_ROUND: Duration = Duration::from_millis(500);
/// A standby keeps at most this much (from its latest keyframe): a GOP of a
/// 20 Mbit/s channel fits.
const STANDBY_CAP: usize = 8 * 1024 * 1024;
/// How long a handover may take before the standby counts as gone.
const HANDOVER_WAIT: Duration = Duration::from_secs(1);
/// A source's standby opens this long after the source connected: the
/// connection a switch just closed has gone at the provider by then (an
/// account that counts connections sees the close a moment late).
const STANDBY_SETTLE: Duration = Duration::from_secs(1);

type Body = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

/// An open provider connection, ready to pump.
struct Upstream {
    body: Body,
    lease: Lease,
    /// Bytes a standby already read (PAT/PMT + data from its last keyframe).
    backlog: Option<Bytes>,
}

struct Prepared {
    pos: usize,
    url: Url,
    up: Upstream,
}

enum Outcome {
    Cancelled,
    /// The source failed; `handover` is the standby ready to take over.
    Failed {
        reason: String,
        got_bytes: bool,
        handover: Option<Prepared>,
    },
    /// A planned switch to a connection opened beside the current one.
    Handover(Prepared),
    /// A planned switch without a spare connection (return to a primary of the
    /// same one-connection provider): the current source is not blamed.
    Switch(usize),
    /// The media came to its end (a resolver's video file played through):
    /// the channel ends, nothing failed.
    Finished,
}

/// Why a standby or a return probe has no connection.
enum Unready {
    /// The source failed: counted against it.
    Failed(String),
    /// No lease (its provider at its limit, or in cluster mode Redis
    /// unavailable): nothing wrong with the source, tried again later.
    NoLease,
}

impl From<OpenError> for Unready {
    fn from(e: OpenError) -> Unready {
        match e {
            OpenError::Failed(reason) => Unready::Failed(reason),
            OpenError::Full(..) => Unready::NoLease,
        }
    }
}

/// The return-to-primary probe. Aborted with the pump: a channel that was
/// fenced, closed or switched must not open the primary after all.
struct Probe(JoinHandle<Result<Prepared, Unready>>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How to go back to the primary.
enum Return {
    /// A probe connection is being opened beside the current one.
    Probe(Probe),
    /// No spare lease on a shared provider: drop the current source and connect.
    Switch,
    /// Not now (primary backing off, or its provider full).
    Later,
}

/// What the run loop does next.
enum Target {
    Connect(usize, Url),
    Use(Prepared),
}

pub async fn run(app: Arc<App>, ch: Arc<Channel>) {
    let stop = ch.cancel.clone();
    let mut reader = Reader::new(app, ch.clone());
    reader.run_provider(stop).await;
    ch.lease.lock().take();
}

/// How a channel's feed from another node ended ([`Reader::run_peer`]).
pub(crate) enum PeerEnd {
    /// Stopped (`stop` or the channel closed).
    Stopped,
    /// No valid TS for the stall window; the connection is still open and
    /// can be read on if the owner is still the owner.
    Stalled(PeerBody),
    /// The connection ended or failed.
    Broken(String),
}

/// The body of a relay connection from the channel's owner.
pub(crate) type PeerBody = Body;

impl Reader {
    /// A reader of `ch` that has served nothing yet.
    pub(crate) fn new(app: Arc<App>, ch: Arc<Channel>) -> Reader {
        let spec = ch.stream.spec();
        Reader {
            stop: ch.cancel.clone(),
            app,
            ch,
            spec,
            aligner: Aligner::new(),
            scanner: Scanner::new(),
            psi: None,
            marker: None,
            switched_at: None,
            left_primary: None,
            switch_reason: None,
            landed: None,
            resolved_from_cache: false,
            finished: false,
        }
    }

    /// Serves the provider's sources (primary, failovers, resolver) until
    /// `stop` is cancelled (`None`), or until the channel ends: every source
    /// failed for `live.give_up_after` or the media ended (`Some(reason)`,
    /// the phase is set and `stream_failed` sent). The provider lease is
    /// given back before it returns.
    pub(crate) async fn run_provider(&mut self, stop: CancellationToken) -> Option<String> {
        self.stop = stop;
        self.finished = false;
        let (app, ch) = (self.app.clone(), self.ch.clone());
        let spec = ch.stream.spec();
        self.spec = spec.clone();
        let urls = static_sources::static_sources(&spec);
        let current = ch.stream.failover().current_url;
        let start = urls.iter().position(|u| u.as_str() == current).unwrap_or(0);
        let mut picker = Picker::new(urls, start, app.config.live.retry_backoff);
        // Silence detection watches the channel beside the reader (a transcoded
        // channel is checked at its source).
        let silence = spec
            .silence
            .clone()
            .filter(|_| spec.transcode.is_none())
            .map(|s| tokio::spawn(crate::silence::watch(app.clone(), ch.clone(), s)));
        let outcome = self.run(&mut picker).await;
        if let Some(s) = silence {
            // Normally it ends with the channel; a channel that ended by itself
            // may not be closed yet. Its ffmpeg is killed and reaped on drop.
            s.abort();
        }
        ch.lease.lock().take();
        *ch.stream.health.lock() = picker.health.clone();
        if let Some(end) = &outcome {
            tracing::warn!(stream_id = %ch.stream.id, reason = %end, "live channel ended");
            ch.set_phase(Phase::Ended(end.clone()));
        }
        if self.finished {
            // Played to its end: viewers get the end of the stream, no failure.
            return outcome;
        }
        if let Some(error) = outcome.clone().or_else(|| match ch.phase() {
            Phase::Unavailable(code) => Some(format!(
                "no source could be opened (HTTP {code} to the client)"
            )),
            _ => None,
        }) {
            ch.stream.emit(
                EventType::StreamFailed,
                serde_json::json!({ "error": error, "error_type": "all_sources_failed", "mode": "live_hub" }),
            );
        }
        outcome
    }

    /// The next source (provider or peer) starts after a gap: its first
    /// chunk re-sends PAT/PMT and marks the discontinuity.
    pub(crate) fn note_switch(&mut self) {
        if self.ch.phase() != Phase::Connecting {
            self.switched_at.get_or_insert_with(Instant::now);
        }
    }

    /// Feeds the channel from another node's relay connection `body` (the
    /// owner's ring: PAT/PMT + keyframe first) until `stop`, a stall of
    /// `stall` or the end of the connection. Nothing here is the owner's:
    /// no lease, no events, no failover bookkeeping.
    pub(crate) async fn run_peer(
        &mut self,
        mut body: PeerBody,
        stall: Duration,
        stop: &CancellationToken,
    ) -> PeerEnd {
        if self.switched_at.is_some() {
            self.begin_switch();
        }
        if self.ch.phase() == Phase::Connecting {
            self.ch.set_phase(Phase::Live);
        }
        let mut pending = BytesMut::with_capacity(CHUNK_TARGET * 2);
        let mut flush_at: Option<tokio::time::Instant> = None;
        let mut progress_at = tokio::time::Instant::now();
        let mut any_bytes = false;
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    self.flush(&mut pending);
                    return PeerEnd::Stopped;
                }
                _ = wait_until(flush_at) => {
                    self.flush(&mut pending);
                    flush_at = None;
                }
                r = tokio::time::timeout_at(progress_at + stall, body.next()) => match r {
                    Err(_) => {
                        self.flush(&mut pending);
                        return PeerEnd::Stalled(body);
                    }
                    Ok(None) => {
                        self.flush(&mut pending);
                        return PeerEnd::Broken("the owner closed the relay".into());
                    }
                    Ok(Some(Err(e))) => {
                        self.flush(&mut pending);
                        return PeerEnd::Broken(format!("relay read error: {}", e.without_url()));
                    }
                    Ok(Some(Ok(b))) => {
                        self.app.metrics.bytes_in.inc_by(b.len() as u64);
                        let first = !any_bytes;
                        any_bytes = true;
                        let aligned = self.aligner.push_bytes(b);
                        if self.is_progress(&aligned) || first {
                            progress_at = tokio::time::Instant::now();
                        }
                        pending.extend_from_slice(&aligned);
                        if pending.len() >= CHUNK_TARGET || first {
                            self.flush(&mut pending);
                            flush_at = None;
                        } else if flush_at.is_none() && !pending.is_empty() {
                            flush_at = Some(tokio::time::Instant::now() + FLUSH_AFTER);
                        }
                    }
                }
            }
        }
    }
}

/// Sends one request to `url` without following redirects; a 3xx comes back
/// as `Ok` for [`open`] to follow. `Err((status, reason))`.
async fn connect_once(
    app: &App,
    spec: &StreamSpec,
    url: &Url,
) -> Result<reqwest::Response, (Option<u16>, String)> {
    let ua = app.user_agent_for(spec, url);
    // `hls_http` follows no redirects: each hop is opened by `open` under
    // the lease of the provider it goes to.
    let mut req = app
        .hls_http
        .get(url.clone())
        .header(http::header::USER_AGENT, ua)
        .header(http::header::ACCEPT_ENCODING, "identity");
    for (k, v) in app.headers_for(spec, url) {
        req = req.header(k, v);
    }
    let timeout = app.config.upstream.connect_timeout + app.config.upstream.read_timeout;
    let resp = tokio::time::timeout(timeout, req.send())
        .await
        .map_err(|_| {
            (
                None,
                "timed out waiting for the response header".to_string(),
            )
        })?
        .map_err(|e| {
            let reason = if e.is_connect() {
                "connect error".to_string()
            } else {
                format!("request error: {}", e.without_url())
            };
            (None, reason)
        })?;
    if !resp.status().is_success() && !resp.status().is_redirection() {
        let code = resp.status().as_u16();
        return Err((Some(code), format!("HTTP {code}")));
    }
    Ok(resp)
}

/// The metric labels of a failure reason.
fn classify(reason: &str) -> (FailoverReason, UpstreamErrorKind) {
    if reason.starts_with("no bytes") || reason.starts_with("no valid TS") {
        (FailoverReason::Stall, UpstreamErrorKind::Timeout)
    } else if reason.starts_with("provider closed") {
        (FailoverReason::Eof, UpstreamErrorKind::Read)
    } else if reason.starts_with("HTTP") {
        (FailoverReason::Status, UpstreamErrorKind::Status)
    } else if reason.starts_with("connect") {
        (FailoverReason::Connect, UpstreamErrorKind::Connect)
    } else if reason.starts_with("timed out") {
        (FailoverReason::Connect, UpstreamErrorKind::Timeout)
    } else if reason.starts_with("too many redirects") {
        (FailoverReason::Error, UpstreamErrorKind::Redirect)
    } else if reason.starts_with("forced") {
        (FailoverReason::Forced, UpstreamErrorKind::Read)
    } else if reason.starts_with("silence") {
        (FailoverReason::Silence, UpstreamErrorKind::Read)
    } else {
        (FailoverReason::Error, UpstreamErrorKind::Read)
    }
}

/// Connects, asking again while the provider answers "busy" (429, or 509 as
/// IPTV panels send for "max connections") for a short while.
async fn connect(app: &App, spec: &StreamSpec, url: &Url) -> Result<reqwest::Response, String> {
    let deadline = Instant::now() + BUSY_RETRY_FOR;
    loop {
        match connect_once(app, spec, url).await {
            Err((Some(429 | 509), _)) if Instant::now() < deadline => {
                tokio::time::sleep(BUSY_RETRY_EVERY).await;
            }
            Err((_, reason)) => return Err(reason),
            Ok(r) => return Ok(r),
        }
    }
}

/// The provider whose lease a connection to `url` for `spec` takes.
fn provider_of(app: &App, spec: &StreamSpec, url: &Url) -> Option<String> {
    // A transcoded channel holds no provider connection: its source does.
    if spec.transcode.is_some() {
        return None;
    }
    app.providers.for_stream(spec, url).map(|p| p.name.clone())
}

/// Why [`open`] gave up.
enum OpenError {
    /// The source failed (connect, status, redirect rules).
    Failed(String),
    /// A redirect led to a provider at its connection limit.
    Full(Full, Option<String>),
}

/// An opened source: the response, the lease of the provider it is
/// connected to, and that provider.
struct Opened {
    resp: reqwest::Response,
    lease: Lease,
    provider: Option<String>,
}

/// Opens `url`, holding `lease` (of `provider`), and follows redirects one
/// hop at a time: before connecting to a host of another provider, its lease
/// is taken (and the previous one given back). A provider a redirect lands
/// on so never sees a connection beyond its `max_connections`, not even for
/// the moment it would take to notice one after the fact.
async fn open(
    app: &App,
    spec: &StreamSpec,
    url: &Url,
    mut lease: Lease,
    mut provider: Option<String>,
    provider_of: impl Fn(&Url) -> Option<String>,
) -> Result<Opened, OpenError> {
    let mut url = url.clone();
    for _ in 0..=app.config.upstream.max_redirects {
        let resp = connect(app, spec, &url).await.map_err(OpenError::Failed)?;
        if !resp.status().is_redirection() {
            return Ok(Opened {
                resp,
                lease,
                provider,
            });
        }
        let next = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|loc| url.join(loc.trim()).ok())
            .ok_or_else(|| OpenError::Failed("redirect without a usable Location".into()))?;
        drop(resp);
        if !matches!(next.scheme(), "http" | "https") {
            return Err(OpenError::Failed(
                "redirect to a URL that is not http(s)".into(),
            ));
        }
        crate::upstream::guard::check_url(&next)
            .map_err(|refused| OpenError::Failed(refused.to_string()))?;
        let landed = provider_of(&next);
        if landed != provider {
            drop(lease);
            lease = app
                .leases
                .acquire(landed.as_deref(), Duration::ZERO)
                .await
                .map_err(|full| OpenError::Full(full, landed.clone()))?;
            provider = landed;
        }
        url = next;
    }
    Err(OpenError::Failed("too many redirects".into()))
}

/// A second source kept connected and buffered while the current one serves.
struct Standby {
    pos: usize,
    url: Url,
    ask: mpsc::Sender<oneshot::Sender<Upstream>>,
    task: JoinHandle<Unready>,
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Standby {
    /// Takes the standby's connection over, with what it buffered.
    async fn hand_over(self) -> Option<Prepared> {
        let (tx, rx) = oneshot::channel();
        self.ask.send(tx).await.ok()?;
        let up = tokio::time::timeout(HANDOVER_WAIT, rx).await.ok()?.ok()?;
        Some(Prepared {
            pos: self.pos,
            url: self.url.clone(),
            up,
        })
    }
}

/// Reads the standby source, keeping only data from its latest keyframe (with
/// its PAT/PMT), until asked to hand over or until it fails (returns why).
async fn standby_task(
    app: Arc<App>,
    spec: Arc<StreamSpec>,
    url: Url,
    lease: Option<Lease>,
    mut ask: mpsc::Receiver<oneshot::Sender<Upstream>>,
) -> Unready {
    let provider = provider_of(&app, &spec, &url);
    let lease = match lease_in_task(&app, provider.as_deref(), lease).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    let (resp, lease) = match open(&app, &spec, &url, lease, provider, |u| {
        provider_of(&app, &spec, u)
    })
    .await
    {
        Ok(o) if o.resp.content_length().is_some() => {
            return Unready::Failed("not a live stream".into())
        }
        Ok(o) => (o.resp, o.lease),
        Err(e) => return e.into(),
    };
    let stall = app.config.live.stall_timeout;
    let mut body: Body = Box::pin(resp.bytes_stream());
    let mut aligner = Aligner::new();
    let mut scanner = Scanner::new();
    let mut kept = BytesMut::new();
    loop {
        tokio::select! {
            Some(reply) = ask.recv() => {
                let mut backlog = BytesMut::new();
                if let Some(psi) = scanner.psi_prefix() {
                    backlog.extend_from_slice(&psi);
                }
                backlog.extend_from_slice(&kept);
                let _ = reply.send(Upstream { body, lease, backlog: Some(backlog.freeze()) });
                return Unready::Failed("handed over".into());
            }
            r = tokio::time::timeout(stall, body.next()) => match r {
                Err(_) => return Unready::Failed(format!("no bytes for {stall:?}")),
                Ok(None) => return Unready::Failed("provider closed the stream".into()),
                Ok(Some(Err(e))) => {
                    return Unready::Failed(format!("read error: {}", e.without_url()))
                }
                Ok(Some(Ok(b))) => {
                    let aligned = aligner.push_bytes(b);
                    let scan = scanner.scan(&aligned);
                    match scan.random_access.last() {
                        Some(i) => {
                            kept.clear();
                            kept.extend_from_slice(&aligned[i * PACKET_LEN..]);
                        }
                        None => kept.extend_from_slice(&aligned),
                    }
                    if kept.len() > STANDBY_CAP {
                        kept.clear();
                    }
                }
            }
        }
    }
}

/// The lease [`Reader::helper_lease`] left to a helper's task, taken now
/// (no wait: the helper is tried again later).
async fn lease_in_task(
    app: &App,
    provider: Option<&str>,
    lease: Option<Lease>,
) -> Result<Lease, Unready> {
    match lease {
        Some(l) => Ok(l),
        None => app
            .leases
            .acquire(provider, Duration::ZERO)
            .await
            .map_err(|_| Unready::NoLease),
    }
}

async fn wait_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

pub(crate) struct Reader {
    app: Arc<App>,
    /// Ends the provider connection (the channel's cancel token, or on a
    /// cluster node a child of it that ends when ownership is given up).
    stop: CancellationToken,
    ch: Arc<Channel>,
    spec: Arc<StreamSpec>,
    aligner: Aligner,
    scanner: Scanner,
    /// PAT + PMT of the current source, shared by every chunk.
    psi: Option<Bytes>,
    /// Set after a source switch until every PID was marked.
    marker: Option<DiscontinuityMarker>,
    /// When the last source was lost, for the failover gap.
    switched_at: Option<Instant>,
    /// When the channel left its primary, for `live.primary_cooldown`.
    left_primary: Option<Instant>,
    /// Why the next source is being connected, for `failover_triggered`.
    switch_reason: Option<String>,
    /// The provider a source's redirects landed on, for the connection
    /// about to be served (when it differs from the source URL's).
    landed: Option<Option<String>>,
    /// The resolver source being served was resolved earlier (its URL may
    /// have expired since).
    resolved_from_cache: bool,
    /// The channel ended because its media did ([`Outcome::Finished`]).
    finished: bool,
}

impl Reader {
    /// Runs until cancelled (`None`) or until every source failed for
    /// `give_up_after` (`Some(reason)`).
    async fn run(&mut self, picker: &mut Picker) -> Option<String> {
        let give_up = self.app.config.live.give_up_after;
        let mut outage: Option<Instant> = None;
        let mut last_error = String::from("no source");
        let mut resolver_calls = 0usize;
        // Failures before the channel ever went live, and whether all were "not found".
        let mut cold_failures = 0usize;
        let mut cold_all_not_found = true;
        // A resolver source re-resolved after its failure, not yet working again.
        let mut re_resolved = false;
        let mut target = picker.current().map(|(p, u)| Target::Connect(p, u.clone()));
        loop {
            if self.stop.is_cancelled() {
                return None;
            }
            let Some(t) = target.take() else {
                if outage.is_some_and(|t| t.elapsed() >= give_up) {
                    return Some(format!("every source failed: {last_error}"));
                }
                if let Some(u) = self.ask_resolver(picker, &last_error, resolver_calls).await {
                    resolver_calls += 1;
                    let p = picker.push(u.clone());
                    target = Some(Target::Connect(p, u));
                    continue;
                }
                let wait = picker
                    .next_retry_in()
                    .clamp(Duration::from_millis(50), IDLE_ROUND);
                tokio::select! {
                    _ = self.stop.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
                target = picker.advance().map(|(p, u)| Target::Connect(p, u));
                continue;
            };
            let pos = match &t {
                Target::Connect(p, _) => *p,
                Target::Use(prep) => prep.pos,
            };
            let outcome = match t {
                Target::Connect(p, u) => self.serve_source(picker, p, &u).await,
                Target::Use(prep) => self.serve(picker, prep).await,
            };
            match outcome {
                Outcome::Cancelled => return None,
                Outcome::Finished => {
                    self.finished = true;
                    return Some("the media ended".into());
                }
                Outcome::Handover(prep) => {
                    self.switch_reason = Some(if prep.pos == 0 {
                        "returning to the primary".into()
                    } else {
                        "handover".into()
                    });
                    tracing::info!(stream_id = %self.ch.stream.id, from = picker.index_of(pos), to = picker.index_of(prep.pos), "switching source by handover");
                    self.switched_at = Some(Instant::now());
                    picker.jump(prep.pos);
                    target = Some(Target::Use(prep));
                }
                Outcome::Switch(p) => {
                    self.switch_reason = Some("returning to the primary".into());
                    self.switched_at = Some(Instant::now());
                    picker.jump(p);
                    target = picker.url(p).cloned().map(|u| Target::Connect(p, u));
                }
                Outcome::Failed {
                    reason,
                    got_bytes,
                    handover,
                } => {
                    if self.stop.is_cancelled()
                        || matches!(self.ch.phase(), Phase::File | Phase::Hls | Phase::Full(_))
                    {
                        return None;
                    }
                    tracing::warn!(stream_id = %self.ch.stream.id, source = picker.index_of(pos), %reason, "live source failed");
                    let (why, kind) = classify(&reason);
                    if got_bytes {
                        re_resolved = false;
                    }
                    // A resolved media URL that worked, or came from the
                    // cache, may just have expired (signed CDN URLs): resolve
                    // the page again and retry it once before failing over.
                    if self.spec.resolver.is_some()
                        && !re_resolved
                        && (got_bytes || self.resolved_from_cache)
                        && !matches!(why, FailoverReason::Forced | FailoverReason::Silence)
                        && handover.is_none()
                    {
                        if let Some(u) = picker.url(pos).cloned() {
                            re_resolved = true;
                            let page = crate::resolvers::page_of(&self.spec, &u);
                            self.app.resolvers.forget(&self.ch.stream.id, &page);
                            tracing::info!(stream_id = %self.ch.stream.id, source = picker.index_of(pos), %reason, "resolved URL failed: resolving the page again");
                            self.switched_at.get_or_insert_with(Instant::now);
                            target = Some(Target::Connect(pos, u));
                            continue;
                        }
                    }
                    if !matches!(why, FailoverReason::Forced | FailoverReason::Silence) {
                        self.app.metrics.upstream_error(kind);
                    }
                    if self.ch.phase() != Phase::Connecting {
                        self.app.metrics.failover(why);
                    }
                    picker.fail(pos, &reason);
                    *self.ch.stream.health.lock() = picker.health.clone();
                    if self.ch.phase() == Phase::Connecting {
                        // Nobody got a byte yet: fail as fast as per-client
                        // proxying does once every source said no.
                        cold_failures += 1;
                        cold_all_not_found &= reason == "HTTP 404" || reason == "HTTP 410";
                        if cold_failures >= picker.len()
                            && self.spec.failover_resolver_url.is_none()
                        {
                            let code = if cold_all_not_found { 404 } else { 502 };
                            self.ch.set_phase(Phase::Unavailable(code));
                            return None;
                        }
                    }
                    if got_bytes || outage.is_none() {
                        outage = Some(Instant::now());
                    }
                    self.switch_reason = Some(reason.clone());
                    last_error = reason;
                    self.switched_at.get_or_insert_with(Instant::now);
                    target = match self.forced_target(picker) {
                        Some((p, u)) => Some(Target::Connect(p, u)),
                        None => match handover {
                            Some(prep) => {
                                picker.jump(prep.pos);
                                Some(Target::Use(prep))
                            }
                            None => picker.advance().map(|(p, u)| Target::Connect(p, u)),
                        },
                    };
                    let next = match &target {
                        Some(Target::Connect(p, _)) => Some(*p),
                        Some(Target::Use(prep)) => Some(prep.pos),
                        None => None,
                    };
                    if next.is_some_and(|p| p != pos) {
                        self.ch.failovers.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// A forced failover through the API already chose the stream's new source.
    fn forced_target(&self, picker: &mut Picker) -> Option<(usize, Url)> {
        let f = self.ch.stream.failover();
        let want = Url::parse(&f.current_url).ok()?;
        let (_, url) = picker.current()?;
        if *url == want {
            return None;
        }
        let p = picker.push(want.clone());
        Some((p, want))
    }

    async fn ask_resolver(&self, picker: &Picker, reason: &str, calls: usize) -> Option<Url> {
        // A few resolver rounds per static round: bounded, so a resolver naming
        // dead URLs cannot spin.
        if calls >= picker.len().max(1) * 4 {
            return None;
        }
        let resolver = self.spec.failover_resolver_url.as_deref()?;
        let f = self.ch.stream.failover();
        static_sources::ask_resolver(
            &self.app.http,
            resolver,
            &self.spec,
            &f.current_url,
            f.index,
            None,
            reason,
        )
        .await
    }

    fn provider_of(&self, url: &Url) -> Option<String> {
        provider_of(&self.app, &self.spec, url)
    }

    /// A lease on `provider`: at once if one is free, else after asking an
    /// idle channel of it to close (a zap on a one-connection account) and
    /// waiting up to [`LEASE_WAIT`]. None when it stays full.
    async fn lease(&self, provider: Option<String>) -> Option<Lease> {
        if let Ok(l) = self
            .app
            .leases
            .acquire(provider.as_deref(), Duration::ZERO)
            .await
        {
            return Some(l);
        }
        if let Some(p) = &provider {
            self.app.hub.free_idle(p, &self.ch.stream.id);
        }
        match self
            .app
            .leases
            .acquire(provider.as_deref(), LEASE_WAIT)
            .await
        {
            Ok(l) => Some(l),
            Err(full) => {
                self.note_full(full);
                None
            }
        }
    }

    /// A channel still connecting tells its viewers the provider is full.
    fn note_full(&self, full: Full) {
        if self.ch.phase() == Phase::Connecting {
            self.ch.set_phase(Phase::Full(full));
        }
    }

    /// Connects to one source and serves it until it fails or the channel closes.
    async fn serve_source(&mut self, picker: &mut Picker, pos: usize, url: &Url) -> Outcome {
        if let Some(c) = &self.app.cluster {
            if !crate::cluster::owner::may_open_provider(c) {
                // Fenced, or about to be: the owner gives the channel up.
                return Outcome::Cancelled;
            }
        }
        if let Some(t) = self.spec.transcode.clone() {
            return self.serve_transcode(picker, pos, url, &t).await;
        }
        if let Some(r) = self.spec.resolver.clone() {
            return self.serve_resolved(picker, pos, url, &r).await;
        }
        self.serve_http(picker, pos, url, url).await
    }

    /// Resolves the page `url` with streamlink or yt-dlp and serves the
    /// media URL it names (fetched like any source), or else the tool's
    /// stdout.
    async fn serve_resolved(
        &mut self,
        picker: &mut Picker,
        pos: usize,
        url: &Url,
        r: &crate::resolvers::ResolverSpec,
    ) -> Outcome {
        use crate::resolvers::{pipe, resolve, Resolved};
        let failed = |reason: String| Outcome::Failed {
            reason,
            got_bytes: false,
            handover: None,
        };
        let id = self.ch.stream.id.clone();
        let page = crate::resolvers::page_of(&self.spec, url);
        if let Err(why) = crate::resolvers::check_page(&page).await {
            return failed(why);
        }
        let resolved = tokio::select! {
            _ = self.stop.cancelled() => return Outcome::Cancelled,
            r = resolve::resolve(&self.app, &id, &self.spec, r, &page, false) => r,
        };
        let (media, cached) = match resolved {
            Ok(r) => r,
            Err(why) => return failed(format!("resolver: {why}")),
        };
        self.resolved_from_cache = cached;
        let mut remux = None;
        if let Resolved::Url(media) = media {
            if crate::resolvers::is_container_file(&media) {
                remux = Some(media);
            } else {
                let outcome = self.serve_http(picker, pos, url, &media).await;
                let Outcome::Failed { reason, .. } = &outcome else {
                    return outcome;
                };
                match reason.as_str() {
                    // A playlist behind the media URL: the tool plays it.
                    "hls" => {
                        self.app.resolvers.remember(&id, &page, Resolved::Pipe);
                    }
                    // A file that is not MPEG-TS: ffmpeg remuxes it.
                    "remux" => remux = Some(media),
                    _ => return outcome,
                }
                self.landed = None;
            }
        }
        if let Some(media) = &remux {
            // ffmpeg fetches it, not the hub: the same policy first.
            if let Err(why) = crate::resolvers::check_page(media.as_str()).await {
                return failed(why);
            }
        }
        let Some(lease) = self.lease(self.provider_of(url)).await else {
            return failed("provider at its connection limit".into());
        };
        let opened = tokio::select! {
            _ = self.stop.cancelled() => return Outcome::Cancelled,
            o = async {
                match &remux {
                    Some(media) => pipe::remux(&self.app, &id, &self.spec, media).await,
                    None => pipe::open(&self.app, &id, &self.spec, r, &page).await,
                }
            } => o,
        };
        let (body, first) = match opened {
            Ok(o) => o,
            Err(why) => return failed(format!("resolver: {why}")),
        };
        let up = Upstream {
            body,
            lease,
            backlog: Some(first),
        };
        let url = url.clone();
        let outcome = self.serve(picker, Prepared { pos, url, up }).await;
        match outcome {
            // ffmpeg played the whole file: a video's end, not a failure.
            Outcome::Failed {
                ref reason,
                got_bytes: true,
                ..
            } if remux.is_some() && reason == "provider closed the stream" => Outcome::Finished,
            o => o,
        }
    }

    /// Connects to `fetch` (the source `url` itself, or the media URL a
    /// resolver named for it) and serves it until it fails or the channel
    /// closes.
    async fn serve_http(
        &mut self,
        picker: &mut Picker,
        pos: usize,
        url: &Url,
        fetch: &Url,
    ) -> Outcome {
        let failed = |reason: &str| Outcome::Failed {
            reason: reason.to_string(),
            got_bytes: false,
            handover: None,
        };
        let provider = self.provider_of(fetch);
        let Some(lease) = self.lease(provider.clone()).await else {
            return failed("provider at its connection limit");
        };
        if self.stop.is_cancelled() {
            return Outcome::Cancelled;
        }
        let t0 = Instant::now();
        let opened = tokio::select! {
            _ = self.stop.cancelled() => return Outcome::Cancelled,
            r = open(&self.app, &self.spec, fetch, lease, provider, |u| self.provider_of(u)) => r,
        };
        self.app
            .metrics
            .upstream_connect_seconds
            .observe(t0.elapsed().as_secs_f64());
        // The connection that stays open is to the host the redirects ended
        // on, and its provider is the one whose limit counts.
        let Opened {
            resp,
            lease,
            provider: landed,
        } = match opened {
            Ok(o) => o,
            Err(OpenError::Failed(reason)) => return failed(&reason),
            Err(OpenError::Full(full, landed)) => {
                if let Some(p) = &landed {
                    self.app.hub.free_idle(p, &self.ch.stream.id);
                }
                self.note_full(full);
                return failed("provider at its connection limit");
            }
        };
        self.landed = Some(landed);
        let is_playlist = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.to_ascii_lowercase().contains("mpegurl"));
        if is_playlist && self.spec.resolver.is_some() {
            // The resolver's URL is a playlist: its tool plays it.
            return failed("hls");
        }
        if self.spec.resolver.is_some()
            && resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(crate::resolvers::is_container_type)
        {
            // MP4, WebM, ...: remuxed to MPEG-TS for the hub.
            return failed("remux");
        }
        if self.ch.phase() == Phase::Connecting && is_playlist {
            // An HLS playlist behind a URL that did not say so.
            self.ch.stream.set_detected_hls();
            self.ch.set_phase(Phase::Hls);
            return failed("hls");
        }
        if self.ch.phase() == Phase::Connecting
            && self.spec.live.is_none()
            && resp.content_length().is_some()
        {
            // A response with a length is a file, not a live channel. Per-client
            // proxying starts on the source that answered.
            if self.ch.stream.failover().current_url != url.as_str() {
                self.ch
                    .stream
                    .set_current(picker.index_of(pos), url.as_str());
            }
            self.ch.stream.set_detected_live(false);
            self.ch.set_phase(Phase::File);
            return failed("file");
        }
        let up = Upstream {
            body: Box::pin(resp.bytes_stream()),
            lease,
            backlog: None,
        };
        self.serve(
            picker,
            Prepared {
                pos,
                url: url.clone(),
                up,
            },
        )
        .await
    }

    /// Starts ffmpeg over the source channel and serves its output.
    async fn serve_transcode(
        &mut self,
        picker: &mut Picker,
        pos: usize,
        url: &Url,
        t: &crate::registry::TranscodeSpec,
    ) -> Outcome {
        use crate::transcode::source::{self, OpenError};
        let failed = |reason: String| Outcome::Failed {
            reason,
            got_bytes: false,
            handover: None,
        };
        let opened = tokio::select! {
            _ = self.stop.cancelled() => return Outcome::Cancelled,
            r = source::open(&self.app, &self.ch.stream.id, t) => r,
        };
        let (body, first) = match opened {
            Ok(o) => o,
            Err(OpenError::Full(max)) => {
                if self.ch.phase() == Phase::Connecting {
                    self.ch.set_phase(Phase::Full(crate::provider::Full {
                        provider: "ffmpeg (transcode.max_processes)".into(),
                        max_connections: u32::try_from(max).unwrap_or(u32::MAX),
                        reason: None,
                    }));
                }
                return failed("transcode.max_processes reached".into());
            }
            Err(OpenError::Failed(why)) => return failed(why),
        };
        let Ok(lease) = self.app.leases.try_acquire(None) else {
            return failed("no lease".into());
        };
        let up = Upstream {
            body,
            lease,
            backlog: Some(first),
        };
        let url = url.clone();
        self.serve(picker, Prepared { pos, url, up }).await
    }

    /// Serves an open connection: the channel's source from now on.
    async fn serve(&mut self, picker: &mut Picker, prep: Prepared) -> Outcome {
        let Prepared { pos, url, up } = prep;
        *self.ch.lease.lock() = Some(up.lease);
        self.ch.source_epoch.fetch_add(1, Ordering::AcqRel);
        *self.ch.provider.lock() = match self.landed.take() {
            Some(landed) => landed,
            None => self.provider_of(&url),
        };
        let index = picker.index_of(pos);
        if self.ch.stream.failover().current_url != url.as_str() {
            let reason = self
                .switch_reason
                .take()
                .unwrap_or_else(|| "source failed".into());
            self.ch.stream.record_failover(index, url.as_str(), &reason);
        }
        if self.switched_at.is_some() {
            self.begin_switch();
        }
        self.ch.stream.set_detected_live(true);
        if self.ch.phase() == Phase::Connecting {
            self.ch.set_phase(Phase::Live);
        }
        self.ch.stream.started(|| {
            serde_json::json!({
                "mode": "live_hub",
                "source_index": index,
                "url": url.as_str(),
            })
        });
        picker.ok(pos);
        *self.ch.stream.health.lock() = picker.health.clone();
        if pos == 0 {
            self.left_primary = None;
        } else {
            self.left_primary.get_or_insert_with(Instant::now);
        }
        tracing::info!(stream_id = %self.ch.stream.id, source = index, "live source connected");
        let mut pending = BytesMut::with_capacity(CHUNK_TARGET * 2);
        if let Some(b) = up.backlog {
            // Through the aligner: a child's first read (ffmpeg, a resolver)
            // ends wherever its pipe did, not on a packet boundary.
            let aligned = self.aligner.push_bytes(b);
            pending.extend_from_slice(&aligned);
            self.flush(&mut pending);
        }
        let outcome = self.pump(picker, pos, up.body, pending).await;
        // The connection is closed here: free the provider slot at once.
        self.ch.lease.lock().take();
        outcome
    }

    fn begin_switch(&mut self) {
        self.aligner.reset();
        self.scanner = Scanner::new();
        self.psi = None;
        self.marker = Some(DiscontinuityMarker::new(&[], None));
    }

    /// A lease for a helper connection (standby, return probe) on `provider`.
    /// `Ok(None)`: a limited provider in cluster mode, whose lease takes a
    /// Redis round trip the reader does not wait for: the helper's task
    /// takes it ([`lease_in_task`]).
    fn helper_lease(&self, provider: Option<&str>) -> Result<Option<Lease>, Full> {
        match self.app.leases.try_acquire(provider) {
            Ok(l) => Ok(Some(l)),
            Err(full) if self.app.cluster.is_some() && full.reason.is_some() => Ok(None),
            Err(full) => Err(full),
        }
    }

    /// Opens a standby on the next source, if configured and its provider has a
    /// free lease (most accounts allow one connection: then there is none).
    fn start_standby(&self, picker: &Picker, pos: usize) -> Option<Standby> {
        // A resolver's sources are pages, not media: no standby on them.
        if !self.app.config.live.standby || self.spec.resolver.is_some() {
            return None;
        }
        if let Some(c) = &self.app.cluster {
            if !crate::cluster::owner::may_open_provider(c) {
                return None;
            }
        }
        let (spos, url) = picker.peek_next(pos)?;
        let lease = self.helper_lease(self.provider_of(&url).as_deref()).ok()?;
        let (ask_tx, ask_rx) = mpsc::channel(1);
        let task = tokio::spawn(standby_task(
            self.app.clone(),
            self.spec.clone(),
            url.clone(),
            lease,
            ask_rx,
        ));
        tracing::debug!(stream_id = %self.ch.stream.id, source = picker.index_of(spos), "standby opened");
        Some(Standby {
            pos: spos,
            url,
            ask: ask_tx,
            task,
        })
    }

    /// Starts the return to the primary: a probe connection when its provider
    /// has a free lease, else (same provider, no spare slot) a plain switch.
    fn start_return(&self, picker: &Picker, pos: usize) -> Return {
        let Some(primary) = picker.url(0).cloned() else {
            return Return::Later;
        };
        if !picker.is_available(0) {
            return Return::Later;
        }
        if let Some(c) = &self.app.cluster {
            if !crate::cluster::owner::may_open_provider(c) {
                return Return::Later;
            }
        }
        if self.spec.resolver.is_some() {
            // The primary is a page to resolve: switch, resolving it.
            return Return::Switch;
        }
        let provider = self.provider_of(&primary);
        let same_provider = picker
            .url(pos)
            .is_some_and(|u| self.provider_of(u) == provider);
        let lease = match self.helper_lease(provider.as_deref()) {
            Ok(Some(lease)) => Some(lease),
            // No lease now, none to spare on the account in use: switch.
            Ok(None) | Err(_) if same_provider => return Return::Switch,
            Ok(None) => None,
            Err(_) => return Return::Later,
        };
        let (app, spec) = (self.app.clone(), self.spec.clone());
        Return::Probe(Probe(tokio::spawn(async move {
            let lease = lease_in_task(&app, provider.as_deref(), lease).await?;
            let opened = open(&app, &spec, &primary, lease, provider, |u| {
                provider_of(&app, &spec, u)
            })
            .await?;
            Ok(Prepared {
                pos: 0,
                url: primary,
                up: Upstream {
                    body: Box::pin(opened.resp.bytes_stream()),
                    lease: opened.lease,
                    backlog: None,
                },
            })
        })))
    }

    async fn pump(
        &mut self,
        picker: &mut Picker,
        pos: usize,
        mut body: Body,
        mut pending: BytesMut,
    ) -> Outcome {
        let live = self.app.config.live.clone();
        let mut flush_at: Option<tokio::time::Instant> = None;
        // Valid TS arrived from this source (not just bytes): what resets
        // the stall timer and, in `run`, the `give_up_after` clock.
        let mut got_bytes = false;
        let mut any_bytes = false;
        let mut progress_at = tokio::time::Instant::now();
        let mut last_byte_at = progress_at;
        let mut standby: Option<Standby> = None;
        let mut standby_retry = tokio::time::Instant::now() + STANDBY_SETTLE;
        let mut probe: Option<Probe> = None;
        let mut return_at = self
            .left_primary
            .filter(|_| pos != 0)
            .map(|t| tokio::time::Instant::from_std(t + live.primary_cooldown));
        loop {
            if standby.is_none() && live.standby && tokio::time::Instant::now() >= standby_retry {
                standby = self.start_standby(picker, pos);
                standby_retry = tokio::time::Instant::now() + live.retry_backoff;
            }
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Outcome::Cancelled,
                _ = self.ch.force_switch.notified() => {
                    self.flush(&mut pending);
                    let reason = self.ch.take_switch_reason().unwrap_or_else(|| "forced failover".into());
                    // A silent source goes to the next one in order, which is
                    // where a standby waits; the API may name another.
                    let handover = match standby.take() {
                        Some(sb) if reason.starts_with("silence") => sb.hand_over().await,
                        _ => None,
                    };
                    return Outcome::Failed { reason, got_bytes, handover };
                }
                why = async {
                    match standby.as_mut() {
                        Some(s) => (&mut s.task).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(sb) = standby.take() {
                        let failed = match why {
                            Ok(Unready::NoLease) => None,
                            Ok(Unready::Failed(w)) => Some(w),
                            Err(e) => Some(e.to_string()),
                        };
                        if let Some(why) = failed {
                            tracing::warn!(stream_id = %self.ch.stream.id, source = picker.index_of(sb.pos), reason = %why, "standby source failed");
                            picker.fail(sb.pos, &format!("standby: {why}"));
                            *self.ch.stream.health.lock() = picker.health.clone();
                        } else {
                            tracing::debug!(stream_id = %self.ch.stream.id, source = picker.index_of(sb.pos), "standby: no lease free on its provider");
                        }
                    }
                }
                _ = wait_until(return_at) => {
                    return_at = None;
                    // A standby on the primary is the cheapest way back.
                    if let Some(sb) = standby.take_if(|s| s.pos == 0) {
                        self.flush(&mut pending);
                        if let Some(prep) = sb.hand_over().await {
                            return Outcome::Handover(prep);
                        }
                    }
                    match self.start_return(picker, pos) {
                        Return::Probe(p) => probe = Some(p),
                        Return::Switch => {
                            self.flush(&mut pending);
                            return Outcome::Switch(0);
                        }
                        Return::Later => {}
                    }
                    if probe.is_none() {
                        return_at = Some(tokio::time::Instant::now() + live.primary_cooldown);
                    }
                }
                r = async {
                    match probe.as_mut() {
                        Some(p) => (&mut p.0).await,
                        None => std::future::pending().await,
                    }
                } => {
                    probe = None;
                    match r {
                        Ok(Ok(prep)) => {
                            self.flush(&mut pending);
                            return Outcome::Handover(prep);
                        }
                        Ok(Err(Unready::Failed(why))) => {
                            picker.fail(0, &why);
                            *self.ch.stream.health.lock() = picker.health.clone();
                        }
                        Ok(Err(Unready::NoLease)) | Err(_) => {}
                    }
                    return_at = Some(tokio::time::Instant::now() + live.primary_cooldown);
                }
                _ = wait_until(flush_at) => {
                    self.flush(&mut pending);
                    flush_at = None;
                }
                r = tokio::time::timeout_at(progress_at + live.stall_timeout, body.next()) => {
                    let reason = match r {
                        Err(_) if last_byte_at > progress_at => format!(
                            "no valid TS for {:?} (garbage, or too slow for whole packets)",
                            live.stall_timeout
                        ),
                        Err(_) => format!("no bytes for {:?}", live.stall_timeout),
                        Ok(None) => "provider closed the stream".into(),
                        Ok(Some(Err(e))) => format!("read error: {}", e.without_url()),
                        Ok(Some(Ok(b))) => {
                            self.app.metrics.bytes_in.inc_by(b.len() as u64);
                            let first = !any_bytes;
                            any_bytes = true;
                            last_byte_at = tokio::time::Instant::now();
                            let aligned = self.aligner.push_bytes(b);
                            if self.is_progress(&aligned) {
                                got_bytes = true;
                                progress_at = last_byte_at;
                            }
                            pending.extend_from_slice(&aligned);
                            if pending.len() >= CHUNK_TARGET || first {
                                self.flush(&mut pending);
                                flush_at = None;
                            } else if flush_at.is_none() && !pending.is_empty() {
                                flush_at = Some(tokio::time::Instant::now() + FLUSH_AFTER);
                            }
                            continue;
                        }
                    };
                    self.flush(&mut pending);
                    let handover = match standby.take() {
                        Some(sb) => sb.hand_over().await,
                        None => None,
                    };
                    return Outcome::Failed { reason, got_bytes, handover };
                }
            }
        }
    }

    /// Whether newly aligned bytes show the source is working: whole
    /// sync-aligned packets, the program's PAT/PMT known, and a packet of
    /// something other than PAT or padding (elementary stream payload or
    /// PCR). Garbage at full speed and a trickle of bytes that never makes
    /// a packet are not progress, so they stall and fail over.
    fn is_progress(&self, aligned: &[u8]) -> bool {
        self.psi.is_some()
            && aligned.chunks_exact(PACKET_LEN).any(|p| {
                let pid = (u16::from(p[1] & 0x1f) << 8) | u16::from(p[2]);
                pid != crate::ts::PAT_PID && pid != crate::ts::NULL_PID
            })
    }

    /// Publishes the pending bytes as one ring chunk.
    fn flush(&mut self, pending: &mut BytesMut) {
        if pending.is_empty() {
            return;
        }
        // A copy, and `pending` keeps its buffer from the start: the ring
        // writes the copy to its spool and frees it, so a channel holds one
        // chunk-sized buffer, not the two halves `split()` would leave.
        let mut data = Bytes::copy_from_slice(pending);
        pending.clear();
        if pending.capacity() > CHUNK_TARGET * 2 {
            // A burst (a provider catching up) grew it: give that back.
            *pending = BytesMut::with_capacity(CHUNK_TARGET * 2);
        }
        let after_switch = self.marker.is_some();
        if let Some(m) = &mut self.marker {
            data = m.process(&data);
            if m.is_done() {
                self.marker = None;
            }
        }
        let scan = self.scanner.scan(&data);
        if scan.psi_changed || self.psi.is_none() {
            self.psi = self.scanner.psi_prefix().map(Bytes::from);
        }
        let mut rap = scan.random_access.last().map(|i| i * PACKET_LEN);
        if let Some(t) = self.switched_at.take().filter(|_| after_switch) {
            // First bytes of the new source: lead with its PAT/PMT.
            if let Some(psi) = &self.psi {
                let mut b = BytesMut::with_capacity(psi.len() + data.len());
                b.extend_from_slice(psi);
                b.extend_from_slice(&data);
                rap = rap.map(|r| r + psi.len());
                data = b.freeze();
            }
            let gap = t.elapsed().as_millis() as u64;
            self.ch.last_gap_ms.store(gap, Ordering::Relaxed);
            self.app
                .metrics
                .failover_gap_seconds
                .observe(t.elapsed().as_secs_f64());
            tracing::info!(stream_id = %self.ch.stream.id, gap_ms = gap, "source switched, viewers kept");
        }
        self.ch.publish(data, rap, self.psi.clone());
    }
}
