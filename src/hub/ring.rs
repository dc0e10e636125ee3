//! The shared ring of a live channel: packet-aligned chunks with sequence
//! numbers, bounded by bytes and by age. Viewers hold only a sequence number
//! (their cursor); a cursor that fell out of the ring is a lagging viewer and
//! is dropped, never waited for. No network I/O, no Pingora.
//!
//! Each byte is kept once. With a spool (hub/spool.rs, an in-memory file) the
//! spool *is* the ring: a chunk is an offset into it, joins read from it and
//! viewers are handed spans of it to sendfile(). Without one (not Linux, or a
//! spool write failed) chunks are `Bytes` in memory. A channel of 4 Mbit/s
//! with `ring_seconds` 4 thus holds about 2 MB, not twice that.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::spool::{Span, Spool};

/// Where a chunk's bytes are: its only copy.
#[derive(Debug, Clone)]
pub enum Body {
    /// In memory (no spool).
    Mem(Bytes),
    /// At this offset of the ring's spool.
    Spool(u64),
}

#[derive(Debug, Clone)]
pub struct Chunk {
    pub seq: u64,
    pub len: usize,
    pub body: Body,
    /// Byte offset of the last random-access point (keyframe start) in this
    /// chunk, if it has one.
    pub rap: Option<usize>,
    /// PAT + PMT packets valid for this chunk's data (shared, not copied).
    pub psi: Option<Bytes>,
    pub at: Instant,
}

/// The spool of a ring.
#[derive(Debug)]
struct Spooled {
    spool: Arc<Spool>,
    /// Bytes written so far: the offset of the next chunk.
    written: u64,
    /// Everything below this offset left the ring; it is released as soon as
    /// no viewer holds a span of it (a viewer sending a span it was handed
    /// before the eviction keeps it readable until the send ends or its write
    /// timeout drops it).
    evicted_to: u64,
    /// A write failed: new chunks stay in memory.
    failed: bool,
}

#[derive(Debug)]
pub struct Ring {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    next_seq: u64,
    max_bytes: usize,
    max_age: Duration,
    spooled: Option<Spooled>,
    /// When a chunk with a keyframe last arrived: a joining viewer that finds
    /// none in the ring waits for the next one only if the channel has them.
    last_rap_at: Option<Instant>,
}

/// What a viewer gets when it asks for more.
#[derive(Debug)]
pub enum Read {
    /// Bytes to write and the cursor to continue from.
    Data(Bytes, u64),
    /// The same from the spool, to sendfile().
    Span(Span, u64),
    /// Nothing new yet.
    Empty,
    /// The cursor fell out of the ring: the viewer is too slow.
    Lagged,
}

/// Where a joining viewer starts.
#[derive(Debug)]
pub struct Join {
    /// PAT + PMT and the data from the latest keyframe, written first.
    pub first: Option<Bytes>,
    /// The cursor after `first`.
    pub cursor: u64,
    /// No keyframe in the ring but the channel has them (a GOP longer than
    /// the ring): start at the next one ([`Ring::seek_keyframe`]).
    pub await_keyframe: bool,
}

/// A waiting viewer's search for the next keyframe.
#[derive(Debug)]
pub enum Seek {
    /// PAT + PMT and the chunk from its keyframe on; the cursor after it.
    Found(Bytes, u64),
    /// None yet; look again from this cursor.
    Wait(u64),
}

impl Ring {
    pub fn new(max_bytes: usize, max_age: Duration) -> Self {
        Ring {
            chunks: VecDeque::new(),
            bytes: 0,
            next_seq: 0,
            max_bytes: max_bytes.max(188),
            max_age,
            spooled: None,
            last_rap_at: None,
        }
    }

    /// Keeps the chunks in `spool` instead of memory.
    pub fn with_spool(mut self, spool: Arc<Spool>) -> Self {
        self.spooled = Some(Spooled {
            spool,
            written: 0,
            evicted_to: 0,
            failed: false,
        });
        self
    }

    /// The chunk's spool offset; a failed write turns spooling off for good
    /// (later chunks are kept in memory; earlier ones stay readable there).
    fn spool(&mut self, data: &[u8]) -> Option<u64> {
        let s = self.spooled.as_mut().filter(|s| !s.failed)?;
        match s.spool.write_at(data, s.written) {
            Ok(()) => {
                let off = s.written;
                s.written += data.len() as u64;
                Some(off)
            }
            Err(e) => {
                tracing::warn!(error = %e, "live spool write failed: the ring keeps new data in memory");
                s.failed = true;
                None
            }
        }
    }

