//! Lag or reset? A live playlist whose media sequence went down is one of two
//! things (issue #19):
//!
//! * lag: a backend behind a balancer serves an older window of the same
//!   stream. Its segments are ones already seen (the same URIs, or a window
//!   that is a prefix of the last one). Serving it would move players
//!   backwards and make them loop: it is refused, the newer playlist is kept.
//! * reset: the provider's encoder restarted (after a crash, nightly) and
//!   numbers from 0 or 1 again, with segments never seen before. Refusing it
//!   would stall every viewer until the stream is registered again: once a
//!   second poll confirms it (or one target duration after it was first seen,
//!   at the next poll), it is accepted as a new epoch of this playlist, which
//!   the timeline (`hls/timeline.rs`) maps onto the numbers players already
//!   know. An encoder that restarts with the very names it used before
//!   looks like lag; it is taken for a restart when nothing but that lower,
//!   advancing window came back for ten target durations.
//!
//! One [`History`] per playlist slot, judged at every provider fetch; pure.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

/// A lower window of segments already seen, polled without a break for this
/// many target durations while it keeps advancing, is an encoder that
/// restarted with the names it used before (`seg_0.ts` again): by then any
/// balancer would have sent a poll to an up-to-date backend, and a sticky
/// backend this far behind is not serving the live edge anyway.
const SUSTAINED_LAG_TARGETS: u32 = 10;

/// Segment identities remembered per playlist: far more than any window
/// (RFC 8216 §6.2.2 wants three target durations), bounded for playlists
/// that never end.
const SEEN: usize = 4096;

/// What to do with a fetched playlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it.
    Accept,
    /// Lower and overlapping what was served: refuse it, keep the newer one.
    Lag,
    /// Lower and all new: maybe a reset; keep the current one until confirmed.
    Pending,
    /// A confirmed reset: serve it as a new epoch.
    Reset,
}

/// A playlist as the judge sees it.
#[derive(Debug, Clone, Copy)]
pub struct Window<'a> {
    pub media_sequence: Option<u64>,
    pub endlist: bool,
    /// [`super::render::Rendered::segment_ids`].
    pub ids: &'a [u64],
}

#[derive(Debug)]
struct Candidate {
    media_sequence: u64,
    ids: Vec<u64>,
    since: Instant,
}

/// What one playlist slot has seen.
#[derive(Debug, Default)]
pub struct History {
    /// Confirmed resets so far: the provider epoch of the slot's playlists.
    pub epoch: u64,
    seen: HashSet<u64>,
    order: VecDeque<u64>,
    /// Segments of the epochs before the last reset: a backend still on the
    /// old epoch serves higher numbers, and must not win.
    retired: HashSet<u64>,
    candidate: Option<Candidate>,
    /// Since when every poll was lag, and the media sequence it started at.
    lagging: Option<(Instant, u64)>,
}

impl History {
    /// Judges `new` against the media sequence `served` of the playlist the
    /// slot serves now; `target` is its target duration. Accepted playlists
    /// (and resets) are remembered; a reset moves to the next epoch.
    pub fn judge(
        &mut self,
        served: Option<u64>,
        new: &Window,
        target: Duration,
        now: Instant,
    ) -> Verdict {
        let verdict = self.classify(served, new, target, now);
        if verdict != Verdict::Lag {
            self.lagging = None;
        }
        match verdict {
            Verdict::Accept => self.remember(new.ids),
            Verdict::Reset => {
                self.epoch += 1;
                self.retired = std::mem::take(&mut self.seen);
                self.order.clear();
                self.remember(new.ids);
            }
            Verdict::Lag | Verdict::Pending => {}
        }
        verdict
    }

    fn classify(
        &mut self,
        served: Option<u64>,
        new: &Window,
        target: Duration,
        now: Instant,
    ) -> Verdict {
        let (Some(old), Some(seq)) = (served, new.media_sequence) else {
            return Verdict::Accept;
        };
        if !new.endlist && new.ids.iter().any(|id| self.retired.contains(id)) {
            return Verdict::Lag;
        }
        if new.endlist || seq >= old {
            // The current epoch is alive: whatever looked like a reset was not.
            self.candidate = None;
            return Verdict::Accept;
        }
        if new.ids.is_empty() || new.ids.iter().any(|id| self.seen.contains(id)) {
            self.candidate = None;
            let (since, first) = *self.lagging.get_or_insert((now, seq));
            if seq > first && now.duration_since(since) >= target * SUSTAINED_LAG_TARGETS {
                return Verdict::Reset;
            }
            return Verdict::Lag;
        }
        let confirmed = self.candidate.as_ref().is_some_and(|c| {
            let continues = seq >= c.media_sequence
                && (seq > c.media_sequence || new.ids.iter().any(|id| c.ids.contains(id)));
            continues || now.duration_since(c.since) >= target
        });
        if confirmed {
            self.candidate = None;
            return Verdict::Reset;
        }
        self.candidate = Some(Candidate {
            media_sequence: seq,
            ids: new.ids.to_vec(),
            since: now,
        });
        Verdict::Pending
    }

