//! Pass 2 for the standalone sections: `playlists`, `playlist`, `epg`,
//! `hdhomerun` (see `crate::playlists`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::super::raw::{
    spanned_at, RawEpg, RawHdHomeRun, RawPlaylist, RawPlaylistExport, RawPlaylistFilter,
};
use super::super::{
    EpgConfig, HdHomeRunConfig, PlaylistConfig, PlaylistExportConfig, PlaylistFilter,
    PlaylistSource, ProviderConfig,
};
use super::{
    api_token, boolean, duration, http_url, line_note, live_mode, whole_number, At, Check,
    Validator,
};

/// Shortest `refresh` of a playlist or guide: providers ban accounts that
/// poll their lists too often.
const MIN_REFRESH: Duration = Duration::from_secs(10);

/// Default `playlists[].refresh`.
const DEFAULT_PLAYLIST_REFRESH: Duration = Duration::from_secs(6 * 3600);

impl Validator<'_> {
    pub(super) fn playlists(
        &mut self,
        raw: Vec<RawPlaylist>,
        providers: &[ProviderConfig],
    ) -> Vec<PlaylistConfig> {
        let mut names: HashMap<String, (usize, At)> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, p) in raw.iter().enumerate() {
            let base = format!("playlists[{i}]");
            let name = self.spanned(&p.name, &format!("{base}.name"), String::new(), |s| {
                playlist_name(s)
            });
            if !name.is_empty() {
                let at = spanned_at(&p.name);
                if let Some((first, first_at)) = names.get(&name) {
                    let msg = format!(
                        "duplicate playlist name {name:?}; playlists[{first}]{} already uses it",
                        line_note(*first_at)
                    );
                    self.report(at, &format!("{base}.name"), &msg);
                } else {
                    names.insert(name.clone(), (i, at));
                }
            }
            let source = self.spanned(
                &p.url,
                &format!("{base}.url"),
                PlaylistSource::File(PathBuf::new()),
                |s| playlist_source(s),
            );
            let provider = self.optional(&p.provider, &format!("{base}.provider"), |name| {
                if providers.iter().any(|p| &p.name == name) {
                    Ok(name.clone())
                } else {
                    let known: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
                    Err(format!(
                        "unknown provider {name:?}; defined providers: {}",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ))
                }
            });
            out.push(PlaylistConfig {
                name,
                source,
                provider,
                refresh: self.leaf(
                    &p.refresh,
                    &format!("{base}.refresh"),
                    DEFAULT_PLAYLIST_REFRESH,
                    refresh,
                ),
                include: self.filter(p.include.as_ref(), &format!("{base}.include")),
                exclude: self.filter(p.exclude.as_ref(), &format!("{base}.exclude")),
                live: self.leaf(&p.live, &format!("{base}.live"), None, live_mode),
                epg_url: self.optional(&p.epg_url, &format!("{base}.epg_url"), |u| http_url(u)),
            });
        }
        out
    }

    fn filter(&mut self, raw: Option<&RawPlaylistFilter>, base: &str) -> PlaylistFilter {
        let Some(raw) = raw else {
            return PlaylistFilter::default();
        };
        PlaylistFilter {
            group: self.optional(&raw.group, &format!("{base}.group"), |s| pattern(s)),
            name: self.optional(&raw.name, &format!("{base}.name"), |s| pattern(s)),
        }
    }

    pub(super) fn playlist_export(&mut self, raw: RawPlaylistExport) -> PlaylistExportConfig {
        PlaylistExportConfig {
            token: self.optional(&raw.token, "playlist.token", |s| api_token(s)),
        }
    }

    pub(super) fn epg(&mut self, raw: RawEpg) -> EpgConfig {
        let d = EpgConfig::default();
        EpgConfig {
            url: self.optional(&raw.url, "epg.url", |u| http_url(u)),
            refresh: self.leaf(&raw.refresh, "epg.refresh", d.refresh, refresh),
        }
    }

    pub(super) fn hdhomerun(&mut self, raw: RawHdHomeRun) -> HdHomeRunConfig {
        let d = HdHomeRunConfig::default();
        HdHomeRunConfig {
            enabled: self.leaf(&raw.enabled, "hdhomerun.enabled", d.enabled, boolean),
            friendly_name: self.leaf(
                &raw.friendly_name,
                "hdhomerun.friendly_name",
                d.friendly_name,
                |s| friendly_name(s),
            ),
            device_id: self.optional(&raw.device_id, "hdhomerun.device_id", |s| device_id(s)),
            tuner_count: self.optional(&raw.tuner_count, "hdhomerun.tuner_count", |s| {
                whole_number(s, 1, 1000).map(|n| n as u32)
            }),
            ssdp: self.leaf(&raw.ssdp, "hdhomerun.ssdp", d.ssdp, boolean),
            open: self.leaf(&raw.open, "hdhomerun.open", d.open, boolean),
        }
    }
}

fn playlist_name(s: &str) -> Check<String> {
    let ok = (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "invalid playlist name {s:?}: use 1 to 64 letters, digits, `_`, `-` or `.`"
        ))
    }
}

/// http(s) URL, or an absolute path to a local file (checked to exist at
/// each import, not here: it may be written later).
fn playlist_source(s: &str) -> Check<PlaylistSource> {
    if s.starts_with('/') {
        return Ok(PlaylistSource::File(PathBuf::from(s)));
    }
    if let Some(path) = s.strip_prefix("file://") {
        if path.starts_with('/') {
            return Ok(PlaylistSource::File(PathBuf::from(path)));
        }
    }
    http_url(s)
        .map(PlaylistSource::Url)
        .map_err(|e| format!("{e}; or give an absolute path to a local file"))
}

fn refresh(s: &super::Scalar) -> Check<Duration> {
    let d = duration(s)?;
    if d < MIN_REFRESH {
        return Err(format!(
            "at least {}: providers ban accounts that poll too often",
            humantime::format_duration(MIN_REFRESH)
        ));
    }
    Ok(d)
}

/// A regular expression of the `regex` crate, size-bounded.
fn pattern(s: &str) -> Check<String> {
    regex::RegexBuilder::new(s)
        .size_limit(1 << 20)
        .build()
        .map(|_| s.to_owned())
        .map_err(|e| format!("invalid regular expression {s:?}: {e}"))
}

fn friendly_name(s: &str) -> Check<String> {
    let t = s.trim();
    if t.is_empty() || t.len() > 64 || t.chars().any(char::is_control) {
        return Err("use 1 to 64 printable characters".to_owned());
    }
    Ok(t.to_owned())
}

fn device_id(s: &str) -> Check<String> {
    if s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_uppercase())
    } else {
        Err(format!(
            "invalid device id {s:?}: use 8 hex digits, e.g. 1054A3F2"
        ))
    }
}
