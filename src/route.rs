//! Request path → [`Route`]. Pure: no I/O, no Pingora. Every route answers both
//! at `/x` and at `{root_path}/x` (API-COMPAT.md §1), because players reach the
//! proxy both through m3u-editor's nginx (prefix stripped) and directly.

/// Management API endpoints (token-protected except `Health`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Api {
    /// `/health`
    Health,
    /// `/info`
    Info,
    /// `/streams`
    Streams,
    /// `/streams/by-metadata`
    ByMetadata,
    /// `/streams/counts-by-metadata`
    CountsByMetadata,
    /// `/streams/oldest-by-metadata`
    OldestByMetadata,
    /// `/streams/{id}`
    Stream(String),
    /// `/streams/{id}/failover`
    StreamFailover(String),
    /// `/clients`, `/stats/clients`
    Clients,
    /// `/stats`
    Stats,
    /// `/test-connection`
    TestConnection,
    /// `/webhooks`
    Webhooks,
    /// `/webhooks/test`
    WebhooksTest,
    /// `/transcode`
    Transcode,
    /// `/transcode/profiles`
    TranscodeProfiles,
    /// `/validate-cookies-file`
    ValidateCookiesFile,
    /// `/broadcast`: every network.
    Broadcasts,
    /// `/broadcast/{network_id}` (DELETE).
    Broadcast(String),
    /// `/broadcast/{network_id}/start`
    BroadcastStart(String),
    /// `/broadcast/{network_id}/stop`
    BroadcastStop(String),
    /// `/broadcast/{network_id}/status`
    BroadcastStatus(String),
    /// `/playlists`: status of the `playlists:` imports.
    Playlists,
    /// `/playlists/refresh`
    PlaylistsRefresh,
}

/// Player-facing documents of standalone use (`crate::playlists`), with a
/// token in the query or, under `/hdhr/{token}/`, in the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// `/playlist.m3u` (also `.m3u8`)
    Playlist,
    /// `/epg.xml`
    Epg,
    /// `/discover.json`
    Discover,
    /// `/lineup.json`
    Lineup,
    /// `/lineup_status.json`
    LineupStatus,
    /// `/lineup.post` (Plex asks for a scan; there is nothing to scan)
    LineupPost,
    /// `/device.xml`
    DeviceXml,
}

