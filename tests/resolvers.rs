//! Resolvers with the real tools (streamlink and yt-dlp from PyPI, installed
//! by `scripts/deps.sh --test-tools` into `target/resolvers-venv`, or named
//! by `M3U_EDGE_STREAMLINK` / `M3U_EDGE_YTDLP`): `POST /transcode` with
//! `resolver` as m3u-editor sends it, against pages and streams of the
//! loopback provider. Resolved media URLs are fetched by the hub (one
//! provider connection for every viewer); HLS plays through the tool's
//! stdout; an expired signed URL is resolved again while viewers stay;
//! arguments outside the allowlist and cookies outside the cookies dir are
//! 400s naming what was refused. Skipped with a message where the tools are
//! not installed (the argument and cookies checks run anyway).

use std::path::PathBuf;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};

use crate::common::{api, config};
use crate::support::client::{self, BodyReader};
use crate::support::edge::Edge;
use crate::support::eventually::eventually;
use crate::support::procs::children_named;
use crate::support::provider::Provider;
use crate::support::ts_check::is_valid_ts;

const T: Duration = Duration::from_secs(40);

/// The tool: `$env` if set, else the venv the scripts make.
fn tool(env: &str, name: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target/resolvers-venv/bin")
            .join(name)
    });
    let ok = std::process::Command::new(&path)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(path)
    } else {
        eprintln!("SKIPPED: {name} not installed (scripts/deps.sh --test-tools installs it, or set {env})");
        None
    }
}

fn streamlink() -> Option<PathBuf> {
    tool("M3U_EDGE_STREAMLINK", "streamlink")
}

fn ytdlp() -> Option<PathBuf> {
    tool("M3U_EDGE_YTDLP", "yt-dlp")
}

fn resolver_config(streamlink: &str, ytdlp: &str, extra: &str) -> String {
    config(&format!(
        "live:\n  stall_timeout: \"6s\"\n  give_up_after: \"40s\"\n  retry_backoff: \"1s\"\n\
         resolvers:\n  streamlink: \"{streamlink}\"\n  yt_dlp: \"{ytdlp}\"\n{extra}"
    ))
}

async fn transcode(e: &Edge, body: Value) -> (u16, Value) {
    api(e, Method::POST, "/transcode", Some(body)).await
}

async fn watch(e: &Edge, id: &str, client_id: &str) -> BodyReader {
    let resp = client::get(&e.url(&format!("/stream/{id}?client_id={client_id}"))).await;
    assert_eq!(resp.status(), 200, "viewer {client_id}");
    BodyReader::new(resp)
}

