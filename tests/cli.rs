//! Command-line modes that change how the process runs: `-d` (daemon).
//! Pingora forks in daemon mode; anything started before the fork would be
//! silently gone, so this checks serving, the hub and webhook delivery in the
//! forked process, then stops it through its pid file.

use std::time::Duration;

use serde_json::json;

use crate::common::TOKEN;
use crate::support::client::{self, BodyReader};
use crate::support::edge::{free_port, run_bin};
use crate::support::eventually::eventually;
use crate::support::provider::Provider;
use crate::support::webhook::WebhookReceiver;

const T: Duration = Duration::from_secs(15);

/// Sends SIGTERM to `pid` when dropped, so a failed test leaves no daemon behind.
struct Daemon(Option<i32>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_mode_serves_streams_and_sends_webhooks() {
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let conf = dir.path().join("config.yaml");
    let yaml = format!(
        "server:\n  listen: \"127.0.0.1:{port}\"\n  state_file: \"{}\"\n  grace_period: \"0s\"\napi:\n  token: \"{TOKEN}\"\nevents:\n  webhooks:\n    - url: \"{}\"\n",
        dir.path().join("state.json").display(),
        hook.url("/hooks")
    );
    std::fs::write(&conf, yaml).expect("write config");
    let pid_file = format!("/tmp/m3u-edge-{port}.pid");
    let _ = std::fs::remove_file(&pid_file);

    // The foreground process returns once the daemon is forked off.
    let out = run_bin(&["-d", "-c", conf.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "m3u-edge -d failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        eventually(T, || std::fs::read_to_string(&pid_file)
            .is_ok_and(|s| s.trim().parse::<i32>().is_ok()))
        .await,
        "no pid file at {pid_file}"
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0);
    let daemon = Daemon(Some(pid));
    let base = format!("http://127.0.0.1:{port}");

    let mut healthy = false;
    for _ in 0..150 {
        if let Ok(Ok(r)) = tokio::time::timeout(
            Duration::from_secs(2),
            reqwest::get(format!("{base}/health")),
        )
        .await
        {
            if r.status() == 200 {
                healthy = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(healthy, "the daemon does not answer /health");

    let body = json!({"url": p.url("live/daemon.ts?kbps=2000")});
    let r = reqwest::Client::new()
        .post(format!("{base}/streams"))
        .header("x-api-token", TOKEN)
        .json(&body)
        .send()
        .await
        .expect("POST /streams");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    let id = v["stream_id"].as_str().expect("stream_id").to_string();

    // The hub and the event workers run in the forked process.
    let resp = client::get(&format!("{base}/stream/{id}?client_id=d1")).await;
    assert_eq!(resp.status(), 200);
    let mut viewer = BodyReader::new(resp);
    assert!(viewer.read_n(188 * 500, T).await.len() >= 188 * 500);
    drop(viewer);
    assert_eq!(hook.wait_for_events("stream_started", 1, T).await.len(), 1);
    assert_eq!(hook.wait_for_events("stream_stopped", 1, T).await.len(), 1);
    assert!(p.wait_until(T, |p| p.open_streams("/live/") == 0).await);

    // Stopping through the pid file ends the daemon.
    drop(daemon);
    assert!(
        eventually(T, || std::net::TcpStream::connect(("127.0.0.1", port))
            .is_err())
        .await,
        "the daemon still listens after SIGTERM"
    );
}
