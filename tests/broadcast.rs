//! Broadcasts (m3u-editor's networks) with real ffmpeg against the test
//! provider's `sample.mp4`: the calls m3u-editor makes (its body shapes, at
//! both prefixes), the HLS players get, the numbering and discontinuity
//! across programmes, the callbacks, stop, delete, failures and caps.
//! Skipped with a message where ffmpeg is not installed.

use std::process::Command;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};

use crate::common::{api, config, TOKEN};
use crate::support::client;
use crate::support::edge::Edge;
use crate::support::eventually::eventually;
use crate::support::procs::children_named;
use crate::support::provider::Provider;
use crate::support::ts_check::is_valid_ts;
use crate::support::webhook::WebhookReceiver;

const T: Duration = Duration::from_secs(40);
const NET: &str = "6f1c2a9e-0b1d-4e53-9a51-3c1a5f0e7d21";

fn have_ffmpeg() -> bool {
    let ok = Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: ffmpeg not installed (scripts/deps.sh installs it)");
    }
    ok
}

fn ffmpeg_children(edge: &Edge) -> usize {
    edge.pid()
        .map_or(0, |pid| children_named(pid, "ffmpeg").len())
}

fn broadcast_config(extra: &str) -> String {
    config(&format!("broadcast:\n  max_networks: 2\n{extra}"))
}

async fn start(e: &Edge, id: &str, body: Value) -> (u16, Value) {
    api(
        e,
        Method::POST,
        &format!("/broadcast/{id}/start"),
        Some(body),
    )
    .await
}

async fn status(e: &Edge, id: &str) -> (u16, Value) {
    api(e, Method::GET, &format!("/broadcast/{id}/status"), None).await
}

/// The playlist as a player gets it (no token), or None when not 200.
async fn playlist(e: &Edge, id: &str) -> Option<String> {
    let (st, _, body) = client::get_body(&e.url(&format!("/broadcast/{id}/live.m3u8"))).await;
    (st == 200).then(|| String::from_utf8_lossy(&body).into_owned())
}

