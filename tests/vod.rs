//! Per-client proxying of files (issue: foundation §5–6): Range, HEAD,
//! redirects followed server-side, failover before the first byte, 404/502
//! mapping, and header hygiene, observed at the client and at the provider.

use serde_json::json;

use crate::common::{config, register};
use crate::support::client::{get_body, get_body_with, get_with, head};
use crate::support::edge::Edge;
use crate::support::fixture;
use crate::support::provider::Provider;

async fn setup() -> (Provider, Edge) {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    (p, e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_return_the_exact_fixture_slice() {
    let (p, e) = setup().await;
    for (name, mime) in [
        ("sample.mp4", "video/mp4"),
        ("sample.mkv", "video/x-matroska"),
        ("sample.webm", "video/webm"),
    ] {
        let id = register(&e, json!({ "url": p.url(&format!("files/{name}")) })).await;
        let data = fixture(name);
        let url = e.url(&format!("/stream/{id}"));

        let (status, headers, body) = get_body(&url).await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(body.as_ref(), &data[..], "{name}: full body");
        assert_eq!(headers["content-type"], mime);

        let (status, headers, body) = get_body_with(&url, &[("Range", "bytes=1000-1999")]).await;
        assert_eq!(status, 206, "{name}");
        assert_eq!(body.as_ref(), &data[1000..2000], "{name}: range");
        assert_eq!(
            headers["content-range"],
            format!("bytes 1000-1999/{}", data.len()).as_str()
        );

        let (status, _, body) = get_body_with(&url, &[("Range", "bytes=-500")]).await;
        assert_eq!(status, 206);
        assert_eq!(body.as_ref(), &data[data.len() - 500..]);

        let (status, _, body) =
            get_body_with(&url, &[("Range", &format!("bytes={}-", data.len() - 10))]).await;
        assert_eq!(status, 206);
        assert_eq!(body.as_ref(), &data[data.len() - 10..]);

        let (status, headers, _) =
            get_body_with(&url, &[("Range", &format!("bytes={}-", data.len() + 10))]).await;
        assert_eq!(status, 416, "{name}: unsatisfiable range");
        assert!(headers.contains_key("content-range"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_range_and_head_pass_through() {
    let (p, e) = setup().await;
    let id = register(&e, json!({ "url": p.url("files/sample.mp4") })).await;
    let url = e.url(&format!("/m3u-proxy/stream/{id}"));
    let data = fixture("sample.mp4");

    let resp = head(&url).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"],
        data.len().to_string().as_str()
    );
    let etag = resp.headers()["etag"].to_str().unwrap().to_string();
    let req = p.requests_to("/files/sample.mp4");
    assert_eq!(req.last().unwrap().method, "HEAD");

    let (status, _, body) =
        get_body_with(&url, &[("Range", "bytes=10-19"), ("If-Range", &etag)]).await;
    assert_eq!(status, 206);
    assert_eq!(body.as_ref(), &data[10..20]);
    let (status, _, body) = get_body_with(
        &url,
        &[("Range", "bytes=10-19"), ("If-Range", "\"stale-etag\"")],
    )
    .await;
    assert_eq!(status, 200, "a stale If-Range gets the whole file");
    assert_eq!(body.len(), data.len());
    let seen = p.requests_to("/files/sample.mp4");
    assert_eq!(
        seen.last().unwrap().header("if-range"),
        Some("\"stale-etag\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed_server_side() {
    let (p, e) = setup().await;
    let data = fixture("sample.mp4");
    for path in [
        "redirect/3/files/sample.mp4",
        "redirect-abs/2/files/sample.mp4",
        "redirect-rel/sample.mp4",
    ] {
        let id = register(&e, json!({ "url": p.url(path) })).await;
        let (status, headers, body) = get_body(&e.url(&format!("/stream/{id}"))).await;
        assert_eq!(status, 200, "{path}");
        assert!(!headers.contains_key("location"), "{path}: Location leaked");
        assert_eq!(body.as_ref(), &data[..], "{path}");
    }
    // Five hops is the limit (redirect/N answers N+1 redirects); six is a
    // failure, a loop is a failure.
    let id = register(&e, json!({ "url": p.url("redirect/4/files/sample.mp4") })).await;
    let (status, _, _) = get_body(&e.url(&format!("/stream/{id}"))).await;
    assert_eq!(status, 200, "5 hops are followed");
    for path in ["redirect/5/files/sample.mp4", "loop/a"] {
        let id = register(&e, json!({ "url": p.url(path) })).await;
        let (status, headers, body) = get_body(&e.url(&format!("/stream/{id}"))).await;
        assert_eq!(status, 502, "{path}");
        assert_eq!(headers["content-type"], "application/json");
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("127.0.0.1"),
            "{path}: error names the provider: {text}"
        );
        assert!(!text.contains("PROVIDER-BODY-SECRET"));
    }
    assert!(
        p.hits("/loop/") <= 12,
        "loop was detected, not followed forever"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_before_the_first_byte_goes_in_order() {
    let (p, e) = setup().await;
    let data = fixture("sample.mkv");
    let dead = "http://127.0.0.1:1/dead.mkv".to_string();
    // `live: false`: a file, proxied per client from the first request.
    let id = register(
        &e,
        json!({
            "url": p.url("status/503"),
            "failover_urls": [dead, p.url("status/404"), p.url("files/sample.mkv")],
            "live": false,
        }),
    )
    .await;
    let (status, _, body) = get_body(&e.url(&format!("/stream/{id}"))).await;
    assert_eq!(status, 200);
    assert_eq!(body.as_ref(), &data[..]);
    let order: Vec<String> = p
        .requests()
        .iter()
        .map(|r| r.path_only().to_string())
        .filter(|x| x.starts_with("/status") || x.starts_with("/files"))
        .collect();
    assert_eq!(order, ["/status/503", "/status/404", "/files/sample.mkv"]);

    // The stream now starts on the source that worked.
    let (_, v) = crate::common::api(&e, http::Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(v["stream"]["current_failover_index"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_sources_failing_map_to_404_or_502_with_json() {
    let (p, e) = setup().await;
    let not_found = register(
        &e,
        json!({ "url": p.url("status/404"), "failover_urls": [p.url("nothing-here.mp4")] }),
    )
    .await;
    let (status, headers, body) = get_body(&e.url(&format!("/stream/{not_found}"))).await;
    assert_eq!(status, 404);
    assert_eq!(headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["detail"].as_str().unwrap().contains(&not_found));

    let mixed = register(
        &e,
        json!({ "url": p.url("status/404"), "failover_urls": [p.url("status/500")] }),
    )
    .await;
    let (status, _, body) = get_body(&e.url(&format!("/stream/{mixed}"))).await;
    assert_eq!(status, 502);
    let text = String::from_utf8_lossy(&body);
    assert!(
        !text.contains("PROVIDER-BODY-SECRET"),
        "provider body leaked: {text}"
    );
    assert!(!text.contains("127.0.0.1"), "provider URL leaked: {text}");

    let dead = register(&e, json!({ "url": "http://127.0.0.1:1/x.mp4" })).await;
    let (status, _, _) = get_body(&e.url(&format!("/stream/{dead}"))).await;
    assert_eq!(status, 502, "connection refused → 502");

    let (status, _, body) = get_body(&e.url("/stream/0123456789abcdef")).await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["detail"],
        "Stream not found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_primary_times_out_and_fails_over() {
    let (p, e) = setup().await;
    // read_timeout is 3s in the test config; the primary answers after 6s.
    let id = register(
        &e,
        json!({
            "url": p.url("slow/6000/files/sample.webm"),
            "failover_urls": [p.url("files/sample.webm")],
        }),
    )
    .await;
    let (status, _, body) = get_body(&e.url(&format!("/stream/{id}"))).await;
    assert_eq!(status, 200);
    assert_eq!(body.as_ref(), &fixture("sample.webm")[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_never_sees_the_client_and_the_client_never_sees_the_provider() {
    let p = Provider::start().await;
    let yaml = config(&format!(
        "streams:\n  - id: withua\n    url: \"{}\"\n    user_agent: \"StreamUA/2.0\"\n    headers:\n      X-Provider-Key: \"k1\"\n",
        p.url("files/sample.mp4")
    ));
    let e = Edge::start(&yaml).await;
    let plain = register(&e, json!({ "url": p.url("redirect/1/files/sample.mkv") })).await;
    let client_headers = [
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Real-IP", "203.0.113.7"),
        ("Forwarded", "for=203.0.113.7"),
        ("Via", "1.1 client-proxy"),
        ("Cookie", "session=CLIENTCOOKIE"),
        ("Authorization", "Bearer CLIENTAUTH"),
        ("Referer", "http://client.example/page"),
        ("Origin", "http://client.example"),
        ("User-Agent", "ClientPlayer/9.9"),
        ("Range", "bytes=0-99"),
        ("Accept", "video/*"),
    ];
    for (id, want_ua) in [
        ("withua", "StreamUA/2.0"),
        (plain.as_str(), "EdgeDefault/1.0"),
    ] {
        p.clear_requests();
        let resp = get_with(&e.url(&format!("/stream/{id}")), &client_headers).await;
        assert_eq!(resp.status(), 206);
        for (name, _) in resp.headers() {
            let n = name.as_str();
            assert!(
                !(n == "set-cookie" || n == "server" || n == "via" || n.starts_with("x-")),
                "{id}: provider header {n} reached the client"
            );
        }
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len(), 100);
        let seen = p.requests();
        assert!(!seen.is_empty());
        for r in &seen {
            for banned in [
                "x-forwarded-for",
                "x-real-ip",
                "forwarded",
                "via",
                "cookie",
                "authorization",
                "referer",
                "origin",
            ] {
                assert!(
                    r.header(banned).is_none(),
                    "{id}: {banned} reached the provider on {}",
                    r.path
                );
            }
            assert_eq!(r.header("user-agent"), Some(want_ua), "{id}: {}", r.path);
            assert_eq!(r.header("range"), Some("bytes=0-99"));
            assert_eq!(r.header("accept"), Some("video/*"));
            let text = format!("{:?}", r.headers);
            assert!(
                !text.contains("203.0.113.7") && !text.contains("CLIENT"),
                "{text}"
            );
        }
        if id == "withua" {
            assert_eq!(seen[0].header("x-provider-key"), Some("k1"));
        }
    }
}