    fn remember(&mut self, ids: &[u64]) {
        for &id in ids {
            if self.seen.insert(id) {
                self.order.push_back(id);
            }
        }
        while self.order.len() > SEEN {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);

    fn w(seq: u64, ids: &[u64]) -> Window<'_> {
        Window {
            media_sequence: Some(seq),
            endlist: false,
            ids,
        }
    }

    #[test]
    fn an_overlapping_lower_window_is_lag_every_time() {
        let mut h = History::default();
        let now = Instant::now();
        assert_eq!(
            h.judge(None, &w(10, &[10, 11, 12]), T, now),
            Verdict::Accept
        );
        assert_eq!(
            h.judge(Some(10), &w(11, &[11, 12, 13]), T, now),
            Verdict::Accept
        );
        // A prefix of the last window, again and again, even much later.
        for i in 1..5 {
            let later = now + T * i;
            assert_eq!(
                h.judge(Some(11), &w(9, &[9, 10, 11]), T, later),
                Verdict::Lag
            );
        }
        assert_eq!(h.epoch, 0);
    }

    #[test]
    fn an_all_new_lower_window_is_a_reset_once_confirmed() {
        let mut h = History::default();
        let now = Instant::now();
        h.judge(None, &w(100, &[100, 101, 102]), T, now);
        assert_eq!(
            h.judge(Some(100), &w(0, &[900, 901]), T, now),
            Verdict::Pending
        );
        // The old epoch answering in between cancels it (alternating backends).
        assert_eq!(
            h.judge(Some(100), &w(101, &[101, 102, 103]), T, now),
            Verdict::Accept
        );
        assert_eq!(
            h.judge(Some(101), &w(0, &[900, 901]), T, now),
            Verdict::Pending
        );
        assert_eq!(
            h.judge(Some(101), &w(0, &[900, 901]), T, now),
            Verdict::Reset
        );
        assert_eq!(h.epoch, 1);
        // The new epoch goes on; a backend still on the old one is refused
        // although its numbers are higher.
        assert_eq!(
            h.judge(Some(0), &w(1, &[901, 902]), T, now),
            Verdict::Accept
        );
        assert_eq!(h.judge(Some(1), &w(102, &[102, 103]), T, now), Verdict::Lag);
    }

    #[test]
    fn an_unrelated_second_window_needs_a_target_duration() {
        let mut h = History::default();
        let now = Instant::now();
        h.judge(None, &w(50, &[50, 51]), T, now);
        assert_eq!(h.judge(Some(50), &w(5, &[1, 2]), T, now), Verdict::Pending);
        assert_eq!(h.judge(Some(50), &w(3, &[7, 8]), T, now), Verdict::Pending);
        assert_eq!(
            h.judge(Some(50), &w(3, &[9, 10]), T, now + T),
            Verdict::Reset
        );
    }

    #[test]
    fn lag_that_goes_on_and_on_while_advancing_is_a_restart_with_old_names() {
        let mut h = History::default();
        let now = Instant::now();
        let old: Vec<u64> = (0..=50).collect();
        h.judge(None, &w(0, &old), T, now);
        // The encoder restarted at 0 with the names it had then.
        for i in 0..10u32 {
            let seq = u64::from(i / 2);
            let v = h.judge(Some(50), &w(seq, &[seq, seq + 1]), T, now + T * i);
            assert_eq!(v, Verdict::Lag, "{i}");
        }
        assert_eq!(
            h.judge(Some(50), &w(5, &[5, 6]), T, now + T * 10),
            Verdict::Reset
        );
        // A frozen backend (not advancing) stays refused.
        let mut h = History::default();
        h.judge(None, &w(50, &[1, 50]), T, now);
        for i in 0..30u32 {
            assert_eq!(h.judge(Some(50), &w(1, &[1]), T, now + T * i), Verdict::Lag);
        }
        // An up-to-date answer in between starts the count again.
        let mut h = History::default();
        h.judge(None, &w(50, &[1, 2, 3, 50]), T, now);
        h.judge(Some(50), &w(1, &[1]), T, now);
        h.judge(Some(50), &w(51, &[51]), T, now + T * 5);
        assert_eq!(
            h.judge(Some(51), &w(3, &[3]), T, now + T * 11),
            Verdict::Lag
        );
    }

    #[test]
    fn endlist_and_missing_numbers_are_accepted() {
        let mut h = History::default();
        let now = Instant::now();
        h.judge(None, &w(50, &[50]), T, now);
        let vod = Window {
            media_sequence: Some(0),
            endlist: true,
            ids: &[50],
        };
        assert_eq!(h.judge(Some(50), &vod, T, now), Verdict::Accept);
        let empty = w(1, &[]);
        assert_eq!(h.judge(Some(50), &empty, T, now), Verdict::Lag);
    }
}
