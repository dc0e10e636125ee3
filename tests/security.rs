//! Abuse resistance, tried as an attacker would on loopback: requests to the
//! proxy itself, slow and oversized headers, connection floods, cross-site
//! calls to the API, client floods, smuggled framing headers, and how the
//! token is given. Every attack is bounded in count and time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::{api, config, register, TOKEN};
use crate::support::client;
use crate::support::edge::{Edge, StartOpts};
use crate::support::provider::Provider;

/// A raw connection from `source` (a loopback address of our choosing).
async fn connect_from(source: &str, edge: &Edge) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{source}:0").parse::<SocketAddr>().expect("addr"))
        .expect("bind source");
    let to: SocketAddr = format!("127.0.0.1:{}", edge.port()).parse().expect("addr");
    sock.connect(to).await.expect("connect")
}

/// Reads whatever comes until the peer closes or `wait` passes.
async fn read_reply(conn: &mut TcpStream, wait: Duration) -> (String, bool) {
    let mut buf = Vec::new();
    let deadline = Instant::now() + wait;
    loop {
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, conn.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&buf).into(), true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return (String::from_utf8_lossy(&buf).into(), false),
        }
    }
}

fn status_of(reply: &str) -> Option<u16> {
    reply.split(' ').nth(1)?.parse().ok()
}

