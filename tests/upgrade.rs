//! Zero-downtime upgrade, as an operator runs it: a new `m3u-edge -u` takes
//! the listening sockets of the running one (SIGQUIT), which finishes what
//! it serves within its grace period and exits.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::json;

use crate::common::{api, config, register};
use crate::support::client::{self, BodyReader};
use crate::support::edge::{Edge, BIN};
use crate::support::eventually::eventually;
use crate::support::provider::Provider;
use crate::support::webhook::WebhookReceiver;

/// The new process, killed by pid if the test ends early.
struct NewProcess(Child);

impl Drop for NewProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigquit(pid: u32) {
    let ok = Command::new("kill")
        .args(["-QUIT", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -QUIT {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_accepting_finishes_downloads_and_hands_over_state() {
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let mut old = Edge::start(
        &config("live:\n  stall_timeout: \"3s\"\n")
            .replace("grace_period: \"0s\"", "grace_period: \"4s\""),
    )
    .await;
    let (s, _) = api(
        &old,
        Method::POST,
        "/webhooks",
        Some(json!({ "url": hook.url("/hook") })),
    )
    .await;
    assert_eq!(s, 200);
    let live = register(&old, json!({ "url": p.url("live/up.ts?kbps=800") })).await;
    let file = register(
        &old,
        json!({ "url": p.url("files/sample.mp4"), "live": false }),
    )
    .await;
    let file_len = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/sample.mp4"
    ))
    .expect("fixture")
    .len();

    // A live viewer and a download (read slowly) of the old process.
    let mut viewer = BodyReader::new(client::get(&old.url(&format!("/stream/{live}"))).await);
    viewer.read_n(188 * 100, Duration::from_secs(10)).await;
    let mut download = client::get(&old.url(&format!("/stream/{file}"))).await;
    assert_eq!(download.status(), 200);
    let first = download
        .chunk()
        .await
        .expect("download")
        .expect("bytes")
        .len();

    // New connections keep being answered throughout.
    let answered = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop_probe = Instant::now() + Duration::from_secs(10);
    let probe = {
        let url = old.url("/health");
        let (answered, failed) = (answered.clone(), failed.clone());
        tokio::spawn(async move {
            while Instant::now() < stop_probe {
                // A fresh connection each time: the listener is what changes hands.
                let c = client::builder().pool_max_idle_per_host(0).build().unwrap();
                match c.get(&url).send().await {
                    Ok(r) if r.status().is_success() => answered.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // The new process takes over.
    let log = std::fs::File::create(old.dir().join("edge-new.log")).unwrap();
    let mut new = NewProcess(
        Command::new(BIN)
            .args(["-u", "-c"])
            .arg(old.config_path())
            .current_dir(old.dir())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn the new process"),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let old_pid = old.pid().expect("old pid");
    let quit_at = Instant::now();
    sigquit(old_pid);

    // The download in progress completes, from the old process.
    let mut got = first;
    while let Ok(Some(chunk)) = download.chunk().await {
        got += chunk.len();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got, file_len, "the download in progress completed");
    // The old process's live viewer keeps receiving into the grace period.
    let after = viewer.try_read_n(188 * 200, Duration::from_secs(3)).await;
    assert!(after.is_ok(), "live viewer cut at once");
    // The old process exits at the end of its grace period.
    let gone = Instant::now() + Duration::from_secs(20);
    while old.is_running() && Instant::now() < gone {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!old.is_running(), "old process still running");
    assert!(
        quit_at.elapsed() >= Duration::from_secs(2),
        "the old process left before its grace"
    );
    probe.await.unwrap();
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "a connection was refused during the upgrade"
    );
    assert!(answered.load(Ordering::SeqCst) > 20);
    assert!(
        new.0.try_wait().unwrap().is_none(),
        "the new process is serving"
    );

    // The old process left no provider connection, and flushed its events.
    assert!(eventually(Duration::from_secs(10), || p.open_streams("/live/") == 0).await);
    let stopped = hook
        .wait_for_events("stream_stopped", 1, Duration::from_secs(10))
        .await;
    assert!(
        stopped.iter().any(|ev| ev["stream_id"] == live.as_str()),
        "stream_stopped of the old process's channel: {stopped:?}"
    );

    // The state carried over: the new process knows both streams and serves them.
    let (s, list) = api(&old, Method::GET, "/streams", None).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = list["streams"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["stream_id"].as_str())
        .collect();
    assert!(
        ids.contains(&live.as_str()) && ids.contains(&file.as_str()),
        "{list}"
    );
    let mut again = BodyReader::new(client::get(&old.url(&format!("/stream/{live}"))).await);
    again.read_n(188 * 50, Duration::from_secs(10)).await;
    drop(again);
    drop(new);
}
