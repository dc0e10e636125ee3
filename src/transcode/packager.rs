//! HLS from a live hub channel, in memory: for transcoding templates that
//! ask for HLS (`-f hls`, `-hls_time`), which m3u-editor then plays from
//! `/hls/{id}/playlist.m3u8`.
//!
//! ffmpeg still writes MPEG-TS to the hub (so `/stream/{id}` and every other
//! viewer share it); the packager is one more viewer of that channel. It
//! cuts segments at keyframes once a segment is `hls_time` long (ffmpeg is
//! told to force a keyframe that often), each starting with PAT/PMT, keeps
//! the last few in memory and writes the playlist. Nothing touches the disk,
//! and segments are served by signed reference like any HLS, never by path.
//! It runs while the stream has clients and stops when they are gone.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::app::App;
use crate::hub::Next;
use crate::registry::Stream;
use crate::ts::{Scanner, PACKET_LEN};

/// Segments kept beyond the playlist, for players a little behind.
const SPARE_SEGMENTS: usize = 3;
/// Playlist length when the template did not say (and its upper bound).
const DEFAULT_LIST: usize = 6;
const MAX_LIST: usize = 30;
/// A segment is cut at the first keyframe after this multiple of hls_time
/// at the latest, keyframe or not (a source whose GOP is longer than that).
const FORCE_CUT_AFTER: f64 = 3.0;
/// Bytes arrive in chunks, a little before or after their media time: a
/// keyframe this close to hls_time (as a fraction of it) ends the segment,
/// so forced keyframes every hls_time do not make segments twice as long.
const CUT_TOLERANCE: f64 = 0.75;
/// How long the packager outlives the stream's last client.
const IDLE_STOP: Duration = Duration::from_secs(3);
/// Bytes one segment may hold (a 20 Mbit/s channel's 10 s fit).
const MAX_SEGMENT: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Segment {
    pub seq: u64,
    pub duration: f64,
    pub data: Bytes,
}

#[derive(Debug)]
pub struct Packager {
    target: f64,
    list: usize,
    segments: Mutex<VecDeque<Segment>>,
    /// The number of segments made so far (the next sequence number).
    made: watch::Sender<u64>,
    ended: watch::Sender<bool>,
}

impl Packager {
    fn new(target: f64, list: usize) -> Self {
        Packager {
            target,
            list: list.clamp(2, MAX_LIST),
            segments: Mutex::new(VecDeque::new()),
            made: watch::channel(0).0,
            ended: watch::channel(false).0,
        }
    }

    /// Waits until at least `n` segments exist, the packager ended, or `wait`
    /// passed. Whether they exist.
    pub async fn ready(&self, n: u64, wait: Duration) -> bool {
        let mut made = self.made.subscribe();
        let mut ended = self.ended.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if *made.borrow_and_update() >= n {
                return true;
            }
            if *ended.borrow_and_update() {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return false,
                r = made.changed() => if r.is_err() { return false },
                r = ended.changed() => if r.is_err() { return false },
            }
        }
    }

    pub fn is_ended(&self) -> bool {
        *self.ended.borrow()
    }

    /// The segment `seq`, while kept.
    pub fn segment(&self, seq: u64) -> Option<Segment> {
        self.segments.lock().iter().find(|s| s.seq == seq).cloned()
    }

    /// The media playlist: `uri(seq)` names each segment.
    pub fn playlist(&self, mut uri: impl FnMut(u64) -> String) -> Option<String> {
        let segs = self.segments.lock();
        let shown: Vec<&Segment> = segs.iter().rev().take(self.list).collect();
        let first = shown.last()?;
        let target = shown
            .iter()
            .map(|s| s.duration.ceil() as u64)
            .max()
            .unwrap_or(1)
            .max(self.target.ceil() as u64);
        let mut out = format!(
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:{target}\n#EXT-X-MEDIA-SEQUENCE:{}\n",
            first.seq
        );
        for s in shown.iter().rev() {
            out.push_str(&format!("#EXTINF:{:.3},\n{}\n", s.duration, uri(s.seq)));
        }
        Some(out)
    }

    pub fn target(&self) -> f64 {
        self.target
    }

    fn push(&self, seg: Segment) {
        let mut segs = self.segments.lock();
        segs.push_back(seg);
        while segs.len() > self.list + SPARE_SEGMENTS {
            segs.pop_front();
        }
        let n = segs.back().map_or(0, |s| s.seq + 1);
        drop(segs);
        self.made.send_replace(n);
    }
}

/// The packagers of running HLS transcodes, by stream id.
#[derive(Debug, Default)]
pub struct Packagers {
    running: Mutex<std::collections::HashMap<String, Arc<Packager>>>,
}

impl Packagers {
    /// The stream's packager, started if it is not running.
    pub fn get_or_start(
        &self,
        app: &Arc<App>,
        stream: &Arc<Stream>,
        target: f64,
        list: Option<usize>,
    ) -> Arc<Packager> {
        let mut running = self.running.lock();
        if let Some(p) = running.get(&stream.id).filter(|p| !p.is_ended()) {
            return p.clone();
        }
        let p = Arc::new(Packager::new(target, list.unwrap_or(DEFAULT_LIST)));
        running.insert(stream.id.clone(), p.clone());
        tokio::spawn(run(app.clone(), stream.clone(), p.clone()));
        tracing::info!(stream_id = %stream.id, "HLS packager started");
        p
    }

