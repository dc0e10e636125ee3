//! The rewritten playlist every viewer of one playlist generation shares
//! (issue #14 d). References are minted once per generation without viewer
//! identity; a viewer's identity (`client_id`, `username`) is a short query
//! suffix spliced after each reference while its answer is written, so memory
//! holds one rendering per playlist, not one per viewer, and a viewer's
//! answer is produced in bounded pieces. The suffix is what keeps a viewer one
//! client across its playlist, segment and key requests (the `client_id` query
//! wins when the proxy attributes a request, API-COMPAT.md §5).
//!
//! The caller (`hls/fetch.rs`) renders when it stores a fetched playlist; the
//! proxy (`proxy/hls.rs`) writes [`Rendered::pieces`].

use bytes::{Bytes, BytesMut};
use url::Url;

use super::rewrite::{self, Kind, RewriteError};
use super::token::{Claims, Signer};

/// Pieces of a viewer's answer: big enough for few writes, small enough that
/// concurrent answers cost little memory.
pub const PIECE: usize = 64 * 1024;

const DISCONTINUITY: &[u8] = b"#EXT-X-DISCONTINUITY";

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Rewrite(#[from] RewriteError),
    #[error("rewritten playlist too large ({0} bytes, hls.rendered_max_bytes is {1})")]
    TooLarge(usize, usize),
}

/// A playlist with every URI replaced by a signed reference, shared by all viewers.
#[derive(Debug)]
pub struct Rendered {
    body: Bytes,
    /// Where a viewer's suffix goes: the end of each minted reference.
    marks: Vec<usize>,
    /// Where `#EXT-X-DISCONTINUITY` goes when one is asked for (before the
    /// first media segment), and the line end to write after it.
    discontinuity_at: Option<(usize, &'static [u8])>,
    /// Where the numbers a [`View`] may renumber are, for the timeline
    /// (`hls/timeline.rs`): a lane that continues another source or epoch
    /// serves its own media and discontinuity sequence numbers.
    numbers: Numbers,
    /// Identities of the media segments and parts, for telling a lagging
    /// backend from a restarted one (`hls/reset.rs`).
    pub segment_ids: Vec<u64>,
    /// `#EXT-X-DISCONTINUITY` tags in the playlist.
    pub discontinuities: u64,
    /// The provider put `#EXT-X-DISCONTINUITY` before its first segment.
    pub first_tagged: bool,
}

/// Byte positions of renumberable values in the rendered body.
#[derive(Debug, Default)]
struct Numbers {
    /// After the first line: where missing sequence tags are inserted.
    header_end: usize,
    /// The line end the playlist uses.
    eol: &'static [u8],
    media_sequence: Option<(std::ops::Range<usize>, u64)>,
    discontinuity_sequence: Option<(std::ops::Range<usize>, u64)>,
    /// `LAST-MSN` values of `#EXT-X-RENDITION-REPORT` (RFC 8216bis §4.4.5.4):
    /// media sequence numbers too, shifted like this playlist's.
    last_msn: Vec<(std::ops::Range<usize>, u64)>,
}

/// How one viewer's answer differs from the shared rendering.
#[derive(Debug, Clone, Copy, Default)]
pub struct View<'a> {
    /// The viewer's identity, spliced after each reference.
    pub suffix: &'a str,
    /// `#EXT-X-DISCONTINUITY` before the first segment (unless there is one).
    pub discontinuity: bool,
    /// Added to the media sequence numbers (`EXT-X-MEDIA-SEQUENCE`, `LAST-MSN`).
    pub msn_delta: i64,
    /// The `EXT-X-DISCONTINUITY-SEQUENCE` to serve instead of the provider's.
    pub discontinuity_sequence: Option<u64>,
}

/// One change to the shared body: at `at`, drop `skip` bytes and write `text`.
#[derive(Debug)]
struct Edit {
    at: usize,
    skip: usize,
    text: Vec<u8>,
}

/// `{public_url}{root_path}` or `{root_path}`: the prefix of minted URIs.
pub fn prefix(config: &crate::config::Config) -> String {
    let root = &config.server.root_path;
    match &config.server.public_url {
        Some(u) => format!("{}{}", u.as_str().trim_end_matches('/'), root),
        None => root.clone(),
    }
}

