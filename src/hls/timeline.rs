//! One monotonic timeline per playlist a player follows (issue #19). A player
//! polls one playlist URL of m3u-edge (a "lane": the stream's own playlist,
//! or one variant reference). What feeds a lane can change under it: a
//! failover moves it to another source whose sequence numbers are unrelated
//! (a primary at 5000, a backup at 0), and a provider reset (`hls/reset.rs`)
//! starts the numbering of the same source again. Each such (source, epoch)
//! is an epoch of the lane, mapped onto the lane's own numbering with an
//! offset:
//!
//! * media sequence numbers continue: the first segment of a new epoch gets
//!   the number after the last one the lane served (after the part being
//!   made too, for LL-HLS);
//! * it is preceded by `EXT-X-DISCONTINUITY` (RFC 8216 §4.3.2.3) while it is
//!   in the window, and discontinuity sequence numbers continue too: that
//!   segment is one past the last one served, and when it slides out of the
//!   window `EXT-X-DISCONTINUITY-SEQUENCE` goes up by one (§6.2.1: the
//!   segments still in the playlist keep their numbers);
//! * LL-HLS `_HLS_msn` of players are in the lane's numbering:
//!   [`Mapping::to_provider`] translates them back.
//!
//! A lane's first epoch keeps the provider's numbers: nothing changes for a
//! stream that never fails over or resets. Pure but for the clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

/// Lanes remembered per stream (variants of a master, old references after
/// a failover); the least recently used goes first.
const LANES_PER_STREAM: usize = 64;

/// Where a lane's playlist comes from: a provider playlist URL and its
/// reset epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub url: Arc<str>,
    pub epoch: u64,
}

/// The numbers of a provider playlist the mapping needs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts {
    /// `EXT-X-MEDIA-SEQUENCE` (0 when absent).
    pub media_sequence: u64,
    /// One past the last media sequence number the playlist names (complete
    /// segments, and the segment whose parts are trailing).
    pub next_msn: u64,
    /// `EXT-X-DISCONTINUITY-SEQUENCE` (0 when absent).
    pub discontinuity_sequence: u64,
    /// `EXT-X-DISCONTINUITY` tags in the playlist.
    pub discontinuities: u64,
    /// The provider marked its first segment with `EXT-X-DISCONTINUITY`.
    pub first_tagged: bool,
    /// Which fetch it is (increasing): tells a playlist fetched before a
    /// switch from one fetched after it.
    pub generation: u64,
}

/// How to serve one playlist on one lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mapping {
    /// Lane number = provider number + `msn_delta`.
    pub msn_delta: i64,
    /// The discontinuity sequence to serve (`None`: the provider's).
    pub discontinuity_sequence: Option<u64>,
    /// `EXT-X-DISCONTINUITY` before the first segment.
    pub discontinuity: bool,
    /// The lane served another source or epoch before this one.
    pub continued: bool,
}

impl Mapping {
    /// A player's `_HLS_msn` in the provider's numbering; `None` when it is
    /// before this epoch (the playlist has it already).
    pub fn to_provider(&self, msn: u64) -> Option<u64> {
        u64::try_from(i128::from(msn) - i128::from(self.msn_delta)).ok()
    }
}

/// How one (source, epoch) maps onto a lane.
#[derive(Debug, Clone)]
struct Epoch {
    source: Source,
    /// Lane number = provider number + `offset` (media sequence).
    offset: i64,
    /// The same for discontinuity sequence numbers.
    d_offset: i64,
    /// Provider media sequence number of the epoch's first segment.
    first: u64,
    first_tagged: bool,
    /// The lane served another source or epoch before this one.
    continued: bool,
    /// The generation of the playlist that started this epoch: an older one
    /// of the previous source was fetched before the switch.
    started: u64,
}

impl Epoch {
    fn mapping(&self, f: &Facts) -> Mapping {
        // Our tag before the epoch's first segment while it is in the window:
        // the discontinuity sequence counts it from one lower (§4.3.3.3).
        let ours = self.continued && f.media_sequence == self.first && !self.first_tagged;
        let dseq = signed(f.discontinuity_sequence) + self.d_offset - i64::from(ours);
        Mapping {
            msn_delta: self.offset,
            discontinuity_sequence: self.continued.then_some(dseq.max(0) as u64),
            discontinuity: ours,
            continued: self.continued,
        }
    }
}

