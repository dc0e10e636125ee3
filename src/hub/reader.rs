//! The one upstream task of a live channel. It opens the provider connection
//! (holding a provider lease while it is open), cuts the bytes at packet
//! boundaries, tracks PAT/PMT and keyframes, publishes chunks to the ring, and
//! on error, EOF, stall or a forced switch moves to the next source while the
//! viewers stay attached. After a switch the first chunk re-sends PAT/PMT and
//! carries the discontinuity indicator so players resync (ISO/IEC 13818-1
//! §2.4.3.5).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use url::Url;

use super::sources::Picker;
use super::{Channel, Phase};
use crate::app::App;
use crate::registry::StreamSpec;
use crate::ts::{Aligner, DiscontinuityMarker, Scanner};
use crate::upstream::sources as static_sources;

/// Ring chunks aim at this size: viewers then write ~64 KiB per send(), the
/// batch size DESIGN.md measured as cheapest for fan-out.
const CHUNK_TARGET: usize = 64 * 1024;
/// ...but never hold bytes back longer than this, so low-bitrate channels and
/// cold starts are not delayed.
const FLUSH_AFTER: Duration = Duration::from_millis(30);
/// How long a channel waits for a provider lease held by a closing channel.
const LEASE_WAIT: Duration = Duration::from_secs(2);
/// A provider that says "too many connections" right after we closed one has
/// usually not noticed the close yet: ask again this often, for this long,
/// before treating the source as failed.
const BUSY_RETRY_EVERY: Duration = Duration::from_millis(150);
const BUSY_RETRY_FOR: Duration = Duration::from_secs(3);
/// Pause between rounds when every source is backing off.
const IDLE_ROUND: Duration = Duration::from_millis(500);

enum Outcome {
    Cancelled,
    Failed { reason: String, got_bytes: bool },
}

pub async fn run(app: Arc<App>, ch: Arc<Channel>) {
    let spec = ch.stream.spec();
    let urls = static_sources::static_sources(&spec);
    let current = ch.stream.failover().current_url;
    let start = urls.iter().position(|u| u.as_str() == current).unwrap_or(0);
    let mut picker = Picker::new(urls, start, app.config.live.retry_backoff);
    let mut reader = Reader {
        app: app.clone(),
        ch: ch.clone(),
        spec,
        aligner: Aligner::new(),
        scanner: Scanner::new(),
        psi: None,
        marker: None,
        switched_at: None,
    };
    let outcome = reader.run(&mut picker).await;
    *ch.stream.health.lock() = picker.health.clone();
    if let Some(end) = outcome {
        tracing::warn!(stream_id = %ch.stream.id, reason = %end, "live channel ended");
        ch.set_phase(Phase::Ended(end));
    }
    ch.lease.lock().take();
}

struct Reader {
    app: Arc<App>,
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
}

