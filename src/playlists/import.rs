//! Fetching a playlist (or the guide), turning its entries into streams,
//! and the refresh timer.
//!
//! A refresh registers the new list in three steps so that a player reading
//! `/playlist.m3u` meanwhile sees either the whole old list or the whole new
//! one, each entry playable: add or update every new entry in the registry,
//! swap the list, then remove the streams no list names any more. A kept
//! stream is the same `Stream` before and after (only its spec is swapped
//! if its metadata changed), so its viewers and live channel never notice.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::parse::{self, Entry};
use super::{Imported, ListState, MAX_ENTRIES, MAX_PLAYLIST_BYTES};
use crate::app::App;
use crate::config::{PlaylistConfig, PlaylistSource};
use crate::registry::{stream_id_for, Origin, StreamSpec, Upsert};

/// A whole playlist or guide download may take this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// After a failed refresh the next try comes this soon (or at the regular
/// refresh, if sooner).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(300);

/// A downloaded document and the headers that describe its bytes.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub body: Bytes,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
}

/// GETs `url` with the provider's user agent and headers (the named
/// provider, else the one matching the host), through the private-upstream
/// guard of `app.http`; at most `max` bytes. Errors never carry the URL
/// (it holds the account's credentials).
pub async fn fetch_url(
    app: &App,
    url: &url::Url,
    provider: Option<&str>,
    max: usize,
    accept_gzip: bool,
) -> Result<Fetched, String> {
    crate::upstream::guard::check_url(url).map_err(|e| e.to_string())?;
    let p = provider
        .and_then(|n| app.providers.by_name(n))
        .or_else(|| app.providers.by_url(url));
    let ua = p
        .and_then(|p| p.user_agent.clone())
        .unwrap_or_else(|| app.config.upstream.user_agent.clone());
    let mut req = app
        .http
        .get(url.clone())
        .timeout(FETCH_TIMEOUT)
        .header(http::header::USER_AGENT, ua);
    for (k, v) in p.map(|p| p.headers.as_slice()).unwrap_or_default() {
        req = req.header(k.as_str(), v.as_str());
    }
    if accept_gzip {
        req = req.header(http::header::ACCEPT_ENCODING, "gzip");
    }
    let resp = req.send().await.map_err(|e| describe(&e))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("the server answered HTTP {}", status.as_u16()));
    }
    let header = |name: http::header::HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(http::header::CONTENT_TYPE);
    let content_encoding = header(http::header::CONTENT_ENCODING);
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(format!("larger than {max} bytes"));
    }
    let mut body = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| describe(&e))?;
        if body.len() + chunk.len() > max {
            return Err(format!("larger than {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Fetched {
        body: body.freeze(),
        content_type,
        content_encoding,
    })
}

fn describe(e: &reqwest::Error) -> String {
    if let Some(r) = crate::upstream::guard::find_refused(e) {
        return r.to_string();
    }
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_redirect() {
        "too many or refused redirects"
    } else {
        "the download failed"
    };
    // reqwest's message names the URL; its source chain does not.
    let mut cause = String::new();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        cause = s.to_string();
        src = s.source();
    }
    if cause.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {cause}")
    }
}