#[derive(Debug)]
struct Lane {
    current: Epoch,
    /// The epoch before: a viewer that fetched its playlist just before the
    /// switch is served with the mapping it was made for, and does not
    /// start yet another epoch.
    previous: Option<Epoch>,
    /// One past the last media sequence number served (lane numbering).
    next_msn: u64,
    /// Discontinuity sequence number of the last segment served.
    last_dnum: i64,
    used: Instant,
}

/// A provider number as a signed one: RFC 8216 allows up to 2^64-1, but
/// nothing real comes near 2^62 and the arithmetic here must not overflow.
fn signed(v: u64) -> i64 {
    v.min(1 << 62) as i64
}

impl Lane {
    fn new(source: Source, f: &Facts) -> Lane {
        Lane {
            current: Epoch {
                source,
                offset: 0,
                d_offset: 0,
                first: f.media_sequence,
                first_tagged: f.first_tagged,
                continued: false,
                started: f.generation,
            },
            previous: None,
            next_msn: 0,
            last_dnum: 0,
            used: Instant::now(),
        }
    }

    fn map(&mut self, source: &Source, f: &Facts) -> Mapping {
        self.used = Instant::now();
        if let Some(prev) = &self.previous {
            if prev.source == *source && f.generation < self.current.started {
                return prev.mapping(f);
            }
        }
        let cur = &self.current;
        // A new source or epoch; or (never expected) the same one below the
        // epoch's start, which would move players back: also a new epoch.
        if *source != cur.source || f.media_sequence < cur.first {
            // The first segment: one discontinuity past the last one served.
            let first_dnum = signed(f.discontinuity_sequence) + i64::from(f.first_tagged);
            let next = Epoch {
                source: source.clone(),
                offset: signed(self.next_msn) - signed(f.media_sequence),
                d_offset: self.last_dnum + 1 - first_dnum,
                first: f.media_sequence,
                first_tagged: f.first_tagged,
                continued: true,
                started: f.generation,
            };
            self.previous = Some(std::mem::replace(&mut self.current, next));
        }
        let cur = &self.current;
        let served_next = (signed(f.next_msn) + cur.offset).max(0) as u64;
        self.next_msn = self.next_msn.max(served_next);
        let last =
            signed(f.discontinuity_sequence.saturating_add(f.discontinuities)) + cur.d_offset;
        self.last_dnum = self.last_dnum.max(last);
        cur.mapping(f)
    }
}

/// Every lane of every stream.
#[derive(Default)]
pub struct Lanes {
    streams: Mutex<HashMap<String, HashMap<String, Lane>>>,
}

impl Lanes {
    /// Serves playlist `f` from `source` on lane `lane` of `stream_id`: the
    /// mapping to write it with.
    pub fn map(&self, stream_id: &str, lane: &str, source: &Source, f: &Facts) -> Mapping {
        let mut all = self.streams.lock();
        if !all.contains_key(stream_id) {
            all.insert(stream_id.to_string(), HashMap::new());
        }
        let Some(lanes) = all.get_mut(stream_id) else {
            return Mapping::default();
        };
        if let Some(l) = lanes.get_mut(lane) {
            return l.map(source, f);
        }
        if lanes.len() >= LANES_PER_STREAM {
            let oldest = lanes
                .iter()
                .min_by_key(|(_, l)| l.used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                lanes.remove(&k);
            }
        }
        let mut l = Lane::new(source.clone(), f);
        let m = l.map(source, f);
        lanes.insert(lane.to_string(), l);
        m
    }