impl Reader {
    /// Runs until cancelled (`None`) or until every source failed for
    /// `give_up_after` (`Some(reason)`).
    async fn run(&mut self, picker: &mut Picker) -> Option<String> {
        let give_up = self.app.config.live.give_up_after;
        let mut outage: Option<Instant> = None;
        let mut last_error = String::from("no source");
        let mut resolver_calls = 0usize;
        // Failures before the channel ever went live: (all were "not found").
        let mut cold_failures = 0usize;
        let mut cold_all_not_found = true;
        let mut target = picker.current().map(|(p, u)| (p, u.clone()));
        loop {
            if self.ch.is_closed() {
                return None;
            }
            let Some((pos, url)) = target.take() else {
                if outage.is_some_and(|t| t.elapsed() >= give_up) {
                    return Some(format!("every source failed: {last_error}"));
                }
                if let Some(u) = self.ask_resolver(picker, &last_error, resolver_calls).await {
                    resolver_calls += 1;
                    let p = picker.push(u.clone());
                    target = Some((p, u));
                    continue;
                }
                let wait = picker
                    .next_retry_in()
                    .clamp(Duration::from_millis(50), IDLE_ROUND);
                tokio::select! {
                    _ = self.ch.cancel.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
                target = picker.advance();
                continue;
            };
            match self.serve_source(picker, pos, &url).await {
                Outcome::Cancelled => return None,
                Outcome::Failed { reason, got_bytes } => {
                    if self.ch.is_closed() {
                        return None;
                    }
                    if matches!(self.ch.phase(), Phase::File | Phase::Full(_)) {
                        return None;
                    }
                    tracing::warn!(stream_id = %self.ch.stream.id, source = picker.index_of(pos), %reason, "live source failed");
                    picker.fail(pos, &reason);
                    *self.ch.stream.health.lock() = picker.health.clone();
                    if got_bytes || outage.is_none() {
                        outage = Some(Instant::now());
                    }
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
                    last_error = reason;
                    self.switched_at.get_or_insert_with(Instant::now);
                    target = self.forced_target(picker).or_else(|| picker.advance());
                    if let Some((p, _)) = &target {
                        if *p != pos {
                            self.ch.failovers.fetch_add(1, Ordering::Relaxed);
                        }
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
        // One resolver round per static round: bounded, so a resolver naming
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

    /// Connects to one source and pumps it until it fails or the channel closes.
    async fn serve_source(&mut self, picker: &mut Picker, pos: usize, url: &Url) -> Outcome {
        let index = picker.index_of(pos);
        let provider = self
            .app
            .providers
            .for_stream(&self.spec, url)
            .map(|p| p.name.clone());
        let lease = match self.app.leases.try_acquire(provider.as_deref()) {
            Ok(l) => l,
            Err(_) => {
                if let Some(p) = &provider {
                    self.app.hub.free_idle(p, &self.ch.stream.id);
                }
                match self
                    .app
                    .leases
                    .acquire(provider.as_deref(), LEASE_WAIT)
                    .await
                {
                    Ok(l) => l,
                    Err(full) => {
                        if self.ch.phase() == Phase::Connecting {
                            self.ch.set_phase(Phase::Full(full));
                        }
                        return Outcome::Failed {
                            reason: "provider at its connection limit".into(),
                            got_bytes: false,
                        };
                    }
                }
            }
        };
        if self.ch.is_closed() {
            return Outcome::Cancelled;
        }
        *self.ch.provider.lock() = provider;
        let resp = tokio::select! {
            _ = self.ch.cancel.cancelled() => return Outcome::Cancelled,
            r = self.connect(url) => r,
        };
        let resp = match resp {
            Ok(r) => r,
            Err(reason) => {
                return Outcome::Failed {
                    reason,
                    got_bytes: false,
                }
            }
        };
        if self.ch.phase() == Phase::Connecting
            && self.spec.live.is_none()
            && resp.content_length().is_some()
        {
            // A response with a length is a file, not a live channel. Per-client
            // proxying starts on the source that answered.
            if self.ch.stream.failover().current_url != url.as_str() {
                self.ch.stream.record_failover(index, url.as_str());
            }
            self.ch.stream.set_detected_live(false);
            self.ch.set_phase(Phase::File);
            return Outcome::Failed {
                reason: "file".into(),
                got_bytes: false,
            };
        }
        *self.ch.lease.lock() = Some(lease);
        let prev = self.ch.stream.failover();
        if prev.current_url != url.as_str() {
            self.ch.stream.record_failover(index, url.as_str());
        }
        if self.switched_at.is_some() {
            self.begin_switch();
        }
        self.ch.stream.set_detected_live(true);
        if self.ch.phase() == Phase::Connecting {
            self.ch.set_phase(Phase::Live);
        }
        picker.ok(pos);
        *self.ch.stream.health.lock() = picker.health.clone();
        tracing::info!(stream_id = %self.ch.stream.id, source = index, "live source connected");
        let outcome = self.pump(resp).await;
        // The connection is closed here: free the provider slot at once.
        self.ch.lease.lock().take();
        outcome
    }

    /// Connects, asking again while the provider answers "busy" (429, or 509
    /// as IPTV panels send for "max connections") for a short while.
    async fn connect(&self, url: &Url) -> Result<reqwest::Response, String> {
        let deadline = Instant::now() + BUSY_RETRY_FOR;
        loop {
            match self.connect_once(url).await {
                Err((Some(429 | 509), _)) if Instant::now() < deadline => {
                    tokio::time::sleep(BUSY_RETRY_EVERY).await;
                }
                Err((_, reason)) => return Err(reason),
                Ok(r) => return Ok(r),
            }
        }
    }

    async fn connect_once(&self, url: &Url) -> Result<reqwest::Response, (Option<u16>, String)> {
        let ua = self.app.user_agent_for(&self.spec, url);
        let mut req = self
            .app
            .http
            .get(url.clone())
            .header(http::header::USER_AGENT, ua)
            .header(http::header::ACCEPT_ENCODING, "identity");
        for (k, v) in self.app.headers_for(&self.spec, url) {
            req = req.header(k, v);
        }
        let timeout =
            self.app.config.upstream.connect_timeout + self.app.config.upstream.read_timeout;
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
                } else if e.is_redirect() {
                    "too many redirects".to_string()
                } else {
                    format!("request error: {}", e.without_url())
                };
                (None, reason)
            })?;
        if !resp.status().is_success() {
            let code = resp.status().as_u16();
            return Err((Some(code), format!("HTTP {code}")));
        }
        Ok(resp)
    }

    fn begin_switch(&mut self) {
        self.aligner.reset();
        self.scanner = Scanner::new();
        self.psi = None;
        self.marker = Some(DiscontinuityMarker::new(&[], None));
    }

    async fn pump(&mut self, resp: reqwest::Response) -> Outcome {
        let stall = self.app.config.live.stall_timeout;
        let mut body = resp.bytes_stream();
        let mut pending = BytesMut::with_capacity(CHUNK_TARGET * 2);
        let mut flush_at: Option<tokio::time::Instant> = None;
        let mut got_bytes = false;
        loop {
            let flush_timer = async {
                match flush_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.ch.cancel.cancelled() => return Outcome::Cancelled,
                _ = self.ch.force_switch.notified() => {
                    self.flush(&mut pending);
                    return Outcome::Failed { reason: "forced failover".into(), got_bytes };
                }
                _ = flush_timer => {
                    self.flush(&mut pending);
                    flush_at = None;
                }
                r = tokio::time::timeout(stall, body.next()) => match r {
                    Err(_) => {
                        self.flush(&mut pending);
                        return Outcome::Failed { reason: format!("no bytes for {stall:?}"), got_bytes };
                    }
                    Ok(None) => {
                        self.flush(&mut pending);
                        return Outcome::Failed { reason: "provider closed the stream".into(), got_bytes };
                    }
                    Ok(Some(Err(e))) => {
                        self.flush(&mut pending);
                        return Outcome::Failed { reason: format!("read error: {}", e.without_url()), got_bytes };
                    }
                    Ok(Some(Ok(b))) => {
                        got_bytes = true;
                        let aligned = self.aligner.push_bytes(b);
                        pending.extend_from_slice(&aligned);
                        if pending.len() >= CHUNK_TARGET {
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

    /// Publishes the pending bytes as one ring chunk.
    fn flush(&mut self, pending: &mut BytesMut) {
        if pending.is_empty() {
            return;
        }
        let mut data = pending.split().freeze();
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
        let mut rap = scan.random_access.last().map(|i| i * crate::ts::PACKET_LEN);
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
            tracing::info!(stream_id = %self.ch.stream.id, gap_ms = gap, "failover complete, viewers kept");
        }
        self.ch.publish(data, rap, self.psi.clone());
    }
}
