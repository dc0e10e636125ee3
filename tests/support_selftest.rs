//! Self-tests of `tests/support/`: the loopback provider must behave exactly as
//! documented, or every proxy test built on it proves nothing. Tests the provider only
//! (through the test client); `Edge` is exercised by the proxy tests themselves.
use std::time::Duration;

use reqwest::StatusCode;
use url::Url;

use crate::support::client::{self, get, get_body, get_body_with, get_with, BodyEnd, BodyReader};
use crate::support::eventually::eventually;
use crate::support::fixture;
use crate::support::provider::{
    etag_for, parse_range, Provider, RangeAnswer, LAST_MODIFIED, PROVIDER_HEADERS, TS_PACKET,
};

const T: Duration = Duration::from_secs(5);

fn assert_provider_headers(h: &reqwest::header::HeaderMap) {
    for (k, v) in PROVIDER_HEADERS {
        assert_eq!(h.get(*k).and_then(|v| v.to_str().ok()), Some(*v), "{k}");
    }
}

#[test]
fn parse_range_table() {
    use RangeAnswer::*;
    let cases: &[(&str, u64, RangeAnswer)] = &[
        ("bytes=0-99", 1000, Partial(0, 99)),
        ("bytes=100-", 1000, Partial(100, 999)),
        ("bytes=-100", 1000, Partial(900, 999)),
        ("bytes=-5000", 1000, Partial(0, 999)),
        ("bytes=990-5000", 1000, Partial(990, 999)),
        ("bytes=1000-", 1000, Unsatisfiable),
        ("bytes=-0", 1000, Unsatisfiable),
        ("bytes=5-4", 1000, Full),
        ("bytes=0-1,5-6", 1000, Full),
        ("items=0-1", 1000, Full),
        ("bytes=x-1", 1000, Full),
    ];
    for (h, total, want) in cases {
        assert_eq!(parse_range(h, *total), *want, "{h}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_full_head_and_ranges() {
    let p = Provider::start().await;
    let data = fixture("sample.mp4");
    let total = data.len();
    let url = p.url("/files/sample.mp4");

    let (status, h, body) = get_body(&url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], &data[..]);
    assert_eq!(h["content-type"], "video/mp4");
    assert_eq!(h["content-length"], total.to_string().as_str());
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["etag"], etag_for("sample.mp4", total).as_str());
    assert_provider_headers(&h);

    let resp = client::head(&url).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], total.to_string().as_str());
    assert!(client::body(resp).await.is_empty());

    let ranges = [
        ("bytes=100-199".to_string(), 100, 199),
        ("bytes=500000-".to_string(), 500000, total - 1),
        ("bytes=-1000".to_string(), total - 1000, total - 1),
        (
            format!("bytes={}-{}", total - 10, total + 10),
            total - 10,
            total - 1,
        ),
    ];
    for (range, a, b) in ranges {
        let (status, h, body) = get_body_with(&url, &[("range", &range)]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(&body[..], &data[a..=b], "{range}");
        assert_eq!(
            h["content-range"],
            format!("bytes {a}-{b}/{total}").as_str()
        );
        assert_eq!(h["content-length"], (b - a + 1).to_string().as_str());
    }

    for range in [format!("bytes={total}-"), "bytes=-0".to_string()] {
        let (status, h, body) = get_body_with(&url, &[("range", &range)]).await;
        assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(h["content-range"], format!("bytes */{total}").as_str());
        assert!(body.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_if_range() {
    let p = Provider::start().await;
    let data = fixture("sample.mkv");
    let url = p.url("/files/sample.mkv");
    let etag = etag_for("sample.mkv", data.len());

    for validator in [etag.as_str(), LAST_MODIFIED] {
        let (status, _, body) =
            get_body_with(&url, &[("range", "bytes=10-19"), ("if-range", validator)]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{validator}");
        assert_eq!(&body[..], &data[10..20]);
    }
    let (status, h, body) =
        get_body_with(&url, &[("range", "bytes=10-19"), ("if-range", "\"stale\"")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], &data[..]);
    assert_eq!(h["content-type"], "video/x-matroska");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_types_subdirs_and_traversal() {
    let p = Provider::start().await;
    for (name, ct) in [
        ("hls_ts/master.m3u8", "application/vnd.apple.mpegurl"),
        ("sample.ts", "video/mp2t"),
        ("sample.webm", "video/webm"),
    ] {
        let (status, h, body) = get_body(&p.url(&format!("/files/{name}"))).await;
        assert_eq!(status, StatusCode::OK, "{name}");
        assert_eq!(h["content-type"], ct, "{name}");
        assert_eq!(&body[..], &fixture(name)[..], "{name}");
    }
    // reqwest normalises `..` away (WHATWG URL), so send the raw request line.
    for path in ["/files/../README.md", "/files/hls_ts/../sample.ts"] {
        assert_eq!(raw_status(&p, path).await, 404, "{path}");
    }
    let resp = get(&p.url("/files/nope.ts")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(p.requests().iter().all(|r| r.method == "GET"));
}

/// Status code of `GET path` sent byte for byte on a fresh connection.
async fn raw_status(p: &Provider, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(p.addr()).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf);
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Follows redirects by hand (the client never does) and returns the hops' Location
/// headers and the final response.
async fn follow(start: &str, max: usize) -> (Vec<String>, reqwest::Response) {
    let mut url = Url::parse(start).unwrap();
    let mut hops = Vec::new();
    for _ in 0..max {
        let resp = get(url.as_str()).await;
        if !resp.status().is_redirection() {
            return (hops, resp);
        }
        assert_eq!(resp.status(), StatusCode::FOUND);
        assert_provider_headers(resp.headers());
        let loc = resp.headers()["location"].to_str().unwrap().to_string();
        url = url.join(&loc).unwrap();
        hops.push(loc);
    }
    let resp = get(url.as_str()).await;
    (hops, resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_chains_resolve() {
    let p = Provider::start().await;
    let data = fixture("sample.mp4");

    let (hops, resp) = follow(&p.url("/redirect/3/files/sample.mp4"), 10).await;
    assert_eq!(
        hops,
        [
            "/redirect/2/files/sample.mp4",
            "/redirect/1/files/sample.mp4",
            "/redirect/0/files/sample.mp4",
            "/files/sample.mp4"
        ]
    );
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&client::body(resp).await[..], &data[..]);

    let (hops, resp) = follow(&p.url("/redirect-abs/1/files/sample.mp4?x=1"), 10).await;
    assert_eq!(
        hops,
        [
            p.url("/redirect-abs/0/files/sample.mp4?x=1"),
            p.url("/files/sample.mp4?x=1")
        ]
    );
    assert_eq!(&client::body(resp).await[..], &data[..]);

    let (hops, resp) = follow(&p.url("/redirect-rel/hls_ts/v0/index.m3u8"), 10).await;
    assert_eq!(hops, ["../../../files/hls_ts/v0/index.m3u8"]);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        &client::body(resp).await[..],
        &fixture("hls_ts/v0/index.m3u8")[..]
    );
    let (hops, _) = follow(&p.url("/redirect-rel/sample.mp4"), 10).await;
    assert_eq!(hops, ["../files/sample.mp4"]);

    let (hops, resp) = follow(&p.url("/redirect/1/status/503"), 10).await;
    assert_eq!(hops.len(), 2);
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_loops() {
    let p = Provider::start().await;
    let (hops, resp) = follow(&p.url("/loop/a"), 9).await;
    assert_eq!(hops.len(), 9);
    assert_eq!(hops[0], "/loop/b");
    assert_eq!(hops[1], "/loop/a");
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(p.hits("/loop/"), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_is_aligned_ts_and_stops_when_client_leaves() {
    let p = Provider::start().await;
    let resp = get(&p.url("/live/ch1.ts")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "video/mp2t");
    assert!(resp.headers().get("content-length").is_none());
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    assert_provider_headers(resp.headers());

    let sample = fixture("sample.ts");
    // More than one loop of the file, read in pieces across chunk boundaries.
    let mut reader = BodyReader::new(resp);
    let mut got = Vec::new();
    while got.len() < sample.len() + 100 * TS_PACKET {
        got.extend_from_slice(&reader.read_n(50_000, T).await);
    }
    assert!(got.chunks(TS_PACKET).all(|p| p[0] == 0x47));
    assert_eq!(&got[..sample.len()], &sample[..]);
    assert_eq!(&got[sample.len()..sample.len() + 1000], &sample[..1000]);

    assert_eq!(p.open_streams("/live/"), 1);
    assert_eq!(p.open_streams("/live/ch1"), 1);
    assert_eq!(p.open_streams("/live/ch2"), 0);
    assert_eq!(p.connections_open(), 1);
    drop(reader);
    assert!(eventually(T, || p.open_streams("/live/") == 0).await);
    assert!(eventually(T, || p.connections_open() == 0).await);
    assert_eq!(p.connections_total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_drop_after_truncates() {
    let p = Provider::start().await;
    let mut resp = get(&p.url("/live/x.ts?drop_after=100000&kbps=20000")).await;
    let (got, end) = client::read_to_end(&mut resp, T).await;
    assert!(matches!(end, BodyEnd::Error(_)), "{end:?}");
    assert_eq!(got.len(), 100_000);
    assert_eq!(&got[..], &fixture("sample.ts")[..100_000]);
    assert!(eventually(T, || p.open_streams("/live/") == 0).await);
    assert!(eventually(T, || p.connections_open() == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_stall_after_keeps_connection_until_client_leaves() {
    let p = Provider::start().await;
    let resp = get(&p.url("/live/x.ts?stall_after=18800")).await;
    let mut reader = BodyReader::new(resp);
    reader.read_n(18_800, T).await;
    // Nothing more arrives, yet the stream stays open.
    let more = reader.try_read_n(1, Duration::from_millis(300)).await;
    assert!(
        matches!(more, Err((ref b, BodyEnd::Timeout)) if b.is_empty()),
        "{more:?}"
    );
    assert_eq!(p.open_streams("/live/"), 1);
    drop(reader);
    assert!(eventually(T, || p.open_streams("/live/") == 0).await);
    assert!(eventually(T, || p.connections_open() == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delay_head_and_max_connections() {
    let p = Provider::start().await;
    let resp = get(&p.url("/live/a.ts?delay_ms=50&kbps=1000")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = client::head(&p.url("/live/a.ts")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(client::body(resp).await.is_empty());

    p.set_max_connections(Some(1));
    let mut second = get(&p.url("/live/b.ts")).await;
    assert_eq!(second.status().as_u16(), 509);
    let (body, _) = client::read_to_end(&mut second, T).await;
    assert!(String::from_utf8_lossy(&body).contains("PROVIDER-BODY-SECRET"));
    assert_eq!(p.refused(), 1);
    p.set_max_connections(None);
    let third = get(&p.url("/live/c.ts")).await;
    assert_eq!(third.status(), StatusCode::OK);
    assert!(eventually(T, || p.open_streams("/live/") == 2).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_routes_overrides_and_slow() {
    let p = Provider::start().await;
    let (status, h, body) = get_body(&p.url("/status/503")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&body[..], b"PROVIDER-BODY-SECRET 503");
    assert_provider_headers(&h);

    let (status, _, body) = get_body(&p.url("/nothing/here")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(&body[..], b"PROVIDER-BODY-SECRET 404");

    p.set_status("/files/sample.mp4", 403);
    let (status, _, body) = get_body(&p.url("/files/sample.mp4?x=1")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(&body[..], b"PROVIDER-BODY-SECRET 403");
    p.set_status("/live/a.ts", 502);
    assert_eq!(get(&p.url("/live/a.ts")).await.status().as_u16(), 502);
    p.clear_overrides();
    let (status, _, _) = get_body(&p.url("/files/sample.mp4")).await;
    assert_eq!(status, StatusCode::OK);

    let (status, _, body) = get_body(&p.url("/slow/30/files/hls_aes/enc.key")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], &fixture("hls_aes/enc.key")[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_requests_and_connections() {
    let p = Provider::start().await;
    let c = client::client();
    let resp = client::send(
        c.get(p.url("/echo-headers?q=1"))
            .header("User-Agent", "TestUA/1")
            .header("X-Custom", "a"),
    )
    .await;
    let json: serde_json::Value = serde_json::from_slice(&client::body(resp).await).unwrap();
    assert_eq!(json["user-agent"], "TestUA/1");
    assert_eq!(json["x-custom"], "a");
    assert_eq!(p.connections_total(), 1);

    // A second client: a second connection, told apart by its id. (Keep-alive reuse is
    // not asserted: reqwest's pool may race a new connect against an idle checkout.)
    let other = get_with(&p.url("/status/200"), &[("cookie", "c=1")]).await;
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(p.connections_total(), 2);

    let reqs = p.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].path, "/echo-headers?q=1");
    assert_eq!(reqs[0].path_only(), "/echo-headers");
    assert_eq!(reqs[0].header("User-Agent"), Some("TestUA/1"));
    assert_eq!(reqs[0].headers["x-custom"], "a");
    assert_ne!(reqs[0].conn_id, reqs[1].conn_id);
    assert_eq!(p.hits("/echo-headers"), 1);
    assert_eq!(p.requests_to("/status/").len(), 1);
    assert_eq!(p.requests_to("/status/")[0].header("cookie"), Some("c=1"));
    drop(other);
    drop(c);
    assert!(p.wait_until(T, |p| p.connections_open() == 0).await);
}

#[test]
fn live_playlist_window_wraps_with_discontinuity() {
    let vod = String::from_utf8(fixture("hls_aes/index.m3u8")).unwrap();
    let pl = crate::support::provider::live_playlist(&vod, 4, 3);
    assert!(pl.starts_with("#EXTM3U\n"));
    assert!(pl.contains("#EXT-X-KEY:METHOD=AES-128,URI=\"enc.key\""));
    assert!(pl.contains("#EXT-X-MEDIA-SEQUENCE:4\n"));
    assert!(pl.contains("#EXT-X-DISCONTINUITY-SEQUENCE:0\n"));
    assert!(!pl.contains("ENDLIST") && !pl.contains("PLAYLIST-TYPE"));
    let uris: Vec<&str> = pl.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        uris,
        ["seg004.ts?seq=4", "seg000.ts?seq=5", "seg001.ts?seq=6"]
    );
    assert_eq!(pl.matches("#EXT-X-DISCONTINUITY\n").count(), 1);
    let pl = crate::support::provider::live_playlist(&vod, 12, 3);
    assert!(pl.contains("#EXT-X-DISCONTINUITY-SEQUENCE:2\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_live_window_advances_and_segments_resolve() {
    let p = Provider::start().await;
    let url = p.url("/hls-live/hls_ts/v0/index.m3u8?seg_ms=20");
    let seq_of = |pl: &str| -> u64 {
        pl.lines()
            .find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:"))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (status, h, body) = get_body(&url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["content-type"], "application/vnd.apple.mpegurl");
    let first = String::from_utf8(body.to_vec()).unwrap();
    let seq0 = seq_of(&first);
    // The window moves with time: poll (bounded) until a later playlist shows it.
    let mut advanced = false;
    for _ in 0..500 {
        let (_, _, body) = get_body(&url).await;
        if seq_of(&String::from_utf8_lossy(&body)) > seq0 {
            advanced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(advanced);

    let base = Url::parse(&url).unwrap();
    let uri = first.lines().find(|l| !l.starts_with('#')).unwrap();
    let seg = base.join(uri).unwrap();
    let (status, _, body) = get_body(seg.as_str()).await;
    assert_eq!(status, StatusCode::OK);
    let file = uri.split('?').next().unwrap();
    assert_eq!(&body[..], &fixture(&format!("hls_ts/v0/{file}"))[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_playlists_blobs_gates_and_free_redirects() {
    use crate::support::provider::blob_bytes;
    let p = Provider::start().await;
    // /gen-playlist: N segments, {i} numbered, padded URIs, ENDLIST unless live.
    let (s, _, b) = get_body(&p.url("/gen-playlist?segs=3&uri=s{i}.ts&pad=5")).await;
    assert_eq!(s, 200);
    let text = String::from_utf8(b.to_vec()).unwrap();
    assert!(text.starts_with("#EXTM3U\n"));
    for i in 0..3 {
        assert!(text.contains(&format!("\ns{i}.ts?pad=aaaaa\n")), "{text}");
    }
    assert!(text.ends_with("#EXT-X-ENDLIST\n"));
    let (_, _, b) = get_body(&p.url("/gen-playlist?live=1")).await;
    assert!(!String::from_utf8_lossy(&b).contains("ENDLIST"));
    // /to: any Location, as given.
    let resp = get(&p.url("/to?url=file%3A%2F%2F%2Fetc%2Fpasswd")).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(resp.headers()["location"], "file:///etc/passwd");
    // /blob/{n}: generated bytes, Range, and ?chunked=1 without Content-Length.
    let (s, h, b) = get_body(&p.url("/blob/1000")).await;
    assert_eq!(
        (s, h["content-length"].to_str().unwrap()),
        (StatusCode::OK, "1000")
    );
    assert_eq!(b.as_ref(), &blob_bytes(0..1000)[..]);
    let (s, h, b) = get_body_with(&p.url("/blob/1000"), &[("range", "bytes=990-")]).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(h["content-range"], "bytes 990-999/1000");
    assert_eq!(b.as_ref(), &blob_bytes(990..1000)[..]);
    let (s, h, b) = get_body(&p.url("/blob/1000?chunked=1")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!h.contains_key("content-length"));
    assert_eq!(b.len(), 1000);
    // /gated/: half, then the rest once the gate opens; counted in flight.
    let mut r = BodyReader::new(get(&p.url("/gated/g/2000")).await);
    let first = r.read_n(1000, T).await;
    assert_eq!(first.as_ref(), &blob_bytes(0..1000)[..]);
    assert!(r.try_read_n(1, Duration::from_millis(300)).await.is_err());
    assert_eq!(p.in_flight(), 1);
    p.open_gate("g");
    let rest = r.read_n(1000, T).await;
    assert_eq!(rest.as_ref(), &blob_bytes(1000..2000)[..]);
    assert!(eventually(T, || p.in_flight() == 0).await);
    assert_eq!(p.peak_in_flight(), 1);
}
