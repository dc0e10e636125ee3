//! A small, strict parser of IPTV "extended M3U" channel lists (`#EXTM3U`,
//! `#EXTINF` with `tvg-*` attributes, as Xtream panels and iptv-org write them).
//!
//! Written here rather than taken from crates.io: the crates found
//! (`m3u` 0.4, 2017, no attributes; `crispy-m3u` 0.1, one release) either do
//! not read IPTV attributes or are too young to trust with what real lists
//! contain. What real lists contain, and what this parser does with it:
//!
//! - a UTF-8 BOM, CRLF or lone CR line ends, invalid UTF-8 (replaced);
//! - attributes quoted with `"` or `'`, or not quoted at all (up to the next
//!   space), names in any case, commas inside quoted values (the channel
//!   name starts after the first comma outside quotes);
//! - `#EXTGRP:` (the group when `group-title` is absent), `#EXTVLCOPT:`
//!   `http-user-agent` / `http-referrer` (kept for the upstream request),
//!   `#KODIPROP:` and every other directive (ignored);
//! - an URL line without `#EXTINF` (named after its URL).
//!
//! Strict where it matters: a body that does not start with `#EXTM3U` (an
//! HTML error page, a JSON "account expired") is an error, so a provider
//! outage never replaces a good channel list with nothing. No input panics
//! (see the random-input test) and the work is linear in the input.

use std::collections::BTreeMap;

/// One channel of the list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// The URL line, trimmed.
    pub url: String,
    /// The text after the `#EXTINF` attributes' comma (may be empty).
    pub name: String,
    /// Attributes of `#EXTINF`, names lowercased.
    pub attrs: BTreeMap<String, String>,
    /// `#EXTGRP:` of this entry.
    pub extgrp: Option<String>,
    pub user_agent: Option<String>,
    pub referrer: Option<String>,
}

impl Entry {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// `group-title`, else `#EXTGRP`, else "".
    pub fn group(&self) -> &str {
        self.attr("group-title")
            .or(self.extgrp.as_deref())
            .unwrap_or("")
    }

    /// The channel's display name: the `#EXTINF` title, else `tvg-name`,
    /// else the URL.
    pub fn display_name(&self) -> &str {
        if !self.name.is_empty() {
            &self.name
        } else {
            self.attr("tvg-name").unwrap_or(&self.url)
        }
    }
}

/// A parsed list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Playlist {
    /// Attributes of the `#EXTM3U` line (`url-tvg`, `x-tvg-url`, ...).
    pub header: BTreeMap<String, String>,
    pub entries: Vec<Entry>,
}

