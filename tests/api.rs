//! The management API as m3u-editor uses it (../shared/API-COMPAT.md): its call
//! sequence replayed in order, auth on every route, body validation, and
//! registered streams surviving a restart.

use std::time::Duration;

use http::Method;
use serde_json::{json, Value};

use crate::common::{api, config, register, TOKEN};
use crate::support::client::{self, BodyReader};
use crate::support::edge::{Edge, StartOpts};
use crate::support::eventually::eventually;
use crate::support::provider::Provider;

fn md5_hex(s: &str) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(s.as_bytes()))
}

/// Every field of S that m3u-editor reads without a default (API-COMPAT.md §3).
const STREAM_FIELDS: [&str; 19] = [
    "stream_id",
    "original_url",
    "current_url",
    "user_agent",
    "client_count",
    "total_bytes_served",
    "total_segments_served",
    "error_count",
    "is_active",
    "has_failover",
    "failover_urls",
    "failover_resolver_url",
    "current_failover_index",
    "failover_attempts",
    "last_failover_time",
    "stream_type",
    "created_at",
    "last_access",
    "metadata",
];

const CLIENT_FIELDS: [&str; 9] = [
    "client_id",
    "stream_id",
    "user_agent",
    "ip_address",
    "username",
    "bytes_served",
    "created_at",
    "last_access",
    "is_connected",
];