fn children(e: &Edge, name: &str) -> usize {
    e.pid().map_or(0, |pid| children_named(pid, name).len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamlink_httpstream_resolves_to_a_url_the_hub_fetches_once_for_every_viewer() {
    let Some(sl) = streamlink() else { return };
    let p = Provider::start().await;
    let e = Edge::start(&resolver_config(
        &sl.display().to_string(),
        "/nonexistent/yt-dlp",
        "",
    ))
    .await;
    let (s, info) = api(&e, Method::GET, "/info", None).await;
    assert_eq!(s, 200);
    let out = std::process::Command::new(&sl)
        .arg("--version")
        .output()
        .unwrap();
    let want = String::from_utf8_lossy(&out.stdout)
        .trim()
        .replace("streamlink ", "");
    assert_eq!(info["streamlink_version"], json!(want), "{info}");
    assert_eq!(info["ytdlp_version"], Value::Null, "{info}");

    let page = format!("httpstream://{}", p.url("live/sl.ts?kbps=2000"));
    let (s, v) = transcode(
        &e,
        json!({
            "url": page,
            "resolver": "streamlink",
            "resolver_args": "",
            "cookies_path": null,
            "user_agent": "ResolverUA/2.0",
            "headers": {"X-Provider-Key": "k1"},
            "metadata": {"id": 5, "profile_id": 9},
        }),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stream_type"], "resolver");
    assert_eq!(v["format"], "mpegts");
    assert_eq!(v["resolver"], "streamlink");
    let id = v["stream_id"].as_str().unwrap().to_string();
    assert_eq!(v["stream_endpoint"], format!("/stream/{id}"));

    let (mut a, mut b) = tokio::join!(watch(&e, &id, "a"), watch(&e, &id, "b"));
    let da = a.read_n(188 * 2000, T).await;
    let db = b.read_n(188 * 2000, T).await;
    is_valid_ts(&da).unwrap();
    is_valid_ts(&db).unwrap();
    // One provider connection for both, made by the hub with the stream's
    // user agent and headers; streamlink is gone once it named the URL.
    assert_eq!(p.open_streams("/live/"), 1);
    let reqs = p.requests_to("/live/sl.ts");
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].header("user-agent"), Some("ResolverUA/2.0"));
    assert_eq!(reqs[0].header("x-provider-key"), Some("k1"));
    assert_eq!(children(&e, "streamlink"), 0);
    // Not an HLS stream: its page is never fetched as a playlist.
    let (s, _, _) = client::get_body(&e.url(&format!("/hls/{id}/playlist.m3u8"))).await;
    assert_eq!(s, 404);
    drop((a, b));
    assert!(eventually(T, || p.open_streams("/live/") == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamlink_hls_plays_through_its_stdout_and_stops_with_the_last_viewer() {
    let Some(sl) = streamlink() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hls.txt"),
        "# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t4102444800\tsl\tcookie-for-streamlink\n",
    )
    .unwrap();
    let p = Provider::start().await;
    let e = Edge::start(&resolver_config(
        &sl.display().to_string(),
        "/nonexistent/yt-dlp",
        &format!("  cookies_dir: \"{}\"\n", dir.path().display()),
    ))
    .await;
    let page = format!(
        "hls://{}",
        p.url("hls-live/hls_ts/v0/index.m3u8?seg_ms=1000")
    );
    let (s, v) = transcode(
        &e,
        json!({
            "url": page,
            "resolver": "streamlink",
            "resolver_args": "best --hls-live-edge 2",
            "cookies_path": "hls.txt",
            "user_agent": "SlUA/3",
            "headers": {"X-Provider-Key": "k2"},
        }),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let id = v["stream_id"].as_str().unwrap().to_string();
    let (mut a, mut b) = tokio::join!(watch(&e, &id, "a"), watch(&e, &id, "b"));
    let da = a.read_n(188 * 500, T).await;
    let db = b.read_n(188 * 500, T).await;
    is_valid_ts(&da).unwrap();
    is_valid_ts(&db).unwrap();
    // One streamlink plays it for both viewers.
    assert_eq!(children(&e, "streamlink"), 1);
    // streamlink fetched the playlist with the stream's user agent, headers
    // and the cookies file (`--http-cookies-file`).
    let reqs = p.requests_to("/hls-live/hls_ts/v0/index.m3u8");
    let last = reqs.last().expect("playlist fetched");
    assert_eq!(last.header("user-agent"), Some("SlUA/3"));
    assert_eq!(last.header("x-provider-key"), Some("k2"));
    assert!(
        last.header("cookie")
            .is_some_and(|c| c.contains("sl=cookie-for-streamlink")),
        "{last:?}"
    );
    drop((a, b));
    assert!(
        eventually(T, || children(&e, "streamlink") == 0).await,
        "streamlink stopped and reaped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ytdlp_generic_page_resolves_to_the_media_url_and_sends_the_cookies() {
    let Some(yt) = ytdlp() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("site.txt"),
        "# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t4102444800\tsession\tcookie-value-1\n",
    )
    .unwrap();
    let p = Provider::start().await;
    let extra = format!("  cookies_dir: \"{}\"\n", dir.path().display());
    let e = Edge::start(&resolver_config(
        "/nonexistent/streamlink",
        &yt.display().to_string(),
        &extra,
    ))
    .await;
    let (_, info) = api(&e, Method::GET, "/info", None).await;
    assert_eq!(info["streamlink_version"], Value::Null, "{info}");
    assert!(
        info["ytdlp_version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{info}"
    );
    let page = p.url("page?src=/live/yt.ts%3Fkbps%3D2000");
    let (s, v) = transcode(
        &e,
        json!({"url": page, "resolver": "ytdlp", "resolver_args": "", "cookies_path": "site.txt", "user_agent": "YtUA/1"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["resolver"], "ytdlp");
    let id = v["stream_id"].as_str().unwrap().to_string();
    let (mut a, mut b) = tokio::join!(watch(&e, &id, "a"), watch(&e, &id, "b"));
    let da = a.read_n(188 * 2000, T).await;
    let db = b.read_n(188 * 2000, T).await;
    is_valid_ts(&da).unwrap();
    is_valid_ts(&db).unwrap();
    assert_eq!(p.open_streams("/live/"), 1);
    let page_reqs = p.requests_to("/page");
    assert!(!page_reqs.is_empty());
    assert_eq!(page_reqs[0].header("user-agent"), Some("YtUA/1"));
    assert!(
        page_reqs[0]
            .header("cookie")
            .is_some_and(|c| c.contains("session=cookie-value-1")),
        "{page_reqs:?}"
    );
    let media = p.requests_to("/live/yt.ts");
    assert_eq!(media.len(), 1, "{media:?}");
    assert_eq!(media[0].header("user-agent"), Some("YtUA/1"));
    assert_eq!(children(&e, "yt-dlp"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_resolved_url_is_resolved_again_while_viewers_stay() {
    let Some(yt) = ytdlp() else { return };
    let p = Provider::start().await;
    let e = Edge::start(&resolver_config(
        "/nonexistent/streamlink",
        &yt.display().to_string(),
        "",
    ))
    .await;
    // Every resolution names a URL that works for 4 s, then is cut and refused.
    let page = p.url("page?src=/live/exp.ts%3Fkbps%3D1000&ttl_ms=4000");
    let (s, v) = transcode(
        &e,
        json!({"url": page, "resolver": "ytdlp", "resolver_args": "best"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let id = v["stream_id"].as_str().unwrap().to_string();
    let mut viewer = watch(&e, &id, "v").await;
    viewer.read_n(188 * 100, T).await;
    // Read on through at least two expiries: the viewer never sees an end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while p.requests_to("/expiring/").len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "no re-resolution");
        viewer.read_n(188 * 100, T).await;
    }
    let more = viewer.read_n(188 * 1000, T).await;
    is_valid_ts(&more).unwrap();
    assert!(
        p.requests_to("/page").len() >= 3,
        "the page was resolved again"
    );
    // Each media URL was used once: the expired one was not retried.
    let urls: Vec<String> = p
        .requests_to("/expiring/")
        .iter()
        .map(|r| r.path.clone())
        .collect();
    let mut unique = urls.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), urls.len(), "{urls:?}");
    let (_, st) = api(&e, Method::GET, &format!("/streams/{id}"), None).await;
    assert_eq!(st["client_count"], 1, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_outside_the_allowlist_and_cookies_outside_the_dir_are_400s() {
    let dir = tempfile::tempdir().unwrap();
    let cookies = dir.path().join("cookies");
    std::fs::create_dir(&cookies).unwrap();
    std::fs::write(cookies.join("bad.txt"), "not cookies\n").unwrap();
    std::fs::write(
        dir.path().join("outside.txt"),
        "# Netscape HTTP Cookie File\n",
    )
    .unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.path().join("outside.txt"), cookies.join("link.txt")).unwrap();
    // No tools needed: the checks come first.
    let e = Edge::start(&resolver_config(
        "/nonexistent/streamlink",
        "/nonexistent/yt-dlp",
        &format!("  cookies_dir: \"{}\"\n", cookies.display()),
    ))
    .await;
    let url = "http://127.0.0.1:9/page";
    for (resolver, args, option) in [
        (
            "ytdlp",
            "best --exec 'before_dl:touch /tmp/pwned'",
            "--exec",
        ),
        ("ytdlp", "-o /tmp/x.ts", "-o"),
        ("ytdlp", "--config-locations /tmp/c", "--config-locations"),
        ("ytdlp", "--output=/tmp/x", "--output"),
        ("streamlink", "best --plugin-dirs /tmp", "--plugin-dirs"),
        ("streamlink", "best --config /tmp/c", "--config"),
        ("streamlink", "best --output /tmp/x", "--output"),
        (
            "streamlink",
            "best --player-external-http",
            "--player-external-http",
        ),
    ] {
        let (s, v) = transcode(
            &e,
            json!({"url": url, "resolver": resolver, "resolver_args": args}),
        )
        .await;
        assert_eq!(s, 400, "{args}: {v}");
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(&format!("'{option}'")), "{args}: {detail}");
    }
    let (s, v) = transcode(&e, json!({"url": url, "resolver": "streamlink", "resolver_args": "best --hls-live-edge '--exec=x'"})).await;
    assert_eq!(s, 400, "{v}");
    for path in [
        "../outside.txt",
        "/etc/passwd",
        "link.txt",
        "missing.txt",
        "bad.txt",
    ] {
        let (s, v) = transcode(
            &e,
            json!({"url": url, "resolver": "ytdlp", "cookies_path": path}),
        )
        .await;
        assert_eq!(s, 400, "{path}: {v}");
        assert!(
            v["detail"]
                .as_str()
                .unwrap_or_default()
                .starts_with("cookies_path"),
            "{v}"
        );
    }
    // Allowed arguments pass the checks; the missing tool is then a clear 503.
    let (s, v) = transcode(
        &e,
        json!({"url": url, "resolver": "streamlink", "resolver_args": "best --hls-live-edge 3"}),
    )
    .await;
    assert_eq!(s, 503, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("streamlink not found"),
        "{v}"
    );
    let (s, v) = transcode(&e, json!({"url": url, "resolver": "vlc"})).await;
    assert_eq!(s, 422, "{v}");
    let (_, info) = api(&e, Method::GET, "/info", None).await;
    assert_eq!(info["streamlink_version"], Value::Null);
    assert_eq!(info["ytdlp_version"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_url_that_expired_meanwhile_is_resolved_again_on_the_next_join() {
    let Some(yt) = ytdlp() else { return };
    let p = Provider::start().await;
    let e = Edge::start(&resolver_config(
        "/nonexistent/streamlink",
        &yt.display().to_string(),
        "",
    ))
    .await;
    let page = p.url("page?src=/live/later.ts%3Fkbps%3D1000&ttl_ms=3000");
    let (s, v) = transcode(&e, json!({"url": page, "resolver": "ytdlp"})).await;
    assert_eq!(s, 200, "{v}");
    let id = v["stream_id"].as_str().unwrap().to_string();
    let mut first = watch(&e, &id, "first").await;
    first.read_n(188 * 100, T).await;
    drop(first);
    assert!(eventually(T, || p.open_streams("/live/") == 0).await);
    let before = p.requests_to("/expiring/");
    let n = before.len();
    let expired = before[n - 1].path.clone();
    // The cached URL is past its deadline now.
    let deadline: u64 = expired.split('/').nth(2).unwrap().parse().unwrap();
    while crate::support::resolver_site::now_ms() <= deadline + 200 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut second = watch(&e, &id, "second").await;
    is_valid_ts(&second.read_n(188 * 1000, T).await).unwrap();
    // The cached URL was tried (refused), then the page resolved again.
    let used: Vec<String> = p
        .requests_to("/expiring/")
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(used.len() >= n + 2, "{used:?}");
    assert_eq!(used[n], expired, "{used:?}");
    assert_ne!(used[n + 1], expired, "{used:?}");
    assert!(
        p.requests_to("/page").len() > n,
        "the page was resolved again"
    );
}

/// Page fetches (resolutions) for two viewers one after the other, the
/// channel closed in between, with `extra` config.
async fn resolutions_for_two_joins(yt: &std::path::Path, extra: &str) -> usize {
    let p = Provider::start().await;
    let e = Edge::start(&resolver_config(
        "/nonexistent/streamlink",
        &yt.display().to_string(),
        extra,
    ))
    .await;
    let page = p.url("page?src=/live/ttl.ts%3Fkbps%3D1000");
    let (s, v) = transcode(&e, json!({"url": page, "resolver": "ytdlp"})).await;
    assert_eq!(s, 200, "{v}");
    let id = v["stream_id"].as_str().unwrap().to_string();
    for viewer in ["first", "second"] {
        let mut w = watch(&e, &id, viewer).await;
        is_valid_ts(&w.read_n(188 * 100, T).await).unwrap();
        drop(w);
        assert!(eventually(T, || p.open_streams("/live/") == 0).await);
    }
    p.requests_to("/page").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_ttl_decides_whether_a_resolution_is_reused() {
    let Some(yt) = ytdlp() else { return };
    // Default (5 min): the second join reuses the first resolution.
    assert_eq!(resolutions_for_two_joins(&yt, "").await, 1);
    // "0s": every start resolves the page again.
    assert_eq!(
        resolutions_for_two_joins(&yt, "  url_ttl: \"0s\"\n").await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_file_is_remuxed_to_mpegts_shared_by_viewers_and_ends_with_the_file() {
    let Some(yt) = ytdlp() else { return };
    if !std::process::Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: ffmpeg not installed (scripts/deps.sh installs it)");
        return;
    }
    let p = Provider::start().await;
    let e = Edge::start(&resolver_config(
        "/nonexistent/streamlink",
        &yt.display().to_string(),
        "",
    ))
    .await;
    let page = p.url("page?src=/files/sample.mp4");
    let (s, v) = transcode(
        &e,
        json!({"url": page, "resolver": "ytdlp", "user_agent": "RemuxUA/1"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let id = v["stream_id"].as_str().unwrap().to_string();
    let (a, b) = tokio::join!(watch(&e, &id, "a"), watch(&e, &id, "b"));
    // One ffmpeg remuxes for both viewers, reading the file as the stream's
    // user agent.
    assert_eq!(children(&e, "ffmpeg"), 1);
    let media = p.requests_to("/files/sample.mp4");
    assert!(!media.is_empty());
    assert!(
        media
            .iter()
            .all(|r| r.header("user-agent") == Some("RemuxUA/1")),
        "{media:?}"
    );
    // The 10 s file plays through (at its own pace) and the stream ends.
    for viewer in [a, b] {
        let mut resp = viewer.into_inner();
        let (body, end) = client::read_to_end(&mut resp, T).await;
        assert!(matches!(end, client::BodyEnd::Complete), "{end:?}");
        assert!(body.len() > 188 * 1000, "{}", body.len());
        is_valid_ts(&body).unwrap();
    }
    assert!(
        eventually(T, || children(&e, "ffmpeg") == 0).await,
        "ffmpeg reaped"
    );
    // Played once: the page was not resolved again for a second round.
    assert_eq!(p.requests_to("/page").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_deny_private_upstreams_a_private_page_never_reaches_the_tool() {
    let Some(yt) = ytdlp() else { return };
    let p = Provider::start().await;
    let e = Edge::start(&resolver_config(
        "/nonexistent/streamlink",
        &yt.display().to_string(),
        "security:\n  deny_private_upstreams: true\n",
    ))
    .await;
    // Both the IP literal and a name that resolves to loopback.
    for host in ["127.0.0.1", "localhost"] {
        let page = format!("http://{host}:{}/page?src=/live/priv.ts", p.port());
        let (s, v) = transcode(&e, json!({"url": page, "resolver": "ytdlp"})).await;
        assert_eq!(s, 200, "{v}");
        let id = v["stream_id"].as_str().unwrap().to_string();
        let resp = client::get(&e.url(&format!("/stream/{id}"))).await;
        assert_ne!(resp.status(), 200, "{host}");
    }
    assert_eq!(p.requests().len(), 0, "{:?}", p.requests());
}