/// The query suffix that names a viewer: `&client_id=…[&username=…]`.
pub fn viewer_suffix(client_id: &str, username: Option<&str>) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    q.append_pair("client_id", client_id);
    if let Some(u) = username {
        q.append_pair("username", u);
    }
    format!("&{}", q.finish())
}

impl Rendered {
    /// Rewrites `body` (fetched from `base`) for stream `stream_id`.
    pub fn new(
        body: &[u8],
        base: &Url,
        signer: &Signer,
        prefix: &str,
        stream_id: &str,
        max_bytes: usize,
    ) -> Result<Rendered, RenderError> {
        let mut segments: Vec<Url> = Vec::new();
        let mut mint = |u: &Url, kind: Kind, _: &str| {
            if kind == Kind::Segment {
                segments.push(u.clone());
            }
            let t = signer.mint(&Claims {
                stream_id: stream_id.to_string(),
                url: u.to_string(),
                kind,
                client_id: None,
                username: None,
            });
            format!("{prefix}/hls/{stream_id}/{}?t={t}", kind.file_name())
        };
        let out = rewrite::rewrite(body, base, &mut mint)?;
        if out.body.len() > max_bytes {
            return Err(RenderError::TooLarge(out.body.len(), max_bytes));
        }
        let (discontinuity_at, first_tagged) = if out.info.is_master {
            (None, false)
        } else {
            discontinuity_point(&out.body)
        };
        let (numbers, discontinuities) = if out.info.is_master {
            (Numbers::default(), 0)
        } else {
            scan_numbers(&out.body)
        };
        Ok(Rendered {
            body: Bytes::from(out.body),
            marks: out.minted_ends,
            discontinuity_at,
            numbers,
            segment_ids: segment_ids(&segments),
            discontinuities,
            first_tagged,
        })
    }

    /// The changes a view makes besides the suffixes, in body order.
    fn edits(&self, view: &View) -> Vec<Edit> {
        let mut out = Vec::new();
        let n = &self.numbers;
        let shift = |v: u64| -> Vec<u8> {
            let shifted = (v.min(1 << 62) as i64)
                .saturating_add(view.msn_delta)
                .max(0);
            shifted.to_string().into_bytes()
        };
        let mut header = Vec::new();
        if view.msn_delta != 0 {
            match &n.media_sequence {
                Some((range, v)) => out.push(Edit {
                    at: range.start,
                    skip: range.len(),
                    text: shift(*v),
                }),
                // §4.3.3.2: absent means 0.
                None => {
                    header.extend_from_slice(b"#EXT-X-MEDIA-SEQUENCE:");
                    header.extend_from_slice(&shift(0));
                    header.extend_from_slice(n.eol);
                }
            }
            for (range, v) in &n.last_msn {
                out.push(Edit {
                    at: range.start,
                    skip: range.len(),
                    text: shift(*v),
                });
            }
        }
        if let Some(d) = view.discontinuity_sequence {
            match &n.discontinuity_sequence {
                Some((_, v)) if *v == d => {}
                Some((range, _)) => out.push(Edit {
                    at: range.start,
                    skip: range.len(),
                    text: d.to_string().into_bytes(),
                }),
                // §4.3.3.3: absent means 0.
                None if d == 0 => {}
                None => {
                    header.extend_from_slice(b"#EXT-X-DISCONTINUITY-SEQUENCE:");
                    header.extend_from_slice(d.to_string().as_bytes());
                    header.extend_from_slice(n.eol);
                }
            }
        }
        if !header.is_empty() {
            out.push(Edit {
                at: n.header_end,
                skip: 0,
                text: header,
            });
        }
        if let Some((at, eol)) = self.discontinuity_at.filter(|_| view.discontinuity) {
            let mut text = DISCONTINUITY.to_vec();
            text.extend_from_slice(eol);
            out.push(Edit { at, skip: 0, text });
        }
        out.sort_by_key(|e| e.at);
        out
    }

    /// Length of a viewer's answer.
    pub fn len_for(&self, view: &View) -> usize {
        let edits = self.edits(view);
        let added: usize = edits.iter().map(|e| e.text.len()).sum();
        let skipped: usize = edits.iter().map(|e| e.skip).sum();
        self.body.len() + self.marks.len() * view.suffix.len() + added - skipped
    }

