//! The live hub (issue: live MPEG-TS hub): one provider connection per channel,
//! clean late joins, slow viewers dropped alone, teardown when the last viewer
//! leaves, failover with viewers attached, provider connection limits.
//! Everything is observed at the provider (connections, requests) and in the
//! bytes viewers receive (parsed as TS).

use std::time::Duration;

use http::Method;
use serde_json::json;

use crate::common::{api, config, register};
use crate::support::client::{self, BodyReader};
use crate::support::edge::Edge;
use crate::support::eventually::eventually;
use crate::support::provider::Provider;
use crate::support::ts_check::{check_clean_join, is_valid_ts};

const T: Duration = Duration::from_secs(15);

fn live_config(extra: &str) -> String {
    config(&format!(
        "live:\n  stall_timeout: \"1s\"\n  give_up_after: \"20s\"\n  retry_backoff: \"1s\"\n{extra}"
    ))
}

async fn watch(e: &Edge, id: &str, client_id: &str) -> BodyReader {
    let resp = client::get(&e.url(&format!("/stream/{id}?client_id={client_id}"))).await;
    assert_eq!(resp.status(), 200, "viewer {client_id}");
    assert_eq!(resp.headers()["content-type"], "video/mp2t");
    BodyReader::new(resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_viewers_share_one_provider_connection() {
    let p = Provider::start().await;
    let e = Edge::start(&live_config("")).await;
    let id = register(&e, json!({"url": p.url("live/one.ts?kbps=4000")})).await;
    assert_eq!(p.hits("/live/"), 0, "registering opens nothing");
    let mut viewers = Vec::new();
    for i in 0..20 {
        viewers.push(watch(&e, &id, &format!("v{i}")).await);
    }
    let sample = crate::support::fixture("sample.ts");
    for (i, v) in viewers.iter_mut().enumerate() {
        let b = v.read_n(188 * 2000, T).await;
        is_valid_ts(&b).unwrap();
        if i == 0 {
            // Past the join prefix (PAT/PMT, when it starts at a keyframe), the
            // first viewer gets the provider's (looped) bytes, unchanged.
            let tail = &b[b.len() - 188 * 1000..];
            let looped = [sample.as_slice(), sample.as_slice()].concat();
            let probe = &tail[..188 * 4];
            let at = looped
                .windows(probe.len())
                .position(|w| w == probe)
                .expect("viewer bytes not found in the source");
            assert!(
                looped[at..at + tail.len()] == tail[..],
                "first viewer's bytes differ from the source"
            );
        }
    }
    assert_eq!(
        p.hits("/live/one.ts"),
        1,
        "exactly one provider request for 20 viewers"
    );
    assert_eq!(p.open_streams("/live/"), 1);
    let (_, s) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(s["client_count"], 20);
    // Everyone leaves: the provider connection closes.
    drop(viewers);
    assert!(
        p.wait_until(T, |p| p.open_streams("/live/") == 0).await,
        "provider connection still open after the last viewer left"
    );
    let (_, s) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(s["client_count"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_starts_with_pat_pmt_and_a_keyframe() {
    let p = Provider::start().await;
    let e = Edge::start(&live_config("")).await;
    let id = register(&e, json!({"url": p.url("live/join.ts?kbps=6000")})).await;
    let mut first = watch(&e, &id, "first").await;
    // Cold channel: the first viewer gets the provider's bytes from the start.
    let b = first.read_n(188 * 3000, T).await;
    check_clean_join(&b).expect("first viewer");
    for round in 0..4 {
        // Join at various points of the GOP.
        first.read_n(188 * (700 + round * 331), T).await;
        let mut late = watch(&e, &id, &format!("late{round}")).await;
        let b = late.read_n(188 * 1500, T).await;
        let report =
            check_clean_join(&b).unwrap_or_else(|err| panic!("late joiner {round}: {err}"));
        assert!(report.pat_index < report.pmt_index);
    }
    assert_eq!(p.hits("/live/join.ts"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_stops_reading_is_dropped_alone() {
    let p = Provider::start().await;
    let e = Edge::start(&live_config(
        "  ring_seconds: \"2s\"\n  ring_bytes: \"2MiB\"\n",
    ))
    .await;
    let id = register(&e, json!({"url": p.url("live/slow.ts?kbps=16000")})).await;
    let mut fast = watch(&e, &id, "fast").await;
    let stuck = watch(&e, &id, "stuck").await;
    // 40 MB at 2 MB/s: far more than socket buffers and the ring can hold for `stuck`.
    let mut total = 0usize;
    while total < 40_000_000 {
        let b = fast.read_n(1_000_000, T).await;
        total += b.len();
    }
    assert_eq!(
        p.hits("/live/slow.ts"),
        1,
        "the provider connection was never restarted"
    );
    let (_, stats) = api(&e, Method::GET, "/stats", None).await;
    assert!(
        stats["slow_viewers_dropped"].as_u64().unwrap() >= 1,
        "stuck viewer not dropped: {stats}"
    );
    let (_, s) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    let ids: Vec<_> = s["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("fast")]);
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zapping_through_a_one_connection_provider_never_fails() {
    let p = Provider::start().await;
    p.set_max_connections(Some(1));
    let e = Edge::start(&live_config(
        "providers:\n  - name: tiny\n    hosts: [\"127.0.0.1\"]\n    max_connections: 1\n",
    ))
    .await;
    let mut ids = Vec::new();
    for ch in 0..5 {
        ids.push(
            register(
                &e,
                json!({"url": p.url(&format!("live/zap{ch}.ts?kbps=2000"))}),
            )
            .await,
        );
    }
    for i in 0..50 {
        let id = &ids[i % ids.len()];
        let resp = client::get(&e.url(&format!("/stream/{id}?client_id=zapper"))).await;
        assert_eq!(resp.status(), 200, "zap {i} refused");
        let mut r = BodyReader::new(resp);
        r.read_n(188 * 50, T).await;
    }
    // The provider may notice a close a moment after the proxy made it and
    // answer "busy" (509) once; the proxy asks again instead of failing the zap.
    assert!(
        p.wait_until(T, |p| p.open_streams("/live/") == 0).await,
        "a zapped-away channel kept its provider connection"
    );
    // A second, different channel while one is watched: a clear 503.
    let _watching = watch(&e, &ids[0], "a").await;
    let resp = client::get(&e.url(&format!("/stream/{}?client_id=b", ids[1]))).await;
    assert_eq!(resp.status(), 503);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["provider"], "tiny");
    assert_eq!(v["max_connections"], 1);
    let (_, stats) = api(&e, Method::GET, "/stats", None).await;
    assert_eq!(stats["providers"][0]["connections"], 1);
}

async fn failover_keeps_viewers(primary: &str, setup: impl FnOnce(&Provider)) {
    let p = Provider::start().await;
    setup(&p);
    let e = Edge::start(&live_config("")).await;
    let id = register(
        &e,
        json!({"url": p.url(primary), "failover_urls": [p.url("live/backup.ts?kbps=4000")]}),
    )
    .await;
    let mut a = watch(&e, &id, "a").await;
    let mut b = watch(&e, &id, "b").await;
    // Read well past the switch; both stay connected and get aligned TS.
    let mut got_a = Vec::new();
    while got_a.len() < 3_000_000 {
        got_a.extend_from_slice(&a.read_n(188 * 1000, T).await);
        b.read_n(188 * 1000, T).await;
    }
    is_valid_ts(&got_a).unwrap();
    assert!(p.hits("/live/backup.ts") >= 1, "backup never used");
    let (_, s) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(s["stream"]["current_failover_index"], 0, "{s}");
    assert!(s["stream"]["failover_attempts"].as_u64().unwrap() >= 1);
    assert_eq!(s["client_count"], 2);
    let sources = s["stream"]["sources"].as_array().unwrap();
    assert_eq!(sources[0]["state"], "failing", "{s}");
    assert!(sources[0]["last_error"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_when_the_primary_drops_the_connection() {
    failover_keeps_viewers("live/main.ts?kbps=4000&drop_after=600000", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_when_the_primary_stalls() {
    failover_keeps_viewers("live/main.ts?kbps=4000&stall_after=600000", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_when_the_primary_answers_5xx() {
    failover_keeps_viewers("live/main.ts?kbps=4000", |p| {
        p.set_status("/live/main.ts", 503)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_failover_through_the_api() {
    let p = Provider::start().await;
    let e = Edge::start(&live_config("")).await;
    let id = register(
        &e,
        json!({"url": p.url("live/pri.ts?kbps=3000"), "failover_urls": [p.url("live/sec.ts?kbps=3000")]}),
    )
    .await;
    let mut v = watch(&e, &id, "v").await;
    v.read_n(188 * 1000, T).await;
    let (s, r) = api(&e, Method::POST, &format!("/streams/{id}/failover"), None).await;
    assert_eq!(s, 200, "{r}");
    for f in [
        "message",
        "new_url",
        "failover_index",
        "failover_attempts",
        "active_clients",
        "stream_type",
    ] {
        assert!(r.get(f).is_some(), "failover reply lacks {f}");
    }
    assert_eq!(r["failover_index"], 0);
    assert_eq!(r["active_clients"], 1);
    let mut got = Vec::new();
    while got.len() < 1_500_000 {
        got.extend_from_slice(&v.read_n(188 * 1000, T).await);
    }
    is_valid_ts(&got).unwrap();
    assert!(eventually(T, || p.hits("/live/sec.ts") == 1).await);
    assert!(
        eventually(T, || p.open_streams("/live/pri.ts") == 0).await,
        "old source left open"
    );
    // Nothing left to switch to.
    let (s, _) = api(&e, Method::POST, &format!("/streams/{id}/failover"), None).await;
    assert_eq!(s, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_behind_an_ambiguous_url_is_proxied_per_client() {
    let p = Provider::start().await;
    let e = Edge::start(&live_config("")).await;
    // A .ts file with a length is VOD: every client gets it whole, Range works.
    let id = register(&e, json!({"url": p.url("files/sample.ts")})).await;
    let data = crate::support::fixture("sample.ts");
    let (s, _, body) = client::get_body(&e.url(&format!("/stream/{id}"))).await;
    assert_eq!(s, 200);
    assert_eq!(body.as_ref(), &data[..]);
    let (s, _, body) = client::get_body_with(
        &e.url(&format!("/stream/{id}")),
        &[("Range", "bytes=188-375")],
    )
    .await;
    assert_eq!(s, 206);
    assert_eq!(body.as_ref(), &data[188..376]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_a_live_stream_opens_nothing() {
    let p = Provider::start().await;
    let e = Edge::start(&live_config("")).await;
    let id = register(&e, json!({"url": p.url("live/h.ts"), "live": true})).await;
    let resp = client::head(&e.url(&format!("/stream/{id}"))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "video/mp2t");
    assert_eq!(p.hits("/live/"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_standby_takes_over_without_a_reconnect() {
    let p = Provider::start().await;
    let e = Edge::start(&live_config("  standby: true\n")).await;
    let id = register(
        &e,
        json!({
            "url": p.url("live/main.ts?kbps=4000&drop_after=2500000"),
            "failover_urls": [p.url("live/backup.ts?kbps=4000")],
        }),
    )
    .await;
    let mut v = watch(&e, &id, "v").await;
    v.read_n(188 * 500, T).await;
    // The standby is connected while the primary still serves.
    assert!(
        p.wait_until(T, |p| p.open_streams("/live/backup.ts") == 1
            && p.open_streams("/live/main.ts") == 1)
            .await,
        "no standby connection beside the primary"
    );
    let mut got = Vec::new();
    while got.len() < 4_000_000 {
        got.extend_from_slice(&v.read_n(188 * 1000, T).await);
    }
    is_valid_ts(&got).unwrap();
    // The standby's connection was handed over, not reopened.
    assert_eq!(p.hits("/live/backup.ts"), 1);
    let (_, s) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(s["stream"]["current_failover_index"], 0);
    assert_eq!(s["client_count"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_returns_to_the_primary_after_the_cooldown() {
    let p = Provider::start().await;
    let e = Edge::start(&live_config("  primary_cooldown: \"1s\"\n")).await;
    let id = register(
        &e,
        json!({
            "url": p.url("live/main.ts?kbps=4000&drop_after=400000"),
            "failover_urls": [p.url("live/backup.ts?kbps=4000")],
        }),
    )
    .await;
    let mut v = watch(&e, &id, "v").await;
    let mut got = Vec::new();
    while p.hits("/live/main.ts") < 2 {
        got.extend_from_slice(&v.read_n(188 * 500, T).await);
        assert!(got.len() < 40_000_000, "never went back to the primary");
    }
    assert!(p.hits("/live/backup.ts") >= 1);
    got.extend_from_slice(&v.read_n(188 * 2000, T).await);
    is_valid_ts(&got).unwrap();
}

/// A live viewer is served off its Pingora session; it still leaves one access
/// log line (status, bytes) and one request count when it goes, and it leaves
/// the client list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_viewer_is_logged_and_counted_when_it_leaves() {
    let p = Provider::start().await;
    let e = Edge::start(&live_config("")).await;
    let id = register(&e, json!({"url": p.url("live/logged.ts?kbps=2000")})).await;
    let mut v = watch(&e, &id, "logged-viewer").await;
    let b = v.read_n(188 * 1000, T).await;
    is_valid_ts(&b).unwrap();
    drop(v);
    let line = |log: &str| {
        log.lines()
            .find(|l| l.contains(" access: request") && l.contains(&format!("stream_id=\"{id}\"")))
            .map(str::to_string)
    };
    assert!(
        eventually(T, || line(&e.log()).is_some()).await,
        "no access log line for the live viewer:\n{}",
        e.log()
    );
    let l = line(&e.log()).unwrap_or_default();
    assert!(l.contains("status=200"), "{l}");
    assert!(l.contains("client=\"logged-viewer\""), "{l}");
    let bytes: u64 = l
        .split_whitespace()
        .find_map(|f| f.strip_prefix("bytes="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(bytes >= 188 * 1000, "{l}");
    let (_, _, body) = client::get_body(&e.url("/metrics")).await;
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.lines()
            .any(|l| l.starts_with("m3u_edge_requests_total{")
                && l.contains("route=\"stream\"")
                && l.contains("status=\"2xx\"")
                && l.ends_with(" 1")),
        "{body}"
    );
    assert!(p.wait_until(T, |p| p.open_streams("/live/") == 0).await);
    let (_, s) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(s["client_count"], 0);
}
