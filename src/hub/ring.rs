//! The shared ring of a live channel: packet-aligned `Bytes` chunks with
//! sequence numbers, bounded by bytes and by age. Viewers hold only a sequence
//! number (their cursor); a cursor that fell out of the ring is a lagging
//! viewer and is dropped, never waited for. No network I/O, no Pingora; with
//! a spool (hub/spool.rs) each chunk is also written to the channel's
//! in-memory file, and viewers are handed spans of it to sendfile().

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::spool::{Span, Spool};

#[derive(Debug, Clone)]
pub struct Chunk {
    pub seq: u64,
    pub data: Bytes,
    /// Byte offset of the last random-access point (keyframe start) in this
    /// chunk, if it has one.
    pub rap: Option<usize>,
    /// PAT + PMT packets valid for this chunk's data (shared, not copied).
    pub psi: Option<Bytes>,
    pub at: Instant,
    /// Where `data` is in the spool, if it was written there.
    pub off: Option<u64>,
}

/// The spool of a ring and its release schedule.
#[derive(Debug)]
struct Spooled {
    spool: Arc<Spool>,
    /// Bytes written so far: the offset of the next chunk.
    written: u64,
    /// How long evicted data stays readable: longer than any viewer may take
    /// to send a span it was handed (its write timeout).
    grace: Duration,
    /// (when evicted, end offset) of evicted chunks not yet released.
    evicted: VecDeque<(Instant, u64)>,
}

#[derive(Debug)]
pub struct Ring {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    next_seq: u64,
    max_bytes: usize,
    max_age: Duration,
    spooled: Option<Spooled>,
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

impl Ring {
    pub fn new(max_bytes: usize, max_age: Duration) -> Self {
        Ring {
            chunks: VecDeque::new(),
            bytes: 0,
            next_seq: 0,
            max_bytes: max_bytes.max(188),
            max_age,
            spooled: None,
        }
    }

    /// Also writes every chunk to `spool`; evicted data stays there for `grace`.
    pub fn with_spool(mut self, spool: Arc<Spool>, grace: Duration) -> Self {
        self.spooled = Some(Spooled {
            spool,
            written: 0,
            grace,
            evicted: VecDeque::new(),
        });
        self
    }

    /// The chunk's spool offset; a failed write turns the spool off for good
    /// (viewers are then written from memory, as without one).
    fn spool(&mut self, data: &[u8]) -> Option<u64> {
        let s = self.spooled.as_mut()?;
        match s.spool.write_at(data, s.written) {
            Ok(()) => {
                let off = s.written;
                s.written += data.len() as u64;
                Some(off)
            }
            Err(e) => {
                tracing::warn!(error = %e, "live spool write failed: viewers are written from memory");
                self.spooled = None;
                None
            }
        }
    }