    /// Releases spool data that left the ring and no viewer is sending.
    fn release(&mut self) {
        let Some(s) = self.spooled.as_mut() else {
            return;
        };
        let to = s.spool.unpinned_below(s.evicted_to);
        if let Err(e) = s.spool.release_before(to) {
            tracing::debug!(error = %e, "live spool: releasing old data failed");
        }
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes of video the ring holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn push(&mut self, data: Bytes, rap: Option<usize>, psi: Option<Bytes>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let now = Instant::now();
        let len = data.len();
        self.bytes += len;
        let body = match self.spool(&data) {
            Some(off) => Body::Spool(off),
            None => Body::Mem(data),
        };
        if rap.is_some() {
            self.last_rap_at = Some(now);
        }
        self.chunks.push_back(Chunk {
            seq,
            len,
            body,
            rap,
            psi,
            at: now,
        });
        // Keep at least the newest chunk whatever the limits say.
        while self.chunks.len() > 1
            && (self.bytes > self.max_bytes
                || self
                    .chunks
                    .front()
                    .is_some_and(|c| now.duration_since(c.at) > self.max_age))
        {
            if let Some(old) = self.chunks.pop_front() {
                self.bytes -= old.len;
                if let (Some(s), Body::Spool(off)) = (self.spooled.as_mut(), &old.body) {
                    s.evicted_to = off + old.len as u64;
                }
            }
        }
        self.release();
        seq
    }

    /// A chunk's bytes from `from` on, copied out of the spool if there.
    fn chunk_bytes(&self, c: &Chunk, from: usize) -> Option<Bytes> {
        let from = from.min(c.len);
        match &c.body {
            Body::Mem(b) => Some(b.slice(from..)),
            Body::Spool(off) => {
                let s = self.spooled.as_ref()?;
                let mut buf = vec![0u8; c.len - from];
                match s.spool.read_at(&mut buf, off + from as u64) {
                    Ok(()) => Some(Bytes::from(buf)),
                    Err(e) => {
                        tracing::warn!(error = %e, "live spool read failed");
                        None
                    }
                }
            }
        }
    }

    /// PAT + PMT then chunk `c` from its keyframe on.
    fn keyframe_start(&self, c: &Chunk) -> Option<Bytes> {
        let data = self.chunk_bytes(c, c.rap.unwrap_or(0))?;
        let mut first = BytesMut::with_capacity(data.len() + c.psi.as_ref().map_or(0, |p| p.len()));
        if let Some(psi) = &c.psi {
            first.extend_from_slice(psi);
        }
        first.extend_from_slice(&data);
        Some(first.freeze())
    }

    /// Where a joining viewer starts: PAT + PMT, then the newest chunk that
    /// holds a keyframe, sliced at the keyframe. Without a keyframe in the
    /// ring, the viewer starts at the live edge, never on stale data: at the
    /// next keyframe when the channel has had one lately (a GOP longer than
    /// the ring), else (a cold channel, or a stream without recognisable
    /// keyframes) at once, after PAT + PMT.
    pub fn join(&self, keyframe_wait: Duration) -> Join {
        if let Some(c) = self.chunks.iter().rev().find(|c| c.rap.is_some()) {
            if let Some(first) = self.keyframe_start(c) {
                return Join {
                    first: Some(first),
                    cursor: c.seq + 1,
                    await_keyframe: false,
                };
            }
        }
        let await_keyframe = self
            .last_rap_at
            .is_some_and(|t| t.elapsed() < keyframe_wait);
        Join {
            first: if await_keyframe { None } else { self.psi() },
            cursor: self.next_seq,
            await_keyframe,
        }
    }

    /// The newest PAT + PMT.
    pub fn psi(&self) -> Option<Bytes> {
        self.chunks.back().and_then(|c| c.psi.clone())
    }

    /// The first chunk with a keyframe at or after `cursor`.
    pub fn seek_keyframe(&self, cursor: u64) -> Seek {
        let Some(front) = self.chunks.front() else {
            return Seek::Wait(cursor);
        };
        let start = cursor.max(front.seq);
        let skip = usize::try_from(start - front.seq).unwrap_or(usize::MAX);
        for c in self.chunks.iter().skip(skip) {
            if c.rap.is_some() {
                if let Some(b) = self.keyframe_start(c) {
                    return Seek::Found(b, c.seq + 1);
                }
            }
        }
        Seek::Wait(self.next_seq.max(cursor))
    }

    /// Up to `max` bytes from `cursor` on. A single chunk is handed out as is;
    /// several are joined into one span (or buffer) so each viewer makes one
    /// large write instead of many small ones (send() count dominates fan-out
    /// cost, DESIGN.md).
    pub fn read(&self, cursor: u64, max: usize) -> Read {
        let Some(front) = self.chunks.front() else {
            return Read::Empty;
        };
        if cursor < front.seq {
            return Read::Lagged;
        }
        if cursor >= self.next_seq {
            return Read::Empty;
        }
        let start = (cursor - front.seq) as usize;
        let first = &self.chunks[start];
        let spooled = matches!(first.body, Body::Spool(_));
        let mut total = 0;
        let mut end = start;
        // One batch is all spooled or all in memory: spooled chunks are
        // contiguous in the spool (offsets only advance), so one span covers them.
        while end < self.chunks.len()
            && (end == start
                || (total + self.chunks[end].len <= max
                    && matches!(self.chunks[end].body, Body::Spool(_)) == spooled))
        {
            total += self.chunks[end].len;
            end += 1;
        }
        let next = cursor + (end - start) as u64;
        match (&first.body, &self.spooled) {
            (Body::Spool(off), Some(s)) => Read::Span(s.spool.span(*off, total), next),
            (Body::Mem(b), _) if end == start + 1 => Read::Data(b.clone(), next),
            _ => {
                let mut buf = BytesMut::with_capacity(total);
                for c in self.chunks.range(start..end) {
                    if let Body::Mem(b) = &c.body {
                        buf.extend_from_slice(b);
                    }
                }
                Read::Data(buf.freeze(), next)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: usize, v: u8) -> Bytes {
        Bytes::from(vec![v; n])
    }

    const WAIT: Duration = Duration::from_secs(12);

    #[test]
    fn viewers_read_in_order_and_batch() {
        let mut r = Ring::new(1 << 20, Duration::from_secs(60));
        for i in 0..4 {
            r.push(b(188, i), None, None);
        }
        match r.read(0, 400) {
            Read::Data(d, next) => {
                assert_eq!(d.len(), 376);
                assert_eq!(next, 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(r.read(4, 400), Read::Empty));
    }

    #[test]
    fn slow_cursor_lags_out() {
        let mut r = Ring::new(188 * 3, Duration::from_secs(60));
        for i in 0..10 {
            r.push(b(188, i), None, None);
        }
        assert!(matches!(r.read(0, 1000), Read::Lagged));
        assert!(matches!(r.read(8, 1000), Read::Data(..)));
    }

    #[test]
    fn join_starts_at_latest_keyframe_with_psi() {
        let mut r = Ring::new(1 << 20, Duration::from_secs(60));
        let psi = Bytes::from(vec![1u8; 376]);
        r.push(b(188 * 4, 2), Some(0), Some(psi.clone()));
        r.push(b(188 * 4, 3), Some(188 * 2), Some(psi.clone()));
        r.push(b(188 * 4, 4), None, Some(psi.clone()));
        let join = r.join(WAIT);
        let first = join.first.unwrap();
        assert_eq!(&first[..376], &psi[..]);
        assert_eq!(first.len(), 376 + 188 * 2);
        assert_eq!(first[376], 3);
        assert_eq!((join.cursor, join.await_keyframe), (2, false));
    }

    #[test]
    fn a_gop_longer_than_the_ring_joins_at_the_next_keyframe() {
        // Three chunks fit; the keyframe chunk was evicted.
        let mut r = Ring::new(188 * 4 * 3, Duration::from_secs(60));
        let psi = Bytes::from(vec![1u8; 188]);
        r.push(b(188 * 4, 9), Some(0), Some(psi.clone()));
        for i in 0..3 {
            r.push(b(188 * 4, i), None, Some(psi.clone()));
        }
        let join = r.join(WAIT);
        assert!(join.await_keyframe);
        assert!(join.first.is_none(), "nothing before the keyframe");
        assert_eq!(join.cursor, 4);
        let Seek::Wait(cursor) = r.seek_keyframe(join.cursor) else {
            panic!("no keyframe yet");
        };
        r.push(b(188 * 4, 5), None, Some(psi.clone()));
        r.push(b(188 * 4, 6), Some(188), Some(psi.clone()));
        let Seek::Found(first, next) = r.seek_keyframe(cursor) else {
            panic!("the keyframe arrived");
        };
        assert_eq!(next, 6);
        assert_eq!(first.len(), 188 + 188 * 3);
        assert_eq!((first[0], first[188]), (1, 6));
    }

    #[test]
    fn a_stream_without_keyframes_joins_at_the_live_edge_at_once() {
        let mut r = Ring::new(1 << 20, Duration::from_secs(60));
        let psi = Bytes::from(vec![1u8; 188]);
        r.push(b(188, 0), None, Some(psi.clone()));
        let join = r.join(WAIT);
        assert!(!join.await_keyframe);
        assert_eq!(join.first.as_deref(), Some(&psi[..]));
        assert_eq!(join.cursor, 1);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_spooled_ring_keeps_one_copy_and_releases_what_left_it() {
        let spool = Arc::new(Spool::new().unwrap());
        // 64 KiB chunks in a 256 KiB ring.
        let mut r = Ring::new(256 * 1024, Duration::from_secs(60)).with_spool(spool.clone());
        let chunk = |i: u8| Bytes::from((0..65536u32).map(|j| i ^ j as u8).collect::<Vec<_>>());
        for i in 0..3 {
            r.push(chunk(i), Some(0), None);
        }
        // The chunks are offsets of the spool, not buffers.
        assert!(r.chunks.iter().all(|c| matches!(c.body, Body::Spool(_))));
        // A batch of two chunks is one span, byte-identical to the chunks.
        let Read::Span(span, next) = r.read(1, 128 * 1024) else {
            panic!("expected a span");
        };
        assert_eq!((span.off(), span.len(), next), (65536, 131072, 3));
        let mut got = vec![0u8; span.len()];
        spool.read_at(&mut got, span.off()).unwrap();
        assert_eq!(&got[..65536], &chunk(1)[..]);
        assert_eq!(&got[65536..], &chunk(2)[..]);
        drop(span);
        // A join is read back from the spool.
        assert_eq!(r.join(WAIT).first.unwrap(), chunk(2));
        // Sixteen more chunks: the ring keeps four, the spool as much.
        for i in 3..19 {
            r.push(chunk(i), None, None);
        }
        assert!(matches!(r.read(0, 1 << 20), Read::Lagged));
        let Read::Span(span, _) = r.read(15, 65536) else {
            panic!("expected a span");
        };
        assert_eq!(span.off(), 15 * 65536);
        let resident = spool.resident_bytes().unwrap();
        assert!(resident <= 4 * 65536, "{resident} bytes still held");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn evicted_data_stays_readable_while_a_viewer_sends_it() {
        let spool = Arc::new(Spool::new().unwrap());
        let mut r = Ring::new(65536, Duration::from_secs(60)).with_spool(spool.clone());
        r.push(Bytes::from(vec![0u8; 65536]), None, None);
        r.push(Bytes::from(vec![1u8; 65536]), None, None);
        // A viewer was handed chunk 1, then the ring moved on.
        let Read::Span(span, _) = r.read(1, 65536) else {
            panic!("expected a span");
        };
        for i in 2..8u8 {
            r.push(Bytes::from(vec![i; 65536]), None, None);
        }
        assert!(matches!(r.read(1, 65536), Read::Lagged));
        // The span is still the right bytes; older data is gone.
        assert_eq!(span.bytes().unwrap(), vec![1u8; 65536]);
        let held = spool.resident_bytes().unwrap();
        assert!((7 * 65536..=8 * 65536).contains(&held), "{held}");
        // Once sent, it goes at the next push.
        drop(span);
        r.push(Bytes::from(vec![8u8; 65536]), None, None);
        let held = spool.resident_bytes().unwrap();
        assert!(held <= 65536, "{held}");
    }
}