impl Page {
    fn from_name(name: &str) -> Option<Page> {
        Some(match name {
            "playlist.m3u" | "playlist.m3u8" => Page::Playlist,
            "epg.xml" => Page::Epg,
            "discover.json" => Page::Discover,
            "lineup.json" => Page::Lineup,
            "lineup_status.json" => Page::LineupStatus,
            "lineup.post" => Page::LineupPost,
            "device.xml" => Page::DeviceXml,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Api(Api),
    /// `/metrics`: Prometheus text format (no token: no sensitive labels).
    Metrics,
    /// `/openapi.json`: the API description (no token).
    OpenApi,
    /// `/stream/{id}`: relays any registered stream.
    Play(String),
    /// `/hls/{id}/playlist.m3u8[?t=]`: the stream's playlist, or a variant by token.
    HlsPlaylist(String),
    /// `/hls/{id}/segment.ts?t=` (also `/segment`): a segment, key or init map.
    HlsSegment(String),
    /// `/broadcast/{network_id}/live.m3u8`: a network's live playlist (no token).
    BroadcastPlaylist(String),
    /// `/broadcast/{network_id}/segment/{file}`: one of its segments (no
    /// token); the file name is checked where it is served.
    BroadcastSegment(String, String),
    /// `/playlist.m3u`, `/epg.xml`, HDHomeRun documents; `Some(token)` when
    /// reached as `/hdhr/{token}/{page}`.
    Standalone(Page, Option<String>),
    NotFound,
}

/// Decodes a request path. `root_path` is "" or "/prefix" without a trailing slash.
pub fn decode(path: &str, root_path: &str) -> Route {
    let path = strip_root(path, root_path);
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let Some(r) = standalone(&parts) {
        return r;
    }
    match parts.as_slice() {
        ["health"] => Route::Api(Api::Health),
        ["info"] => Route::Api(Api::Info),
        ["streams"] => Route::Api(Api::Streams),
        ["streams", "by-metadata"] => Route::Api(Api::ByMetadata),
        ["streams", "counts-by-metadata"] => Route::Api(Api::CountsByMetadata),
        ["streams", "oldest-by-metadata"] => Route::Api(Api::OldestByMetadata),
        ["streams", id] if valid_id(id) => Route::Api(Api::Stream(id.to_string())),
        ["streams", id, "failover"] if valid_id(id) => {
            Route::Api(Api::StreamFailover(id.to_string()))
        }
        ["clients"] | ["stats", "clients"] => Route::Api(Api::Clients),
        ["stats"] => Route::Api(Api::Stats),
        ["test-connection"] => Route::Api(Api::TestConnection),
        ["webhooks"] => Route::Api(Api::Webhooks),
        ["webhooks", "test"] => Route::Api(Api::WebhooksTest),
        ["transcode"] => Route::Api(Api::Transcode),
        ["transcode", "profiles"] => Route::Api(Api::TranscodeProfiles),
        ["validate-cookies-file"] => Route::Api(Api::ValidateCookiesFile),
        ["broadcast"] => Route::Api(Api::Broadcasts),
        ["broadcast", id] if valid_id(id) => Route::Api(Api::Broadcast(id.to_string())),
        ["broadcast", id, "start"] if valid_id(id) => {
            Route::Api(Api::BroadcastStart(id.to_string()))
        }
        ["broadcast", id, "stop"] if valid_id(id) => Route::Api(Api::BroadcastStop(id.to_string())),
        ["broadcast", id, "status"] if valid_id(id) => {
            Route::Api(Api::BroadcastStatus(id.to_string()))
        }
        ["broadcast", id, "live.m3u8"] if valid_id(id) => Route::BroadcastPlaylist(id.to_string()),
        ["broadcast", id, "segment", file] if valid_id(id) => {
            Route::BroadcastSegment(id.to_string(), file.to_string())
        }
        // Beside the playlist too: its bare segment lines resolve here when
        // a player reads it directly (m3u-editor rewrites them instead).
        ["broadcast", id, file] if valid_id(id) && segment_name(file) => {
            Route::BroadcastSegment(id.to_string(), file.to_string())
        }
        ["playlists"] => Route::Api(Api::Playlists),
        ["playlists", "refresh"] => Route::Api(Api::PlaylistsRefresh),
        ["metrics"] => Route::Metrics,
        ["openapi.json"] => Route::OpenApi,
        ["stream", id] if valid_id(id) => Route::Play(id.to_string()),
        ["hls", id, "playlist.m3u8"] if valid_id(id) => Route::HlsPlaylist(id.to_string()),
        ["hls", id, "segment.ts" | "segment"] if valid_id(id) => Route::HlsSegment(id.to_string()),
        _ => Route::NotFound,
    }
}

fn standalone(parts: &[&str]) -> Option<Route> {
    match parts {
        [name] => Some(Route::Standalone(Page::from_name(name)?, None)),
        ["hdhr", token, name] if !token.is_empty() => {
            let page = Page::from_name(name)?;
            let token = percent_encoding::percent_decode_str(token)
                .decode_utf8_lossy()
                .into_owned();
            Some(Route::Standalone(page, Some(token)))
        }
        _ => None,
    }
}

fn strip_root<'a>(path: &'a str, root: &str) -> &'a str {
    if root.is_empty() {
        return path;
    }
    match path.strip_prefix(root) {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

/// `live<digits>.ts`, a broadcast segment's name.
fn segment_name(name: &str) -> bool {
    name.strip_prefix("live")
        .and_then(|n| n.strip_suffix(".ts"))
        .is_some_and(|d| !d.is_empty() && d.len() <= 18 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Stream ids are md5 hex or YAML ids (`[A-Za-z0-9_-]`); anything else cannot
/// name a stream, so it is not routed.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let root = "/m3u-proxy";
        let cases = [
            ("/health", Route::Api(Api::Health)),
            ("/m3u-proxy/health", Route::Api(Api::Health)),
            ("/m3u-proxy/streams/", Route::Api(Api::Streams)),
            ("/streams/abc", Route::Api(Api::Stream("abc".into()))),
            ("/streams/by-metadata", Route::Api(Api::ByMetadata)),
            (
                "/m3u-proxy/streams/ab/failover",
                Route::Api(Api::StreamFailover("ab".into())),
            ),
            ("/stats/clients", Route::Api(Api::Clients)),
            ("/m3u-proxy/stream/abc123", Route::Play("abc123".into())),
            ("/stream/abc123", Route::Play("abc123".into())),
            (
                "/m3u-proxy/hls/ab/playlist.m3u8",
                Route::HlsPlaylist("ab".into()),
            ),
            ("/hls/ab/segment.ts", Route::HlsSegment("ab".into())),
            ("/hls/ab/segment", Route::HlsSegment("ab".into())),
            ("/m3u-proxy/openapi.json", Route::OpenApi),
            ("/broadcast", Route::Api(Api::Broadcasts)),
            (
                "/m3u-proxy/broadcast/n-1/start",
                Route::Api(Api::BroadcastStart("n-1".into())),
            ),
            (
                "/broadcast/n/stop",
                Route::Api(Api::BroadcastStop("n".into())),
            ),
            (
                "/broadcast/n/status",
                Route::Api(Api::BroadcastStatus("n".into())),
            ),
            ("/broadcast/n", Route::Api(Api::Broadcast("n".into()))),
            (
                "/m3u-proxy/broadcast/n/live.m3u8",
                Route::BroadcastPlaylist("n".into()),
            ),
            (
                "/broadcast/n/segment/live000001.ts",
                Route::BroadcastSegment("n".into(), "live000001.ts".into()),
            ),
            ("/broadcast/n/segment/../../etc/passwd", Route::NotFound),
            (
                "/broadcast/n/live000012.ts",
                Route::BroadcastSegment("n".into(), "live000012.ts".into()),
            ),
            ("/broadcast/n/x.ts", Route::NotFound),
            ("/broadcast/../segment/live1.ts", Route::NotFound),
            ("/playlist.m3u", Route::Standalone(Page::Playlist, None)),
            ("/m3u-proxy/epg.xml", Route::Standalone(Page::Epg, None)),
            ("/discover.json", Route::Standalone(Page::Discover, None)),
            (
                "/hdhr/a%20b/lineup.json",
                Route::Standalone(Page::Lineup, Some("a b".into())),
            ),
            ("/hdhr/t/stream.json", Route::NotFound),
            ("/playlists/refresh", Route::Api(Api::PlaylistsRefresh)),
            ("/hls/ab/key.bin", Route::NotFound),
            ("/stream/../etc", Route::NotFound),
            ("/m3u-proxyhealth", Route::NotFound),
            ("/", Route::NotFound),
        ];
        for (path, want) in cases {
            assert_eq!(decode(path, root), want, "{path}");
        }
        assert_eq!(decode("/health", ""), Route::Api(Api::Health));
    }
}
