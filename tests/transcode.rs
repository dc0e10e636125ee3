//! Transcoding with real ffmpeg (Debian's package, installed by the scripts):
//! `POST /transcode` as m3u-editor calls it, one ffmpeg per profile and
//! channel shared by every viewer, fed from the one provider connection of
//! the original channel, torn down with the last viewer. Skipped with a
//! message where ffmpeg is not installed.

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

const T: Duration = Duration::from_secs(30);

/// A cheap live profile: tiny picture, fastest preset (the CI box has 2 cores).
const SMALL: &str = "-fflags +genpts -i {input_url} -c:v libx264 -preset ultrafast -tune zerolatency -g 25 -vf scale=160:-2 -b:v {bitrate|200k} -c:a aac -b:a 64k -f mpegts {output_args|pipe:1}";

/// ffmpeg children of the proxy process.
fn ffmpeg_children(edge: &Edge) -> usize {
    edge.pid()
        .map_or(0, |pid| children_named(pid, "ffmpeg").len())
}

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

fn transcode_config() -> String {
    config("live:\n  stall_timeout: \"8s\"\n  give_up_after: \"30s\"\n  retry_backoff: \"1s\"\n")
}

async fn transcode(e: &Edge, body: Value) -> (u16, Value) {
    api(e, Method::POST, "/transcode", Some(body)).await
}

async fn watch(e: &Edge, id: &str, client_id: &str) -> BodyReader {
    let resp = client::get(&e.url(&format!("/stream/{id}?client_id={client_id}"))).await;
    assert_eq!(resp.status(), 200, "viewer {client_id}");
    BodyReader::new(resp)
}

