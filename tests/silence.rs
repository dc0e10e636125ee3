//! Silence detection with real ffmpeg: a live channel whose audio is silent
//! (a fixture made here with ffmpeg's `anullsrc`) switches to its next
//! source, with one backup and with two in order, while its viewer stays
//! connected and the provider sees one connection at a time; a channel with
//! sound throughout never switches; the checker's ffmpeg goes with the
//! channel. Skipped with a message where ffmpeg is not installed.

use std::process::Command;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};

use crate::common::{api, config, register};
use crate::support::client::{self, BodyReader};
use crate::support::edge::Edge;
use crate::support::eventually::eventually;
use crate::support::procs::children_named;
use crate::support::provider::Provider;
use crate::support::ts_check::is_valid_ts;
use crate::support::webhook::WebhookReceiver;

const T: Duration = Duration::from_secs(60);

/// 10 s of a small test picture over silent audio (`anullsrc`), MPEG-TS.
fn silent_fixture() -> Option<Vec<u8>> {
    let dir = tempfile::tempdir().ok()?;
    let out = dir.path().join("silent.ts");
    let ok = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=160x90:rate=25",
            "-f",
            "lavfi",
            "-i",
            "anullsrc=r=48000:cl=stereo",
            "-t",
            "10",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "25",
            "-c:a",
            "aac",
            "-b:a",
            "64k",
            "-f",
            "mpegts",
        ])
        .arg(&out)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: ffmpeg not installed (scripts/deps.sh installs it)");
        return None;
    }
    std::fs::read(&out).ok()
}

fn silence_config() -> String {
    config(
        "live:\n  stall_timeout: \"8s\"\n  give_up_after: \"60s\"\n  retry_backoff: \"1s\"\n  primary_cooldown: \"10m\"\n",
    )
}

/// Detection on, with short thresholds: silence of 1 s, checked every
/// second, two silent checks in a row, after a 1 s grace.
fn with_silence(mut body: Value) -> Value {
    for (k, v) in [
        ("enable_silence_detection", json!(true)),
        ("silence_threshold_db", json!(-50)),
        ("silence_duration", json!(1)),
        ("silence_check_interval", json!(1)),
        ("silence_failover_threshold", json!(2)),
        ("silence_monitoring_grace_period", json!(1)),
    ] {
        body[k] = v;
    }
    body
}

/// Provider setup: `silent.ts` added, and the rate (kbit/s) that plays it in
/// real time (the checker reads the channel as it flows).
fn add_silent(p: &Provider, bytes: Vec<u8>) -> u64 {
    let kbps = (bytes.len() as u64 * 8 / 10 / 1000).max(50);
    p.add_file("silent.ts", bytes);
    kbps
}

async fn watch(e: &Edge, id: &str) -> BodyReader {
    let resp = client::get(&e.url(&format!("/stream/{id}?client_id=viewer"))).await;
    assert_eq!(resp.status(), 200);
    BodyReader::new(resp)
}