fn segments(p: &str) -> Vec<String> {
    p.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn number(name: &str) -> u64 {
    name.trim_start_matches("live")
        .trim_end_matches(".ts")
        .parse()
        .expect("live<digits>.ts")
}

fn media_sequence(p: &str) -> u64 {
    p.lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("EXT-X-MEDIA-SEQUENCE")
}

/// Waits for a playlist listing at least `n` segments.
async fn wait_segments(e: &Edge, id: &str, n: usize) -> String {
    let deadline = Instant::now() + T;
    loop {
        if let Some(p) = playlist(e, id).await {
            if segments(&p).len() >= n {
                return p;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {n} segments of {id} within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Video frames ffprobe decodes in some TS.
fn decoded_frames(ts: &[u8]) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg.ts");
    std::fs::write(&path, ts).unwrap();
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-count_frames",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(&path)
        .output()
        .expect("ffprobe");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

/// Bodies of the callbacks received with `event`.
fn callbacks(hook: &WebhookReceiver, event: &str) -> Vec<Value> {
    hook.received()
        .into_iter()
        .filter(|r| r.body["event"] == event)
        .map(|r| r.body)
        .collect()
}

/// Whether process `pid` is gone (or only a zombie left for init to reap).
fn gone(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

fn programme(provider: &Provider, extra: Value) -> Value {
    let mut b = json!({
        "stream_url": provider.url("/files/sample.mp4"),
        "segment_duration": 1,
        "hls_list_size": 30,
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_programme_plays_as_hls_in_ffmpeg_with_the_streams_user_agent() {
    if !have_ffmpeg() {
        return;
    }
    let provider = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let e = Edge::start(&broadcast_config(&format!(
        "events:\n  webhooks:\n    - url: \"{}\"\n",
        hook.url("/events")
    )))
    .await;
    let (st, v) = start(
        &e,
        NET,
        programme(
            &provider,
            json!({"segment_start_number": 100, "headers": {"X-Plex-Token": "tok"}}),
        ),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "running");
    assert!(v["ffmpeg_pid"].as_u64().is_some(), "{v}");
    assert_eq!(v["hls_dir"], Value::Null);
    assert_eq!(ffmpeg_children(&e), 1);

    let p = wait_segments(&e, NET, 3).await;
    assert_eq!(media_sequence(&p), 100, "{p}");
    for s in segments(&p) {
        assert!(
            s.starts_with("live") && s.ends_with(".ts") && number(&s) >= 100,
            "bare live<digits>.ts lines: {p}"
        );
    }
    // A real player: ffmpeg reads the live playlist and its segments.
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("out.ts");
    let run = Command::new("ffmpeg")
        .args(["-v", "error", "-live_start_index", "0", "-i"])
        .arg(e.url(&format!("/broadcast/{NET}/live.m3u8")))
        .args(["-t", "2", "-c", "copy", "-f", "mpegts", "-y"])
        .arg(&file)
        .output()
        .expect("ffmpeg player");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ts = std::fs::read(&file).unwrap();
    is_valid_ts(&ts).expect("valid TS");
    assert!(decoded_frames(&ts) > 10, "decoded video");

    // The stream's user agent and the request's headers reached the provider.
    let reqs = provider.requests_to("/files/sample.mp4");
    assert!(!reqs.is_empty());
    assert!(reqs
        .iter()
        .all(|r| r.header("user-agent") == Some("EdgeDefault/1.0")));
    assert!(reqs.iter().all(|r| r.header("x-plex-token") == Some("tok")));

    // Segment requests make a viewer of the network.
    let (_, v) = status(&e, NET).await;
    assert!(v["viewers"].as_u64().unwrap_or(0) >= 1, "{v}");
    assert_eq!(
        v["current_segment_number"].as_u64().map(|n| n >= 100),
        Some(true)
    );
    // ...evented like an HLS viewer, under the network's id.
    assert!(
        hook.wait_until(T, |h| h
            .received()
            .iter()
            .any(|r| r.event_type() == "client_connected"
                && r.stream_id() == NET
                && r.body["data"]["metadata"]["type"] == "broadcast"))
            .await,
        "client_connected of the network"
    );
    assert!(v["bytes_written"].as_u64().unwrap_or(0) > 0, "{v}");
    // ...and listed with the other clients.
    let (st, clients) = api(&e, Method::GET, "/clients", None).await;
    assert_eq!(st, 200);
    assert!(
        clients["clients"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["stream_id"] == NET)),
        "{clients}"
    );
    assert!(
        clients["total_clients"].as_u64().unwrap_or(0) >= 1,
        "{clients}"
    );
    let (_, stats) = api(&e, Method::GET, "/stats", None).await;
    assert!(
        stats["proxy_stats"]["active_clients"].as_u64().unwrap_or(0) >= 1,
        "{stats}"
    );
    let (st, list) = api(&e, Method::GET, "/broadcast", None).await;
    assert_eq!(st, 200);
    assert_eq!(list["count"], 1);
    assert_eq!(list["broadcasts"][0]["network_id"], NET);

    let (st, _) = api(&e, Method::DELETE, &format!("/broadcast/{NET}"), None).await;
    assert_eq!(st, 200);
    assert!(
        eventually(T, || ffmpeg_children(&e) == 0).await,
        "ffmpeg stopped"
    );
    assert!(playlist(&e, NET).await.is_none());
    assert!(!e
        .dir()
        .join("m3u-edge-broadcast")
        .join(format!("broadcast_{NET}"))
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_programme_continues_the_numbering_after_a_discontinuity() {
    if !have_ffmpeg() {
        return;
    }
    let provider = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let e = Edge::start(&broadcast_config("")).await;
    let callback = hook.url("/api/m3u-proxy/broadcast/callback");
    let (st, v) = start(
        &e,
        NET,
        programme(
            &provider,
            json!({"duration_seconds": 4, "callback_url": callback}),
        ),
    )
    .await;
    assert_eq!(st, 200, "{v}");

    // A player polling the playlist and fetching every new segment, as
    // m3u-editor's players do, across the programme change.
    let mut fetched: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut last_msn = 0;
    let mut second_started = false;
    let mut final_first = None;
    let mut saw_discontinuity = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "timed out; fetched {}",
            fetched.len()
        );
        if let Some(p) = playlist(&e, NET).await {
            let msn = media_sequence(&p);
            assert!(
                msn >= last_msn,
                "media sequence went back: {last_msn} -> {msn}\n{p}"
            );
            last_msn = msn;
            if p.contains("#EXT-X-DISCONTINUITY\n") {
                saw_discontinuity = true;
                let lines: Vec<&str> = p.lines().collect();
                let d = lines
                    .iter()
                    .position(|l| *l == "#EXT-X-DISCONTINUITY")
                    .unwrap();
                let after = lines[d..].iter().find(|l| l.starts_with("live")).unwrap();
                assert_eq!(Some(number(after)), final_first.map(|f: u64| f + 1), "{p}");
            }
            for s in segments(&p) {
                let n = number(&s);
                if fetched.iter().any(|(f, _)| *f == n) {
                    continue;
                }
                let (st, _, body) =
                    client::get_body(&e.url(&format!("/broadcast/{NET}/segment/{s}"))).await;
                assert_eq!(st, 200, "a listed segment {s} must be there\n{p}");
                fetched.push((n, body.to_vec()));
            }
        }
        if !second_started && !callbacks(&hook, "programme_ended").is_empty() {
            let cb = callbacks(&hook, "programme_ended")[0].clone();
            let final_segment = cb["data"]["final_segment_number"].as_u64().expect("final");
            final_first = Some(final_segment);
            // m3u-editor: the status says the programme ended...
            let (st, v) = status(&e, NET).await;
            assert_eq!((st, v["status"].as_str()), (200, Some("stopped")), "{v}");
            // ...and it starts the next one at final + 1 with a discontinuity.
            let (st, v) = start(
                &e,
                NET,
                programme(
                    &provider,
                    json!({"segment_start_number": final_segment + 1, "add_discontinuity": true,
                           "seek_seconds": 2, "duration_seconds": 4, "callback_url": callback}),
                ),
            )
            .await;
            assert_eq!(st, 200, "{v}");
            second_started = true;
        }
        let second = final_first.map_or(0, |f| fetched.iter().filter(|(n, _)| *n > f).count());
        if second >= 2 && saw_discontinuity {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let f = final_first.unwrap();
    let first: Vec<_> = fetched.iter().filter(|(n, _)| *n <= f).collect();
    let second: Vec<_> = fetched.iter().filter(|(n, _)| *n > f).collect();
    assert!(!first.is_empty() && !second.is_empty());
    assert!(decoded_frames(&first[0].1) > 0, "first programme decodes");
    assert!(decoded_frames(&second[0].1) > 0, "second programme decodes");
    // The numbering is continuous: no file number missing or repeated.
    let mut nums: Vec<u64> = fetched.iter().map(|(n, _)| *n).collect();
    nums.sort();
    assert_eq!(
        nums,
        (nums[0]..nums[0] + nums.len() as u64).collect::<Vec<_>>()
    );

    // The callback: contract fields, m3u-proxy's user agent.
    let got = hook.received();
    let cb = got
        .iter()
        .find(|r| r.body["event"] == "programme_ended")
        .expect("programme_ended");
    assert_eq!(cb.header("user-agent"), Some("M3U-Proxy-Broadcast/1.0"));
    assert_eq!(cb.path, "/api/m3u-proxy/broadcast/callback");
    let b = &cb.body;
    assert_eq!(b["network_id"], NET);
    assert!(b["timestamp"].is_string());
    assert_eq!(b["dvr_mode"], false);
    assert!(b.as_object().unwrap().contains_key("hls_dir"));
    assert_eq!(b["data"]["exit_code"], 0);
    assert!(b["data"]["duration_streamed"].as_f64().unwrap() > 1.0);
    assert!(b["data"]["final_segment_number"].is_u64());
    api(&e, Method::DELETE, &format!("/broadcast/{NET}"), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_returns_the_final_segment_number_and_sends_no_callback() {
    if !have_ffmpeg() {
        return;
    }
    let provider = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let e = Edge::start(&broadcast_config("")).await;
    let (st, v) = start(
        &e,
        NET,
        programme(
            &provider,
            json!({"segment_start_number": 40, "callback_url": hook.url("/cb")}),
        ),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    wait_segments(&e, NET, 2).await;
    let (st, v) = api(&e, Method::POST, &format!("/broadcast/{NET}/stop"), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "stopped");
    assert_eq!(v["network_id"], NET);
    assert_eq!(v["message"], "Broadcast stopped");
    let final_segment = v["final_segment_number"]
        .as_u64()
        .expect("final_segment_number");
    let p = playlist(&e, NET)
        .await
        .expect("the playlist stays served after stop");
    let last = segments(&p).last().map(|s| number(s)).unwrap();
    assert!(
        final_segment >= last && final_segment >= 41,
        "{final_segment} vs {p}"
    );
    assert_eq!(ffmpeg_children(&e), 0, "ffmpeg stopped and reaped");
    let (st, _) = status(&e, NET).await;
    assert_eq!(st, 404, "a stopped network is not running");
    let (st, _) = api(&e, Method::POST, &format!("/broadcast/{NET}/stop"), None).await;
    assert_eq!(st, 404);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hook.count(), 0, "no callback on stop");
    // After a stop m3u-editor starts again at 0: a fresh start.
    let (st, v) = start(&e, NET, programme(&provider, json!({}))).await;
    assert_eq!(st, 200, "{v}");
    let p = wait_segments(&e, NET, 1).await;
    assert_eq!(number(&segments(&p)[0]), 0, "{p}");
    assert!(
        media_sequence(&p) > final_segment,
        "media sequence never goes back: {p}"
    );
    api(&e, Method::DELETE, &format!("/broadcast/{NET}"), None).await;
    assert!(eventually(T, || ffmpeg_children(&e) == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_networks_are_404_and_the_work_dir_is_cleaned_at_start_up() {
    // A leftover of an earlier run.
    let dir = tempfile::Builder::new()
        .prefix("m3u-edge-test")
        .tempdir()
        .unwrap();
    let old = dir.path().join("m3u-edge-broadcast").join("broadcast_old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("live000001.ts"), b"x").unwrap();
    let keep = dir.path().join("m3u-edge-broadcast").join("notes.txt");
    std::fs::write(&keep, b"mine").unwrap();
    let e = Edge::start_with(
        &broadcast_config(""),
        crate::support::edge::StartOpts {
            dir: Some(dir),
            ..Default::default()
        },
    )
    .await;
    assert!(!old.exists(), "earlier broadcast directories are removed");
    assert!(keep.exists(), "nothing else in the work dir is touched");
    for (method, path) in [
        (Method::GET, "/broadcast/nope/status"),
        (Method::POST, "/broadcast/nope/stop"),
        (Method::GET, "/m3u-proxy/broadcast/nope/status"),
    ] {
        let (st, v) = api(&e, method, path, None).await;
        assert_eq!(st, 404, "{path}");
        assert_eq!(v["detail"], "Broadcast not found");
    }
    for path in [
        "/broadcast/old/live.m3u8",
        "/broadcast/old/segment/live000001.ts",
    ] {
        let (st, _, _) = client::get_body(&e.url(path)).await;
        assert_eq!(st, 404, "{path}");
    }
    let (st, v) = api(&e, Method::DELETE, "/broadcast/nope", None).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = api(&e, Method::GET, "/broadcast", None).await;
    assert_eq!((st, v["count"].as_u64()), (200, Some(0)));
    // The management routes want the token; the player routes do not.
    let (st, _) = client::api(&e, Method::GET, "/broadcast/nope/status", None, None).await;
    assert_eq!(st, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_stream_url_is_broadcast_failed_in_the_callback_and_the_status() {
    if !have_ffmpeg() {
        return;
    }
    let provider = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let e = Edge::start(&broadcast_config("")).await;
    let (st, v) = start(
        &e,
        NET,
        json!({"stream_url": provider.url("/status/404"), "callback_url": hook.url("/cb")}),
    )
    .await;
    assert_eq!(st, 500, "{v}");
    assert!(
        v["detail"].as_str().is_some_and(|d| d.contains("failed")),
        "{v}"
    );
    assert!(
        hook.wait_until(T, |h| callbacks(h, "broadcast_failed")
            .iter()
            .any(|b| b["data"]["exit_code"].is_i64()))
            .await,
        "broadcast_failed callback"
    );
    let got = hook.received();
    let failed = got
        .iter()
        .find(|r| r.body["event"] == "broadcast_failed" && r.body["data"]["exit_code"].is_i64())
        .unwrap();
    let d = &failed.body["data"];
    assert_ne!(d["exit_code"], 0);
    assert!(d["error"].as_str().is_some_and(|s| !s.is_empty()), "{d}");
    assert!(
        d["final_segment_number"].is_u64() && d["duration_streamed"].is_f64(),
        "{d}"
    );
    // m3u-proxy's detail callback before it, which m3u-editor only logs.
    assert!(got
        .iter()
        .any(|r| r.body["data"]["error_type"] == "input_error"));
    let (st, v) = status(&e, NET).await;
    assert_eq!(st, 200);
    assert_eq!(v["status"], "failed");
    assert!(
        v["error_message"].as_str().is_some_and(|s| !s.is_empty()),
        "{v}"
    );
    assert_eq!(ffmpeg_children(&e), 0);
    // m3u-proxy's brake: three failed starts, then starts are refused for a while.
    let dead = json!({"stream_url": provider.url("/status/404")});
    for _ in 0..2 {
        let (st, v) = start(&e, NET, dead.clone()).await;
        assert_eq!(st, 500, "{v}");
    }
    let (st, v) = start(&e, NET, dead).await;
    assert_eq!(st, 500, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("retry allowed after"),
        "{v}"
    );
    assert_eq!(ffmpeg_children(&e), 0, "no ffmpeg for a refused start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m3u_editors_call_shapes_work_unchanged() {
    if !have_ffmpeg() {
        return;
    }
    let provider = Provider::start().await;
    let e = Edge::start(&broadcast_config("")).await;
    // NetworkBroadcastService::start's payload (m3u-editor d9ce44b), through
    // its proxyRequest: root path prefix, X-API-Token header.
    let body = json!({
        "stream_url": format!("{}#range=0-", provider.url("/files/sample.mp4")),
        "seek_seconds": 0, "duration_seconds": 30, "segment_start_number": 0,
        "add_discontinuity": false, "segment_duration": 2, "hls_list_size": 20,
        "transcode": false, "video_bitrate": null, "audio_bitrate": 192,
        "video_resolution": null, "video_codec": null, "audio_codec": null,
        "preset": null, "hwaccel": null, "preferred_audio_language": null,
        "subtitles_enabled": false, "subtitle_url": null, "subtitle_language": null,
        "subtitle_seek_seconds": 0, "callback_url": "http://127.0.0.1:9/api/m3u-proxy/broadcast/callback",
        "next_stream_config": null, "output_dir": "/dev/shm",
    });
    let (st, v) = api(
        &e,
        Method::POST,
        &format!("/m3u-proxy/broadcast/{NET}/start"),
        Some(body),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert!(v["ffmpeg_pid"].is_u64() && v["status"] == "running", "{v}");
    // isProcessRunning: status in [running, starting].
    let (st, v) = api(
        &e,
        Method::GET,
        &format!("/m3u-proxy/broadcast/{NET}/status"),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(v["status"], "running");
    // NetworkHlsController: GETs the playlist with the token, rewrites
    // ^live\d+\.ts$ lines, and redirects players to the segment route.
    wait_segments(&e, NET, 1).await;
    let resp = client::get_with(
        &e.url(&format!("/m3u-proxy/broadcast/{NET}/live.m3u8")),
        &[("X-API-Token", TOKEN)],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/vnd.apple.mpegurl"
    );
    let text = resp.text().await.unwrap();
    let segs = segments(&text);
    assert!(!segs.is_empty());
    for s in &segs {
        assert!(
            s.len() > 7 && s[4..s.len() - 3].bytes().all(|b| b.is_ascii_digit()),
            "{s} matches ^live\\d+\\.ts$"
        );
        let (st, headers, seg) =
            client::get_body(&e.url(&format!("/m3u-proxy/broadcast/{NET}/segment/{s}"))).await;
        assert_eq!(st, 200);
        assert_eq!(headers.get("content-type").unwrap(), "video/mp2t");
        is_valid_ts(&seg).expect("a TS segment");
    }
    // stop(): POST stop, then DELETE.
    let (st, v) = api(
        &e,
        Method::POST,
        &format!("/m3u-proxy/broadcast/{NET}/stop"),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert!(v["final_segment_number"].is_u64());
    let (st, _) = api(
        &e,
        Method::DELETE,
        &format!("/m3u-proxy/broadcast/{NET}"),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert!(!std::path::Path::new("/dev/shm")
        .join(format!("broadcast_{NET}"))
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_segment_route_serves_only_segment_names_of_its_network() {
    if !have_ffmpeg() {
        return;
    }
    let provider = Provider::start().await;
    let e = Edge::start(&broadcast_config("")).await;
    let (st, v) = start(&e, NET, programme(&provider, json!({}))).await;
    assert_eq!(st, 200, "{v}");
    wait_segments(&e, NET, 1).await;
    for path in [
        "programme.m3u8",
        "..%2Fbroadcast_x%2Flive000000.ts",
        "..%2F..%2Fconfig.yaml",
        "%2e%2e%2f%2e%2e%2fstate.json",
        "live000000.ts%00.m3u8",
        "live000000.ts%2F..%2F..%2F..%2Fconfig.yaml",
        "live-1.ts",
        "..",
    ] {
        let url = e.url(&format!("/broadcast/{NET}/segment/{path}"));
        let (st, _, body) = client::get_body(&url).await;
        assert_ne!(st, 200, "{path}");
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("listen") && !text.contains("#EXTM3U"),
            "{path}: {text}"
        );
    }
    let (st, _, _) =
        client::get_body(&e.url(&format!("/broadcast/{NET}/segment/../../../config.yaml"))).await;
    assert_ne!(st, 200);
    api(&e, Method::DELETE, &format!("/broadcast/{NET}"), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_networks_full_is_503_but_a_running_network_moves_on() {
    if !have_ffmpeg() {
        return;
    }
    let provider = Provider::start().await;
    let e = Edge::start(&config("broadcast:\n  max_networks: 1\n")).await;
    let (st, v) = start(&e, "net-a", programme(&provider, json!({}))).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = start(&e, "net-b", programme(&provider, json!({}))).await;
    assert_eq!(st, 503, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("max_networks"),
        "{v}"
    );
    let (st, _) = status(&e, "net-b").await;
    assert_eq!(st, 404);
    // The running network's next programme is not refused.
    let (st, v) = start(
        &e,
        "net-a",
        programme(&provider, json!({"seek_seconds": 1})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(ffmpeg_children(&e), 1);
    api(&e, Method::DELETE, "/broadcast/net-a", None).await;
    assert!(eventually(T, || ffmpeg_children(&e) == 0).await);
    let (st, v) = start(&e, "net-b", programme(&provider, json!({}))).await;
    assert_eq!(st, 200, "{v}");
    api(&e, Method::DELETE, "/broadcast/net-b", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_does_not_outlive_m3u_edge() {
    if !have_ffmpeg() {
        return;
    }
    let provider = Provider::start().await;
    let mut e = Edge::start(&broadcast_config("")).await;
    let (st, v) = start(&e, NET, programme(&provider, json!({}))).await;
    assert_eq!(st, 200, "{v}");
    let pid = v["ffmpeg_pid"].as_u64().unwrap();
    assert!(!gone(pid));
    // SIGKILL: no shutdown code runs; the parent-death signal ends ffmpeg.
    e.kill();
    assert!(
        eventually(T, || gone(pid)).await,
        "ffmpeg {pid} outlived m3u-edge"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_stops_ffmpeg_and_removes_the_files() {
    if !have_ffmpeg() {
        return;
    }
    let provider = Provider::start().await;
    let mut e = Edge::start(&broadcast_config("")).await;
    let (st, v) = start(&e, NET, programme(&provider, json!({}))).await;
    assert_eq!(st, 200, "{v}");
    let pid = v["ffmpeg_pid"].as_u64().unwrap();
    wait_segments(&e, NET, 1).await;
    let dir = e
        .dir()
        .join("m3u-edge-broadcast")
        .join(format!("broadcast_{NET}"));
    assert!(dir.exists());
    let status = e.stop().await.expect("exit status");
    assert!(status.success(), "{status}");
    assert!(gone(pid), "ffmpeg {pid} stopped before m3u-edge exited");
    assert!(!dir.exists(), "{} removed at shutdown", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_stream_config_starts_the_next_programme_at_once() {
    if !have_ffmpeg() {
        return;
    }
    let provider = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let e = Edge::start(&broadcast_config("")).await;
    let callback = hook.url("/cb");
    let next = programme(
        &provider,
        json!({"seek_seconds": 2, "duration_seconds": 3, "callback_url": callback}),
    );
    let (st, v) = start(
        &e,
        NET,
        programme(
            &provider,
            json!({"duration_seconds": 3, "callback_url": callback, "next_stream_config": next}),
        ),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let first_pid = v["ffmpeg_pid"].as_u64().unwrap();
    assert!(
        hook.wait_until(T, |h| !callbacks(h, "programme_ended").is_empty())
            .await
    );
    let ended = callbacks(&hook, "programme_ended")[0].clone();
    let d = &ended["data"];
    assert_eq!(d["auto_transitioned"], true, "{ended}");
    let new_pid = d["new_pid"].as_u64().expect("new_pid");
    assert_ne!(new_pid, first_pid);
    let final_segment = d["final_segment_number"].as_u64().unwrap();
    let (st, v) = status(&e, NET).await;
    assert_eq!(st, 200);
    if v["status"] == "running" {
        assert_eq!(v["ffmpeg_pid"].as_u64(), Some(new_pid), "{v}");
    }
    // The second programme follows the first after a discontinuity.
    let deadline = Instant::now() + T;
    loop {
        let p = playlist(&e, NET).await.unwrap_or_default();
        if segments(&p).iter().any(|s| number(s) > final_segment) {
            let lines: Vec<&str> = p.lines().collect();
            let d = lines.iter().position(|l| *l == "#EXT-X-DISCONTINUITY");
            let d = d.unwrap_or_else(|| panic!("a discontinuity: {p}"));
            let after = lines[d..].iter().find(|l| l.starts_with("live")).unwrap();
            assert_eq!(number(after), final_segment + 1, "{p}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no segment of the next programme: {p}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // It has no next one: its end is an ordinary programme_ended.
    assert!(
        hook.wait_until(T, |h| callbacks(h, "programme_ended").len() >= 2)
            .await
    );
    let second = callbacks(&hook, "programme_ended")[1].clone();
    assert_ne!(second["data"]["auto_transitioned"], true, "{second}");
    let (st, v) = status(&e, NET).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("stopped")), "{v}");
    assert_eq!(ffmpeg_children(&e), 0);
}