    /// The shared rendering's size.
    pub fn shared_len(&self) -> usize {
        self.body.len()
    }

    /// A viewer's answer in pieces of about [`PIECE`] bytes: the shared
    /// rendering with the viewer's suffix after each reference and the
    /// view's renumbering; `discontinuity` puts an `#EXT-X-DISCONTINUITY`
    /// before the first segment (RFC 8216 §4.3.2.3) unless one is already there.
    pub fn pieces<'a>(&'a self, view: &View<'a>) -> impl Iterator<Item = Bytes> + 'a {
        let suffix = view.suffix;
        let edits = self.edits(view);
        let mut pos = 0;
        let mut mark = 0;
        let mut edit = 0;
        std::iter::from_fn(move || {
            if pos >= self.body.len() && edit >= edits.len() {
                return None;
            }
            let mut piece = BytesMut::with_capacity(PIECE + suffix.len() + 64);
            while piece.len() < PIECE && (pos < self.body.len() || edit < edits.len()) {
                // The next place something is inserted or replaced.
                let next_mark = self.marks.get(mark).copied();
                let next_edit = edits.get(edit).map(|e| e.at);
                let stop = [next_mark, next_edit]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(self.body.len())
                    .max(pos);
                let end = stop.min(pos + (PIECE - piece.len())).min(self.body.len());
                piece.extend_from_slice(&self.body[pos..end]);
                pos = end;
                if Some(pos) == next_mark {
                    piece.extend_from_slice(suffix.as_bytes());
                    mark += 1;
                } else if let Some(e) = edits.get(edit).filter(|e| e.at <= pos) {
                    piece.extend_from_slice(&e.text);
                    pos = (pos + e.skip).min(self.body.len());
                    edit += 1;
                } else if pos >= self.body.len() {
                    // Edits past the end (none are made there): stop.
                    edit = edits.len();
                }
            }
            Some(piece.freeze())
        })
    }
}

/// Stable identities of segment URLs: by path when the paths of the window
/// are distinct (providers that sign each playlist fetch change the query of
/// every segment every time, which must not look like all-new segments), by
/// the whole URL otherwise (`seg.php?id=7`).
fn segment_ids(urls: &[Url]) -> Vec<u64> {
    use std::hash::{Hash, Hasher};
    let paths: std::collections::HashSet<&str> = urls.iter().map(|u| u.path()).collect();
    let by_path = paths.len() == urls.len();
    urls.iter()
        .map(|u| {
            let mut h = std::hash::DefaultHasher::new();
            u.host_str().hash(&mut h);
            if by_path {
                u.path().hash(&mut h);
            } else {
                u.as_str().hash(&mut h);
            }
            h.finish()
        })
        .collect()
}