    /// Forgets a stream's lanes (stream deleted).
    pub fn forget(&self, stream_id: &str) {
        self.streams.lock().remove(stream_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(url: &str, epoch: u64) -> Source {
        Source {
            url: url.into(),
            epoch,
        }
    }

    fn facts(seq: u64, len: u64, dseq: u64) -> Facts {
        Facts {
            media_sequence: seq,
            next_msn: seq + len,
            discontinuity_sequence: dseq,
            ..Facts::default()
        }
    }

    #[test]
    fn the_first_epoch_is_served_as_it_is() {
        let lanes = Lanes::default();
        let a = src("http://p/a.m3u8", 0);
        for seq in [10, 11, 12] {
            let m = lanes.map("s", "", &a, &facts(seq, 3, 4));
            assert_eq!(m, Mapping::default());
        }
    }

    #[test]
    fn a_reset_continues_both_sequences_with_one_discontinuity() {
        let lanes = Lanes::default();
        let e0 = src("http://p/a.m3u8", 0);
        let e1 = src("http://p/a.m3u8", 1);
        lanes.map("s", "", &e0, &facts(100, 3, 2));
        lanes.map("s", "", &e0, &facts(101, 3, 2)); // served up to 103
                                                    // The provider restarts at 0 (its own discontinuity sequence 0).
        let m = lanes.map("s", "", &e1, &facts(0, 2, 0));
        assert_eq!(m.msn_delta, 104);
        assert!(m.discontinuity && m.continued);
        // The first new segment is discontinuity 3: one past 2; the tag counts it.
        assert_eq!(m.discontinuity_sequence, Some(2));
        let m = lanes.map("s", "", &e1, &facts(0, 3, 0));
        assert_eq!((m.msn_delta, m.discontinuity), (104, true));
        // The first new segment slid out: its tag is gone, the sequence is up one.
        let m = lanes.map("s", "", &e1, &facts(1, 3, 0));
        assert_eq!(m.discontinuity_sequence, Some(3));
        assert!(!m.discontinuity);
        assert_eq!(m.to_provider(105), Some(1));
        assert_eq!(m.to_provider(3), None);
    }

    #[test]
    fn failover_from_5000_to_0_and_back_stays_monotonic() {
        let lanes = Lanes::default();
        let primary = src("http://p/primary.m3u8", 0);
        let backup = src("http://b/backup.m3u8", 0);
        let mut last = 0;
        let mut serve = |s: &Source, f: Facts| {
            let m = lanes.map("s", "v", s, &f);
            let seq = (f.media_sequence as i64 + m.msn_delta) as u64;
            assert!(seq >= last, "{seq} after {last}");
            last = seq;
            m
        };
        serve(&primary, facts(5000, 3, 0));
        let m = serve(&backup, facts(0, 3, 7));
        assert_eq!(m.msn_delta, 5003);
        assert_eq!(m.discontinuity_sequence, Some(0));
        serve(&backup, facts(1, 3, 7));
        // Back to the primary, now further on: a third epoch.
        let m = serve(&primary, facts(5010, 3, 0));
        assert!(m.discontinuity);
        assert_eq!(5010 + m.msn_delta, 5007);
    }

    #[test]
    fn a_playlist_fetched_just_before_the_switch_keeps_its_mapping() {
        let lanes = Lanes::default();
        let old = src("a", 0);
        let new = src("a", 1);
        let f = |seq, generation| Facts {
            generation,
            ..facts(seq, 3, 0)
        };
        lanes.map("s", "", &old, &f(100, 1));
        let switched = lanes.map("s", "", &new, &f(0, 3));
        // A viewer that got generation 2 before the reset is served as before.
        assert_eq!(lanes.map("s", "", &old, &f(100, 2)), Mapping::default());
        assert_eq!(lanes.map("s", "", &new, &f(0, 3)), switched);
        // The old source fetched anew (a failback) is a new epoch.
        let back = lanes.map("s", "", &old, &f(104, 9));
        assert!(back.discontinuity && back.msn_delta != 0);
        assert_eq!(104 + back.msn_delta, 106);
    }

    #[test]
    fn a_provider_tag_on_the_first_segment_is_not_doubled() {
        let lanes = Lanes::default();
        lanes.map("s", "", &src("a", 0), &facts(9, 3, 0));
        let f = Facts {
            first_tagged: true,
            discontinuities: 1,
            ..facts(0, 3, 0)
        };
        let m = lanes.map("s", "", &src("a", 1), &f);
        assert!(!m.discontinuity);
        // Served dseq 0 + the provider's tag: the first new segment is 1.
        assert_eq!(m.discontinuity_sequence, Some(0));
    }
}
