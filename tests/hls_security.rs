//! HLS under attack and at its limits (issue #14 d, e, h, i, item 2; issue #15
//! i, j): a huge playlist costs one rendering however many viewers ask, segments
//! stream through and ranged requests share the fetch, private targets are
//! refused when `security.deny_private_upstreams` is on, HLS fetches hold provider
//! leases and close their sockets, broken redirects and unsignable URIs are
//! clear 502s, and every limit cut is counted in `m3u_edge_hls_limits_total`.
//!
//! Everything is observed from outside: status codes, bytes, the provider's own
//! request and concurrency counters, the proxy's RSS from `/proc`.

use std::time::Duration;

use http::Method;
use serde_json::json;

use crate::common::{api, config, register};
use crate::support::client::{self, get_body, get_body_with, BodyReader};
use crate::support::edge::{free_port, Edge};
use crate::support::provider::{blob_bytes, Provider};

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Every URI of a playlist: URI lines and `URI="…"` attributes.
fn uris(body: &str) -> Vec<String> {
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// The proxy's resident memory in KiB.
fn rss_kib(e: &Edge) -> u64 {
    let pid = e.pid().expect("edge pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn limit_cuts(e: &Edge, limit: &str) -> f64 {
    let (_, _, b) = get_body(&e.url("/metrics")).await;
    metric(
        &String::from_utf8_lossy(&b),
        &format!("m3u_edge_hls_limits_total{{limit=\"{limit}\"}}"),
    )
}

async fn playlist(e: &Edge, id: &str, query: &str) -> (u16, String) {
    let (s, _, b) = get_body(&e.url(&format!("/hls/{id}/playlist.m3u8{query}"))).await;
    (s.as_u16(), String::from_utf8_lossy(&b).into_owned())
}

/// A stream whose playlist is `/gen-playlist` with `query`; returns (id, first segment URI).
async fn gen_stream(e: &Edge, p: &Provider, query: &str) -> (String, String) {
    let id = register(e, json!({"url": p.url(&format!("/gen-playlist?{query}"))})).await;
    let (s, body) = playlist(e, &id, "").await;
    assert_eq!(s, 200, "{body}");
    let first = uris(&body).into_iter().next().expect("a segment");
    (id, first)
}

// ---------------------------------------------------------------- issue #15 j

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_redirected_to_a_file_url_is_a_502() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let to = format!("/to?url={}", enc("file:///etc/passwd"));
    let (_, seg) = gen_stream(&e, &p, &format!("uri={}", enc(&to))).await;
    let (s, h, body) = get_body(&e.url(&seg)).await;
    assert_eq!(s, 502, "{}", String::from_utf8_lossy(&body));
    assert!(!h.contains_key("location"));
    assert!(!String::from_utf8_lossy(&body).contains("/etc/passwd"));
    assert!(String::from_utf8_lossy(&body).contains("redirect"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uri_too_long_to_sign_is_refused_when_rewriting() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let id = register(&e, json!({"url": p.url("/gen-playlist?pad=20000")})).await;
    let (s, body) = playlist(&e, &id, "").await;
    assert_eq!(s, 502, "{}", &body[..body.len().min(300)]);
    assert!(body.contains("too long"), "{body}");
    assert_eq!(limit_cuts(&e, "uri_length").await, 1.0);
    // A long URI that fits is signed and accepted back.
    let id = register(&e, json!({"url": p.url("/gen-playlist?pad=3000")})).await;
    let (s, body) = playlist(&e, &id, "").await;
    assert_eq!(s, 200);
    let (s, _, _) = get_body(&e.url(&uris(&body)[0])).await;
    assert_eq!(s, 200);
}

// ---------------------------------------------------------------- issue #15 i, #14 i

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_provider_sockets_close_after_each_fetch() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let (_, seg) = gen_stream(&e, &p, "segs=3").await;
    let (s, _, _) = get_body(&e.url(&seg)).await;
    assert_eq!(s, 200);
    assert!(
        p.wait_until(Duration::from_secs(5), |p| p.connections_open() == 0)
            .await,
        "provider sockets still open: {}",
        p.connections_open()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_fetches_hold_leases_of_the_provider_actually_connected_to() {
    let p = Provider::start().await;
    let e = Edge::start(&config(
        "providers:\n  - name: small\n    hosts: [\"127.0.0.1\"]\n    max_connections: 2\n",
    ))
    .await;
    // The playlist is on `localhost` (no provider); every segment redirects
    // to 127.0.0.1, which is the provider with two connections.
    let seg = "/redirect-abs/1/slow/300/files/hls_ts/v0/seg000.ts?n={i}";
    let url = format!(
        "http://localhost:{}/gen-playlist?segs=6&uri={}",
        p.port(),
        enc(seg)
    );
    let id = register(&e, json!({"url": url})).await;
    let (s, body) = playlist(&e, &id, "").await;
    assert_eq!(s, 200, "{body}");
    let segs: Vec<String> = uris(&body);
    assert_eq!(segs.len(), 6);
    let urls: Vec<String> = segs.iter().map(|u| e.url(u)).collect();
    let got = futures::future::join_all(urls.iter().map(|u| get_body(u))).await;
    for (s, _, b) in &got {
        assert_eq!(*s, 200, "{}", String::from_utf8_lossy(b));
    }
    assert!(
        p.peak_in_flight() <= 2,
        "{} provider requests at once for a max_connections: 2 provider",
        p.peak_in_flight()
    );
}

// ---------------------------------------------------------------- issue #14 h

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_upstreams_are_refused_when_denied() {
    let p = Provider::start().await;
    let e = Edge::start(&config("security:\n  deny_private_upstreams: true\n")).await;
    let port = p.port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        format!("0x7f000001:{port}"),
        "169.254.169.254".to_string(),
    ] {
        let id = register(
            &e,
            json!({"url": format!("http://{host}/files/hls_ts/v0/index.m3u8")}),
        )
        .await;
        let (s, body) = playlist(&e, &id, "").await;
        assert_eq!(s, 502, "{host}: {body}");
        assert!(body.contains("private"), "{host}: {body}");
        // Files (per-client proxying) too.
        let id = register(
            &e,
            json!({"url": format!("http://{host}/files/sample.mp4")}),
        )
        .await;
        let (s, _, b) = get_body(&e.url(&format!("/stream/{id}"))).await;
        assert_eq!(s, 502, "{host}: {}", String::from_utf8_lossy(&b));
        assert!(String::from_utf8_lossy(&b).contains("private"), "{host}");
        let (s, v) = api(
            &e,
            Method::POST,
            "/test-connection",
            Some(json!({"url": format!("http://{host}/files/sample.mp4")})),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(v["success"], false, "{host}: {v}");
        assert!(
            v["message"].as_str().unwrap_or("").contains("private"),
            "{v}"
        );
    }
    assert!(p.requests().is_empty(), "{:?}", p.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_playlist_uris_to_private_targets_are_refused() {
    let p = Provider::start().await;
    let port = p.port();
    let e = Edge::start(&config(
        "security:\n  deny_private_upstreams: true\n  private_allowlist: [\"127.0.0.1\"]\n",
    ))
    .await;
    let targets = [
        format!("http://127.0.0.2:{port}/files/hls_ts/v0/seg000.ts"),
        format!("http://[::1]:{port}/files/hls_ts/v0/seg000.ts"),
        format!("http://0x7f000002:{port}/files/hls_ts/v0/seg000.ts"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://10.1.2.3/x.ts".to_string(),
    ];
    for t in &targets {
        // As a playlist URI, and behind a redirect of an allowed host.
        for uri in [t.clone(), format!("/to?url={}", enc(t))] {
            let (_, seg) = gen_stream(&e, &p, &format!("uri={}", enc(&uri))).await;
            let (s, _, b) = get_body(&e.url(&seg)).await;
            assert_eq!(s, 502, "{uri}: {}", String::from_utf8_lossy(&b));
            assert!(String::from_utf8_lossy(&b).contains("private"), "{uri}");
        }
        // A file whose redirect leads there.
        let id = register(&e, json!({"url": p.url(&format!("/to?url={}", enc(t)))})).await;
        let (s, _, b) = get_body(&e.url(&format!("/stream/{id}"))).await;
        assert!(
            s == 502 || s == 404,
            "{t}: {s} {}",
            String::from_utf8_lossy(&b)
        );
    }
    // The allowed provider still works.
    let (_, seg) = gen_stream(&e, &p, "segs=1").await;
    let (s, _, _) = get_body(&e.url(&seg)).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connection_does_not_tell_closed_from_open_ports() {
    let e = Edge::start(&config("")).await;
    // An open port that is not HTTP: accepts and hangs up.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = listener.local_addr().unwrap().port();
    let accept = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    let closed = free_port();
    let mut answers = Vec::new();
    for port in [open, closed] {
        let (s, mut v) = api(
            &e,
            Method::POST,
            "/test-connection",
            Some(json!({"url": format!("http://127.0.0.1:{port}/")})),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(v["success"], false);
        v.as_object_mut().unwrap().remove("url_tested");
        answers.push(v);
    }
    assert_eq!(answers[0], answers[1]);
    accept.abort();
}

// ---------------------------------------------------------------- issue #14 d

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_playlist_is_rendered_once_for_all_viewers() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    // ~40 000 segments: about 9 MB once rewritten.
    let id = register(&e, json!({"url": p.url("/gen-playlist?segs=40000&live=1")})).await;
    let (s, first) = playlist(&e, &id, "?client_id=warmup").await;
    assert_eq!(s, 200);
    let rendered = first.len() as u64 / 1024;
    let before = rss_kib(&e);
    let viewers = 12;
    let queries: Vec<String> = (0..viewers)
        .map(|i| format!("?client_id=viewer-{i}"))
        .collect();
    let bodies = futures::future::join_all(queries.iter().map(|q| playlist(&e, &id, q))).await;
    let after = rss_kib(&e);
    eprintln!(
        "RSS {before} -> {after} KiB for {viewers} viewers of a {rendered} KiB rewritten playlist"
    );
    for (s, b) in &bodies {
        assert_eq!(*s, 200);
        assert_eq!(uris(b).len(), 40000);
    }
    assert!(
        after.saturating_sub(before) < 3 * rendered,
        "RSS grew by {} KiB for {viewers} viewers of a {rendered} KiB playlist",
        after.saturating_sub(before)
    );
    // Each viewer stays one client through its segments.
    for (i, (_, b)) in bodies.iter().enumerate() {
        let (s, _, _) = get_body(&e.url(&uris(b)[i])).await;
        assert_eq!(s, 200);
    }
    let (_, v) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(v["client_count"], viewers + 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playlist_line_and_rendered_size_limits_are_cut_and_counted() {
    let p = Provider::start().await;
    let e = Edge::start(&config(
        "hls:\n  playlist_max_lines: 1000\n  rendered_max_bytes: 64KiB\n",
    ))
    .await;
    let id = register(&e, json!({"url": p.url("/gen-playlist?segs=600")})).await;
    let (s, body) = playlist(&e, &id, "").await;
    assert_eq!(s, 502, "{}", &body[..body.len().min(200)]);
    assert!(body.contains("lines"), "{body}");
    assert_eq!(limit_cuts(&e, "playlist_lines").await, 1.0);
    let id = register(&e, json!({"url": p.url("/gen-playlist?segs=450")})).await;
    let (s, body) = playlist(&e, &id, "").await;
    assert_eq!(s, 502, "{}", &body[..body.len().min(200)]);
    assert_eq!(limit_cuts(&e, "rendered_bytes").await, 1.0);
    // A viewer id so long that its copy would pass the limit is cut too.
    let id = register(&e, json!({"url": p.url("/gen-playlist?segs=200")})).await;
    let (s, _) = playlist(&e, &id, "").await;
    assert_eq!(s, 200);
    let (s, _) = playlist(&e, &id, &format!("?client_id={}", "c".repeat(128))).await;
    assert_eq!(s, 502);
    assert_eq!(limit_cuts(&e, "rendered_bytes").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_header_time_is_bounded_and_counted() {
    let p = Provider::start().await;
    let e = Edge::start(&config("hls:\n  header_timeout: 1s\n")).await;
    let id = register(&e, json!({"url": p.url("/slow/4000/gen-playlist")})).await;
    let (s, body) = playlist(&e, &id, "").await;
    assert_eq!(s, 502, "{body}");
    assert!(limit_cuts(&e, "header_timeout").await >= 1.0);
}

// ---------------------------------------------------------------- issue #14 e

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_reaches_the_viewer_while_the_provider_still_sends_it() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let n = 4_000_000;
    let (_, seg) = gen_stream(&e, &p, &format!("uri={}", enc(&format!("/gated/g1/{n}")))).await;
    let resp = client::get(&e.url(&seg)).await;
    assert_eq!(resp.status(), 200);
    let mut r = BodyReader::new(resp);
    // The provider holds the second half until the viewer has bytes.
    let head = r.read_n(64 * 1024, Duration::from_secs(10)).await;
    assert_eq!(head.len(), 64 * 1024, "no bytes before the whole segment");
    p.open_gate("g1");
    let rest = r.read_n(n - head.len(), Duration::from_secs(20)).await;
    let mut all = head.to_vec();
    all.extend_from_slice(&rest);
    assert_eq!(all, blob_bytes(0..n));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_segment_requests_share_one_provider_fetch() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let n = 3_000_000;
    let (_, seg) = gen_stream(&e, &p, &format!("uri={}", enc(&format!("/blob/{n}")))).await;
    let ranges = [
        (0, 999),
        (1000, 1_999_999),
        (2_000_000, n - 1),
        (500, 700),
        (0, n - 1),
        (2_999_000, n - 1),
    ];
    let got = futures::future::join_all(ranges.iter().map(|(a, b)| {
        let url = e.url(&seg);
        let range = format!("bytes={a}-{b}");
        async move { get_body_with(&url, &[("range", range.as_str())]).await }
    }))
    .await;
    for ((a, b), (s, h, body)) in ranges.iter().zip(&got) {
        assert_eq!(*s, 206, "{a}-{b}");
        assert_eq!(h["content-range"], format!("bytes {a}-{b}/{n}").as_str());
        assert_eq!(body.as_ref(), &blob_bytes(*a..*b + 1)[..], "{a}-{b}");
    }
    // The whole object, too, from the shared copy.
    let (s, _, body) = get_body(&e.url(&seg)).await;
    assert_eq!(s, 200);
    assert_eq!(body.len(), n);
    assert_eq!(p.hits("/blob/"), 1, "{:?}", p.requests_to("/blob/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_without_a_content_length_are_shared_too() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let n = 1_500_000;
    let uri = format!("/blob/{n}?chunked=1");
    let (_, seg) = gen_stream(&e, &p, &format!("uri={}", enc(&uri))).await;
    let (s, h, body) = get_body(&e.url(&seg)).await;
    assert_eq!(s, 200);
    assert!(!h.contains_key("content-length") || h["content-length"] == n.to_string().as_str());
    assert_eq!(body.as_ref(), &blob_bytes(0..n)[..]);
    let (s, h, body) = get_body_with(&e.url(&seg), &[("range", "bytes=-100")]).await;
    assert_eq!(s, 206);
    assert_eq!(
        h["content-range"],
        format!("bytes {}-{}/{n}", n - 100, n - 1).as_str()
    );
    assert_eq!(body.as_ref(), &blob_bytes(n - 100..n)[..]);
    let (s, h, _) = get_body_with(&e.url(&seg), &[("range", &format!("bytes={n}-"))]).await;
    assert_eq!(s, 416);
    assert_eq!(h["content-range"], format!("bytes */{n}").as_str());
    assert_eq!(p.hits("/blob/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_segments_stream_through_without_a_copy_per_request() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    // Over the cacheable size (hls.segment_cache_bytes / 4 = 16 MiB).
    let n = 40_000_000;
    let (_, seg) = gen_stream(&e, &p, &format!("uri={}", enc(&format!("/gated/big/{n}")))).await;
    let before = rss_kib(&e);
    let mut readers = Vec::new();
    for k in 0..6usize {
        let range = format!("bytes={}-", k * 1000);
        let resp = client::send(client::client().get(e.url(&seg)).header("range", range)).await;
        assert_eq!(resp.status(), 206);
        readers.push(BodyReader::new(resp));
    }
    for r in &mut readers {
        let b = r.read_n(256 * 1024, Duration::from_secs(20)).await;
        assert_eq!(b.len(), 256 * 1024);
    }
    // Every provider answer is now parked at its half-way gate.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss_kib(&e).saturating_sub(before);
    eprintln!("RSS {before} KiB, +{grown} KiB with 6 ranged requests of a {n}-byte segment");
    assert!(
        grown < 64 * 1024,
        "RSS grew by {grown} KiB for 6 ranged requests"
    );
    // Each ranged request is its own provider request, plus the one shared
    // fetch abandoned at the Content-Length; later ones go straight through.
    assert!(p.hits("/gated/") <= 7, "{:?}", p.requests_to("/gated/"));
    let resp = client::send(
        client::client()
            .get(e.url(&seg))
            .header("range", "bytes=0-99"),
    )
    .await;
    assert_eq!(resp.status(), 206);
    let before_hits = p.hits("/gated/");
    drop(resp);
    assert!(before_hits <= 8);
    p.open_gate("big");
    let mut first = readers.remove(0);
    let rest = first.read_n(n - 256 * 1024, Duration::from_secs(60)).await;
    assert_eq!(rest.len(), n - 256 * 1024);
    assert_eq!(&rest[rest.len() - 10..], &blob_bytes(n - 10..n)[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_fetch_is_bounded_in_time_and_counted() {
    let p = Provider::start().await;
    let e = Edge::start(&config("hls:\n  segment_timeout: 2s\n")).await;
    let n = 1_000_000;
    let (_, seg) = gen_stream(
        &e,
        &p,
        &format!("uri={}", enc(&format!("/gated/never/{n}"))),
    )
    .await;
    let resp = client::get(&e.url(&seg)).await;
    let mut r = BodyReader::new(resp);
    let got = match r.try_read_n(n, Duration::from_secs(20)).await {
        Ok(b) => b,
        Err((b, _)) => b,
    };
    assert!(
        got.len() < n,
        "the whole body arrived through a closed gate"
    );
    assert!(limit_cuts(&e, "segment_timeout").await >= 1.0);
}

/// Measurement for the README/report (run with `--ignored --nocapture`): the
/// proxy's peak RSS while 6 viewers fetch different ranges of one 40 MB segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_peak_rss_of_six_ranged_requests() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let n = 40_000_000;
    let (_, seg) = gen_stream(&e, &p, &format!("uri={}", enc(&format!("/blob/{n}")))).await;
    let before = rss_kib(&e);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let pid_peak = peak.clone();
    let pid = e.pid().expect("pid");
    let sampler = tokio::spawn(async move {
        loop {
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                if let Some(v) = s
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    pid_peak.fetch_max(v, std::sync::atomic::Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let urls: Vec<(String, String)> = (0..6usize)
        .map(|k| (e.url(&seg), format!("bytes={}-", k * 1000)))
        .collect();
    let got = futures::future::join_all(
        urls.iter()
            .map(|(u, r)| async move { get_body_with(u, &[("range", r.as_str())]).await }),
    )
    .await;
    sampler.abort();
    for (s, _, b) in &got {
        assert_eq!(*s, 206);
        assert!(b.len() > n - 10_000);
    }
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "RSS {before} KiB before, peak {peak} KiB (+{} KiB) for 6 ranged requests of a {n}-byte segment; provider requests: {}",
        peak - before,
        p.hits("/blob/")
    );
}

/// Measurement (run with `--ignored --nocapture`): the proxy's RSS after 12
/// viewers, one after the other, fetched a 40 000-segment playlist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_rss_of_twelve_viewers_of_a_big_playlist() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let id = register(&e, json!({"url": p.url("/gen-playlist?segs=40000&live=1")})).await;
    let (s, first) = playlist(&e, &id, "?client_id=warmup").await;
    assert_eq!(s, 200);
    let before = rss_kib(&e);
    let started = std::time::Instant::now();
    for i in 0..12 {
        let (s, _) = playlist(&e, &id, &format!("?client_id=viewer-{i}")).await;
        assert_eq!(s, 200);
    }
    eprintln!(
        "RSS {before} -> {} KiB after 12 viewers of a {} KiB rewritten playlist ({:?})",
        rss_kib(&e),
        first.len() / 1024,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_and_webhooks_to_private_addresses_are_refused() {
    let p = Provider::start().await;
    let hook = crate::support::webhook::WebhookReceiver::start().await;
    let e = Edge::start(&config(&format!(
        "security:\n  deny_private_upstreams: true\nlive:\n  give_up_after: 2s\nevents:\n  webhooks:\n    - url: \"{}\"\n      retry_attempts: 0\n",
        hook.url("/hook")
    )))
    .await;
    // A live channel (the hub's own client) on an IP literal.
    let id = register(&e, json!({"url": p.url("/live/x.ts")})).await;
    let resp = client::client()
        .get(e.url(&format!("/stream/{id}")))
        .timeout(Duration::from_secs(8))
        .send()
        .await;
    if let Ok(r) = resp {
        let _ = r.bytes().await;
    }
    assert_eq!(p.hits("/live/"), 0, "{:?}", p.requests());
    // A webhook on a private address is not sent to, and says why.
    let (s, v) = api(
        &e,
        Method::POST,
        "/webhooks/test",
        Some(json!({"webhook_url": hook.url("/hook")})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("private"), "{v}");
    assert_eq!(hook.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_redirected_to_a_providers_host_count_against_it() {
    let p = Provider::start().await;
    let e = Edge::start(&config(
        "providers:\n  - name: small\n    hosts: [\"127.0.0.1\"]\n    max_connections: 2\n",
    ))
    .await;
    // On `localhost` (no provider), redirected to 127.0.0.1 (the provider).
    let url = format!(
        "http://localhost:{}/redirect-abs/0/slow/1500/files/sample.mp4",
        p.port()
    );
    let id = register(&e, json!({"url": url, "live": false})).await;
    let urls: Vec<String> = (0..5)
        .map(|i| e.url(&format!("/stream/{id}?client_id=c{i}")))
        .collect();
    let got = futures::future::join_all(urls.iter().map(|u| get_body(u))).await;
    let ok = got.iter().filter(|(s, _, _)| *s == 200).count();
    let full = got.iter().filter(|(s, _, _)| *s == 503).count();
    assert!(p.peak_in_flight() <= 2, "{} at once", p.peak_in_flight());
    assert_eq!(
        ok + full,
        5,
        "{:?}",
        got.iter().map(|g| g.0).collect::<Vec<_>>()
    );
    assert!(ok >= 2);
}

/// Issue #14 i for live channels: a channel whose URL redirects to a
/// provider's host holds that provider's lease, so its limit holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_channels_redirected_to_a_providers_host_count_against_it() {
    let p = Provider::start().await;
    let e = Edge::start(&config(
        "providers:\n  - name: small\n    hosts: [\"127.0.0.1\"]\n    max_connections: 2\n",
    ))
    .await;
    let mut viewers = Vec::new();
    for i in 0..4 {
        let url = format!(
            "http://localhost:{}/redirect-abs/0/live/ch{i}.ts?kbps=500",
            p.port()
        );
        let id = register(&e, json!({"url": url})).await;
        viewers.push(
            client::client()
                .get(e.url(&format!("/stream/{id}")))
                .timeout(Duration::from_secs(3))
                .send(),
        );
    }
    // Sampled while the viewers join: a connection opened past the limit and
    // closed a moment later counts too (the provider would have seen it).
    let peak = std::sync::atomic::AtomicUsize::new(0);
    let sample = async {
        loop {
            peak.fetch_max(
                p.open_streams("/live/"),
                std::sync::atomic::Ordering::Relaxed,
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::select! {
        _ = futures::future::join_all(viewers) => {}
        _ = sample => {}
    }
    let peak = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(p.open_streams("/live/"));
    assert!(
        peak <= 2,
        "{peak} live provider connections for max_connections: 2"
    );
}
