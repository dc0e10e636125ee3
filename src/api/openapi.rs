//! The OpenAPI 3.1 description of every route, `docs/openapi.json`, served
//! as is at `GET /openapi.json`. The tests below check it against the route
//! decoder; `tests/openapi.rs` checks it against the running proxy.

/// `docs/openapi.json`, byte for byte.
pub const SPEC: &str = include_str!("../../docs/openapi.json");

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::SPEC;
    use crate::route::{decode, Api, Page, Route};

    const ROOT: &str = "/m3u-proxy";
    const SAMPLE_ID: &str = "0123456789abcdef0123456789abcdef";
    const SAMPLE_NETWORK: &str = "6f1c2a9e-0b1d-4e53-9a51-3c1a5f0e7d21";
    const SAMPLE_SEGMENT: &str = "live000001.ts";

    fn spec() -> Value {
        serde_json::from_str(SPEC).expect("docs/openapi.json is not valid JSON")
    }

    fn spec_paths() -> BTreeSet<String> {
        spec()["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .cloned()
            .collect()
    }

    fn concrete(template: &str) -> String {
        template
            .replace("{stream_id}", SAMPLE_ID)
            .replace("{network_id}", SAMPLE_NETWORK)
            .replace("{segment}", SAMPLE_SEGMENT)
    }

    /// The spec paths of each route. No wildcard arm: a new `Route` or `Api`
    /// variant does not compile until it is given its paths here, and
    /// `every_route_variant_is_in_the_spec` then wants them in the spec.
    fn templates(route: &Route) -> &'static [&'static str] {
        match route {
            Route::Api(api) => match api {
                Api::Health => &["/health"],
                Api::Info => &["/info"],
                Api::Streams => &["/streams"],
                Api::ByMetadata => &["/streams/by-metadata"],
                Api::CountsByMetadata => &["/streams/counts-by-metadata"],
                Api::OldestByMetadata => &["/streams/oldest-by-metadata"],
                Api::Stream(_) => &["/streams/{stream_id}"],
                Api::StreamFailover(_) => &["/streams/{stream_id}/failover"],
                Api::Clients => &["/clients", "/stats/clients"],
                Api::Stats => &["/stats"],
                Api::TestConnection => &["/test-connection"],
                Api::Webhooks => &["/webhooks"],
                Api::WebhooksTest => &["/webhooks/test"],
                Api::Transcode => &["/transcode"],
                Api::TranscodeProfiles => &["/transcode/profiles"],
                Api::ValidateCookiesFile => &["/validate-cookies-file"],
                Api::Broadcasts => &["/broadcast"],
                Api::Broadcast(_) => &["/broadcast/{network_id}"],
                Api::BroadcastStart(_) => &["/broadcast/{network_id}/start"],
                Api::BroadcastStop(_) => &["/broadcast/{network_id}/stop"],
                Api::BroadcastStatus(_) => &["/broadcast/{network_id}/status"],
                Api::Playlists => &["/playlists"],
                Api::PlaylistsRefresh => &["/playlists/refresh"],
            },
            Route::Standalone(page, token) => standalone_templates(*page, token.is_some()),
            Route::Metrics => &["/metrics"],
            Route::OpenApi => &["/openapi.json"],
            Route::Play(_) => &["/stream/{stream_id}"],
            Route::HlsPlaylist(_) => &["/hls/{stream_id}/playlist.m3u8"],
            Route::HlsSegment(_) => &["/hls/{stream_id}/segment.ts", "/hls/{stream_id}/segment"],
            Route::BroadcastPlaylist(_) => &["/broadcast/{network_id}/live.m3u8"],
            Route::BroadcastSegment(..) => &[
                "/broadcast/{network_id}/segment/{segment}",
                "/broadcast/{network_id}/{segment}",
            ],
            Route::NotFound => &[],
        }
    }

    const PAGES: [Page; 7] = [
        Page::Playlist,
        Page::Epg,
        Page::Discover,
        Page::Lineup,
        Page::LineupStatus,
        Page::LineupPost,
        Page::DeviceXml,
    ];

    fn standalone_templates(page: Page, in_path: bool) -> &'static [&'static str] {
        match (page, in_path) {
            (Page::Playlist, false) => &["/playlist.m3u", "/playlist.m3u8"],
            (Page::Epg, false) => &["/epg.xml"],
            (Page::Discover, false) => &["/discover.json"],
            (Page::Lineup, false) => &["/lineup.json"],
            (Page::LineupStatus, false) => &["/lineup_status.json"],
            (Page::LineupPost, false) => &["/lineup.post"],
            (Page::DeviceXml, false) => &["/device.xml"],
            (Page::Playlist, true) => {
                &["/hdhr/{token}/playlist.m3u", "/hdhr/{token}/playlist.m3u8"]
            }
            (Page::Epg, true) => &["/hdhr/{token}/epg.xml"],
            (Page::Discover, true) => &["/hdhr/{token}/discover.json"],
            (Page::Lineup, true) => &["/hdhr/{token}/lineup.json"],
            (Page::LineupStatus, true) => &["/hdhr/{token}/lineup_status.json"],
            (Page::LineupPost, true) => &["/hdhr/{token}/lineup.post"],
            (Page::DeviceXml, true) => &["/hdhr/{token}/device.xml"],
        }
    }

    /// One of each variant (keep in step with [`templates`]).
    fn every_route() -> Vec<Route> {
        let id = || SAMPLE_ID.to_string();
        let net = || SAMPLE_NETWORK.to_string();
        let apis = [
            Api::Health,
            Api::Info,
            Api::Streams,
            Api::ByMetadata,
            Api::CountsByMetadata,
            Api::OldestByMetadata,
            Api::Stream(id()),
            Api::StreamFailover(id()),
            Api::Clients,
            Api::Stats,
            Api::TestConnection,
            Api::Webhooks,
            Api::WebhooksTest,
            Api::Transcode,
            Api::TranscodeProfiles,
            Api::ValidateCookiesFile,
            Api::Broadcasts,
            Api::Broadcast(net()),
            Api::BroadcastStart(net()),
            Api::BroadcastStop(net()),
            Api::BroadcastStatus(net()),
            Api::Playlists,
            Api::PlaylistsRefresh,
        ];
        let mut all: Vec<Route> = apis.into_iter().map(Route::Api).collect();
        all.extend([
            Route::Metrics,
            Route::OpenApi,
            Route::Play(id()),
            Route::HlsPlaylist(id()),
            Route::HlsSegment(id()),
            Route::BroadcastPlaylist(net()),
            Route::BroadcastSegment(net(), SAMPLE_SEGMENT.to_string()),
        ]);
        for page in PAGES {
            all.push(Route::Standalone(page, None));
            all.push(Route::Standalone(page, Some("{token}".into())));
        }
        all
    }

    /// The path templates `route::decode` matches, read from its source: each
    /// `[..]` slice pattern of its `match`, a binding standing for the id and
    /// `"a" | "b"` for alternatives.
    fn decoder_templates() -> BTreeSet<String> {
        let src = include_str!("../route.rs");
        let start = src
            .find("match parts.as_slice() {")
            .expect("route::decode's match");
        let end = start
            + src[start..]
                .find("_ => Route::NotFound")
                .expect("route::decode's NotFound arm");
        let body = &src[start + "match parts.as_slice() {".len()..end];
        let mut out = BTreeSet::new();
        let mut rest = body;
        while let Some(open) = rest.find('[') {
            let close = open + rest[open..].find(']').expect("closing ]");
            let mut paths = vec![String::new()];
            let pattern = &rest[open + 1..close];
            // Networks are named by m3u-editor's ids, their files by name.
            let id_name = if pattern.trim_start().starts_with("\"broadcast\"") {
                "{network_id}"
            } else {
                "{stream_id}"
            };
            for elem in pattern.split(',') {
                let elem = elem.trim();
                let alts: Vec<String> = if elem.starts_with('"') {
                    elem.split('|')
                        .map(|a| a.trim().trim_matches('"').to_string())
                        .collect()
                } else if elem == "file" {
                    vec!["{segment}".to_string()]
                } else {
                    vec![id_name.to_string()]
                };
                paths = paths
                    .iter()
                    .flat_map(|p| alts.iter().map(move |a| format!("{p}/{a}")))
                    .collect();
            }
            out.extend(paths);
            rest = &rest[close + 1..];
        }
        assert!(out.len() >= 15, "decoder patterns not found: {out:?}");
        out
    }

    #[test]
    fn spec_is_openapi_3_1() {
        let s = spec();
        let version = s["openapi"].as_str().unwrap_or_default();
        assert!(version.starts_with("3.1."), "openapi: {version}");
        assert!(s["info"]["title"].is_string());
        assert_eq!(
            s["info"]["version"],
            crate::app::VERSION,
            "docs/openapi.json info.version is the crate's version"
        );
        assert!(s["components"]["securitySchemes"]["ApiTokenHeader"].is_object());
        assert!(s["components"]["securitySchemes"]["ApiTokenQuery"].is_object());
    }

    #[test]
    fn every_spec_path_is_a_route() {
        for path in spec_paths() {
            let plain = decode(&concrete(&path), "");
            assert_ne!(plain, Route::NotFound, "spec path {path} is no route");
            assert!(
                templates(&plain).contains(&path.as_str()),
                "spec path {path} decodes to {plain:?}, whose paths are {:?}",
                templates(&plain)
            );
            let prefixed = decode(&format!("{ROOT}{}", concrete(&path)), ROOT);
            assert_eq!(prefixed, plain, "{ROOT}{path}");
        }
    }

    #[test]
    fn every_decoder_pattern_is_in_the_spec() {
        let spec = spec_paths();
        for template in decoder_templates() {
            assert!(
                spec.contains(&template),
                "route::decode routes {template}, docs/openapi.json does not describe it"
            );
            assert_ne!(decode(&concrete(&template), ""), Route::NotFound);
        }
    }

    #[test]
    fn every_route_variant_is_in_the_spec() {
        let spec = spec_paths();
        for route in every_route() {
            let paths = templates(&route);
            assert!(!paths.is_empty(), "{route:?} has no spec path");
            for path in paths {
                assert!(spec.contains(*path), "{route:?}: {path} not in the spec");
                assert_eq!(decode(&concrete(path), ""), route, "{path}");
            }
        }
    }

    /// Every operation has an id and responses, and every `$ref` resolves.
    #[test]
    fn operations_are_complete_and_refs_resolve() {
        let s = spec();
        let mut ids = BTreeSet::new();
        for (path, item) in s["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                if method == "parameters" {
                    continue;
                }
                let id = op["operationId"].as_str().unwrap_or_default();
                assert!(!id.is_empty(), "{method} {path}: no operationId");
                assert!(ids.insert(id.to_string()), "operationId {id} twice");
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path}: no responses"
                );
            }
        }
        fn walk(v: &Value, root: &Value) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        let pointer = r.strip_prefix('#').expect("local $ref");
                        assert!(root.pointer(pointer).is_some(), "dangling $ref {r}");
                    }
                    m.values().for_each(|x| walk(x, root));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, root)),
                _ => {}
            }
        }
        walk(&s, &s);
    }
}