/// The playlist's bytes, from its URL or its file.
async fn fetch_list(app: &App, cfg: &PlaylistConfig) -> Result<Bytes, String> {
    match &cfg.source {
        PlaylistSource::Url(url) => {
            Ok(
                fetch_url(app, url, cfg.provider.as_deref(), MAX_PLAYLIST_BYTES, false)
                    .await?
                    .body,
            )
        }
        PlaylistSource::File(path) => {
            let meta = tokio::fs::metadata(path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if meta.len() > MAX_PLAYLIST_BYTES as u64 {
                return Err(format!(
                    "{}: larger than {MAX_PLAYLIST_BYTES} bytes",
                    path.display()
                ));
            }
            tokio::fs::read(path)
                .await
                .map(Bytes::from)
                .map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}

/// What a refresh changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub streams: usize,
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

/// The entries of a parsed list that become streams, in list order:
/// filtered, http(s) only, first of duplicate URLs.
fn build(
    list: &ListState,
    parsed: &parse::Playlist,
) -> (Vec<(String, Arc<StreamSpec>)>, usize, usize) {
    let mut seen = HashSet::with_capacity(parsed.entries.len());
    let mut out = Vec::with_capacity(parsed.entries.len());
    let (mut filtered, mut skipped) = (0, 0);
    for e in &parsed.entries {
        if !list.keeps(e.group(), e.display_name()) {
            filtered += 1;
            continue;
        }
        let usable = url::Url::parse(&e.url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
        let id = stream_id_for(&e.url);
        if !usable || !seen.insert(id.clone()) {
            skipped += 1;
            continue;
        }
        out.push((id, Arc::new(spec(&list.config, e))));
    }
    (out, filtered, skipped)
}

/// The stream an entry becomes. Metadata keys are the M3U attribute names,
/// so the export writes them back as they came.
fn spec(cfg: &PlaylistConfig, e: &Entry) -> StreamSpec {
    let mut metadata = BTreeMap::new();
    for key in ["tvg-id", "tvg-name", "tvg-logo", "tvg-chno"] {
        if let Some(v) = e.attr(key) {
            metadata.insert(key.to_owned(), clean(v));
        }
    }
    if let Some(chno) = e
        .attr("channel-number")
        .filter(|_| e.attr("tvg-chno").is_none())
    {
        metadata.insert("tvg-chno".to_owned(), clean(chno));
    }
    let group = e.group();
    if !group.is_empty() {
        metadata.insert("group-title".to_owned(), clean(group));
    }
    metadata.insert("name".to_owned(), clean(e.display_name()));
    metadata.insert("playlist".to_owned(), cfg.name.clone());
    // Header values from the list: only printable ASCII gets through.
    let header_ok = |v: &String| v.bytes().all(|b| (0x20..0x7f).contains(&b));
    StreamSpec {
        url: e.url.clone(),
        user_agent: e.user_agent.clone().filter(header_ok),
        headers: e
            .referrer
            .clone()
            .filter(header_ok)
            .map(|r| vec![("Referer".to_owned(), r)])
            .unwrap_or_default(),
        metadata,
        live: cfg.live,
        provider: cfg.provider.clone(),
        ..StreamSpec::default()
    }
}

/// Control characters out (they would break the exported M3U's lines).
fn clean(v: &str) -> String {
    v.chars().filter(|c| !c.is_control()).collect()
}

/// Fetches, parses and applies list `idx`. A failure changes nothing but
/// the list's status (and the log and metric).
pub async fn refresh(app: &App, idx: usize) -> Result<Summary, String> {
    let Some(list) = app.playlists.lists.get(idx) else {
        return Err("no such playlist".to_owned());
    };
    // One refresh of a list at a time (the timer and `POST /playlists/refresh`).
    let _one = list.refreshing.lock().await;
    let started = Instant::now();
    list.status.lock().last_attempt = Some(chrono::Utc::now());
    let result = fetch_and_apply(app, idx, list).await;
    let mut st = list.status.lock();
    st.refreshes += 1;
    match &result {
        Ok(s) => {
            st.last_success = Some(chrono::Utc::now());
            st.last_error = None;
            app.metrics
                .playlist_refreshes
                .with_label_values(&["ok"])
                .inc();
            tracing::info!(
                playlist = %list.config.name,
                streams = s.streams,
                added = s.added,
                updated = s.updated,
                removed = s.removed,
                ms = started.elapsed().as_millis() as u64,
                "playlist imported"
            );
        }
        Err(e) => {
            st.failures += 1;
            st.last_error = Some(e.clone());
            app.metrics
                .playlist_refreshes
                .with_label_values(&["failed"])
                .inc();
            tracing::warn!(
                playlist = %list.config.name,
                error = %e,
                kept = list.current().entries.len(),
                "playlist refresh failed; the previous list stays"
            );
        }
    }
    drop(st);
    app.metrics
        .playlist_refresh_failing
        .set(app.playlists.failing() as i64);
    result
}

async fn fetch_and_apply(app: &App, idx: usize, list: &ListState) -> Result<Summary, String> {
    let body = fetch_list(app, &list.config).await?;
    let parsed = parse::parse(&body, MAX_ENTRIES).map_err(|e| e.to_string())?;
    drop(body);
    if parsed.entries.is_empty() {
        // What an expired account often gets: keep the channels it had.
        return Err("the playlist has no entries".to_owned());
    }
    let guide_url = parsed
        .guide_url()
        .and_then(|u| url::Url::parse(u).ok())
        .filter(|u| matches!(u.scheme(), "http" | "https"));
    let (entries, filtered, skipped) = build(list, &parsed);
    let total = parsed.entries.len();
    drop(parsed);
    let summary = apply(app, idx, Imported { entries, guide_url });
    let mut st = list.status.lock();
    st.total = total;
    st.filtered_out = filtered;
    st.skipped = skipped + summary.1;
    Ok(summary.0)
}

/// Registers `new` as list `idx`'s streams; returns the summary and how
/// many entries were refused (`limits.max_streams`).
fn apply(app: &App, idx: usize, mut new: Imported) -> (Summary, usize) {
    let list = &app.playlists.lists[idx];
    let mut s = Summary::default();
    let mut full = 0;
    new.entries.retain_mut(
        |(id, spec)| match app.registry.upsert_playlist(id, spec.clone()) {
            Upsert::Added => {
                s.added += 1;
                true
            }
            Upsert::Updated => {
                s.updated += 1;
                true
            }
            Upsert::Unchanged => {
                // Share the registry's copy: a list of 100k channels is
                // not kept twice after every refresh.
                if let Some(st) = app.registry.get(id) {
                    *spec = st.spec();
                }
                true
            }
            Upsert::Taken => true,
            Upsert::Full => {
                full += 1;
                false
            }
        },
    );
    if full > 0 {
        tracing::warn!(playlist = %list.config.name, refused = full, max = app.config.limits.max_streams, "limits.max_streams reached: entries left out");
    }
    s.streams = new.entries.len();
    let new = Arc::new(new);
    let keep: HashSet<&str> = new.entries.iter().map(|(id, _)| id.as_str()).collect();
    let old = std::mem::replace(&mut *list.current.write(), new.clone());
    let gone: Vec<&str> = old
        .entries
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| !keep.contains(id))
        .collect();
    if !gone.is_empty() {
        // A stream another list still names stays.
        let others: Vec<Arc<Imported>> = app
            .playlists
            .lists
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != idx)
            .map(|(_, l)| l.current())
            .collect();
        let named_elsewhere = |id: &str| {
            others
                .iter()
                .any(|o| o.entries.iter().any(|(other, _)| other == id))
        };
        for id in gone {
            let ours = app
                .registry
                .get(id)
                .is_some_and(|st| st.origin == Origin::Playlist);
            if ours && !named_elsewhere(id) && app.remove_stream(id, "playlist_refresh") {
                s.removed += 1;
            }
        }
    }
    (s, full)
}

/// Imports every playlist at start, then each on its own `refresh` timer.
pub struct PlaylistService {
    pub app: Arc<App>,
}

#[async_trait]
impl BackgroundService for PlaylistService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let n = self.app.playlists.lists.len();
        if n == 0 {
            return;
        }
        let mut next = vec![tokio::time::Instant::now(); n];
        loop {
            let now = tokio::time::Instant::now();
            for (i, due) in next.iter_mut().enumerate() {
                if *due > now {
                    continue;
                }
                let every = self.app.playlists.lists[i].config.refresh;
                let wait = tokio::select! {
                    r = refresh(&self.app, i) => match r {
                        Ok(_) => every,
                        Err(_) => every.min(RETRY_AFTER_FAILURE),
                    },
                    _ = shutdown.changed() => return,
                };
                *due = tokio::time::Instant::now() + wait;
            }
            let Some(wake) = next.iter().min().copied() else {
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
