//! Live channels' memory (issue #16): each channel's backlog is held once and
//! given back when the channel closes; a channel whose GOP is longer than its
//! ring still gives late joiners a clean start (at the next keyframe).
//! Observed from outside: the bytes viewers receive (parsed as TS) and the
//! m3u-edge process's memory in /proc.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use serde_json::json;

use crate::common::{config, register};
use crate::support::client::{self, BodyReader};
use crate::support::edge::Edge;
use crate::support::eventually::eventually;
use crate::support::provider::Provider;
use crate::support::ts_check::check_clean_join;

const T: Duration = Duration::from_secs(15);

async fn watch(e: &Edge, id: &str, client_id: &str) -> BodyReader {
    let resp = client::get(&e.url(&format!("/stream/{id}?client_id={client_id}"))).await;
    assert_eq!(resp.status(), 200, "viewer {client_id}");
    BodyReader::new(resp)
}

/// (anonymous KiB, memfd files, bytes held by them) of a process.
fn memory(pid: u32) -> (u64, usize, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let anon = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (mut files, mut bytes) = (0, 0);
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let memfd = std::fs::read_link(e.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:m3u-edge-live"));
        if let (true, Ok(m)) = (memfd, std::fs::metadata(e.path())) {
            files += 1;
            bytes += m.blocks() * 512;
        }
    }
    (anon, files, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_holds_its_backlog_once_and_gives_it_back_when_it_closes() {
    let p = Provider::start().await;
    // 4 channels of 8 Mbit/s with a 2 s ring: 2 MB of backlog each.
    let e = Edge::start(&config("live:\n  ring_seconds: 2s\n  linger: 0s\n")).await;
    let pid = e.pid().expect("pid");
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            register(
                &e,
                json!({"url": p.url(&format!("live/mem{i}.ts?kbps=8000"))}),
            )
            .await,
        );
    }
    // Warm the process up (one request of each kind) before the baseline.
    drop(
        watch(&e, &ids[0], "warmup")
            .await
            .read_n(188 * 100, T)
            .await,
    );
    assert!(eventually(T, || memory(pid).1 == 0).await);
    let (anon0, _, _) = memory(pid);
    let mut viewers = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        viewers.push(watch(&e, id, &format!("v{i}")).await);
    }
    // Four seconds: every ring full and turned over once.
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        for v in &mut viewers {
            v.read_n(188 * 1000, T).await;
        }
    }
    let (anon1, files, spooled) = memory(pid);
    let backlog = 4 * 2 * 8_000_000 / 8;
    assert_eq!(files, 4, "one spool per channel");
    assert!(
        spooled >= backlog / 2 && spooled <= backlog * 5 / 4,
        "spools hold {spooled} bytes for a backlog of {backlog}"
    );
    // The backlog is not also kept on the heap (it was, as `Bytes`, before).
    let grown = (anon1.saturating_sub(anon0)) * 1024;
    assert!(
        grown < backlog / 2,
        "heap grew by {grown} bytes with {spooled} bytes spooled"
    );
    drop(viewers);
    assert!(
        eventually(T, || memory(pid).1 == 0).await,
        "spools still open after the channels closed: {:?}",
        memory(pid)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gop_longer_than_the_ring_joins_at_the_next_keyframe() {
    let p = Provider::start().await;
    // The fixture has a keyframe every 2 s at its own 766 kbit/s; the ring
    // keeps half a second, so most joins find no keyframe in it.
    let e = Edge::start(&config("live:\n  ring_seconds: 0.5s\n")).await;
    let id = register(&e, json!({"url": p.url("live/longgop.ts?kbps=766")})).await;
    let mut first = watch(&e, &id, "first").await;
    first.read_n(188 * 100, T).await;
    // The first viewer keeps reading, so the channel stays warm.
    let drain = tokio::spawn(async move {
        loop {
            first.read_n(188 * 10, T).await;
        }
    });
    for round in 0..4u64 {
        // Join at various points of the GOP.
        tokio::time::sleep(Duration::from_millis(300 + round * 370)).await;
        let mut late = watch(&e, &id, &format!("late{round}")).await;
        let b = late.read_n(188 * 600, T).await;
        check_clean_join(&b).unwrap_or_else(|err| panic!("late joiner {round}: {err}"));
    }
    drain.abort();
    assert_eq!(p.hits("/live/longgop.ts"), 1);
}
