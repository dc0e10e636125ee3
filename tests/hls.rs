//! HLS through the proxy (issue: HLS rewriting, signed URIs, shared fetches):
//! the fixtures end to end byte for byte, signed references only (no open
//! proxy), one provider fetch for many viewers, and playlists that never go
//! backwards behind lagging backends.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;

use crate::common::{config, register};
use crate::support::client::{self, get_body, get_body_with};
use crate::support::edge::Edge;
use crate::support::fixture;
use crate::support::provider::Provider;

/// Every URI of a playlist: the URI lines and the `URI="..."` attributes.
fn uris(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if !line.starts_with('#') {
            out.push(line.to_string());
        } else if let Some(i) = line.find("URI=\"") {
            let rest = &line[i + 5..];
            if let Some(end) = rest.find('"') {
                out.push(rest[..end].to_string());
            }
        }
    }
    out
}

async fn text(url: &str) -> (u16, String) {
    let (s, h, b) = get_body(url).await;
    if s == 200 {
        assert_eq!(h["content-type"], "application/vnd.apple.mpegurl", "{url}");
    }
    (s.as_u16(), String::from_utf8_lossy(&b).into_owned())
}

/// Checks a rewritten playlist: only signed proxy references, nothing of the provider.
fn assert_only_proxy_uris(body: &str, id: &str, p: &Provider) {
    assert!(!body.contains(&p.base()), "provider URL leaked:\n{body}");
    for u in uris(body) {
        assert!(
            u.starts_with(&format!("/m3u-proxy/hls/{id}/playlist.m3u8?t="))
                || u.starts_with(&format!("/m3u-proxy/hls/{id}/segment.ts?t=")),
            "not a signed proxy reference: {u}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_variants_and_segments_byte_exact() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let id = register(&e, json!({"url": p.url("files/hls_ts/master.m3u8")})).await;
    let (s, master) = text(&e.url(&format!("/hls/{id}/playlist.m3u8"))).await;
    assert_eq!(s, 200, "{master}");
    assert_only_proxy_uris(&master, &id, &p);
    // Everything but the URIs is kept byte for byte.
    let original = String::from_utf8(fixture("hls_ts/master.m3u8")).unwrap();
    let strip = |b: &str| {
        b.lines()
            .filter(|l| l.starts_with('#'))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&master), strip(&original));
    let variants = uris(&master);
    assert_eq!(variants.len(), 2);
    for (i, v) in variants.iter().enumerate() {
        let (s, media) = text(&e.url(v)).await;
        assert_eq!(s, 200);
        assert_only_proxy_uris(&media, &id, &p);
        let segs = uris(&media);
        assert_eq!(segs.len(), 6);
        for (k, seg) in segs.iter().enumerate() {
            let (s, h, body) = get_body(&e.url(seg)).await;
            assert_eq!(s, 200);
            assert_eq!(
                body.as_ref(),
                &fixture(&format!("hls_ts/v{i}/seg{k:03}.ts"))[..]
            );
            assert!(!h.contains_key("set-cookie") && !h.contains_key("server"));
        }
    }
    // /stream/{id} of an HLS stream answers with the same rewritten playlist.
    let (s, via_stream) = text(&e.url(&format!("/stream/{id}"))).await;
    assert_eq!(s, 200);
    assert_only_proxy_uris(&via_stream, &id, &p);
    assert_eq!(uris(&via_stream).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fmp4_init_maps_and_aes_keys_go_through_the_proxy() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    for (dir, special, file) in [
        ("hls_fmp4", "#EXT-X-MAP", "init.mp4"),
        ("hls_aes", "#EXT-X-KEY", "enc.key"),
    ] {
        let id = register(
            &e,
            json!({"url": p.url(&format!("files/{dir}/index.m3u8"))}),
        )
        .await;
        let (s, media) = text(&e.url(&format!("/m3u-proxy/hls/{id}/playlist.m3u8"))).await;
        assert_eq!(s, 200, "{dir}: {media}");
        assert_only_proxy_uris(&media, &id, &p);
        let line = media.lines().find(|l| l.starts_with(special)).unwrap();
        let start = line.find("URI=\"").unwrap() + 5;
        let uri = &line[start..start + line[start..].find('"').unwrap()];
        let (s, _, body) = get_body(&e.url(uri)).await;
        assert_eq!(s, 200);
        assert_eq!(
            body.as_ref(),
            &fixture(&format!("{dir}/{file}"))[..],
            "{dir} {file}"
        );
        let segs: Vec<String> = uris(&media).into_iter().filter(|u| u != uri).collect();
        assert_eq!(segs.len(), 5);
        let ext = if dir == "hls_fmp4" { "m4s" } else { "ts" };
        for (k, seg) in segs.iter().enumerate() {
            let (s, _, body) = get_body(&e.url(seg)).await;
            assert_eq!(s, 200);
            assert_eq!(
                body.as_ref(),
                &fixture(&format!("{dir}/seg{k:03}.{ext}"))[..]
            );
        }
        // Byte ranges of a segment pass through.
        let (s, _, body) = get_body_with(&e.url(&segs[0]), &[("Range", "bytes=0-187")]).await;
        assert_eq!(s, 206);
        assert_eq!(
            body.as_ref(),
            &fixture(&format!("{dir}/seg000.{ext}"))[..188]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_are_signed_and_bound_to_their_stream() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let a = register(&e, json!({"url": p.url("files/hls_ts/v0/index.m3u8")})).await;
    let b = register(&e, json!({"url": p.url("files/hls_aes/index.m3u8")})).await;
    let (_, media) = text(&e.url(&format!("/hls/{a}/playlist.m3u8"))).await;
    let seg = uris(&media)[0].clone();
    let token = seg.split("?t=").nth(1).unwrap().to_string();
    // Tampered: flip one character in the payload.
    let mut bytes = token.clone().into_bytes();
    bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).unwrap();
    let resp = client::get(&e.url(&format!("/hls/{a}/segment.ts?t={tampered}"))).await;
    assert_eq!(resp.status(), 403);
    // A token of stream a does not work for stream b.
    let resp = client::get(&e.url(&format!("/hls/{b}/segment.ts?t={token}"))).await;
    assert_eq!(resp.status(), 403);
    // No token, or a client-written URL: refused, never fetched.
    let before = p.requests().len();
    for q in [
        "",
        "?url=http://127.0.0.1:1/x.ts",
        "?url=file:///etc/passwd",
    ] {
        let resp = client::get(&e.url(&format!("/hls/{a}/segment.ts{q}"))).await;
        assert_eq!(resp.status(), 403, "{q}");
    }
    assert_eq!(
        p.requests().len(),
        before,
        "the proxy fetched something a client named"
    );
    // The genuine one works; a segment token is not a playlist token.
    let (s, _, _) = get_body(&e.url(&seg)).await;
    assert_eq!(s, 200);
    let resp = client::get(&e.url(&format!("/hls/{a}/playlist.m3u8?t={token}"))).await;
    assert_eq!(resp.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_viewers_of_a_live_playlist_share_provider_fetches() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    // 1 s segments (target duration 2 in the fixture → cache 1 s).
    let id = register(
        &e,
        json!({"url": p.url("hls-live/hls_ts/v0/index.m3u8?seg_ms=1000")}),
    )
    .await;
    let url = e.url(&format!("/hls/{id}/playlist.m3u8"));
    let rounds = 10;
    let started = std::time::Instant::now();
    let mut seen_segments = HashSet::new();
    for _ in 0..rounds {
        let mut tasks = Vec::new();
        for v in 0..20 {
            let url = format!("{url}?client_id=viewer{v}");
            tasks.push(tokio::spawn(async move { text(&url).await }));
        }
        let mut last = String::new();
        for t in tasks {
            let (s, body) = t.await.unwrap();
            assert_eq!(s, 200);
            last = body;
        }
        // Every viewer also fetches the newest segment.
        let seg = uris(&last).last().cloned().unwrap();
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let u = e.url(&seg);
            tasks.push(tokio::spawn(async move { get_body(&u).await.0 }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
        // Minted URIs are deterministic per segment and client (viewer19 here).
        seen_segments.insert(seg);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let playlist_fetches = p.hits("/hls-live/hls_ts/v0/index.m3u8");
    // At most one fetch per half target duration (1 s here), plus the first.
    assert!(
        playlist_fetches as f64 <= elapsed / 1.0 + 2.0,
        "{playlist_fetches} playlist fetches in {elapsed:.1}s for 20 viewers × {rounds} rounds"
    );
    assert!(
        playlist_fetches < rounds * 20 / 4,
        "playlist fetches not coalesced"
    );
    // One provider fetch per segment, however many viewers asked.
    let seg_hits: Vec<_> = p
        .requests()
        .into_iter()
        .filter(|r| r.path_only().ends_with(".ts"))
        .map(|r| r.path)
        .collect();
    assert_eq!(seg_hits.len(), seen_segments.len(), "{seg_hits:?}");
    assert!(seen_segments.len() >= 2, "the live edge did not move");
    let unique: HashSet<_> = seg_hits.iter().collect();
    assert_eq!(
        seg_hits.len(),
        unique.len(),
        "a segment was fetched twice: {seg_hits:?}"
    );
    // The viewers are listed as clients.
    let (_, s) = crate::common::api(&e, http::Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(s["client_count"], 20, "{s}");
}

fn media_sequence(body: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_backends_never_move_the_playlist_backwards() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    // Let the provider's live window get ahead of the lag (4 segments of 400 ms),
    // so a lagging backend really serves an older media sequence: the proxy
    // refetches once a second (half the 2 s target duration), 2.5 segments on.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for sticky in [false, true] {
        let id = register(
            &e,
            json!({
                "url": p.url(&format!("hls-lagging/hls_ts/v0/index.m3u8?seg_ms=400&lag_by=4&s={sticky}")),
                "use_sticky_session": sticky,
            }),
        )
        .await;
        let url = e.url(&format!("/hls/{id}/playlist.m3u8"));
        let mut last = 0;
        for _ in 0..25 {
            let (s, body) = text(&url).await;
            assert_eq!(s, 200);
            let seq = media_sequence(&body);
            assert!(
                seq >= last,
                "sticky={sticky}: media sequence went from {last} to {seq}"
            );
            last = seq;
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
    }
    // Sticky: after the first redirect, the proxy keeps asking the backend it led to.
    let lagging = p.hits("/hls-lagging/");
    assert!(lagging >= 2);
    // The refused backward playlists were counted.
    let (_, stats) = crate::common::api(&e, http::Method::GET, "/stats", None).await;
    assert!(
        stats["proxy_stats"]["hls_sequence_regressions"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{}",
        stats["proxy_stats"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_playlist_source_fails_over() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let id = register(
        &e,
        json!({
            "url": p.url("status/503/index.m3u8"),
            "failover_urls": [p.url("files/hls_ts/v1/index.m3u8")],
        }),
    )
    .await;
    let (s, media) = text(&e.url(&format!("/hls/{id}/playlist.m3u8"))).await;
    assert_eq!(s, 200, "{media}");
    assert!(
        media.contains("#EXT-X-DISCONTINUITY"),
        "no discontinuity at the switch:\n{media}"
    );
    let (_, st) = crate::common::api(&e, http::Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(st["stream"]["current_failover_index"], 0);
    // Everything failing: a JSON error, never the provider's body.
    let dead = register(&e, json!({"url": p.url("status/500")})).await;
    let (s, h, body) = get_body(&e.url(&format!("/hls/{dead}/playlist.m3u8"))).await;
    assert_eq!(s, 502);
    assert_eq!(h["content-type"], "application/json");
    assert!(!String::from_utf8_lossy(&body).contains("PROVIDER-BODY-SECRET"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_sees_the_streams_identity_not_the_clients() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let id = register(
        &e,
        json!({"url": p.url("files/hls_aes/index.m3u8"), "user_agent": "HlsUA/1", "headers": {"X-Key": "s3"}}),
    )
    .await;
    let headers = [
        ("User-Agent", "Player/1"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("Cookie", "c=1"),
        ("Referer", "http://me/"),
    ];
    let (_, _, body) = get_body_with(&e.url(&format!("/hls/{id}/playlist.m3u8")), &headers).await;
    let media = String::from_utf8_lossy(&body).into_owned();
    for u in uris(&media) {
        let (s, _, _) = get_body_with(&e.url(&u), &headers).await;
        assert_eq!(s, 200);
    }
    let seen = p.requests();
    assert!(seen.len() >= 7);
    for r in seen {
        assert_eq!(r.header("user-agent"), Some("HlsUA/1"), "{}", r.path);
        assert_eq!(r.header("x-key"), Some("s3"));
        for bad in ["x-forwarded-for", "cookie", "referer"] {
            assert!(
                r.header(bad).is_none(),
                "{bad} reached the provider on {}",
                r.path
            );
        }
    }
}

/// LL-HLS facts of a playlist, counted independently of the proxy's parser:
/// (MSN of the segment being made, its parts so far, CAN-BLOCK-RELOAD).
fn ll_state(body: &str) -> (u64, u64, bool) {
    let mut segments = 0;
    let mut trailing = 0;
    for l in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !l.starts_with('#') {
            segments += 1;
            trailing = 0;
        } else if l.starts_with("#EXT-X-PART:") {
            trailing += 1;
        }
    }
    (
        media_sequence(body) + segments,
        trailing,
        body.contains("CAN-BLOCK-RELOAD=YES"),
    )
}

/// LL-HLS blocking reloads (RFC 8216bis §6.2.5.2): a request for a part that
/// does not exist yet is held until it does; viewers waiting for the same part
/// cost the provider one request; bad directives are 400s; a provider that
/// cannot block never sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llhls_blocking_reloads_wait_for_the_part_and_are_shared() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    // 1 s segments of 4 parts; the fixture's target duration (2 s) keeps the
    // shared playlist 1 s.
    let id = register(
        &e,
        json!({"url": p.url("hls-ll/hls_ts/v0/index.m3u8?seg_ms=1000&parts=4")}),
    )
    .await;
    let url = e.url(&format!("/hls/{id}/playlist.m3u8"));
    let (s, body) = text(&url).await;
    assert_eq!(s, 200, "{body}");
    let (next, made, can_block) = ll_state(&body);
    assert!(can_block, "{body}");
    assert_only_proxy_uris(&body, &id, &p);
    // Five viewers want the next part (≤ 250 ms away), three the last part of
    // the segment after (~1.5 s away).
    let (msn, part) = (next + 1, 3);
    let mut tasks = Vec::new();
    for v in 0..8 {
        let want = if v < 5 { (next, made) } else { (msn, part) };
        let u = format!(
            "{url}?client_id=ll{v}&_HLS_msn={}&_HLS_part={}",
            want.0, want.1
        );
        tasks.push(tokio::spawn(async move { (want, text(&u).await) }));
    }
    for t in tasks {
        let ((m, q), (s, b)) = t.await.unwrap();
        assert_eq!(s, 200, "{b}");
        let (n, trailing, _) = ll_state(&b);
        assert!(
            n > m || (n == m && trailing > q),
            "part {q} of segment {m} missing:\n{b}"
        );
        assert_only_proxy_uris(&b, &id, &p);
    }
    let mut blocking: Vec<String> = p
        .requests()
        .into_iter()
        .map(|r| r.path)
        .filter(|path| path.contains("_HLS_msn"))
        .collect();
    blocking.sort();
    let held = |m: u64, q: u64| {
        format!("/hls-ll/hls_ts/v0/index.m3u8?seg_ms=1000&parts=4&_HLS_msn={m}&_HLS_part={q}")
    };
    let mut expected = vec![held(next, made), held(msn, part)];
    expected.sort();
    assert_eq!(blocking, expected, "one held provider request per part");
    // Whole-segment reloads, answered from what is shared when already there.
    let (s, b) = text(&format!("{url}?_HLS_msn={}", msn - 1)).await;
    assert_eq!(s, 200);
    assert!(ll_state(&b).0 >= msn, "{b}");
    for bad in [
        "_HLS_msn=abc".to_string(),
        "_HLS_part=1".to_string(),
        format!("_HLS_msn={msn}&_HLS_part=-1"),
        format!("_HLS_msn={}", msn + 10),
    ] {
        let (s, b) = text(&format!("{url}?{bad}")).await;
        assert_eq!(s, 400, "{bad}: {b}");
        assert!(b.contains("_HLS_"), "{b}");
    }
    // A playlist without CAN-BLOCK-RELOAD: the query is not the provider's business.
    let plain = register(&e, json!({"url": p.url("hls-live/hls_ts/v0/index.m3u8")})).await;
    let (s, _) = text(&e.url(&format!(
        "/hls/{plain}/playlist.m3u8?_HLS_msn=99999&_HLS_part=0"
    )))
    .await;
    assert_eq!(s, 200);
    assert!(p
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/hls-live/"))
        .all(|r| !r.path.contains("_HLS_")));
}