    pub fn get(&self, id: &str) -> Option<Arc<Packager>> {
        self.running.lock().get(id).cloned()
    }

    fn remove(&self, id: &str, p: &Arc<Packager>) {
        let mut running = self.running.lock();
        if running.get(id).is_some_and(|q| Arc::ptr_eq(q, p)) {
            running.remove(id);
        }
    }
}

/// Watches the channel and cuts segments until the stream has no clients.
async fn run(app: Arc<App>, stream: Arc<Stream>, p: Arc<Packager>) {
    match app.hub.join(&app, &stream).await {
        Ok(mut viewer) => {
            let mut cutter = Cutter::new(p.target);
            let mut idle_since: Option<Instant> = None;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    next = viewer.next(256 * 1024) => {
                        let data = match next {
                            Next::Data(b) => b,
                            Next::Span(s) => match s.bytes() {
                                Ok(b) => b,
                                Err(_) => break,
                            },
                            Next::Lagged | Next::Ended => break,
                        };
                        if let Some(seg) = cutter.push(&data, Instant::now()) {
                            p.push(seg);
                        }
                    }
                    _ = tick.tick() => {
                        if stream.client_count() > 0 {
                            idle_since = None;
                        } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= IDLE_STOP {
                            break;
                        }
                    }
                }
            }
        }
        Err(e) => tracing::warn!(stream_id = %stream.id, error = ?e, "HLS packager could not join"),
    }
    p.ended.send_replace(true);
    app.packagers.remove(&stream.id, &p);
    tracing::info!(stream_id = %stream.id, "HLS packager stopped");
}

/// Cuts a packet-aligned TS byte stream into segments at keyframes.
struct Cutter {
    target: f64,
    scanner: Scanner,
    current: BytesMut,
    started: Option<Instant>,
    seq: u64,
}

impl Cutter {
    fn new(target: f64) -> Self {
        Cutter {
            target,
            scanner: Scanner::new(),
            current: BytesMut::new(),
            started: None,
            seq: 0,
        }
    }

    /// Adds bytes that arrived at `now`; a finished segment when one is cut.
    fn push(&mut self, data: &[u8], now: Instant) -> Option<Segment> {
        let whole = data.len() - data.len() % PACKET_LEN;
        let data = &data[..whole];
        let scan = self.scanner.scan(data);
        let Some(started) = self.started else {
            // Wait for the first keyframe; the segment starts with PAT/PMT.
            let rap = *scan.random_access.first()?;
            self.begin(&data[rap * PACKET_LEN..], now);
            return None;
        };
        let age = now.duration_since(started).as_secs_f64();
        let cut_at = if age >= self.target * CUT_TOLERANCE {
            scan.random_access.first().copied()
        } else {
            None
        }
        .or_else(|| (age >= self.target * FORCE_CUT_AFTER).then_some(0));
        let Some(rap) = cut_at else {
            if self.current.len() + data.len() <= MAX_SEGMENT {
                self.current.extend_from_slice(data);
            }
            return None;
        };
        self.current.extend_from_slice(&data[..rap * PACKET_LEN]);
        let seg = Segment {
            seq: self.seq,
            duration: age,
            data: self.current.split().freeze(),
        };
        self.seq += 1;
        self.begin(&data[rap * PACKET_LEN..], now);
        Some(seg)
    }

    fn begin(&mut self, from_keyframe: &[u8], now: Instant) {
        self.current.clear();
        if let Some(psi) = self.scanner.psi_prefix() {
            self.current.extend_from_slice(&psi);
        }
        self.current.extend_from_slice(from_keyframe);
        self.started = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Option<Vec<u8>> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fixtures/sample.ts"
        ))
        .ok()
    }

    #[test]
    fn segments_start_at_keyframes_with_psi_and_the_playlist_lists_them() {
        let Some(ts) = fixture() else {
            eprintln!("SKIPPED: ../shared/fixtures/sample.ts not found");
            return;
        };
        let p = Packager::new(2.0, 3);
        let mut cutter = Cutter::new(2.0);
        let t0 = Instant::now();
        // The 10 s fixture in 40 pieces, as if in real time.
        let piece = (ts.len() / 40) / PACKET_LEN * PACKET_LEN;
        for (i, chunk) in ts.chunks(piece).enumerate() {
            let now = t0 + Duration::from_millis(250 * i as u64);
            if let Some(seg) = cutter.push(chunk, now) {
                p.push(seg);
            }
        }
        let made = *p.made.borrow();
        assert!(made >= 3, "{made} segments");
        for s in p.segments.lock().iter() {
            let mut sc = Scanner::new();
            let scan = sc.scan(&s.data);
            assert!(sc.psi_prefix().is_some(), "segment {} has PAT/PMT", s.seq);
            assert!(
                scan.random_access.first().is_some_and(|&r| r <= 3),
                "segment {} starts at a keyframe",
                s.seq
            );
            assert!(s.duration >= 1.5 && s.duration < 6.0, "{}", s.duration);
        }
        let text = p.playlist(|seq| format!("s{seq}.ts")).unwrap();
        assert!(text.starts_with("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:"));
        assert_eq!(text.matches("#EXTINF").count(), 3.min(made as usize));
        assert!(text.contains(&format!("s{}.ts", made - 1)));
    }
}
