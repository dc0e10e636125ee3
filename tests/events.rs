//! Events, webhooks and metrics as m3u-editor and Prometheus see them (issue:
//! events, webhooks with retry, metrics): the event sequence of a viewer who
//! joins and leaves, retries, a dead receiver that slows nobody, the webhook
//! API, and metric values that move with viewers and failovers.

use std::time::Duration;

use http::Method;
use serde_json::{json, Value};

use crate::common::{api, config, register};
use crate::support::client::{self, BodyReader};
use crate::support::edge::Edge;
use crate::support::provider::Provider;
use crate::support::webhook::WebhookReceiver;

const T: Duration = Duration::from_secs(15);

/// m3u-editor's registration body.
fn editor_hook(url: &str) -> Value {
    json!({
        "url": url,
        "events": ["client_connected", "client_disconnected", "stream_started", "stream_stopped"],
        "timeout": 5,
        "retry_attempts": 2,
    })
}

async fn watch_some(e: &Edge, id: &str, client: &str) -> BodyReader {
    let resp = client::get(&e.url(&format!("/stream/{id}?client_id={client}"))).await;
    assert_eq!(resp.status(), 200);
    let mut r = BodyReader::new(resp);
    r.read_n(188 * 200, T).await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_joining_and_leaving_sends_the_full_sequence() {
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let e = Edge::start(&config("")).await;
    let (s, v) = api(
        &e,
        Method::POST,
        "/webhooks",
        Some(editor_hook(&hook.url("/api/m3u-proxy/webhooks"))),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let id = register(
        &e,
        json!({"url": p.url("live/ev.ts?kbps=2000"), "metadata": {"provider_profile_id": 7, "id": 3}}),
    )
    .await;
    assert_eq!(hook.count(), 0, "registering a stream is not a start");
    let viewer = watch_some(&e, &id, "alice-player").await;
    drop(viewer);
    let stopped = hook.wait_for_events("stream_stopped", 1, T).await;
    assert_eq!(stopped.len(), 1, "no stream_stopped: {:?}", hook.received());
    let got: Vec<Value> = hook.received().into_iter().map(|r| r.body).collect();
    let types: Vec<&str> = got
        .iter()
        .map(|b| b["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "client_connected",
            "stream_started",
            "client_disconnected",
            "stream_stopped"
        ],
        "{got:#?}"
    );
    for b in &got {
        for f in ["event_id", "event_type", "stream_id", "timestamp", "data"] {
            assert!(b.get(f).is_some(), "envelope lacks {f}: {b}");
        }
        assert_eq!(b["stream_id"], id.as_str());
        assert_eq!(b["data"]["metadata"]["provider_profile_id"], "7", "{b}");
        let text = b.to_string();
        assert!(
            !text.contains("127.0.0.1\""),
            "a client address in a webhook: {text}"
        );
    }
    assert_eq!(got[0]["data"]["client_id"], "alice-player");
    assert_eq!(got[3]["data"]["reason"], "last_client_disconnected");
    assert!(got[2]["data"]["bytes_served"].as_u64().unwrap() >= 188 * 200);
    let r = &hook.received()[0];
    assert_eq!(r.header("user-agent"), Some("M3U-Proxy-Webhook/1.0"));

    // A second session of the same stream starts and stops again, once each.
    let viewer = watch_some(&e, &id, "bob").await;
    drop(viewer);
    assert_eq!(hook.wait_for_events("stream_stopped", 2, T).await.len(), 2);
    assert_eq!(hook.events_of("stream_started").len(), 2);
    // Deleting a stream nobody watches does not send a second stop for the session.
    api(&e, Method::DELETE, &format!("/streams/{id}"), None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.events_of("stream_stopped").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_watched_stream_reports_why() {
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let e = Edge::start(&config("")).await;
    api(
        &e,
        Method::POST,
        "/webhooks",
        Some(json!({"url": hook.url("/h")})),
    )
    .await;
    let id = register(
        &e,
        json!({"url": p.url("live/del.ts?kbps=2000"), "metadata": {"provider_profile_id": 9}}),
    )
    .await;
    let _viewer = watch_some(&e, &id, "v").await;
    api(
        &e,
        Method::DELETE,
        "/streams/by-metadata?field=provider_profile_id&value=9",
        None,
    )
    .await;
    let stopped = hook.wait_for_events("stream_stopped", 1, T).await;
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0]["data"]["reason"], "metadata_filter_deletion");
    assert_eq!(stopped[0]["data"]["metadata"]["provider_profile_id"], "9");
    let left = hook.wait_for_events("client_disconnected", 1, T).await;
    assert_eq!(left[0]["data"]["reason"], "stream_deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_twice_gets_the_event_on_the_third_try() {
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    hook.fail_first(2);
    let e = Edge::start(&config("")).await;
    api(
        &e,
        Method::POST,
        "/webhooks",
        Some(json!({"url": hook.url("/h"), "events": ["stream_started"], "retry_attempts": 3, "timeout": 2})),
    )
    .await;
    let id = register(&e, json!({"url": p.url("live/r.ts?kbps=1000")})).await;
    let _v = watch_some(&e, &id, "v").await;
    assert!(hook.wait_for(3, T).await, "{:?}", hook.received());
    let all = hook.received();
    assert_eq!(all.len(), 3, "one event, three tries");
    let ids: Vec<&Value> = all.iter().map(|r| &r.body["event_id"]).collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "retries carry the same event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_receiver_slows_neither_streaming_nor_other_webhooks() {
    let p = Provider::start().await;
    let dead = WebhookReceiver::start().await;
    dead.never_answer(true);
    let live = WebhookReceiver::start().await;
    let e = Edge::start(&config("")).await;
    for h in [&dead, &live] {
        api(
            &e,
            Method::POST,
            "/webhooks",
            Some(json!({"url": h.url("/h"), "timeout": 30, "retry_attempts": 5})),
        )
        .await;
    }
    let id = register(&e, json!({"url": p.url("live/d.ts?kbps=4000")})).await;
    for i in 0..5 {
        let mut v = watch_some(&e, &id, &format!("c{i}")).await;
        // Streaming is unaffected: a megabyte arrives like any other time.
        v.read_n(1_000_000, T).await;
        drop(v);
        let stops = live.wait_for_events("stream_stopped", i + 1, T).await;
        assert_eq!(
            stops.len(),
            i + 1,
            "the healthy receiver waited on the dead one"
        );
    }
    assert!(dead.count() >= 1, "the dead receiver was tried");
    assert_eq!(dead.answered(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_api_dedupes_lists_deletes_and_persists() {
    let hook = WebhookReceiver::start().await;
    let e = Edge::start(&config("")).await;
    let url = hook.url("/api/m3u-proxy/webhooks");
    for _ in 0..2 {
        let (s, v) = api(&e, Method::POST, "/webhooks", Some(editor_hook(&url))).await;
        assert_eq!(s, 200, "{v}");
        assert!(v["webhook_url"].is_string() && v["events"].is_array());
    }
    let (_, list) = api(&e, Method::GET, "/webhooks", None).await;
    let hooks = list["webhooks"].as_array().unwrap();
    assert_eq!(
        hooks.len(),
        1,
        "re-registering the same URL duplicated it: {list}"
    );
    for f in ["url", "events", "timeout", "retry_attempts"] {
        assert!(hooks[0].get(f).is_some());
    }
    assert_eq!(hooks[0]["timeout"], 5.0);
    // Survives a restart.
    let e = e.restart().await;
    let (_, list) = api(&e, Method::GET, "/webhooks", None).await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 1);
    // m3u-editor deletes with a JSON body.
    let (s, _) = api(
        &e,
        Method::DELETE,
        "/webhooks",
        Some(json!({"webhook_url": url})),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = api(
        &e,
        Method::DELETE,
        &format!("/webhooks?webhook_url={url}"),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (_, list) = api(&e, Method::GET, "/webhooks", None).await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 0);
    // Bad bodies are 422.
    let (s, _) = api(
        &e,
        Method::POST,
        "/webhooks",
        Some(json!({"url": "ftp://x/"})),
    )
    .await;
    assert_eq!(s, 422);
    let (s, _) = api(
        &e,
        Method::POST,
        "/webhooks",
        Some(json!({"url": url, "events": ["nope"]})),
    )
    .await;
    assert_eq!(s, 422);
    let (s, _) = api(
        &e,
        Method::POST,
        "/webhooks",
        Some(json!({"url": url, "timeout": "x"})),
    )
    .await;
    assert_eq!(s, 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yaml_webhooks_are_signed() {
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let e = Edge::start(&config(&format!(
        "events:\n  webhooks:\n    - url: \"{}\"\n      events: [stream_started]\n      secret: \"s3cret\"\n",
        hook.url("/signed")
    )))
    .await;
    let id = register(&e, json!({"url": p.url("live/s.ts?kbps=1000")})).await;
    let _v = watch_some(&e, &id, "v").await;
    assert!(hook.wait_for(1, T).await);
    let r = &hook.received()[0];
    assert!(
        r.signature_valid("s3cret"),
        "bad signature: {:?}",
        r.headers
    );
    assert!(!r.signature_valid("other"));
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

async fn scrape(e: &Edge) -> String {
    let (s, h, b) = client::get_body(&e.url("/metrics")).await;
    assert_eq!(s, 200);
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    String::from_utf8(b.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_viewers_and_failovers() {
    let p = Provider::start().await;
    let e = Edge::start(&config("live:\n  stall_timeout: \"1s\"\n")).await;
    let id = register(
        &e,
        json!({"url": p.url("live/m.ts?kbps=4000&drop_after=800000"), "failover_urls": [p.url("live/m2.ts?kbps=4000")]}),
    )
    .await;
    let before = scrape(&e).await;
    assert_eq!(
        metric(&before, "m3u_edge_clients_active{kind=\"live\"}"),
        0.0
    );
    let mut a = watch_some(&e, &id, "a").await;
    let mut b = watch_some(&e, &id, "b").await;
    let during = scrape(&e).await;
    assert_eq!(
        metric(&during, "m3u_edge_clients_active{kind=\"live\"}"),
        2.0
    );
    assert_eq!(metric(&during, "m3u_edge_live_channels"), 1.0);
    assert_eq!(metric(&during, "m3u_edge_streams_active"), 1.0);
    // Read past the primary's drop: one failover.
    for _ in 0..20 {
        a.read_n(100_000, T).await;
        b.read_n(100_000, T).await;
    }
    let after = scrape(&e).await;
    let failovers: f64 = after
        .lines()
        .filter(|l| l.starts_with("m3u_edge_failovers_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(failovers >= 1.0, "{after}");
    assert!(metric(&after, "m3u_edge_bytes_out_total") >= 4_000_000.0);
    assert!(metric(&after, "m3u_edge_join_seconds_count") >= 2.0);
    drop((a, b));
    let mut gone = false;
    for _ in 0..100 {
        let t = scrape(&e).await;
        if metric(&t, "m3u_edge_clients_active{kind=\"live\"}") == 0.0
            && metric(&t, "m3u_edge_live_channels") == 0.0
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "viewers still counted after leaving");
    // No stream ids, URLs or addresses in labels.
    let text = scrape(&e).await;
    assert!(
        !text.contains(&id) && !text.contains("127.0.0.1"),
        "high-cardinality label"
    );
    // promtool, when installed, accepts the exposition.
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) => eprintln!("SKIPPED: promtool check metrics (promtool not installed)"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_serves_the_same_metrics() {
    let port = crate::support::edge::free_port();
    let e = Edge::start(&config(&format!(
        "metrics:\n  listen: \"127.0.0.1:{port}\"\n"
    )))
    .await;
    let (s, _, body) = client::get_body(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&body).contains("m3u_edge_build_info"));
    let _ = scrape(&e).await;
}