/// The renumberable values of a rendered media playlist, and its number of
/// `#EXT-X-DISCONTINUITY` tags.
fn scan_numbers(body: &[u8]) -> (Numbers, u64) {
    let mut n = Numbers {
        eol: b"\n",
        ..Numbers::default()
    };
    let mut discontinuities = 0;
    let mut start = 0;
    let mut first = true;
    while start < body.len() {
        let end = body[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(body.len(), |i| start + i + 1);
        let line = &body[start..end];
        if first {
            n.header_end = end;
            if line.ends_with(b"\r\n") {
                n.eol = b"\r\n";
            }
            first = false;
        }
        let text = line.trim_ascii_end();
        if text == DISCONTINUITY {
            discontinuities += 1;
        } else if let Some(v) = text.strip_prefix(b"#EXT-X-MEDIA-SEQUENCE:") {
            n.media_sequence = number_at(start + text.len() - v.len(), v);
        } else if let Some(v) = text.strip_prefix(b"#EXT-X-DISCONTINUITY-SEQUENCE:") {
            n.discontinuity_sequence = number_at(start + text.len() - v.len(), v);
        } else if text.starts_with(b"#EXT-X-RENDITION-REPORT:") {
            let key = b"LAST-MSN=";
            if let Some(i) = text.windows(key.len()).position(|w| w == key) {
                let from = i + key.len();
                let len = text[from..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                if let Some(found) = number_at(start + from, &text[from..from + len]) {
                    n.last_msn.push(found);
                }
            }
        }
        start = end;
    }
    (n, discontinuities)
}

/// A decimal value starting at `at` (surrounding spaces allowed): its exact
/// digits range and value, or `None` when it is not a plain integer (the
/// playlist is then served with the provider's own text).
fn number_at(at: usize, text: &[u8]) -> Option<(std::ops::Range<usize>, u64)> {
    let lead = text.iter().take_while(|b| b.is_ascii_whitespace()).count();
    let digits = &text[lead..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    if len == 0 || digits[len..].iter().any(|b| !b.is_ascii_whitespace()) {
        return None;
    }
    let value = std::str::from_utf8(&digits[..len]).ok()?.parse().ok()?;
    Some((at + lead..at + lead + len, value))
}

/// Before the first media segment: its `#EXTINF` line, or its first
/// `#EXT-X-PART` (LL-HLS parts come before the segment's own line), unless a
/// discontinuity tag directly precedes it (then `None`, and `true`: the
/// provider marked it).
fn discontinuity_point(body: &[u8]) -> (Option<(usize, &'static [u8])>, bool) {
    let starts = |i: usize| i == 0 || body[i - 1] == b'\n';
    let Some(at) = (0..body.len()).find(|&i| {
        starts(i)
            && body[i] == b'#'
            && (body[i..].starts_with(b"#EXTINF") || body[i..].starts_with(b"#EXT-X-PART:"))
    }) else {
        return (None, false);
    };
    let before = &body[..at];
    if before.ends_with(b"#EXT-X-DISCONTINUITY\n") || before.ends_with(b"#EXT-X-DISCONTINUITY\r\n")
    {
        return (None, true);
    }
    let eol: &'static [u8] = if before.ends_with(b"\r\n") {
        b"\r\n"
    } else {
        b"\n"
    };
    (Some((at, eol)), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(body: &str) -> Rendered {
        let signer = Signer::new(&[7; 32]);
        let base = Url::parse("http://p.test/live/index.m3u8").unwrap();
        Rendered::new(body.as_bytes(), &base, &signer, "/r", "s1", 1 << 20).unwrap()
    }

    fn answer(r: &Rendered, suffix: &str, disc: bool) -> String {
        let view = View {
            suffix,
            discontinuity: disc,
            ..View::default()
        };
        viewed(r, &view)
    }

    fn viewed(r: &Rendered, view: &View) -> String {
        let all: Vec<u8> = r.pieces(view).flat_map(|b| b.to_vec()).collect();
        assert_eq!(all.len(), r.len_for(view));
        String::from_utf8(all).unwrap()
    }

    const MEDIA: &str = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-KEY:METHOD=AES-128,URI=\"k.key\"\n#EXTINF:2,\na.ts\n#EXTINF:2,\nb.ts\n";

    #[test]
    fn every_reference_gets_the_viewer_suffix() {
        let r = render(MEDIA);
        let sfx = viewer_suffix("c 1&x", Some("ann"));
        assert_eq!(sfx, "&client_id=c+1%26x&username=ann");
        let out = answer(&r, &sfx, false);
        assert_eq!(out.matches(&sfx).count(), 3, "{out}");
        assert!(out.contains(&format!("{sfx}\"")), "{out}");
        // Without the suffix, the answer is the shared rendering.
        assert_eq!(answer(&r, "", false).as_bytes(), &r.body[..]);
    }

    #[test]
    fn discontinuity_before_the_first_segment() {
        let r = render(MEDIA);
        let out = answer(&r, "&client_id=a", true);
        let i = out.find("#EXT-X-DISCONTINUITY\n#EXTINF").unwrap();
        assert!(out[..i].contains("#EXT-X-KEY"));
        assert_eq!(out.matches("#EXT-X-DISCONTINUITY").count(), 1);
    }

    #[test]
    fn big_playlists_come_in_pieces_and_stay_exact() {
        let mut body = String::from("#EXTM3U\r\n#EXT-X-TARGETDURATION:2\r\n");
        for i in 0..3000 {
            body.push_str(&format!("#EXTINF:2,\r\nseg{i}.ts\r\n"));
        }
        let r = render(&body);
        let sfx = "&client_id=viewer-7";
        let view = View {
            suffix: sfx,
            discontinuity: true,
            ..View::default()
        };
        let pieces: Vec<Bytes> = r.pieces(&view).collect();
        assert!(pieces.len() > 3);
        assert!(pieces.iter().all(|p| p.len() <= PIECE + sfx.len() + 64));
        let out = answer(&r, sfx, true);
        assert_eq!(out.matches(sfx).count(), 3000);
        assert!(out.contains("#EXT-X-DISCONTINUITY\r\n#EXTINF"));
    }

    #[test]
    fn too_large_is_an_error() {
        let signer = Signer::new(&[7; 32]);
        let base = Url::parse("http://p.test/i.m3u8").unwrap();
        let e = Rendered::new(MEDIA.as_bytes(), &base, &signer, "", "s", 100).unwrap_err();
        assert!(matches!(e, RenderError::TooLarge(_, 100)));
    }

    #[test]
    fn a_view_renumbers_or_inserts_the_sequence_tags() {
        let body = "#EXTM3U\r\n#EXT-X-TARGETDURATION:2\r\n#EXT-X-MEDIA-SEQUENCE:7\r\n#EXTINF:2,\r\na.ts\r\n#EXT-X-RENDITION-REPORT:URI=\"o.m3u8\",LAST-MSN=8,LAST-PART=1\r\n";
        let r = render(body);
        let view = View {
            suffix: "&client_id=z",
            discontinuity: true,
            msn_delta: 100,
            discontinuity_sequence: Some(3),
        };
        let out = viewed(&r, &view);
        assert!(out.contains("#EXT-X-MEDIA-SEQUENCE:107\r\n"), "{out}");
        assert!(out.contains("LAST-MSN=108,LAST-PART=1"), "{out}");
        assert!(
            out.starts_with("#EXTM3U\r\n#EXT-X-DISCONTINUITY-SEQUENCE:3\r\n"),
            "{out}"
        );
        assert!(out.contains("#EXT-X-DISCONTINUITY\r\n#EXTINF"), "{out}");
        // No sequence tag at all (§4.3.3.2: 0), and a value kept as it is.
        let r = render(MEDIA);
        let view = View {
            msn_delta: 5,
            discontinuity_sequence: Some(0),
            ..View::default()
        };
        let out = viewed(&r, &view);
        assert!(
            out.starts_with("#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:5\n#EXT-X-TARGET"),
            "{out}"
        );
        assert!(!out.contains("DISCONTINUITY"), "{out}");
        assert_eq!(r.discontinuities, 0);
        assert!(!r.first_tagged);
    }

    #[test]
    fn segment_ids_ignore_a_per_fetch_query_unless_paths_repeat() {
        let a = render("#EXTM3U\n#EXTINF:2,\na.ts?tok=1\n#EXTINF:2,\nb.ts?tok=1\n");
        let b = render("#EXTM3U\n#EXTINF:2,\na.ts?tok=2\n#EXTINF:2,\nb.ts?tok=2\n");
        assert_eq!(a.segment_ids, b.segment_ids);
        let c = render("#EXTM3U\n#EXTINF:2,\ns.php?id=1\n#EXTINF:2,\ns.php?id=2\n");
        let d = render("#EXTM3U\n#EXTINF:2,\ns.php?id=2\n#EXTINF:2,\ns.php?id=3\n");
        assert_eq!(c.segment_ids[1], d.segment_ids[0]);
        assert_ne!(c.segment_ids[0], d.segment_ids[1]);
        let t = render("#EXTM3U\n#EXT-X-DISCONTINUITY\n#EXTINF:2,\na.ts\n#EXT-X-DISCONTINUITY\n#EXTINF:2,\nb.ts\n");
        assert!(t.first_tagged);
        assert_eq!(t.discontinuities, 2);
        // LL-HLS: before the parts of the first segment.
        let ll = render("#EXTM3U\n#EXT-X-PART:DURATION=1,URI=\"a.0.ts\"\n#EXTINF:2,\na.ts\n");
        let out = answer(&ll, "", true);
        assert!(out.contains("#EXT-X-DISCONTINUITY\n#EXT-X-PART:"), "{out}");
    }
}
