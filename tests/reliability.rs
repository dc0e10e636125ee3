//! Reliability (issue #15): what a restart, a SIGHUP, a second copy, a burst
//! of registrations or a broken disk look like from outside — webhooks
//! received, exit codes, the state file, `/health`, `/stats` and `/metrics`.

use std::process::{Command, Stdio};
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};

use crate::common::{api, config, register, TOKEN};
use crate::support::client::{self, BodyReader};
use crate::support::edge::{free_port, run_bin, Edge, StartOpts};
use crate::support::eventually::{assert_eventually, eventually};
use crate::support::provider::Provider;
use crate::support::ts_check::is_valid_ts;
use crate::support::webhook::WebhookReceiver;

const T: Duration = Duration::from_secs(15);

fn signal(e: &Edge, sig: &str) {
    let pid = e.pid().expect("edge running");
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// A metric's value from `/metrics` (the first sample whose line starts
/// with `series`).
async fn metric(e: &Edge, series: &str) -> Option<f64> {
    let (_, _, body) = client::get_body(&e.url("/metrics")).await;
    let text = String::from_utf8_lossy(&body).into_owned();
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn health(e: &Edge) -> Value {
    api(e, Method::GET, "/health", None).await.1
}

fn state_streams(e: &Edge) -> Vec<String> {
    std::fs::read(e.state_file())
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| {
            v["streams"].as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s["id"].as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_the_stop_events_of_the_viewers_it_cuts() {
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let mut e = Edge::start(&config("")).await;
    let (s, v) = api(
        &e,
        Method::POST,
        "/webhooks",
        Some(json!({"url": hook.url("/h"), "timeout": 5, "retry_attempts": 2})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let id = register(
        &e,
        json!({"url": p.url("live/term.ts?kbps=2000"), "metadata": {"provider_profile_id": 4}}),
    )
    .await;
    let resp = client::get(&e.url(&format!("/stream/{id}?client_id=tv"))).await;
    assert_eq!(resp.status(), 200);
    let mut viewer = BodyReader::new(resp);
    viewer.read_n(188 * 100, T).await;
    hook.wait_for_events("stream_started", 1, T).await;

    let status = e.stop().await.expect("edge was running");
    assert!(status.success(), "exit status {status}");
    // The process exits only after delivering them: no wait needed.
    let disconnected = hook.events_of("client_disconnected");
    let stopped = hook.events_of("stream_stopped");
    assert_eq!(disconnected.len(), 1, "{:?}", hook.received());
    assert_eq!(stopped.len(), 1, "{:?}", hook.received());
    assert_eq!(stopped[0]["stream_id"], id.as_str());
    assert_eq!(stopped[0]["data"]["metadata"]["provider_profile_id"], "4");
    assert_eq!(stopped[0]["data"]["reason"], "shutdown");
    assert_eq!(disconnected[0]["data"]["client_id"], "tv");
    assert!(
        !e.log().contains("event dropped"),
        "an event was dropped: {}",
        e.log()
    );
    drop(viewer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_webhooks_and_streams_and_keeps_serving() {
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let mut e = Edge::start(&config("log:\n  level: info\n")).await;
    let id = register(&e, json!({"url": p.url("live/hup.ts")})).await;

    signal(&e, "HUP");
    assert!(
        e.wait_for_log("config reloaded", T).await,
        "no log line for SIGHUP: {}",
        e.log()
    );
    assert!(e.is_running(), "SIGHUP ended the process: {}", e.log());

    // Add a webhook and a stream in the file, then reload.
    let yaml = config(&format!(
        "log:\n  level: debug\nevents:\n  webhooks:\n    - url: \"{}\"\nstreams:\n  - id: from-yaml\n    url: \"{}\"\n",
        hook.url("/yaml-hook"),
        p.url("live/yaml.ts")
    ));
    std::fs::write(
        e.config_path(),
        crate::support::edge::render(&yaml, e.port(), e.dir()),
    )
    .expect("write config");
    signal(&e, "HUP");
    // The first SIGHUP reloaded (unchanged) too: wait for the second one.
    assert!(
        eventually(T, || e.log().matches("config reloaded").count() >= 2).await,
        "no reload: {}",
        e.log()
    );
    assert!(e.is_running());
    let (s, v) = api(&e, Method::GET, "/webhooks", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["webhooks"][0]["url"],
        hook.url("/yaml-hook").as_str(),
        "{v}"
    );
    let (s, _) = api(&e, Method::GET, "/streams/from-yaml", None).await;
    assert_eq!(s, 200, "the YAML stream was not added");
    // API streams are kept.
    let (s, _) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(s, 200);

    // A broken file changes nothing and ends nothing.
    std::fs::write(e.config_path(), "server:\n  listn: 1\n").expect("write config");
    signal(&e, "HUP");
    assert!(
        e.wait_for_log("nothing reloaded", T).await,
        "no error for a broken config: {}",
        e.log()
    );
    assert!(e.is_running());
    let (s, _) = api(&e, Method::GET, "/streams/from-yaml", None).await;
    assert_eq!(s, 200);
}

/// A config on `port` with the state file at `state`.
fn yaml_at(port: u16, state: &std::path::Path) -> String {
    format!(
        "server:\n  listen: \"127.0.0.1:{port}\"\n  state_file: \"{}\"\n  grace_period: \"0s\"\napi:\n  token: \"{TOKEN}\"\n",
        state.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_copy_on_the_same_state_file_or_port_exits_at_once() {
    let e = Edge::start(&config("")).await;
    let pid = e.pid().expect("running");
    let dir = tempfile::tempdir().expect("temp dir");

    // Same state file, other port.
    let conf = dir.path().join("same-state.yaml");
    std::fs::write(&conf, yaml_at(free_port(), &e.state_file())).expect("write");
    let out = run_bin(&["-c", conf.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains(&format!("pid {pid}")),
        "holder not named: {err}"
    );
    assert!(err.contains("state.json"), "{err}");

    // Same port, other state file.
    let conf = dir.path().join("same-port.yaml");
    std::fs::write(&conf, yaml_at(e.port(), &dir.path().join("other.json"))).expect("write");
    let out = run_bin(&["-c", conf.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("in use"), "{err}");
    assert!(
        !dir.path().join("other.json").exists(),
        "the failed copy wrote a state file"
    );

    // The first one is untouched.
    let (s, _) = api(&e, Method::GET, "/health", None).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_saved_in_coalesced_writes_and_lists_paginate() {
    let e = Edge::start(&config("")).await;
    const N: usize = 200;
    let before = metric(&e, "m3u_edge_state_saves_total{result=\"ok\"}")
        .await
        .expect("state save metric");
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for i in 0..N {
        ids.push(
            register(
                &e,
                json!({"url": format!("http://provider.invalid/live/{i}.ts")}),
            )
            .await,
        );
    }
    assert_eventually(T, "every registration in the state file", || {
        state_streams(&e).len() == N
    })
    .await;
    let after = metric(&e, "m3u_edge_state_saves_total{result=\"ok\"}")
        .await
        .expect("state save metric");
    // Each write waits out the save delay (500 ms) first, so however
    // loaded the machine, at most one write per delay: coalesced.
    let bound = (started.elapsed().as_secs_f64() / 0.5).floor() + 2.0;
    assert!(
        after - before <= bound && after - before < N as f64,
        "{N} registrations took {} writes (bound {bound})",
        after - before
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(e.state_file())
            .expect("state file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "state file mode {:o}", mode & 0o777);
    }

    // Unpaginated: m3u-proxy's shape, everything.
    let (s, v) = api(&e, Method::GET, "/streams", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["streams"].as_array().map(Vec::len), Some(N));
    assert_eq!(v["total"], N);
    assert!(v.get("limit").is_none(), "{}", v["limit"]);
    // A page.
    let (s, v) = api(&e, Method::GET, "/streams?limit=5&offset=10", None).await;
    assert_eq!(s, 200);
    let page: Vec<&str> = v["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .map(|s| s["stream_id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        page,
        ids[10..15].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(v["total"], N);
    assert_eq!(v["limit"], 5);
    assert_eq!(v["offset"], 10);
    let (s, v) = api(&e, Method::GET, "/streams?offset=1000", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["streams"], json!([]));
    let (s, _) = api(&e, Method::GET, "/streams?limit=-1", None).await;
    assert_eq!(s, 422);
    let (s, v) = api(&e, Method::GET, "/clients?limit=1", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["total_clients"], 0);
    assert_eq!(v["clients"], json!([]));
    let (s, _) = api(&e, Method::GET, "/clients?offset=x", None).await;
    assert_eq!(s, 422);
    let (s, v) = api(&e, Method::GET, "/stats?limit=3", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["streams"].as_array().map(Vec::len), Some(3));
    assert_eq!(v["proxy_stats"]["total_streams"], N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_save_shows_in_health_stats_and_metrics_and_is_retried() {
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\n  state_file: \"{{state_file}}\"\n  grace_period: \"0s\"\n  state_save_delay: 100ms\napi:\n  token: \"{TOKEN}\"\n"
    );
    let e = Edge::start(&yaml).await;
    assert_eventually(T, "first state write", || e.state_file().exists()).await;
    // A directory where the file should be: every write fails, root or not.
    std::fs::remove_file(e.state_file()).expect("remove state file");
    std::fs::create_dir(e.state_file()).expect("mkdir");

    let (s, v) = api(
        &e,
        Method::POST,
        "/streams",
        Some(json!({"url": "http://provider.invalid/live/keep.ts"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let id = v["stream_id"].as_str().expect("id").to_owned();
    let mut h = Value::Null;
    for _ in 0..150 {
        h = health(&e).await;
        if h["status"] == "degraded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["state_file"]["ok"], false, "{h}");
    assert!(h["state_file"]["last_error"].is_string(), "{h}");
    assert_eq!(metric(&e, "m3u_edge_state_save_failing").await, Some(1.0));
    assert!(metric(&e, "m3u_edge_state_saves_total{result=\"failed\"}").await >= Some(1.0));
    let (_, stats) = api(&e, Method::GET, "/stats", None).await;
    assert!(
        stats["proxy_stats"]["state_save_failures"].as_u64() >= Some(1),
        "{stats}"
    );

    // The disk comes back: the retry writes the stream, health recovers.
    std::fs::remove_dir(e.state_file()).expect("rmdir");
    for _ in 0..200 {
        if state_streams(&e).contains(&id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(state_streams(&e).contains(&id), "not retried");
    let h = health(&e).await;
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(metric(&e, "m3u_edge_state_save_failing").await, Some(0.0));
}

/// A primary that answers 200 but never sends valid TS: the hub must count
/// it as stalled after `stall_timeout` and move the viewer to the backup.
async fn bad_primary_fails_over(primary: &str) {
    let p = Provider::start().await;
    let e = Edge::start(&config(
        "live:\n  stall_timeout: \"1s\"\n  give_up_after: \"20s\"\n  retry_backoff: \"1s\"\n",
    ))
    .await;
    let id = register(
        &e,
        json!({"url": p.url(primary), "failover_urls": [p.url("live/good.ts?kbps=4000")]}),
    )
    .await;
    let resp = client::get(&e.url(&format!("/stream/{id}?client_id=v"))).await;
    assert_eq!(resp.status(), 200);
    let mut viewer = BodyReader::new(resp);
    let got = viewer.read_n(188 * 2000, T).await;
    assert!(got.len() >= 188 * 2000, "viewer got {} bytes", got.len());
    is_valid_ts(&got).expect("the viewer got valid TS");
    assert!(p.hits("/live/good.ts") >= 1, "backup never asked");
    let (_, s) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(s["stream"]["current_failover_index"], 0, "{s}");
    assert!(
        metric(&e, "m3u_edge_failovers_total{reason=\"stall\"}").await >= Some(1.0),
        "not counted as a stall"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_sending_garbage_at_full_speed_fails_over() {
    bad_primary_fails_over("live/junk.ts?kbps=4000&garbage=1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_trickling_single_bytes_fails_over() {
    bad_primary_fails_over("live/drip.ts?trickle_ms=300").await;
}

/// Sends `request` as raw bytes and returns the response head (status line
/// and headers, lowercase names) once it arrived, or panics after `T`.
async fn raw(e: &Edge, request: &[u8]) -> (u16, Vec<(String, String)>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", e.port()))
        .await
        .expect("connect");
    sock.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = sock.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    tokio::time::timeout(T, read)
        .await
        .expect("no answer in time");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_get_4xx_allow_and_no_error_log() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;

    // A broken chunked body: 400, connection closed.
    let req = format!(
        "POST /streams HTTP/1.1\r\nHost: x\r\nX-API-Token: {TOKEN}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{{}}\r\n0\r\n\r\n"
    );
    let (status, h) = raw(&e, req.as_bytes()).await;
    assert_eq!(status, 400, "{h:?}");
    assert_eq!(header(&h, "connection"), Some("close"), "{h:?}");

    // HTTP/1.1 without Host: 400.
    let (status, _) = raw(&e, b"GET /health HTTP/1.1\r\nUser-Agent: t\r\n\r\n").await;
    assert_eq!(status, 400);
    let (status, _) = raw(&e, b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await;
    assert_eq!(status, 400);
    // HTTP/1.0 needs none.
    let (status, _) = raw(&e, b"GET /health HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200);

    // 405s name what is allowed; /metrics is read-only.
    for m in ["PUT", "DELETE", "TRACE"] {
        let req = format!("{m} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        let (status, h) = raw(&e, req.as_bytes()).await;
        assert_eq!(status, 405, "{m} /metrics");
        assert_eq!(header(&h, "allow"), Some("GET, HEAD"), "{m}: {h:?}");
    }
    let req = format!("DELETE /health HTTP/1.1\r\nHost: x\r\nX-API-Token: {TOKEN}\r\n\r\n");
    let (status, h) = raw(&e, req.as_bytes()).await;
    assert_eq!(status, 405);
    assert_eq!(header(&h, "allow"), Some("GET, HEAD, OPTIONS"), "{h:?}");
    let (status, h) = raw(
        &e,
        b"PUT /stream/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert_eq!(header(&h, "allow"), Some("GET, HEAD"), "{h:?}");

    // A body that stops arriving: 408 (after the 10 s body timeout).
    let req = format!(
        "POST /streams HTTP/1.1\r\nHost: x\r\nX-API-Token: {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"url\":"
    );
    let (status, h) = raw(&e, req.as_bytes()).await;
    assert_eq!(status, 408, "{h:?}");
    assert_eq!(header(&h, "connection"), Some("close"), "{h:?}");

    // Clients aborting file downloads mid-body: no ERROR line for any of it.
    let id = register(
        &e,
        json!({"url": p.url("live/abort.ts?kbps=8000"), "live": false}),
    )
    .await;
    for i in 0..5 {
        let resp = client::get(&e.url(&format!("/stream/{id}?client_id=a{i}"))).await;
        assert_eq!(resp.status(), 200);
        let mut r = BodyReader::new(resp);
        r.read_n(188 * 100, T).await;
        drop(r);
    }
    assert_eventually(T, "the aborted downloads are over", || {
        p.open_streams("/live/abort.ts") == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = e.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "ERROR lines: {errors:#?}");
}

#[test]
fn check_mode_reports_every_mistake_in_one_run() {
    let yaml = "server:\n  listn: \"127.0.0.1:1\"\n  threads: 0\nstreams:\n  - url: \"http://h/a.ts\"\n    bogus: 1\n  - url: \"ftp://h/b.ts\"\nlog:\n  colour: red\n";
    let out = crate::support::edge::check_config(yaml);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    for (line, key) in [
        (":2:", "server.listn"),
        (":3:", "server.threads"),
        (":6:", "streams[0].bogus"),
        (":7:", "streams[1].url"),
        (":9:", "log.colour"),
    ] {
        assert!(
            err.lines().any(|l| l.contains(line) && l.contains(key)),
            "{key} at {line} missing:\n{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_log_level() {
    let mut e = Edge::start_with(
        &config("log:\n  level: warn\n"),
        StartOpts {
            env: vec![("RUST_LOG".into(), String::new())],
            ..StartOpts::default()
        },
    )
    .await;
    let (s, _) = api(&e, Method::GET, "/health", None).await;
    assert_eq!(s, 200);
    assert!(
        !e.log().contains("access"),
        "info lines at level warn: {}",
        e.log()
    );
    let yaml = config("log:\n  level: info\n");
    std::fs::write(
        e.config_path(),
        crate::support::edge::render(&yaml, e.port(), e.dir()),
    )
    .expect("write config");
    signal(&e, "HUP");
    // The reload's own summary is an info line: it shows once info is on.
    assert!(
        e.wait_for_log("config reloaded", T).await,
        "level not applied: {}",
        e.log()
    );
    let (s, _) = api(&e, Method::GET, "/health", None).await;
    assert_eq!(s, 200);
    assert!(e.wait_for_log("path=\"/health\"", T).await, "{}", e.log());
    assert!(e.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_webhook_receiver_delays_shutdown_only_by_shutdown_timeout() {
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\n  state_file: \"{{state_file}}\"\n  grace_period: \"0s\"\n  shutdown_timeout: 1s\napi:\n  token: \"{TOKEN}\"\nevents:\n  webhooks:\n    - url: \"{}\"\n      timeout: 30s\n",
        hook.url("/dead")
    );
    let mut e = Edge::start(&yaml).await;
    hook.never_answer(true);
    let id = register(&e, json!({"url": p.url("live/dead.ts?kbps=2000")})).await;
    let resp = client::get(&e.url(&format!("/stream/{id}?client_id=v"))).await;
    assert_eq!(resp.status(), 200);
    let mut viewer = BodyReader::new(resp);
    viewer.read_n(188 * 100, T).await;
    // SIGTERM; the harness SIGKILLs after 10 s, which would not be a success.
    let status = e.stop().await.expect("edge was running");
    assert!(status.success(), "exit status {status}: {}", e.log());
    assert!(
        e.log()
            .contains("events not flushed within server.shutdown_timeout")
            || e.log().contains("abandoned"),
        "{}",
        e.log()
    );
    drop(viewer);
}
