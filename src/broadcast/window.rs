//! A network's live playlist across programmes. Pure: no I/O (the caller
//! reads ffmpeg's playlist and deletes the files this says are gone).
//!
//! Each programme's ffmpeg writes its own playlist, which starts empty; a
//! player polling across a programme change would see the old segments
//! vanish. So m3u-edge keeps the window itself: it learns each finished
//! segment from ffmpeg's playlist, appends it (the first one of a
//! programme after `EXT-X-DISCONTINUITY` when asked), and renders the last
//! `hls_list_size` of them. The media sequence only ever grows (each
//! segment gets the next number; a fresh start begins at the first file's
//! number), the discontinuity sequence counts the tags that left the list
//! (RFC 8216 §4.3.3.3), and a segment stays on disk for a few more target
//! durations after it left the list, so a player holding an older playlist
//! never gets a 404 for a segment it was shown.

use std::collections::VecDeque;

use super::command::{segment_name, segment_number};

/// Segments kept on disk after they left the list, for players that
/// fetched the playlist a little earlier.
const SPARE: usize = 4;

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The file's number (`live%06d.ts`).
    pub file: u64,
    /// Media sequence number.
    pub msn: u64,
    pub duration: f64,
    /// `EXT-X-DISCONTINUITY` before it.
    pub discontinuity: bool,
    /// ffmpeg's `EXT-X-PROGRAM-DATE-TIME` for it, as written.
    pub date_time: Option<String>,
}

#[derive(Debug, Default)]
pub struct Window {
    entries: VecDeque<Entry>,
    list: usize,
    /// Discontinuity tags of segments no longer kept.
    dropped_discontinuities: u64,
    last_msn: Option<u64>,
    /// Never shrinks (RFC 8216 §6.2.1: it must not change; it may only
    /// grow when a segment came out longer).
    target: u64,
    /// The current programme: files below this are not its own.
    programme_first: u64,
    /// The next learnt segment opens a programme after a discontinuity.
    pending_discontinuity: bool,
}

impl Window {
    pub fn new() -> Self {
        Window {
            list: 20,
            ..Default::default()
        }
    }

    /// A programme starts writing at file `first`.
    pub fn begin(&mut self, first: u64, discontinuity: bool, list: usize, segment: u64) {
        self.programme_first = first;
        self.pending_discontinuity = discontinuity && !self.entries.is_empty();
        self.list = list.max(1);
        self.target = self.target.max(segment);
    }

