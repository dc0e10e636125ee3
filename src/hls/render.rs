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
        let mut mint = |u: &Url, kind: Kind, _: &str| {
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
        let discontinuity_at = if out.info.is_master {
            None
        } else {
            discontinuity_point(&out.body)
        };
        Ok(Rendered {
            body: Bytes::from(out.body),
            marks: out.minted_ends,
            discontinuity_at,
        })
    }

    /// Length of a viewer's answer.
    pub fn len_for(&self, suffix: &str, discontinuity: bool) -> usize {
        let extra = match (discontinuity, self.discontinuity_at) {
            (true, Some((_, eol))) => DISCONTINUITY.len() + eol.len(),
            _ => 0,
        };
        self.body.len() + self.marks.len() * suffix.len() + extra
    }

    /// The shared rendering's size.
    pub fn shared_len(&self) -> usize {
        self.body.len()
    }

    /// A viewer's answer in pieces of about [`PIECE`] bytes; `discontinuity`
    /// puts an `#EXT-X-DISCONTINUITY` before the first segment (RFC 8216
    /// §4.3.2.3) unless one is already there.
    pub fn pieces<'a>(
        &'a self,
        suffix: &'a str,
        discontinuity: bool,
    ) -> impl Iterator<Item = Bytes> + 'a {
        let disc = self.discontinuity_at.filter(|_| discontinuity);
        let mut pos = 0;
        let mut mark = 0;
        let mut disc_done = disc.is_none();
        std::iter::from_fn(move || {
            if pos >= self.body.len() && disc_done {
                return None;
            }
            let mut piece = BytesMut::with_capacity(PIECE + suffix.len() + 64);
            while piece.len() < PIECE && (pos < self.body.len() || !disc_done) {
                // The next place something is inserted.
                let next_mark = self.marks.get(mark).copied();
                let next_disc = disc.filter(|_| !disc_done).map(|(at, _)| at);
                let stop = [next_mark, next_disc]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(self.body.len());
                let end = stop.min(pos + (PIECE - piece.len()));
                piece.extend_from_slice(&self.body[pos..end]);
                pos = end;
                if Some(pos) == next_disc && !disc_done {
                    if let Some((_, eol)) = disc {
                        piece.extend_from_slice(DISCONTINUITY);
                        piece.extend_from_slice(eol);
                    }
                    disc_done = true;
                } else if Some(pos) == next_mark {
                    piece.extend_from_slice(suffix.as_bytes());
                    mark += 1;
                }
            }
            Some(piece.freeze())
        })
    }
}

/// Before the first `#EXTINF` at a line start, unless a discontinuity tag
/// directly precedes it.
fn discontinuity_point(body: &[u8]) -> Option<(usize, &'static [u8])> {
    let needle = b"#EXTINF";
    let at = body
        .windows(needle.len())
        .enumerate()
        .find(|&(i, w)| w == needle && (i == 0 || body[i - 1] == b'\n'))
        .map(|(i, _)| i)?;
    let before = &body[..at];
    if before.ends_with(b"#EXT-X-DISCONTINUITY\n") || before.ends_with(b"#EXT-X-DISCONTINUITY\r\n")
    {
        return None;
    }
    let eol: &'static [u8] = if before.ends_with(b"\r\n") {
        b"\r\n"
    } else {
        b"\n"
    };
    Some((at, eol))
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
        let all: Vec<u8> = r.pieces(suffix, disc).flat_map(|b| b.to_vec()).collect();
        assert_eq!(all.len(), r.len_for(suffix, disc));
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
        let pieces: Vec<Bytes> = r.pieces(sfx, true).collect();
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
}
