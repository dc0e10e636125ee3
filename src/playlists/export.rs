//! The channel list handed to players: `/playlist.m3u` and the HDHomeRun
//! lineup. Imported streams first, grouped and ordered as their playlists
//! had them, then YAML streams in file order, then API streams oldest first.
//! Every URL is the proxied one (`/stream/{id}`, or `/hls/{id}/playlist.m3u8`
//! for an HLS source, so players that go by the extension pick HLS).

use std::collections::HashSet;
use std::fmt::Write;

use crate::app::App;
use crate::registry::{Origin, StreamSpec};

/// One channel as players see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    pub id: String,
    pub name: String,
    pub group: String,
    pub tvg_id: String,
    pub tvg_name: String,
    pub tvg_logo: String,
    pub chno: String,
    pub hls: bool,
}

impl Channel {
    fn new(id: &str, spec: &StreamSpec) -> Channel {
        let m = |k: &str| spec.metadata.get(k).cloned().unwrap_or_default();
        let name = [m("name"), m("tvg-name"), m("title"), id.to_owned()]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or_default();
        // YAML and API streams may use plainer keys (group, logo, ...).
        let either =
            |a: &str, b: &str| Some(m(a)).filter(|v| !v.is_empty()).unwrap_or_else(|| m(b));
        Channel {
            id: id.to_owned(),
            group: either("group-title", "group"),
            tvg_id: m("tvg-id"),
            tvg_name: m("tvg-name"),
            tvg_logo: either("tvg-logo", "logo"),
            chno: either("tvg-chno", "channel_number"),
            hls: is_hls(&spec.url),
            name,
        }
    }

    /// The proxied URL under `base` (`http://host:port{root_path}`).
    pub fn url(&self, base: &str) -> String {
        if self.hls {
            format!("{base}/hls/{}/playlist.m3u8", self.id)
        } else {
            format!("{base}/stream/{}", self.id)
        }
    }
}

fn is_hls(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| {
        let p = u.path().to_ascii_lowercase();
        p.ends_with(".m3u8") || p.ends_with(".m3u")
    })
}

/// Every channel, in export order; `group` keeps only that `group-title`.
pub fn channels(app: &App, group: Option<&str>) -> Vec<Channel> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut push = |id: &str, spec: &StreamSpec| {
        if seen.insert(id.to_owned()) {
            let c = Channel::new(id, spec);
            if group.is_none_or(|g| g == c.group) {
                out.push(c);
            }
        }
    };
    for list in &app.playlists.lists {
        for (id, _) in &list.current().entries {
            // Shown as the registry has it (a YAML stream may hold the id).
            match app.registry.get(id) {
                Some(s) => push(id, &s.spec()),
                None => continue,
            }
        }
    }
    for s in &app.config.streams {
        if let Some(st) = app.registry.get(&s.id) {
            push(&s.id, &st.spec());
        }
    }
    for s in app.registry.list() {
        if s.origin == Origin::Api {
            push(&s.id, &s.spec());
        }
    }
    out
}

/// The M3U text. `guide` is the absolute `/epg.xml` URL when a guide is
/// configured.
pub fn render(channels: &[Channel], base: &str, guide: Option<&str>) -> String {
    let mut out = String::with_capacity(64 + channels.len() * 200);
    out.push_str("#EXTM3U");
    if let Some(g) = guide {
        let g = attr(g);
        let _ = write!(out, " url-tvg=\"{g}\" x-tvg-url=\"{g}\"");
    }
    out.push('\n');
    for c in channels {
        out.push_str("#EXTINF:-1");
        for (k, v) in [
            ("tvg-id", &c.tvg_id),
            ("tvg-name", &c.tvg_name),
            ("tvg-logo", &c.tvg_logo),
            ("tvg-chno", &c.chno),
            ("group-title", &c.group),
        ] {
            if !v.is_empty() {
                let _ = write!(out, " {k}=\"{}\"", attr(v));
            }
        }
        let _ = writeln!(out, ",{}", line(&c.name));
        out.push_str(&c.url(base));
        out.push('\n');
    }
    out
}

/// An attribute value: no quote can end it early, no line break.
fn attr(v: &str) -> String {
    v.chars()
        .filter(|c| !c.is_control())
        .map(|c| if c == '"' { '\'' } else { c })
        .collect()
}

fn line(v: &str) -> String {
    v.chars().filter(|c| !c.is_control()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_attributes_and_urls() {
        let mut spec = StreamSpec {
            url: "http://p/live/1.ts".into(),
            ..Default::default()
        };
        spec.metadata.insert("name".into(), "CNN \"HD\"\n".into());
        spec.metadata.insert("group-title".into(), "News".into());
        spec.metadata.insert("tvg-id".into(), "cnn.us".into());
        let a = Channel::new("abc", &spec);
        let hls = Channel::new(
            "def",
            &StreamSpec {
                url: "https://p/x/index.m3u8?token=1".into(),
                ..Default::default()
            },
        );
        let text = render(
            &[a, hls],
            "http://h:1/m",
            Some("http://h:1/m/epg.xml?token=t"),
        );
        assert_eq!(
            text,
            "#EXTM3U url-tvg=\"http://h:1/m/epg.xml?token=t\" x-tvg-url=\"http://h:1/m/epg.xml?token=t\"\n\
             #EXTINF:-1 tvg-id=\"cnn.us\" group-title=\"News\",CNN \"HD\"\n\
             http://h:1/m/stream/abc\n\
             #EXTINF:-1,def\n\
             http://h:1/m/hls/def/playlist.m3u8\n"
        );
    }
}