async fn metric(edge: &Edge, limit: &str) -> f64 {
    let text = client::body(client::get(&edge.url("/metrics")).await).await;
    let text = String::from_utf8_lossy(&text).into_owned();
    let series = format!("m3u_edge_limit_cuts_total{{limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_redirects_back_to_the_proxy_is_a_loop_not_a_flood() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let url = p.url(&format!("self/{}/movie.mp4", e.port()));
    let id = register(&e, json!({ "url": url, "live": false })).await;
    let started = Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        client::get(&e.url(&format!("/stream/{id}"))),
    )
    .await
    .expect("the proxy answers instead of requesting itself without end");
    let status = resp.status().as_u16();
    assert!(matches!(status, 502 | 508), "status {status}");
    // One request to the provider per hop that was allowed: the original,
    // and at most a retry; before, thousands in a few seconds.
    let hits = p.hits("/self/");
    assert!(hits <= 3, "{hits} provider requests for one play");
    assert!(metric(&e, "self_loop").await >= 1.0);
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_trickled_a_byte_at_a_time_is_cut_at_the_header_deadline() {
    let e = Edge::start(&config("limits:\n  header_timeout: \"2s\"\n")).await;
    let mut conn = connect_from("127.0.0.1", &e).await;
    let request =
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let started = Instant::now();
    let mut cut = false;
    // One byte every 250 ms: each read is quick, the header never ends.
    for b in request.iter() {
        if conn.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        if started.elapsed() > Duration::from_secs(12) {
            break;
        }
    }
    let (reply, closed) = read_reply(&mut conn, Duration::from_secs(5)).await;
    assert!(
        cut || closed,
        "connection still open after {:?}",
        started.elapsed()
    );
    if !reply.is_empty() {
        assert_eq!(status_of(&reply), Some(408), "{reply}");
    }
    assert!(metric(&e, "header_timeout").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_431_and_normal_ones_pass() {
    let e = Edge::start(&config("")).await;
    for (name, request) in [
        (
            "1 MB complete header",
            format!(
                "GET /health HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
                "a".repeat(1 << 20)
            ),
        ),
        (
            "100 KB header",
            format!(
                "GET /health HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
                "a".repeat(100 << 10)
            ),
        ),
        (
            "300 header lines",
            format!(
                "GET /health HTTP/1.1\r\nHost: a\r\n{}\r\n",
                (0..300)
                    .map(|i| format!("X-H{i}: 1\r\n"))
                    .collect::<String>()
            ),
        ),
    ] {
        let mut conn = connect_from("127.0.0.1", &e).await;
        // The proxy may answer and close before all of it is written.
        let _ = conn.write_all(request.as_bytes()).await;
        let (reply, _) = read_reply(&mut conn, Duration::from_secs(10)).await;
        assert_eq!(status_of(&reply), Some(431), "{name}: {reply:.200}");
    }
    let mut conn = connect_from("127.0.0.1", &e).await;
    let fine = format!(
        "GET /health HTTP/1.1\r\nHost: a\r\nX-Ok: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(8000)
    );
    conn.write_all(fine.as_bytes()).await.unwrap();
    let (reply, _) = read_reply(&mut conn, Duration::from_secs(10)).await;
    assert_eq!(status_of(&reply), Some(200), "{reply:.200}");
    assert!(metric(&e, "header_bytes").await >= 2.0);
    assert!(metric(&e, "header_lines").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_from_one_address_leaves_room_for_everyone_else() {
    let e = Edge::start(&config(
        "limits:\n  max_connections_per_address: 20\n  header_timeout: \"30s\"\n",
    ))
    .await;
    // 60 connections that each send one byte and hold.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..60 {
        let mut c = connect_from("127.0.0.1", &e).await;
        let _ = c.write_all(b"G").await;
        held.push(c);
    }
    // Which 20 get in is the scheduler's choice; how many is not.
    let replies = futures::future::join_all(
        held.iter_mut()
            .map(|c| read_reply(c, Duration::from_secs(3))),
    )
    .await;
    let mut open = 0;
    for (reply, closed) in replies {
        if closed && status_of(&reply) == Some(503) {
            refused += 1;
        } else if !closed {
            open += 1;
        }
    }
    assert_eq!((refused, open), (40, 20), "past the per-address cap: 503");
    // Another address is served at once.
    let mut other = connect_from("127.0.0.2", &e).await;
    other
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (reply, _) = read_reply(&mut other, Duration::from_secs(5)).await;
    assert_eq!(status_of(&reply), Some(200), "{reply:.200}");
    drop(held);
    // The slots come back: the flooding address is served again.
    let mut again = None;
    for _ in 0..50 {
        let mut c = connect_from("127.0.0.1", &e).await;
        c.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (reply, _) = read_reply(&mut c, Duration::from_secs(5)).await;
        again = status_of(&reply);
        if again == Some(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(again, Some(200));
    assert!(metric(&e, "connections_per_address").await >= 40.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_connection_cap_refuses_with_503() {
    let e = Edge::start(&config(
        "limits:\n  max_connections: 10\n  max_connections_per_address: 0\n  header_timeout: \"30s\"\n",
    ))
    .await;
    // Eleven connections from two addresses (no per-address cap): which one
    // is refused is the scheduler's choice, that one is refused is not. (The
    // harness's health check may still hold a kept-alive slot: then two.)
    let mut conns = Vec::new();
    for i in 0..11 {
        conns.push(connect_from(if i < 10 { "127.0.0.1" } else { "127.0.0.3" }, &e).await);
    }
    let replies = futures::future::join_all(
        conns
            .iter_mut()
            .map(|c| read_reply(c, Duration::from_secs(3))),
    )
    .await;
    let refused: Vec<&String> = replies
        .iter()
        .filter(|(reply, closed)| *closed && status_of(reply) == Some(503))
        .map(|(reply, _)| reply)
        .collect();
    let open = replies.iter().filter(|(_, closed)| !closed).count();
    assert!(matches!(refused.len(), 1 | 2), "{} refused", refused.len());
    assert_eq!(
        open + refused.len(),
        11,
        "every connection is either held or refused"
    );
    assert!(refused.iter().all(|r| r.contains("too many connections")));
    drop(conns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_cross_site_callers_and_non_json_bodies() {
    let p = Provider::start().await;
    let yaml = config("").replace(
        &format!("api:\n  token: \"{TOKEN}\"\n"),
        &format!("api:\n  token: \"{TOKEN}\"\n  cors_origins: [\"http://editor.example\"]\n"),
    );
    let e = Edge::start(&yaml).await;
    let http = client::client();
    // A "simple" cross-site POST: text/plain, no preflight.
    let resp = http
        .post(e.url("/streams"))
        .header("X-API-Token", TOKEN)
        .header("Content-Type", "text/plain")
        .body(json!({ "url": p.url("live/a.ts") }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let (_, list) = api(&e, Method::GET, "/streams", None).await;
    assert_eq!(list["streams"].as_array().map(Vec::len), Some(0), "{list}");
    // A page on another site may not read the API.
    let resp = http
        .get(e.url("/streams"))
        .header("X-API-Token", TOKEN)
        .header("Origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    assert!(resp
        .headers()
        .get("access-control-allow-credentials")
        .is_none());
    // The configured origin may, without credentials.
    let resp = http
        .get(e.url("/streams"))
        .header("X-API-Token", TOKEN)
        .header("Origin", "http://editor.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "http://editor.example"
    );
    assert!(resp
        .headers()
        .get("access-control-allow-credentials")
        .is_none());
    // Client routes are open to any origin, without credentials.
    let id = register(
        &e,
        json!({ "url": p.url("files/sample.mp4"), "live": false }),
    )
    .await;
    let resp = http
        .get(e.url(&format!("/stream/{id}")))
        .header("Origin", "http://player.example")
        .header("Range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    assert!(resp
        .headers()
        .get("access-control-allow-credentials")
        .is_none());
    let resp = http
        .request(Method::OPTIONS, e.url(&format!("/stream/{id}")))
        .header("Origin", "http://player.example")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_api_answers_only_to_a_local_host_name() {
    let yaml =
        "server:\n  listen: \"{listen}\"\n  state_file: \"{state_file}\"\n  grace_period: \"0s\"\n";
    let e = Edge::start(yaml).await;
    let http = client::client();
    let resp = http.get(e.url("/streams")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "loopback by address");
    // DNS rebinding: a page whose own name resolved to 127.0.0.1.
    let resp = http
        .get(e.url("/streams"))
        .header("Host", "rebind.example:8085")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(e.log().contains("answers only to loopback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_headers_in_stream_headers_are_refused() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    for name in [
        "Transfer-Encoding",
        "Content-Length",
        "Connection",
        "Upgrade",
    ] {
        let (status, v) = api(
            &e,
            Method::POST,
            "/streams",
            Some(json!({ "url": p.url("files/sample.mp4"), "headers": { name: "1" } })),
        )
        .await;
        assert_eq!(status, 422, "{name}: {v}");
        assert_eq!(v["detail"][0]["loc"][1], format!("headers.{name}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_hls_client_ids_is_capped_per_stream_and_streams_are_capped() {
    let p = Provider::start().await;
    let e = Edge::start(&config(
        "limits:\n  max_hls_clients_per_stream: 5\n  max_hls_clients_per_address: 0\n  max_streams: 2\n",
    ))
    .await;
    let id = register(&e, json!({ "url": p.url("files/hls_ts/v0/index.m3u8") })).await;
    let mut ok = 0;
    let mut refused = 0;
    for i in 0..30 {
        let url = e.url(&format!("/hls/{id}/playlist.m3u8?client_id=flood{i}"));
        match client::get(&url).await.status().as_u16() {
            200 => ok += 1,
            429 => refused += 1,
            other => panic!("status {other}"),
        }
    }
    assert_eq!((ok, refused), (5, 25));
    // A listed client keeps playing.
    let again = client::get(&e.url(&format!("/hls/{id}/playlist.m3u8?client_id=flood0"))).await;
    assert_eq!(again.status(), 200);
    let (_, clients) = api(&e, Method::GET, "/clients", None).await;
    let listed = clients["clients"].as_array().map_or(0, Vec::len);
    assert!(listed <= 5, "{clients}");
    assert!(metric(&e, "hls_clients_per_stream").await >= 25.0);
    // max_streams: 2.
    register(&e, json!({ "url": p.url("files/sample.mp4") })).await;
    let (status, v) = api(
        &e,
        Method::POST,
        "/streams",
        Some(json!({ "url": p.url("files/sample.mkv") })),
    )
    .await;
    assert_eq!(status, 507, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_comes_from_a_file_or_the_environment_and_is_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "file-token-123\n").unwrap();
    let yaml = "server:\n  listen: \"{listen}\"\n  state_file: \"{state_file}\"\n  grace_period: \"0s\"\napi:\n  token_file: \"{dir}/token\"\n";
    let e = Edge::start_with(
        yaml,
        StartOpts {
            dir: Some(dir),
            ..Default::default()
        },
    )
    .await;
    let (s, _) = client::api(&e, Method::GET, "/streams", None, None).await;
    assert_eq!(s, 401);
    let (s, info) = client::api(&e, Method::GET, "/info", Some("file-token-123"), None).await;
    assert_eq!(s, 200);
    let (_, stats) = client::api(&e, Method::GET, "/stats", Some("file-token-123"), None).await;
    for shown in [info.to_string(), stats.to_string(), e.log()] {
        assert!(!shown.contains("file-token-123"));
    }
    // The environment wins over the file.
    let e = Edge::start_with(
        &config(""),
        StartOpts {
            env: vec![("M3U_EDGE_API_TOKEN".into(), "env-token-456".into())],
            ..Default::default()
        },
    )
    .await;
    let (s, _) = client::api(&e, Method::GET, "/streams", Some(TOKEN), None).await;
    assert_eq!(s, 403);
    let (s, _) = client::api(&e, Method::GET, "/streams", Some("env-token-456"), None).await;
    assert_eq!(s, 200);
    assert!(!e.log().contains("env-token-456"));
}

#[test]
fn the_shipped_systemd_unit_verifies_and_scores_ok() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("SKIPPED: systemd-analyze not installed");
        return;
    };
    assert!(out.status.success());
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/m3u-edge.service"
    ))
    .expect("systemd/m3u-edge.service");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m3u-edge.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/m3u-edge", crate::support::edge::BIN),
    )
    .unwrap();
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr).into_owned();
    assert!(verify.status.success(), "verify: {said}");
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("m3u-edge.service"))
        .collect();
    assert!(ours.is_empty(), "verify complained: {ours:?}");
    let security = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout).into_owned();
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for m3u-edge.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in: {text}"));
    assert!(score <= 2.0, "exposure {score}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_in_one_write_are_all_answered_in_order() {
    let e = Edge::start(&config("")).await;
    let mut conn = connect_from("127.0.0.1", &e).await;
    let one = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let three = format!("{}{}{}", one("/health"), one("/nope"), one("/health"));
    conn.write_all(three.as_bytes()).await.unwrap();
    let mut got = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.matches("HTTP/1.1 ").count() < 3 && Instant::now() < deadline {
        let (more, closed) = read_reply(&mut conn, Duration::from_millis(500)).await;
        got.push_str(&more);
        if closed {
            break;
        }
    }
    let statuses: Vec<&str> = got
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &got[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "404", "200"], "{got:.600}");
}