fn has_fields(v: &Value, fields: &[&str], what: &str) {
    for f in fields {
        assert!(v.get(f).is_some(), "{what} lacks {f}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m3u_editor_call_sequence() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let url = p.url("live/ch42.ts?kbps=2000");
    let failover = p.url("live/ch42-backup.ts");

    // 1. Register, exactly as the editor sends it (unknown fields included).
    let body = json!({
        "url": url,
        "failover_urls": [failover],
        "failover_resolver_url": null,
        "user_agent": null,
        "metadata": {"id": 42, "playlist_uuid": "pl-1", "provider_profile_id": 5, "type": "channel"},
        "headers": {},
        "strict_live_ts": false,
        "use_sticky_session": false,
        "enable_silence_detection": false,
        "some_future_field": {"x": 1},
    });
    let (status, v) = api(&e, Method::POST, "/streams", Some(body)).await;
    assert_eq!(status, 200, "{v}");
    let id = v["stream_id"].as_str().unwrap().to_string();
    assert_eq!(id, md5_hex(&url), "stream_id is md5 of the url as sent");
    for f in [
        "primary_url",
        "failover_urls",
        "user_agent",
        "stream_type",
        "stream_endpoint",
        "playlist_url",
        "direct_url",
        "message",
    ] {
        assert!(v.get(f).is_some(), "POST reply lacks {f}: {v}");
    }
    assert_eq!(v["metadata"]["id"], 42, "metadata echoed as sent");
    assert!(
        p.connections_total() == 0,
        "registering opens nothing at the provider (R1)"
    );

    // The stored metadata is stringified the Python way.
    let (_, s) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    has_fields(&s["stream"], &STREAM_FIELDS, "S");
    assert_eq!(s["stream"]["metadata"]["id"], "42");
    assert_eq!(s["stream"]["metadata"]["provider_profile_id"], "5");
    assert_eq!(s["stream"]["current_failover_index"], -1);
    assert_eq!(s["stream"]["client_count"], 0);

    // 2. Play (the editor 302s the player here).
    let resp = client::get(&e.url(&format!(
        "/m3u-proxy/stream/{id}?username=alice&client_id=floating-player-1"
    )))
    .await;
    assert_eq!(resp.status(), 200);
    let mut player = BodyReader::new(resp);
    let first = player.read_n(188 * 100, Duration::from_secs(10)).await;
    assert_eq!(first[0], 0x47);

    // 3. Counting: the editor's capacity checks.
    let (status, c) = api(
        &e,
        Method::GET,
        "/streams/counts-by-metadata?field=provider_profile_id&values=5,%206,,&active_only=1",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        c,
        json!({"field": "provider_profile_id", "counts": {"5": 1, "6": 0}})
    );
    let (_, m) = api(
        &e,
        Method::GET,
        "/streams/by-metadata?field=provider_profile_id&value=5&active_only=true",
        None,
    )
    .await;
    assert_eq!(m["total_matching"], 1);
    assert_eq!(m["total_clients"], 1);
    let ms = &m["matching_streams"][0];
    has_fields(
        ms,
        &["stream_id", "client_count", "metadata"],
        "matching_streams[0]",
    );
    assert_eq!(ms["stream_id"], id.as_str());
    assert_eq!(ms["client_count"], 1);

    let (_, clients) = api(&e, Method::GET, "/clients", None).await;
    assert_eq!(clients["total_clients"], 1);
    let c0 = &clients["clients"][0];
    has_fields(c0, &CLIENT_FIELDS, "C");
    assert_eq!(c0["client_id"], "floating-player-1");
    assert_eq!(c0["username"], "alice");
    assert_eq!(c0["stream_id"], id.as_str());
    let (_, info) = api(&e, Method::GET, "/info", None).await;
    assert!(info["version"].is_string());
    assert_eq!(info["hardware_acceleration"]["enabled"], false);
    assert_eq!(info["redis"]["pooling_enabled"], false);
    let (_, health) = api(&e, Method::GET, "/health", None).await;
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["stats"]["active_streams"], 1);
    assert_eq!(health["stats"]["total_clients"], 1);

    // 4. Stop from the in-app player: its own client goes, then the stream.
    let (status, d) = api(
        &e,
        Method::DELETE,
        "/streams/by-metadata?field=id&value=42&force=false&client_id=floating-player-1",
        None,
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["deleted_count"], 1, "{d}");
    assert_eq!(d["deleted_streams"], json!([id]));
    assert!(d["message"].is_string());
    // The player's connection is closed, and so is the provider's.
    let (_, end) = player
        .try_read_n(50_000_000, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(
        !matches!(end, client::BodyEnd::Timeout),
        "player still fed after delete"
    );
    assert!(
        p.wait_until(Duration::from_secs(5), |p| p.open_streams("/live/") == 0)
            .await,
        "provider connection not closed after the stream was deleted"
    );

    // 5. Cleanup state.
    let (_, c) = api(
        &e,
        Method::GET,
        "/streams/counts-by-metadata?field=provider_profile_id&values=5&active_only=1",
        None,
    )
    .await;
    assert_eq!(c["counts"]["5"], 0);
    let (status, _) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_false_keeps_streams_other_clients_watch() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let id = register(
        &e,
        json!({"url": p.url("live/shared.ts?kbps=1000"), "metadata": {"id": 7}}),
    )
    .await;
    let a = client::get(&e.url(&format!("/stream/{id}?client_id=a"))).await;
    let b = client::get(&e.url(&format!("/stream/{id}?client_id=b"))).await;
    let mut a = BodyReader::new(a);
    let mut b = BodyReader::new(b);
    a.read_n(188 * 10, Duration::from_secs(10)).await;
    b.read_n(188 * 10, Duration::from_secs(10)).await;
    let (_, d) = api(
        &e,
        Method::DELETE,
        "/streams/by-metadata?field=id&value=7&force=false&client_id=a",
        None,
    )
    .await;
    assert_eq!(d["deleted_count"], 0);
    assert_eq!(d["skipped_streams"][0]["reason"], "has_active_clients");
    assert_eq!(d["skipped_streams"][0]["active_clients"], 1);
    // b keeps playing.
    b.read_n(188 * 1000, Duration::from_secs(10)).await;
    // force=true removes it with its viewers.
    let (_, d) = api(
        &e,
        Method::DELETE,
        "/streams/by-metadata?field=id&value=7",
        None,
    )
    .await;
    assert_eq!(d["deleted_count"], 1);
    // exclude_channel_id and oldest-by-metadata.
    let s1 = register(
        &e,
        json!({"url": p.url("files/sample.mp4"), "metadata": {"id": 1, "pp": "x"}}),
    )
    .await;
    let s2 = register(
        &e,
        json!({"url": p.url("files/sample.mkv"), "metadata": {"id": 2, "pp": "x"}}),
    )
    .await;
    let _s3 = register(
        &e,
        json!({"url": p.url("files/sample.webm"), "metadata": {"id": 3, "pp": "x"}}),
    )
    .await;
    let (_, d) = api(
        &e,
        Method::DELETE,
        "/streams/oldest-by-metadata?field=pp&value=x&exclude_channel_id=1",
        None,
    )
    .await;
    assert_eq!(d["deleted_stream"], s2.as_str());
    assert_eq!(d["deleted_count"], 1);
    assert!(d["stream_age_seconds"].is_f64());
    let (_, d) = api(
        &e,
        Method::DELETE,
        "/streams/by-metadata?field=pp&value=x&exclude_channel_id=1",
        None,
    )
    .await;
    assert_eq!(d["deleted_count"], 1);
    assert_eq!(d["skipped_streams"][0]["stream_id"], s1.as_str());
    assert_eq!(d["skipped_streams"][0]["reason"], "excluded_by_channel_id");
    let (_, d) = api(
        &e,
        Method::DELETE,
        "/streams/oldest-by-metadata?field=pp&value=none",
        None,
    )
    .await;
    assert_eq!(d["deleted_count"], 0);
    assert!(d["deleted_stream"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_management_route_requires_the_token() {
    let e = Edge::start(&config("")).await;
    let routes: [(Method, &str); 14] = [
        (Method::POST, "/streams"),
        (Method::GET, "/streams"),
        (Method::GET, "/streams/abc"),
        (Method::DELETE, "/streams/abc"),
        (Method::POST, "/streams/abc/failover"),
        (Method::GET, "/streams/by-metadata?field=a&value=b"),
        (Method::GET, "/streams/counts-by-metadata?field=a&values=b"),
        (Method::DELETE, "/streams/by-metadata?field=a&value=b"),
        (
            Method::DELETE,
            "/streams/oldest-by-metadata?field=a&value=b",
        ),
        (Method::POST, "/test-connection"),
        (Method::GET, "/info"),
        (Method::GET, "/clients"),
        (Method::GET, "/stats"),
        (Method::GET, "/stats/clients"),
    ];
    for prefix in ["", "/m3u-proxy"] {
        for (m, path) in &routes {
            let path = format!("{prefix}{path}");
            let (s, _) = client::api(&e, m.clone(), &path, None, None).await;
            assert_eq!(s, 401, "{m} {path} without a token");
            let (s, v) = client::api(&e, m.clone(), &path, Some("wrong"), None).await;
            assert_eq!(s, 403, "{m} {path} with a wrong token");
            assert!(v["detail"].is_string());
            let (s, _) = client::api(&e, m.clone(), &path, Some(TOKEN), None).await;
            assert!(s != 401 && s != 403, "{m} {path} with the token: {s}");
        }
    }
    // The query form works too.
    let resp = client::get(&e.url(&format!("/streams?api_token={TOKEN}"))).await;
    assert_eq!(resp.status(), 200);
    // /health answers without a token, but checks one that is sent.
    let (s, v) = client::api(&e, Method::GET, "/health", None, None).await;
    assert_eq!((s.as_u16(), v["status"].as_str()), (200, Some("healthy")));
    let (s, _) = client::api(&e, Method::GET, "/health", Some("wrong"), None).await;
    assert_eq!(s, 403);
    // Client routes stay open.
    let resp = client::get(&e.url("/stream/0123abcd")).await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_422_naming_the_field() {
    let e = Edge::start(&config("")).await;
    let raw = |body: &'static str| {
        let e = &e;
        async move {
            let resp = client::send(
                client::client()
                    .post(e.url("/streams"))
                    .header("X-API-Token", TOKEN)
                    .header("content-type", "application/json")
                    .body(body),
            )
            .await;
            let s = resp.status().as_u16();
            let v: Value = serde_json::from_slice(&client::body(resp).await).unwrap_or(Value::Null);
            (s, v)
        }
    };
    let (s, v) = raw("{not json").await;
    assert_eq!(s, 422, "{v}");
    assert!(v["detail"].is_array());
    for (body, field) in [
        (r#"{"url": 5}"#, "url"),
        (r#"{}"#, "url"),
        (r#"{"url": "ftp://h/x.ts"}"#, "url"),
        (r#"{"url": "http://h/x.ts?javascript:alert(1)"}"#, "url"),
        (
            r#"{"url": "http://h/x.ts", "failover_urls": ["file:///etc/passwd"]}"#,
            "failover_urls.0",
        ),
        (
            r#"{"url": "http://h/x.ts", "metadata": {"a": {"b": 1}}}"#,
            "metadata.a",
        ),
        (
            r#"{"url": "http://h/x.ts", "metadata": {"a": null}}"#,
            "metadata.a",
        ),
        (
            r#"{"url": "http://h/x.ts", "headers": {"X-A": null}}"#,
            "headers.X-A",
        ),
        (
            r#"{"url": "http://h/x.ts", "use_sticky_session": "yes"}"#,
            "use_sticky_session",
        ),
        (
            r#"{"url": "http://h/x.ts", "failover_urls": "http://h/y"}"#,
            "failover_urls",
        ),
    ] {
        let (s, v) = raw(body).await;
        assert_eq!(s, 422, "{body}: {v}");
        assert_eq!(v["detail"][0]["loc"][1], field, "{body}: {v}");
    }
    // Metadata values are stored as Python's str() makes them.
    let (s, v) =
        raw(r#"{"url": "http://h/m.ts", "metadata": {"i": 5, "b": true, "f": 1.0, "s": "x"}}"#)
            .await;
    assert_eq!(s, 200, "{v}");
    let id = v["stream_id"].as_str().unwrap();
    let (_, g) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(
        g["stream"]["metadata"],
        json!({"i": "5", "b": "True", "f": "1.0", "s": "x"})
    );
    // A bodiless POST with m3u-editor's `[]` is accepted.
    let resp = client::send(
        client::client()
            .post(e.url(&format!("/streams/{id}/failover")))
            .header("X-API-Token", TOKEN)
            .body("[]"),
    )
    .await;
    assert_eq!(
        resp.status(),
        400,
        "no failover configured, but the body was accepted"
    );
    // Query booleans.
    let (s, _) = api(
        &e,
        Method::GET,
        "/streams/by-metadata?field=a&value=b&active_only=maybe",
        None,
    )
    .await;
    assert_eq!(s, 422);
    let (s, _) = api(&e, Method::GET, "/streams/by-metadata?field=a", None).await;
    assert_eq!(s, 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repost_follows_the_m3u_proxy_rules() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let url = p.url("live/re.ts?kbps=1000");
    let id = register(&e, json!({"url": url, "user_agent": "A/1"})).await;
    let resp = client::get(&e.url(&format!("/stream/{id}"))).await;
    let mut r = BodyReader::new(resp);
    r.read_n(188 * 10, Duration::from_secs(10)).await;
    // Watched: the stored stream stays as it is, the reply echoes the request.
    let (_, v) = api(
        &e,
        Method::POST,
        "/streams",
        Some(json!({"url": url, "user_agent": "B/2"})),
    )
    .await;
    assert_eq!(v["user_agent"], "B/2");
    let (_, g) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(g["stream"]["user_agent"], "A/1");
    drop(r);
    assert!(eventually(Duration::from_secs(5), || p.open_streams("/live/") == 0).await);
    let (_, g) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    let created = g["stream"]["created_at"].clone();
    let bytes = g["stream"]["total_bytes_served"].as_u64().unwrap();
    assert!(bytes > 0);
    // Unwatched: replaced, keeping created_at and the byte total.
    api(
        &e,
        Method::POST,
        "/streams",
        Some(json!({"url": url, "user_agent": "B/2"})),
    )
    .await;
    let (_, g) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(g["stream"]["user_agent"], "B/2");
    assert_eq!(g["stream"]["created_at"], created);
    assert_eq!(g["stream"]["total_bytes_served"].as_u64().unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_streams_survive_a_restart() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let a = register(
        &e,
        json!({"url": p.url("files/sample.mp4"), "metadata": {"id": 1}}),
    )
    .await;
    let b = register(
        &e,
        json!({"url": p.url("files/sample.mkv"), "failover_urls": [p.url("files/sample.webm")], "headers": {"X-K": "v"}}),
    )
    .await;
    let before = api(&e, Method::GET, "/streams", None).await.1;
    let e = e.restart().await;
    let (_, after) = api(&e, Method::GET, "/streams", None).await;
    assert_eq!(after["total"], 2);
    for id in [&a, &b] {
        let find = |v: &Value| {
            v["streams"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["stream_id"] == id.as_str())
                .cloned()
                .unwrap()
        };
        let (x, y) = (find(&before), find(&after));
        for f in [
            "original_url",
            "failover_urls",
            "metadata",
            "headers",
            "created_at",
        ] {
            assert_eq!(x[f], y[f], "{id}: {f} after restart");
        }
    }
    // And they still play.
    let (s, _, body) = client::get_body(&e.url(&format!("/stream/{a}"))).await;
    assert_eq!(s, 200);
    assert_eq!(body.len(), crate::support::fixture("sample.mp4").len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_is_moved_aside_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("state.json"), b"{\"streams\": [trunc").unwrap();
    let e = Edge::start_with(
        &config(""),
        StartOpts {
            dir: Some(dir),
            ..Default::default()
        },
    )
    .await;
    let (_, v) = api(&e, Method::GET, "/streams", None).await;
    assert_eq!(v["total"], 0);
    let moved: Vec<_> = std::fs::read_dir(e.dir())
        .unwrap()
        .filter_map(|d| d.ok())
        .filter(|d| {
            d.file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .collect();
    assert_eq!(moved.len(), 1, "corrupt file kept aside");
    assert!(e.log().contains("state file unreadable"), "{}", e.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwatched_api_streams_expire_yaml_streams_do_not() {
    let p = Provider::start().await;
    let yaml = config(&format!(
        "streams:\n  - id: fixed\n    url: \"{}\"\n",
        p.url("files/sample.mp4")
    ))
    .replace(
        "grace_period: \"0s\"",
        "grace_period: \"0s\"\n  stream_idle_ttl: \"1s\"",
    );
    let e = Edge::start(&yaml).await;
    let id = register(&e, json!({"url": p.url("files/sample.mkv")})).await;
    let gone = async {
        for _ in 0..100 {
            let (s, _) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
            if s == 404 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(gone.await, "unwatched API stream did not expire");
    let (s, _) = api(&e, Method::GET, "/streams/fixed", None).await;
    assert_eq!(s, 200, "YAML stream expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connection_reports_without_failing() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let (s, v) = api(
        &e,
        Method::POST,
        "/test-connection",
        Some(json!({"url": p.url("files/sample.mp4")})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["success"], true);
    assert_eq!(v["status_code"], 200);
    assert!(v["url_tested"].is_string() && v["message"].is_string());
    let (s, v) = api(
        &e,
        Method::POST,
        "/test-connection",
        Some(json!({"url": p.url("status/404")})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["success"], false);
    assert_eq!(v["status_code"], 404);
    let (s, v) = api(
        &e,
        Method::POST,
        "/test-connection",
        Some(json!({"url": "http://127.0.0.1:1/x"})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["success"], false);
    assert!(v["error"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_bodies_422_naming_the_field() {
    let e = Edge::start(&config("")).await;
    for (body, field, input) in [
        (json!({"url": "ftp://x/"}), "url", json!("ftp://x/")),
        (
            json!({"url": "http://127.0.0.1:1/", "timeout": 0.5}),
            "timeout",
            json!(0.5),
        ),
        (
            json!({"url": "http://127.0.0.1:1/", "headers": {"a b": "c"}}),
            "headers",
            json!({"a b": "c"}),
        ),
    ] {
        let (s, v) = api(&e, Method::POST, "/webhooks", Some(body.clone())).await;
        assert_eq!(s, 422, "{body}: {v}");
        assert_eq!(v["detail"][0]["loc"], json!(["body", field]), "{body}: {v}");
        assert_eq!(v["detail"][0]["input"], input, "{body}: {v}");
    }
    // A whole float is an integer, as pydantic reads it.
    let hook = json!({"url": "http://127.0.0.1:1/", "retry_attempts": 2.0});
    let (s, v) = api(&e, Method::POST, "/webhooks", Some(hook)).await;
    assert_eq!(s, 200, "{v}");
    let (_, list) = api(&e, Method::GET, "/webhooks", None).await;
    assert_eq!(list["webhooks"][0]["retry_attempts"], 2, "{list}");
}