async fn hook_failovers(e: &Edge) -> WebhookReceiver {
    let hook = WebhookReceiver::start().await;
    let (s, v) = api(
        e,
        Method::POST,
        "/webhooks",
        Some(json!({"url": hook.url("/hook"), "events": ["failover_triggered"], "timeout": 5})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    hook
}

/// `(from_index, to_index, reason)` of the failover events so far.
fn failovers(hook: &WebhookReceiver) -> Vec<(i64, i64, String)> {
    hook.received()
        .iter()
        .filter(|r| r.event_type() == "failover_triggered")
        .map(|r| {
            let d = if r.body["data"].is_object() {
                &r.body["data"]
            } else {
                &r.body
            };
            (
                d["from_index"].as_i64().unwrap_or(-9),
                d["to_index"].as_i64().unwrap_or(-9),
                d["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn silence_metric(text: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with("m3u_edge_failovers_total{") && l.contains("reason=\"silence\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(e: &Edge) -> String {
    let (_, _, b) = client::get_body(&e.url("/metrics")).await;
    String::from_utf8_lossy(&b).into_owned()
}

fn ffmpeg_children(e: &Edge) -> usize {
    e.pid().map_or(0, |pid| children_named(pid, "ffmpeg").len())
}

/// Reads on until `cond`, failing if the viewer's stream ends first.
async fn read_until(viewer: &mut BodyReader, what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        viewer.read_n(188 * 20, T).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_with_one_backup_switches_to_it_and_the_viewer_stays() {
    let Some(silent) = silent_fixture() else {
        return;
    };
    let p = Provider::start().await;
    let kbps = add_silent(&p, silent);
    let e = Edge::start(&silence_config()).await;
    let hook = hook_failovers(&e).await;
    let id = register(
        &e,
        with_silence(json!({
            "url": p.url(&format!("live/quiet.ts?src=silent.ts&kbps={kbps}")),
            "failover_urls": [p.url("live/loud.ts?kbps=800")],
        })),
    )
    .await;
    let mut viewer = watch(&e, &id).await;
    is_valid_ts(&viewer.read_n(188 * 100, T).await).unwrap();
    assert_eq!(ffmpeg_children(&e), 1, "one silence checker");
    read_until(&mut viewer, "the switch to the backup", || {
        p.requests_to("/live/loud.ts").len() == 1
    })
    .await;
    // The viewer is still served, now from the backup, by one connection.
    let after = viewer.read_n(188 * 2000, T).await;
    assert!(!after.is_empty());
    assert!(eventually(T, || p.open_streams("/live/") == 1).await);
    assert!(eventually(T, || !failovers(&hook).is_empty()).await);
    let f = failovers(&hook);
    assert_eq!((f[0].0, f[0].1), (-1, 0), "{f:?}");
    assert!(f[0].2.contains("silence"), "{f:?}");
    assert!(silence_metric(&metrics(&e).await) >= 1.0);
    let (_, st) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(st["stream"]["current_failover_index"], 0, "{st}");
    assert_eq!(st["client_count"], 1, "{st}");
    // The backup has sound: it stays.
    viewer.read_n(188 * 6000, T).await;
    assert_eq!(failovers(&hook).len(), 1, "{:?}", failovers(&hook));
    // The checker goes with the channel.
    drop(viewer);
    assert!(
        eventually(T, || ffmpeg_children(&e) == 0).await,
        "silence checker stopped and reaped"
    );
    assert!(eventually(T, || p.open_streams("/live/") == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_with_two_backups_goes_through_them_in_order() {
    let Some(silent) = silent_fixture() else {
        return;
    };
    let p = Provider::start().await;
    let kbps = add_silent(&p, silent);
    let e = Edge::start(&silence_config()).await;
    let hook = hook_failovers(&e).await;
    let id = register(
        &e,
        with_silence(json!({
            "url": p.url(&format!("live/q0.ts?src=silent.ts&kbps={kbps}")),
            "failover_urls": [
                p.url(&format!("live/q1.ts?src=silent.ts&kbps={kbps}")),
                p.url("live/loud2.ts?kbps=800"),
            ],
        })),
    )
    .await;
    let mut viewer = watch(&e, &id).await;
    read_until(&mut viewer, "the switch to the second backup", || {
        p.requests_to("/live/loud2.ts").len() == 1
    })
    .await;
    viewer.read_n(188 * 2000, T).await;
    assert!(eventually(T, || failovers(&hook).len() >= 2).await);
    let f = failovers(&hook);
    let steps: Vec<(i64, i64)> = f.iter().map(|x| (x.0, x.1)).collect();
    assert_eq!(steps, [(-1, 0), (0, 1)], "{f:?}");
    assert!(f.iter().all(|x| x.2.contains("silence")), "{f:?}");
    // First backup tried once, before the second.
    assert_eq!(p.requests_to("/live/q1.ts").len(), 1);
    assert!(silence_metric(&metrics(&e).await) >= 2.0);
    assert!(eventually(T, || p.open_streams("/live/") == 1).await);
    let (_, st) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(st["stream"]["current_failover_index"], 1, "{st}");
    assert_eq!(st["client_count"], 1, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_with_sound_throughout_never_fails_over() {
    if silent_fixture().is_none() {
        return;
    }
    let p = Provider::start().await;
    let e = Edge::start(&silence_config()).await;
    let id = register(
        &e,
        with_silence(json!({
            "url": p.url("live/sound.ts?kbps=800"),
            "failover_urls": [p.url("live/spare.ts?kbps=800")],
        })),
    )
    .await;
    let mut viewer = watch(&e, &id).await;
    is_valid_ts(&viewer.read_n(188 * 100, T).await).unwrap();
    assert!(
        eventually(T, || ffmpeg_children(&e) == 1).await,
        "the checker runs"
    );
    // sample.ts (766 kbit/s) at 800 kbit/s plays about in real time:
    // 1.5 MB is some 15 s of audio, far past the grace and two checks.
    viewer.read_n(1500 * 1024, T).await;
    assert_eq!(p.requests_to("/live/spare.ts").len(), 0);
    assert_eq!(silence_metric(&metrics(&e).await), 0.0);
    let (_, st) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(st["stream"]["current_failover_index"], -1, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_without_a_backup_keeps_the_one_source() {
    let Some(silent) = silent_fixture() else {
        return;
    };
    let p = Provider::start().await;
    let kbps = add_silent(&p, silent);
    let e = Edge::start(&silence_config()).await;
    let id = register(
        &e,
        with_silence(json!({"url": p.url(&format!("live/alone.ts?src=silent.ts&kbps={kbps}"))})),
    )
    .await;
    let mut viewer = watch(&e, &id).await;
    // About 12 s of the silent source: past the grace and two silent checks.
    let bytes = (kbps as usize * 1000 / 8) * 12;
    viewer.read_n(bytes / 188 * 188, T).await;
    assert_eq!(
        p.requests_to("/live/alone.ts").len(),
        1,
        "never reconnected"
    );
    assert_eq!(silence_metric(&metrics(&e).await), 0.0);
    assert!(
        e.wait_for_log("no other source", Duration::from_secs(10))
            .await,
        "the silence was seen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_hands_over_to_a_warm_standby() {
    let Some(silent) = silent_fixture() else {
        return;
    };
    let p = Provider::start().await;
    let kbps = add_silent(&p, silent);
    let e = Edge::start(&config(
        "live:\n  stall_timeout: \"8s\"\n  give_up_after: \"60s\"\n  retry_backoff: \"1s\"\n  primary_cooldown: \"10m\"\n  standby: true\n",
    ))
    .await;
    let hook = hook_failovers(&e).await;
    let id = register(
        &e,
        with_silence(json!({
            "url": p.url(&format!("live/sq.ts?src=silent.ts&kbps={kbps}")),
            "failover_urls": [p.url("live/sb.ts?kbps=800")],
        })),
    )
    .await;
    let mut viewer = watch(&e, &id).await;
    read_until(&mut viewer, "the silence failover", || {
        failovers(&hook).iter().any(|f| f.2.contains("silence"))
    })
    .await;
    viewer.read_n(188 * 2000, T).await;
    // The standby's connection became the source: no second connection.
    assert_eq!(p.requests_to("/live/sb.ts").len(), 1);
    let (_, st) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(st["stream"]["current_failover_index"], 0, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_thresholds_out_of_range_are_422_naming_the_field() {
    let e = Edge::start(&silence_config()).await;
    for (field, value) in [
        ("silence_threshold_db", json!(12)),
        ("silence_duration", json!(0)),
        ("silence_check_interval", json!(-1)),
        ("silence_failover_threshold", json!(2.5)),
        ("silence_monitoring_grace_period", json!(-3)),
        ("silence_duration", json!("3")),
    ] {
        let mut body = with_silence(json!({"url": "http://127.0.0.1:9/live.ts"}));
        body[field] = value.clone();
        let (s, v) = api(&e, Method::POST, "/streams", Some(body)).await;
        assert_eq!(s, 422, "{field}={value}: {v}");
        assert_eq!(v["detail"][0]["loc"], json!(["body", field]), "{v}");
    }
    // m3u-editor's defaults pass.
    let (s, v) = api(
        &e,
        Method::POST,
        "/streams",
        Some(json!({
            "url": "http://127.0.0.1:9/live.ts",
            "enable_silence_detection": true,
            "silence_threshold_db": -50,
            "silence_duration": 3,
            "silence_check_interval": 10,
            "silence_failover_threshold": 3,
            "silence_monitoring_grace_period": 15,
        })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}