    /// Releases spool data evicted more than the grace period ago.
    fn release(&mut self, now: Instant) {
        let Some(s) = self.spooled.as_mut() else {
            return;
        };
        let mut upto = None;
        while let Some(&(at, end)) = s.evicted.front() {
            if now.duration_since(at) < s.grace {
                break;
            }
            upto = Some(end);
            s.evicted.pop_front();
        }
        if let Some(end) = upto {
            if let Err(e) = s.spool.release_before(end) {
                tracing::debug!(error = %e, "live spool: releasing old data failed");
            }
        }
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn push(&mut self, data: Bytes, rap: Option<usize>, psi: Option<Bytes>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let now = Instant::now();
        self.bytes += data.len();
        let off = self.spool(&data);
        self.chunks.push_back(Chunk {
            seq,
            data,
            rap,
            psi,
            at: now,
            off,
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
                self.bytes -= old.data.len();
                if let (Some(s), Some(off)) = (self.spooled.as_mut(), old.off) {
                    s.evicted.push_back((now, off + old.data.len() as u64));
                }
            }
        }
        self.release(now);
        seq
    }

    /// Where a joining viewer starts: PAT + PMT, then the newest chunk that holds
    /// a keyframe, sliced at the keyframe. Returns the prefix to write and the
    /// cursor after it. Without a keyframe in the ring, the viewer starts at the
    /// live edge (the next chunk) with PAT + PMT, never on stale data.
    pub fn join(&self) -> (Option<Bytes>, u64) {
        let Some(c) = self.chunks.iter().rev().find(|c| c.rap.is_some()) else {
            let psi = self.chunks.back().and_then(|c| c.psi.clone());
            // A cold channel (nothing received yet): take everything from the first chunk.
            return (psi, self.next_seq);
        };
        let rap = c.rap.unwrap_or(0).min(c.data.len());
        let mut first = BytesMut::new();
        if let Some(psi) = &c.psi {
            first.extend_from_slice(psi);
        }
        first.extend_from_slice(&c.data[rap..]);
        (Some(first.freeze()), c.seq + 1)
    }

    /// Up to `max` bytes from `cursor` on. A single chunk is handed out as is
    /// (shared); several are joined into one buffer so each viewer makes one
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
        let mut total = 0;
        let mut end = start;
        while end < self.chunks.len()
            && (end == start || total + self.chunks[end].data.len() <= max)
        {
            total += self.chunks[end].data.len();
            end += 1;
        }
        let next = cursor + (end - start) as u64;
        // Chunks written to the spool are contiguous there (offsets only
        // advance on success), so one span covers the whole batch.
        let last_spooled = self.chunks[end - 1].off.is_some();
        if let (Some(s), Some(off), true) = (&self.spooled, first.off, last_spooled) {
            let span = Span {
                spool: s.spool.clone(),
                off,
                len: total,
            };
            return Read::Span(span, next);
        }
        if end == start + 1 {
            return Read::Data(first.data.clone(), next);
        }
        let mut buf = BytesMut::with_capacity(total);
        for c in self.chunks.range(start..end) {
            buf.extend_from_slice(&c.data);
        }
        Read::Data(buf.freeze(), next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: usize, v: u8) -> Bytes {
        Bytes::from(vec![v; n])
    }

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
        let (first, cursor) = r.join();
        let first = first.unwrap();
        assert_eq!(&first[..376], &psi[..]);
        assert_eq!(first.len(), 376 + 188 * 2);
        assert_eq!(first[376], 3);
        assert_eq!(cursor, 2);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn spooled_reads_are_spans_of_the_same_bytes_and_old_data_is_released() {
        let spool = Arc::new(Spool::new().unwrap());
        // 64 KiB chunks in a 256 KiB ring; evicted data released at once.
        let mut r = Ring::new(256 * 1024, Duration::from_secs(60))
            .with_spool(spool.clone(), Duration::ZERO);
        let chunk = |i: u8| Bytes::from((0..65536u32).map(|j| i ^ j as u8).collect::<Vec<_>>());
        for i in 0..3 {
            r.push(chunk(i), None, None);
        }
        // A batch of two chunks is one span, byte-identical to the chunks.
        let Read::Span(span, next) = r.read(1, 128 * 1024) else {
            panic!("expected a span");
        };
        assert_eq!((span.off, span.len, next), (65536, 131072, 3));
        let mut got = vec![0u8; span.len];
        spool.read_at(&mut got, span.off).unwrap();
        assert_eq!(&got[..65536], &chunk(1)[..]);
        assert_eq!(&got[65536..], &chunk(2)[..]);
        // Sixteen more chunks: the ring keeps four, the spool about as much.
        for i in 3..19 {
            r.push(chunk(i), None, None);
        }
        assert!(matches!(r.read(0, 1 << 20), Read::Lagged));
        let Read::Span(span, _) = r.read(15, 65536) else {
            panic!("expected a span");
        };
        assert_eq!(span.off, 15 * 65536);
        let resident = spool.resident_bytes().unwrap();
        assert!(resident <= 5 * 65536, "{resident} bytes still held");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn evicted_data_stays_readable_for_the_grace_period() {
        let spool = Arc::new(Spool::new().unwrap());
        let mut r = Ring::new(65536, Duration::from_secs(60))
            .with_spool(spool.clone(), Duration::from_secs(3600));
        for i in 0..8u8 {
            r.push(Bytes::from(vec![i; 65536]), None, None);
        }
        // Evicted from the ring, but a viewer may still be sending it.
        let mut got = vec![0u8; 4];
        spool.read_at(&mut got, 0).unwrap();
        assert_eq!(got, [0; 4]);
        spool.read_at(&mut got, 3 * 65536).unwrap();
        assert_eq!(got, [3; 4]);
        assert!(spool.resident_bytes().unwrap() >= 8 * 65536);
    }
}
