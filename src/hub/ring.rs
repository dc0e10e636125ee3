//! The shared ring of a live channel: packet-aligned `Bytes` chunks with
//! sequence numbers, bounded by bytes and by age. Viewers hold only a sequence
//! number (their cursor); a cursor that fell out of the ring is a lagging
//! viewer and is dropped, never waited for. Pure: no I/O, no Pingora.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

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
}

#[derive(Debug)]
pub struct Ring {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    next_seq: u64,
    max_bytes: usize,
    max_age: Duration,
}

/// What a viewer gets when it asks for more.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Bytes to write and the cursor to continue from.
    Data(Bytes, u64),
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
        self.chunks.push_back(Chunk {
            seq,
            data,
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
                self.bytes -= old.data.len();
            }
        }
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
        if start + 1 == self.chunks.len() || first.data.len() >= max {
            return Read::Data(first.data.clone(), cursor + 1);
        }
        let mut total = 0;
        let mut end = start;
        while end < self.chunks.len()
            && (end == start || total + self.chunks[end].data.len() <= max)
        {
            total += self.chunks[end].data.len();
            end += 1;
        }
        if end == start + 1 {
            return Read::Data(first.data.clone(), cursor + 1);
        }
        let mut buf = BytesMut::with_capacity(total);
        for c in self.chunks.range(start..end) {
            buf.extend_from_slice(&c.data);
        }
        Read::Data(buf.freeze(), cursor + (end - start) as u64)
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
        assert_eq!(r.read(4, 400), Read::Empty);
    }

    #[test]
    fn slow_cursor_lags_out() {
        let mut r = Ring::new(188 * 3, Duration::from_secs(60));
        for i in 0..10 {
            r.push(b(188, i), None, None);
        }
        assert_eq!(r.read(0, 1000), Read::Lagged);
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
}
