//! Standalone use, without m3u-editor: the front door Threadfin or xTeVe
//! would otherwise be.
//!
//! - `import`: `playlists[]` in the YAML are fetched (through the provider's
//!   user agent, headers and the private-upstream guard), parsed (`parse`),
//!   filtered and registered as streams, then refreshed on a timer; a
//!   refresh swaps the list in one step and never disturbs viewers of the
//!   streams it keeps; a failed one keeps the previous list.
//! - `export`: `GET /playlist.m3u`, every stream with its metadata and its
//!   proxied URL, for VLC, TiviMate, Kodi, Jellyfin.
//! - `epg`: `GET /epg.xml`, the XMLTV guide fetched once for all players.
//! - `hdhomerun`: `discover.json`, `lineup.json`, ... so Plex, Emby and
//!   Jellyfin take m3u-edge for an HDHomeRun tuner; `ssdp` answers their
//!   LAN discovery.
//! - `serve`: the Pingora side of those routes (token, base URL, bytes).
//!
//! Players cannot send headers, so these routes take their token in the
//! query (`?token=`) or, for HDHomeRun clients that build URLs from a base,
//! in the path (`/hdhr/{token}/...`). `playlist.token` is a token for
//! players only, so the management token never has to be typed into a TV.

pub mod api;
pub mod epg;
pub mod export;
pub mod hdhomerun;
pub mod import;
pub mod parse;
pub mod serve;
pub mod ssdp;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};
use regex::Regex;
use serde_json::{json, Value};

use crate::config::{Config, PlaylistConfig, PlaylistFilter};
use crate::registry::StreamSpec;

/// What a token must escape to be one path segment (`/hdhr/{token}/`):
/// everything but RFC 3986's unreserved characters.
pub const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Most entries one playlist may have (a large Xtream account has ~100k).
pub const MAX_ENTRIES: usize = 500_000;

/// Largest playlist body read (100k entries are ~30 MiB).
pub const MAX_PLAYLIST_BYTES: usize = 256 << 20;

/// Every imported playlist, and the guide cache.
pub struct Playlists {
    pub lists: Vec<ListState>,
    pub epg: epg::EpgCache,
    /// The HDHomeRun device id (8 hex digits, stable across restarts).
    pub device_id: String,
}

/// One `playlists[]` entry: its config, what it imported last, how the
/// refreshes went.
pub struct ListState {
    pub config: PlaylistConfig,
    include: Filter,
    exclude: Filter,
    /// Swapped whole by a refresh: readers see the old or the new list.
    current: RwLock<Arc<Imported>>,
    status: Mutex<Status>,
    refreshing: tokio::sync::Mutex<()>,
}

/// What one successful import produced, in playlist order.
#[derive(Debug, Default)]
pub struct Imported {
    pub entries: Vec<(String, Arc<StreamSpec>)>,
    /// `url-tvg` of the list's header (http/https only).
    pub guide_url: Option<url::Url>,
}

#[derive(Debug, Default, Clone)]
pub struct Status {
    pub last_attempt: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    /// The latest refresh failed with this (`None` after a success).
    pub last_error: Option<String>,
    pub refreshes: u64,
    pub failures: u64,
    /// Entries of the last import: in the list, after the filters, skipped
    /// (not http(s), duplicates, `limits.max_streams`).
    pub total: usize,
    pub filtered_out: usize,
    pub skipped: usize,
}

/// Compiled include/exclude patterns.
#[derive(Debug, Default)]
struct Filter {
    group: Option<Regex>,
    name: Option<Regex>,
}

impl Filter {
    fn new(f: &PlaylistFilter) -> Result<Filter, regex::Error> {
        let compile = |p: &Option<String>| p.as_deref().map(Regex::new).transpose();
        Ok(Filter {
            group: compile(&f.group)?,
            name: compile(&f.name)?,
        })
    }
}

impl ListState {
    /// Include (all present patterns match) and not exclude (any present
    /// pattern matches).
    pub fn keeps(&self, group: &str, name: &str) -> bool {
        let inc = &self.include;
        let included = inc.group.as_ref().is_none_or(|r| r.is_match(group))
            && inc.name.as_ref().is_none_or(|r| r.is_match(name));
        let exc = &self.exclude;
        let excluded = exc.group.as_ref().is_some_and(|r| r.is_match(group))
            || exc.name.as_ref().is_some_and(|r| r.is_match(name));
        included && !excluded
    }

    pub fn current(&self) -> Arc<Imported> {
        self.current.read().clone()
    }

    pub fn status(&self) -> Status {
        self.status.lock().clone()
    }
}

impl Playlists {
    pub fn new(config: &Config) -> anyhow::Result<Playlists> {
        let lists = config
            .playlists
            .iter()
            .map(|c| {
                Ok(ListState {
                    include: Filter::new(&c.include)?,
                    exclude: Filter::new(&c.exclude)?,
                    config: c.clone(),
                    current: RwLock::default(),
                    status: Mutex::default(),
                    refreshing: tokio::sync::Mutex::new(()),
                })
            })
            .collect::<Result<Vec<_>, regex::Error>>()?;
        Ok(Playlists {
            lists,
            epg: epg::EpgCache::default(),
            device_id: config
                .hdhomerun
                .device_id
                .clone()
                .unwrap_or_else(|| hdhomerun::derive_device_id(config)),
        })
    }

    /// The guide `/epg.xml` serves: `epg.url`, else the first playlist's
    /// `epg_url`, else the first `url-tvg` an imported list named.
    pub fn guide_url(&self, config: &Config) -> Option<url::Url> {
        if let Some(u) = &config.epg.url {
            return Some(u.clone());
        }
        if let Some(u) = self.lists.iter().find_map(|l| l.config.epg_url.clone()) {
            return Some(u);
        }
        self.lists
            .iter()
            .find_map(|l| l.current().guide_url.clone())
    }

    /// The provider whose headers fetch `url` (the guide): the playlist's
    /// that named it, else matched by host.
    pub fn provider_for_guide(&self, url: &url::Url) -> Option<String> {
        self.lists
            .iter()
            .find(|l| {
                l.config.epg_url.as_ref() == Some(url)
                    || l.current().guide_url.as_ref() == Some(url)
            })
            .and_then(|l| l.config.provider.clone())
    }

    /// Number of lists whose latest refresh failed.
    pub fn failing(&self) -> usize {
        self.lists
            .iter()
            .filter(|l| l.status.lock().last_error.is_some())
            .count()
    }

    /// `/stats` and `GET /playlists`: one object per list.
    pub fn stats(&self) -> Value {
        Value::Array(
            self.lists
                .iter()
                .map(|l| {
                    let s = l.status();
                    json!({
                        "name": l.config.name,
                        "ok": s.last_error.is_none() && s.last_success.is_some(),
                        "streams": l.current().entries.len(),
                        "entries_in_list": s.total,
                        "filtered_out": s.filtered_out,
                        "skipped": s.skipped,
                        "refresh_seconds": l.config.refresh.as_secs(),
                        "last_attempt": s.last_attempt,
                        "last_success": s.last_success,
                        "last_error": s.last_error,
                        "refreshes": s.refreshes,
                        "failures": s.failures,
                    })
                })
                .collect(),
        )
    }
}