impl Playlist {
    /// The guide URL the list names (`url-tvg` or `x-tvg-url`; the first
    /// of a comma-separated list).
    pub fn guide_url(&self) -> Option<&str> {
        self.header
            .get("url-tvg")
            .or_else(|| self.header.get("x-tvg-url"))
            .and_then(|v| v.split(',').map(str::trim).find(|u| !u.is_empty()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not an M3U playlist: it does not start with #EXTM3U (first bytes: {0:?})")]
    NotM3u(String),
    #[error("the playlist has more than {0} entries")]
    TooMany(usize),
}

/// Parses `body`; at most `max_entries` entries.
pub fn parse(body: &[u8], max_entries: usize) -> Result<Playlist, ParseError> {
    let text = String::from_utf8_lossy(body);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut lines = text
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("");
    let Some(header) = strip_tag(first, "#EXTM3U") else {
        return Err(ParseError::NotM3u(first.chars().take(40).collect()));
    };
    let mut out = Playlist {
        header: attributes(header).0,
        entries: Vec::new(),
    };
    let mut pending = Entry::default();
    for line in lines {
        if let Some(rest) = strip_tag(line, "#EXTINF:") {
            let (attrs, name) = attributes(rest);
            pending.attrs = attrs;
            pending.name = name.trim().to_owned();
        } else if let Some(rest) = strip_tag(line, "#EXTGRP:") {
            pending.extgrp = Some(rest.trim().to_owned()).filter(|g| !g.is_empty());
        } else if let Some(rest) = strip_tag(line, "#EXTVLCOPT:") {
            if let Some((k, v)) = rest.split_once('=') {
                let v = Some(v.trim().to_owned()).filter(|v| !v.is_empty());
                match k.trim().to_ascii_lowercase().as_str() {
                    "http-user-agent" => pending.user_agent = v,
                    "http-referrer" | "http-referer" => pending.referrer = v,
                    _ => {}
                }
            }
        } else if line.starts_with('#') {
            // #KODIPROP, #EXT-X-*, comments: nothing we can honour.
        } else {
            if out.entries.len() >= max_entries {
                return Err(ParseError::TooMany(max_entries));
            }
            let mut e = std::mem::take(&mut pending);
            e.url = line.to_owned();
            out.entries.push(e);
        }
    }
    Ok(out)
}

/// `line` without `tag` (ASCII case-insensitive), if it starts with it.
fn strip_tag<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    let head = line.get(..tag.len())?;
    head.eq_ignore_ascii_case(tag).then(|| &line[tag.len()..])
}

/// Parses `-1 a="x" b=y c='z',Title` (an `#EXTINF` rest, or an `#EXTM3U`
/// rest without a title) into its attributes and the text after the first
/// comma outside quotes. The leading duration is skipped.
fn attributes(s: &str) -> (BTreeMap<String, String>, &str) {
    let bytes = s.as_bytes();
    let mut attrs = BTreeMap::new();
    let mut i = 0;
    // The duration (`-1`, `0`, `10.5`): everything up to a space or comma.
    while i < bytes.len() && !matches!(bytes[i], b' ' | b'\t' | b',') {
        // A header (`#EXTM3U url-tvg=...`) has no duration: an `=` says so.
        if bytes[i] == b'=' {
            i = 0;
            break;
        }
        i += 1;
    }
    loop {
        while i < bytes.len() && matches!(bytes[i], b' ' | b'\t') {
            i += 1;
        }
        if i >= bytes.len() {
            return (attrs, "");
        }
        if bytes[i] == b',' {
            return (attrs, &s[i + 1..]);
        }
        // A name: up to `=`, space or comma.
        let start = i;
        while i < bytes.len() && !matches!(bytes[i], b'=' | b' ' | b'\t' | b',') {
            i += 1;
        }
        let name = s[start..i].to_ascii_lowercase();
        if i >= bytes.len() || bytes[i] != b'=' {
            // A bare word (no value): skipped.
            continue;
        }
        i += 1;
        let value = match bytes.get(i) {
            Some(&q) if q == b'"' || q == b'\'' => {
                let vstart = i + 1;
                match s[vstart..].find(q as char) {
                    Some(len) => {
                        i = vstart + len + 1;
                        &s[vstart..vstart + len]
                    }
                    // An unclosed quote: the rest of the line, no title.
                    None => {
                        i = bytes.len();
                        &s[vstart..]
                    }
                }
            }
            _ => {
                let vstart = i;
                while i < bytes.len() && !matches!(bytes[i], b' ' | b'\t' | b',') {
                    i += 1;
                }
                &s[vstart..i]
            }
        };
        if !name.is_empty() {
            attrs.insert(name, value.trim().to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_world_lines() {
        let body = "\u{feff}#EXTM3U url-tvg=\"http://p/epg.xml.gz,http://q/e.xml\" refresh=3600\r\n\
            #EXTINF:-1 tvg-id=\"cnn.us\" tvg-name=\"CNN\" tvg-logo=\"http://l/cnn.png\" group-title=\"News, World\",CNN HD, East\r\n\
            #EXTVLCOPT:http-user-agent=VLC/3.0\r\n\
            #EXTVLCOPT:http-referrer=http://ref/\r\n\
            #KODIPROP:inputstream.adaptive.license_type=clearkey\r\n\
            http://p/live/u/p/1.ts\r\n\
            #EXTINF:0 TVG-ID=bbc.uk tvg-chno=101 group-title='UK',BBC One\n\
            #EXTGRP:Ignored\n\
            http://p/live/u/p/2.ts\n\
            \n\
            #EXTINF:-1,No attributes\r\
            http://p/3.m3u8\n\
            http://p/bare.ts\n\
            #EXTINF:-1 tvg-name=\"Only Tvg\",\n\
            http://p/5.ts\n\
            #EXTGRP:Sports\n\
            #EXTINF:-1 tvg-id=\"unclosed,Broken\n\
            http://p/6.ts\n";
        let p = parse(body.as_bytes(), 100).unwrap();
        assert_eq!(p.guide_url(), Some("http://p/epg.xml.gz"));
        assert_eq!(p.entries.len(), 6);
        let e = &p.entries[0];
        assert_eq!(e.url, "http://p/live/u/p/1.ts");
        assert_eq!(e.name, "CNN HD, East");
        assert_eq!(e.group(), "News, World");
        assert_eq!(e.attr("tvg-id"), Some("cnn.us"));
        assert_eq!(e.attr("tvg-logo"), Some("http://l/cnn.png"));
        assert_eq!(e.user_agent.as_deref(), Some("VLC/3.0"));
        assert_eq!(e.referrer.as_deref(), Some("http://ref/"));
        let e = &p.entries[1];
        assert_eq!(e.attr("tvg-id"), Some("bbc.uk"));
        assert_eq!(e.attr("tvg-chno"), Some("101"));
        assert_eq!(e.group(), "UK");
        assert_eq!(e.name, "BBC One");
        assert_eq!(p.entries[2].name, "No attributes");
        assert_eq!(p.entries[2].url, "http://p/3.m3u8");
        assert_eq!(p.entries[3].display_name(), "http://p/bare.ts");
        assert_eq!(p.entries[3].group(), "");
        assert_eq!(p.entries[4].display_name(), "Only Tvg");
        assert_eq!(p.entries[5].group(), "Sports");
        assert_eq!(p.entries[5].attr("tvg-id"), Some("unclosed,Broken"));
    }

    #[test]
    fn not_m3u_is_an_error() {
        for body in [
            &b""[..],
            b"<html><body>Account expired</body></html>",
            b"{\"user_info\":{\"auth\":0}}",
            b"http://p/1.ts\n",
        ] {
            assert!(matches!(parse(body, 10), Err(ParseError::NotM3u(_))));
        }
        let many = "#EXTM3U\nhttp://a/1\nhttp://a/2\nhttp://a/3\n";
        assert_eq!(parse(many.as_bytes(), 2), Err(ParseError::TooMany(2)));
        assert_eq!(parse(b"#extm3u\n", 2).unwrap().entries.len(), 0);
    }

    /// Fuzz-style: random bytes drawn from the characters that matter to
    /// the grammar never panic, and every entry has a non-empty URL.
    #[test]
    fn random_input_never_panics() {
        use rand::{Rng, SeedableRng};
        const ALPHABET: &[&str] = &[
            "#EXTM3U",
            "#EXTINF:",
            "#EXTGRP:",
            "#EXTVLCOPT:",
            "http-user-agent=",
            "#KODIPROP:",
            "\"",
            "'",
            "=",
            ",",
            " ",
            "\t",
            "\r",
            "\n",
            "\r\n",
            "-1",
            "a",
            "tvg-id",
            "é",
            "\u{feff}",
            "\u{0}",
            "http://x/",
            "#",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        for round in 0..20_000 {
            let mut s: Vec<u8> = if round % 2 == 0 {
                b"#EXTM3U\n".to_vec()
            } else {
                Vec::new()
            };
            for _ in 0..rng.gen_range(0..40) {
                if rng.gen_bool(0.1) {
                    s.push(rng.gen());
                } else {
                    s.extend_from_slice(ALPHABET[rng.gen_range(0..ALPHABET.len())].as_bytes());
                }
            }
            if let Ok(p) = parse(&s, 1000) {
                for e in &p.entries {
                    assert!(!e.url.is_empty() && !e.url.starts_with('#'));
                    let _ = (e.group(), e.display_name());
                }
                let _ = p.guide_url();
            }
        }
    }

    #[test]
    fn hundred_thousand_entries() {
        let mut body = String::from("#EXTM3U\n");
        for i in 0..100_000 {
            body.push_str(&format!(
                "#EXTINF:-1 tvg-id=\"c{i}\" group-title=\"G{}\",Channel {i}\nhttp://p/live/{i}.ts\n",
                i % 50
            ));
        }
        let p = parse(body.as_bytes(), 1_000_000).unwrap();
        assert_eq!(p.entries.len(), 100_000);
        assert_eq!(p.entries[99_999].name, "Channel 99999");
    }
}