    /// Forgets every segment (a fresh start); returns the files to delete.
    /// The media sequence keeps growing.
    pub fn clear(&mut self) -> Vec<u64> {
        self.dropped_discontinuities = 0;
        self.entries.drain(..).map(|e| e.file).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The newest segment's file number.
    pub fn last_file(&self) -> Option<u64> {
        self.entries.back().map(|e| e.file)
    }

    pub fn contains_file(&self, n: u64) -> bool {
        self.entries.iter().any(|e| e.file == n)
    }

    /// Learns the finished segments listed in ffmpeg's playlist `text`;
    /// returns the new ones, and the files that fell out of the window.
    pub fn learn(&mut self, text: &str) -> (Vec<Entry>, Vec<u64>) {
        let mut added = Vec::new();
        let mut duration: Option<f64> = None;
        let mut date_time: Option<String> = None;
        for line in text.lines().map(str::trim) {
            if let Some(v) = line.strip_prefix("#EXTINF:") {
                duration = v.split(',').next().and_then(|d| d.trim().parse().ok());
            } else if let Some(v) = line.strip_prefix("#EXT-X-PROGRAM-DATE-TIME:") {
                date_time = Some(v.to_string());
            } else if !line.is_empty() && !line.starts_with('#') {
                let name = line.rsplit('/').next().unwrap_or(line);
                let (Some(file), Some(d)) = (segment_number(name), duration.take()) else {
                    date_time = None;
                    continue;
                };
                let dt = date_time.take();
                let newer = self.last_file().is_none_or(|last| file > last);
                if file < self.programme_first || !newer || !d.is_finite() || d < 0.0 {
                    continue;
                }
                let msn = match (self.entries.is_empty(), self.last_msn) {
                    (false, Some(m)) => m + 1,
                    (_, Some(m)) => file.max(m + 1),
                    (_, None) => file,
                };
                let e = Entry {
                    file,
                    msn,
                    duration: d,
                    discontinuity: std::mem::take(&mut self.pending_discontinuity),
                    date_time: dt,
                };
                self.last_msn = Some(msn);
                self.target = self.target.max(d.round().max(1.0) as u64);
                self.entries.push_back(e.clone());
                added.push(e);
            }
        }
        let mut gone = Vec::new();
        while self.entries.len() > self.list + SPARE {
            if let Some(e) = self.entries.pop_front() {
                if e.discontinuity {
                    self.dropped_discontinuities += 1;
                }
                gone.push(e.file);
            }
        }
        (added, gone)
    }

    /// The playlist players get, or None before the first segment.
    pub fn render(&self) -> Option<String> {
        let skip = self.entries.len().saturating_sub(self.list);
        let shown = self.entries.iter().skip(skip);
        let first = self.entries.get(skip)?;
        let hidden_tags = self
            .entries
            .iter()
            .take(skip)
            .filter(|e| e.discontinuity)
            .count() as u64;
        let mut out = format!(
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-INDEPENDENT-SEGMENTS\n#EXT-X-TARGETDURATION:{}\n#EXT-X-MEDIA-SEQUENCE:{}\n",
            self.target.max(1),
            first.msn
        );
        let ds = self.dropped_discontinuities + hidden_tags;
        if ds > 0 {
            out.push_str(&format!("#EXT-X-DISCONTINUITY-SEQUENCE:{ds}\n"));
        }
        for e in shown {
            if e.discontinuity {
                out.push_str("#EXT-X-DISCONTINUITY\n");
            }
            if let Some(dt) = &e.date_time {
                out.push_str(&format!("#EXT-X-PROGRAM-DATE-TIME:{dt}\n"));
            }
            out.push_str(&format!(
                "#EXTINF:{:.6},\n{}\n",
                e.duration,
                segment_name(e.file)
            ));
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ffmpeg(first: u64, n: u64) -> String {
        let mut s = format!(
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:{first}\n"
        );
        for i in first..first + n {
            s.push_str(&format!(
                "#EXT-X-PROGRAM-DATE-TIME:2026-11-30T10:00:0{}.000+0000\n#EXTINF:2.000000,\nlive{i:06}.ts\n",
                i % 10
            ));
        }
        s
    }

    fn msn(p: &str) -> u64 {
        p.lines()
            .find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:"))
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_programme_change_keeps_the_old_segments_listed_after_a_discontinuity() {
        let mut w = Window::new();
        w.begin(5, false, 4, 2);
        assert!(w.render().is_none());
        w.learn(&ffmpeg(5, 3));
        let p = w.render().unwrap();
        assert_eq!(msn(&p), 5);
        assert!(p.contains("live000005.ts") && p.contains("live000007.ts"));
        assert!(!p.contains("DISCONTINUITY"));
        // Next programme at final + 1, ffmpeg's playlist starts over.
        w.begin(8, true, 4, 2);
        let (added, gone) = w.learn(&ffmpeg(8, 1));
        assert_eq!(added.len(), 1);
        assert!(gone.is_empty());
        let p = w.render().unwrap();
        assert_eq!(msn(&p), 5);
        let lines: Vec<&str> = p.lines().collect();
        let at = |x: &str| lines.iter().position(|l| *l == x).unwrap();
        assert!(at("live000007.ts") < at("#EXT-X-DISCONTINUITY"));
        assert!(at("#EXT-X-DISCONTINUITY") < at("live000008.ts"));
        // Learning the same playlist again adds nothing.
        assert!(w.learn(&ffmpeg(8, 1)).0.is_empty());
        // The tag slides out: the discontinuity sequence counts it.
        w.learn(&ffmpeg(8, 6));
        let p = w.render().unwrap();
        assert_eq!(msn(&p), 10);
        assert!(p.contains("#EXT-X-DISCONTINUITY-SEQUENCE:1\n"));
        assert!(!p.contains("#EXT-X-DISCONTINUITY\n"));
    }

    #[test]
    fn old_files_leave_the_disk_only_after_the_spare_and_msn_never_goes_back() {
        let mut w = Window::new();
        w.begin(0, false, 3, 2);
        let (_, gone) = w.learn(&ffmpeg(0, 3 + SPARE as u64 + 2));
        assert_eq!(gone, vec![0, 1]);
        let before = msn(&w.render().unwrap());
        // A fresh start at 0 again: numbering of files restarts, msn does not.
        let files = w.clear();
        assert_eq!(files.len(), 3 + SPARE);
        w.begin(0, false, 3, 2);
        w.learn(&ffmpeg(0, 2));
        assert!(msn(&w.render().unwrap()) > before);
        // A segment number below the programme's first is not learnt.
        w.begin(100, true, 3, 2);
        assert!(w.learn(&ffmpeg(50, 2)).0.is_empty());
    }

    #[test]
    fn junk_lines_are_ignored() {
        let mut w = Window::new();
        w.begin(0, false, 3, 6);
        let (added, _) = w.learn("#EXTM3U\n#EXTINF:abc,\nlive000000.ts\n#EXTINF:2,\n../x.ts\nlive1.ts\n#EXTINF:2.5,\nlive000002.ts\n");
        assert_eq!(added.len(), 1);
        assert_eq!(added[0].file, 2);
        assert!(w.render().unwrap().contains("#EXT-X-TARGETDURATION:6\n"));
    }
}