/// ffprobe's view of the first video stream of some TS: (codec, width).
fn probe(ts: &[u8]) -> (String, u32) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.ts");
    std::fs::write(&path, ts).unwrap();
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,width",
            "-of",
            "csv=p=0",
        ])
        .arg(&path)
        .output()
        .expect("ffprobe");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // One line per program and per stream: the first says it.
    let mut parts = text.lines().next().unwrap_or("").split(',');
    let codec = parts.next().unwrap_or("").to_string();
    let width = parts
        .next()
        .and_then(|w| w.trim().parse().ok())
        .unwrap_or(0);
    (codec, width)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_viewers_of_a_profile_share_one_ffmpeg_and_one_provider_connection() {
    if !have_ffmpeg() {
        return;
    }
    let p = Provider::start().await;
    let e = Edge::start(&transcode_config()).await;
    let url = p.url("live/tc.ts?kbps=800");
    let (s, v) = transcode(
        &e,
        json!({
            "url": url,
            "profile": SMALL,
            "metadata": {"id": 7, "profile_id": 3, "playlist_uuid": "pl-1"},
            "headers": {"X-Provider-Key": "abc"},
        }),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let id = v["stream_id"].as_str().unwrap().to_string();
    assert_eq!(v["stream_type"], "transcoded");
    assert_eq!(p.hits("/live/"), 0, "registering opens nothing");
    // Three viewers at once: one ffmpeg (single-flight), one provider connection.
    let (a, b, c) = tokio::join!(
        watch(&e, &id, "a"),
        watch(&e, &id, "b"),
        watch(&e, &id, "c")
    );
    let mut viewers = vec![a, b, c];
    let mut first = Vec::new();
    for v in viewers.iter_mut() {
        first.push(v.read_n(188 * 350, T).await);
    }
    for got in &first {
        is_valid_ts(got).unwrap();
    }
    assert_eq!(ffmpeg_children(&e), 1);
    assert_eq!(p.open_streams("/live/"), 1);
    // The profile's codec and size.
    let more = viewers[0].read_n(188 * 1400, T).await;
    let (codec, width) = probe(&[first[0].as_ref(), more.as_ref()].concat());
    assert_eq!((codec.as_str(), width), ("h264", 160));
    // The stream's headers reached the provider.
    let req = p.requests_to("/live/tc.ts");
    assert_eq!(
        req.last().and_then(|r| r.header("x-provider-key")),
        Some("abc")
    );
    // A raw viewer of the same channel: still one provider connection.
    let raw_id = register(&e, json!({ "url": url })).await;
    let mut raw = watch(&e, &raw_id, "raw").await;
    is_valid_ts(&raw.read_n(188 * 350, T).await).unwrap();
    assert_eq!(p.open_streams("/live/"), 1);
    // m3u-editor's pool lookup finds it by metadata.
    let (_, found) = api(
        &e,
        Method::GET,
        "/streams/by-metadata?field=transcoding&value=true",
        None,
    )
    .await;
    assert_eq!(found["total_matching"], 1, "{found}");
    assert_eq!(found["matching_streams"][0]["metadata"]["profile_id"], "3");
    // Everyone leaves: ffmpeg gone, provider connection closed.
    drop(viewers);
    drop(raw);
    assert!(
        eventually(T, || ffmpeg_children(&e) == 0).await,
        "ffmpeg still running"
    );
    assert!(
        eventually(T, || p.open_streams("/live/") == 0).await,
        "provider still connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_killed_from_outside_is_restarted_and_viewers_keep_receiving() {
    if !have_ffmpeg() {
        return;
    }
    let p = Provider::start().await;
    let hook = WebhookReceiver::start().await;
    let e = Edge::start(&transcode_config()).await;
    let (s, _) = api(
        &e,
        Method::POST,
        "/webhooks",
        Some(json!({ "url": hook.url("/hook") })),
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = transcode(
        &e,
        json!({
            "url": p.url("live/k.ts?kbps=800"),
            "profile": SMALL,
            "metadata": {"profile_id": 9},
        }),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let id = v["stream_id"].as_str().unwrap().to_string();
    let mut viewer = watch(&e, &id, "v").await;
    viewer.read_n(188 * 175, T).await;
    assert!(eventually(T, || ffmpeg_children(&e) == 1).await);
    // Kill it the hard way.
    let edge_pid = e.pid().unwrap();
    let killed = Command::new("pkill")
        .args(["-KILL", "-P", &edge_pid.to_string(), "ffmpeg"])
        .status()
        .expect("pkill");
    assert!(killed.success());
    // The viewer stays connected and gets decodable TS from a new ffmpeg.
    let after = viewer.read_n(188 * 700, T).await;
    is_valid_ts(&after).unwrap();
    assert!(eventually(T, || ffmpeg_children(&e) == 1).await);
    let (_, counts) = api(
        &e,
        Method::GET,
        "/streams/counts-by-metadata?field=profile_id&values=9",
        None,
    )
    .await;
    assert_eq!(counts["counts"]["9"], 1, "{counts}");
    // Stopped as m3u-editor stops it, by metadata: all gone, and said so.
    let (s, v) = api(
        &e,
        Method::DELETE,
        "/streams/by-metadata?field=profile_id&value=9",
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(eventually(T, || ffmpeg_children(&e) == 0).await);
    assert!(eventually(T, || p.open_streams("/live/") == 0).await);
    let (_, counts) = api(
        &e,
        Method::GET,
        "/streams/counts-by-metadata?field=profile_id&values=9",
        None,
    )
    .await;
    assert_eq!(counts["counts"]["9"], 0, "{counts}");
    let stopped = hook.wait_for_events("stream_stopped", 1, T).await;
    let ours: Vec<&Value> = stopped
        .iter()
        .filter(|ev| ev["stream_id"] == id.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{stopped:?}");
    assert_eq!(ours[0]["data"]["was_transcoded"], true);
    assert_eq!(ours[0]["data"]["metadata"]["transcoding"], "true");
    assert!(!hook
        .events_of("client_disconnected")
        .iter()
        .all(|ev| ev["stream_id"] != id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_templates_and_variables_are_400s_naming_the_token() {
    let p = Provider::start().await;
    let e = Edge::start(&transcode_config()).await;
    let url = p.url("live/r.ts");
    for (profile, culprit) in [
        ("-i {input_url} -c copy -y /tmp/pwned.ts", "/tmp/pwned.ts"),
        ("-i {input_url} -i /etc/passwd -c copy", "/etc/passwd"),
        ("-i {input_url} -vf movie=/etc/passwd", "movie=/etc/passwd"),
        (
            "-i {input_url} -dump_attachment:t out",
            "-dump_attachment:t",
        ),
        ("-i {input_url} -progress http://x", "-progress"),
    ] {
        let (s, v) = transcode(&e, json!({ "url": url, "profile": profile })).await;
        assert_eq!(s, 400, "{profile}: {v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains(culprit),
            "{profile}: {v}"
        );
    }
    let (s, v) = transcode(
        &e,
        json!({
            "url": url, "profile": "default",
            "profile_variables": {"video_bitrate": "1M -y /tmp/pwned.ts"},
        }),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = transcode(&e, json!({ "url": url, "profile": "nope" })).await;
    assert_eq!(s, 400);
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("Available profiles: default, hq"),
        "{v}"
    );
    assert!(!std::path::Path::new("/tmp/pwned.ts").exists());
    // Two templates on one URL are two channels.
    let (_, a) = transcode(&e, json!({ "url": url, "profile": SMALL })).await;
    let (_, b) = transcode(
        &e,
        json!({ "url": url, "profile": SMALL.replace("160", "192") }),
    )
    .await;
    assert_ne!(a["stream_id"], b["stream_id"]);
    // Profiles are listed.
    let (s, list) = api(&e, Method::GET, "/transcode/profiles", None).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = list["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "default",
            "hq",
            "lowlatency",
            "720p",
            "1080p",
            "hevc",
            "audio"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ffmpeg_transcode_is_a_503_and_info_says_so() {
    let p = Provider::start().await;
    let e = Edge::start(&config("transcode:\n  ffmpeg: /nonexistent/ffmpeg\n")).await;
    let (s, v) = transcode(
        &e,
        json!({ "url": p.url("live/n.ts"), "profile": "default" }),
    )
    .await;
    assert_eq!(s, 503, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("ffmpeg not found"),
        "{v}"
    );
    let (_, info) = api(&e, Method::GET, "/info", None).await;
    assert_eq!(info["ffmpeg_version"], Value::Null);
    assert_eq!(info["transcoding"]["enabled"], false);
}

/// m3u-editor's HLS template (API-COMPAT-FFMPEG §3), lighter for CI: no -g,
/// so x264's default 10 s GOP would hold the first playlist back for 20 s.
const EDITOR_HLS: &str = "-fflags +genpts+discardcorrupt+igndts -i {input_url} -c:v libx264 -preset ultrafast -vf scale=160:-2 -b:v {bitrate|300k} -maxrate {maxrate|400k} -bufsize {bufsize|400k} -c:a aac -b:a {audio_bitrate|64k} -hls_time 2 -hls_list_size 30 -hls_flags program_date_time -f hls {output_args|index.m3u8}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hls_profile_serves_signed_segments_that_play_and_stops_with_its_viewers() {
    if !have_ffmpeg() {
        return;
    }
    let p = Provider::start().await;
    let e = Edge::start(&transcode_config()).await;
    let (s, v) = transcode(
        &e,
        json!({ "url": p.url("live/h.ts?kbps=800"), "profile": EDITOR_HLS }),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["format"], "hls");
    let id = v["stream_id"].as_str().unwrap().to_string();
    assert_eq!(v["playlist_url"], format!("/hls/{id}/playlist.m3u8"));
    let playlist_url = e.url(&format!("/hls/{id}/playlist.m3u8?client_id=hls1"));
    // As a player does: ask again while it starts (a cold start on a busy
    // 2-core box: provider, ffmpeg, a first segment).
    let patient = client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .unwrap();
    let mut body = bytes::Bytes::new();
    for _ in 0..3 {
        let resp = patient.get(&playlist_url).send().await.expect("playlist");
        let status = resp.status();
        body = resp.bytes().await.unwrap_or_default();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    assert!(text.starts_with("#EXTM3U"), "{text}");
    let segs: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert!(!segs.is_empty(), "{text}");
    for s in &segs {
        assert!(s.contains(&format!("/hls/{id}/segment.ts?t=")), "{s}");
        assert!(!s.contains("file:") && !s.contains("/tmp"), "{s}");
    }
    // Forced keyframes: 2 s segments, not x264's 10 s GOP.
    let durations: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("#EXTINF:"))
        .filter_map(|d| d.trim_end_matches(',').parse().ok())
        .collect();
    assert!(durations.iter().all(|d| *d < 5.0), "{durations:?}");
    let seg_url = format!("http://127.0.0.1:{}{}", e.port(), segs[0]);
    let (status, _, seg) = client::get_body(&seg_url).await;
    assert_eq!(status, 200);
    is_valid_ts(&seg).unwrap();
    assert_eq!(probe(&seg).0, "h264");
    // A tampered reference is refused.
    let (status, _, _) = client::get_body(&seg_url.replace("?t=", "?t=x")).await;
    assert_eq!(status, 403);
    // It plays in ffmpeg.
    let out = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-i",
            &playlist_url,
            "-t",
            "3",
            "-f",
            "null",
            "-",
        ])
        .output()
        .expect("ffmpeg");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nobody asks any more: the viewers go idle, the packager and ffmpeg stop.
    assert!(
        eventually(Duration::from_secs(40), || ffmpeg_children(&e) == 0).await,
        "ffmpeg still running"
    );
    assert!(eventually(T, || p.open_streams("/live/") == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_files_are_validated_inside_the_cookies_dir_only() {
    let dir = tempfile::tempdir().unwrap();
    let cookies = dir.path().join("cookies");
    std::fs::create_dir(&cookies).unwrap();
    std::fs::write(
        cookies.join("yt.txt"),
        "# Netscape HTTP Cookie File\n.youtube.com\tTRUE\t/\tTRUE\t4102444800\tSID\tsecret-sid\n.youtube.com\tTRUE\t/\tTRUE\t1000\tOLD\tx\n",
    )
    .unwrap();
    std::fs::write(cookies.join("bad.txt"), "not a cookies file\n").unwrap();
    std::fs::write(dir.path().join("outside.txt"), "x").unwrap();
    let yaml = config(&format!(
        "resolvers:\n  cookies_dir: \"{}\"\n",
        cookies.display()
    ));
    let e = Edge::start(&yaml).await;
    let check = |path: String| {
        let e = &e;
        async move {
            let q = url::form_urlencoded::byte_serialize(path.as_bytes()).collect::<String>();
            let (s, v) = api(
                e,
                Method::GET,
                &format!("/validate-cookies-file?path={q}"),
                None,
            )
            .await;
            assert_eq!(s, 200, "{v}");
            v
        }
    };
    let v = check("yt.txt".into()).await;
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["message"], "2 cookies, 1 expired");
    assert!(!v.to_string().contains("secret-sid"));
    assert_eq!(
        check(cookies.join("yt.txt").display().to_string()).await["valid"],
        true
    );
    for bad in ["bad.txt", "../outside.txt", "/etc/passwd", "missing.txt"] {
        let v = check(bad.into()).await;
        assert_eq!(v["valid"], false, "{bad}: {v}");
    }
    let v = check("/etc/passwd".into()).await;
    assert!(
        v["message"].as_str().unwrap().contains("must be inside"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_process_cap_is_a_clear_503_and_oldest_by_metadata_stops_a_transcode() {
    if !have_ffmpeg() {
        return;
    }
    let p = Provider::start().await;
    let e = Edge::start(&config(
        "live:\n  stall_timeout: \"8s\"\n  give_up_after: \"30s\"\n  retry_backoff: \"1s\"\ntranscode:\n  max_processes: 1\n",
    ))
    .await;
    let mut ids = Vec::new();
    for (i, name) in ["one", "two"].iter().enumerate() {
        let (s, v) = transcode(
            &e,
            json!({
                "url": p.url(&format!("live/cap{name}.ts?kbps=800")),
                "profile": SMALL,
                "metadata": {"profile_id": 5, "n": i},
            }),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        ids.push(v["stream_id"].as_str().unwrap().to_string());
    }
    let mut first = watch(&e, &ids[0], "a").await;
    first.read_n(188 * 100, T).await;
    // The second channel needs a second ffmpeg: refused, saying why.
    let resp = client::get(&e.url(&format!("/stream/{}?client_id=b", ids[1]))).await;
    assert_eq!(resp.status(), 503);
    let body = String::from_utf8_lossy(&client::body(resp).await).into_owned();
    assert!(body.contains("max_processes"), "{body}");
    assert_eq!(ffmpeg_children(&e), 1);
    // m3u-editor frees a slot with oldest-by-metadata on profile_id.
    let (s, v) = api(
        &e,
        Method::DELETE,
        "/streams/oldest-by-metadata?field=profile_id&value=5",
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    drop(first);
    assert!(eventually(T, || ffmpeg_children(&e) == 0).await);
    assert!(eventually(T, || p.open_streams("/live/") == 0).await);
}
