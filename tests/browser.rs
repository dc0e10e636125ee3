//! A real browser: headless Chromium plays HLS through m3u-edge with hls.js
//! (vendored in tests/data/hlsjs) from a page on another origin, as
//! m3u-editor's in-app player does: a transcoded HLS stream and a plain HLS
//! stream. The page reports `currentTime` and whether a decoded frame has
//! any picture in it. Skipped with a message where Chromium is missing
//! (`apt-get install chromium`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::common::{api, config, register};
use crate::support::edge::Edge;
use crate::support::provider::Provider;

const HLS_JS: &str = include_str!("data/hlsjs/hls.light.min.js");

const PAGE: &str = r#"<!doctype html>
<html><body>
<video id="v" muted autoplay playsinline></video>
<canvas id="c" width="64" height="36"></canvas>
<script src="/hls.js"></script>
<script>
const src = new URLSearchParams(location.search).get('src');
const report = (q) => fetch('/result?' + q);
const v = document.getElementById('v');
if (!Hls.isSupported()) { report('error=hls-unsupported'); }
const hls = new Hls({ liveSyncDurationCount: 1 });
hls.on(Hls.Events.ERROR, (e, d) => { if (d.fatal) report('error=' + encodeURIComponent(d.type + ':' + d.details)); });
hls.loadSource(src);
hls.attachMedia(v);
v.play().catch(() => {});
let t0 = null;
const check = () => {
  if (v.currentTime > 0 && t0 === null) { t0 = v.currentTime; }
  if (t0 !== null && v.currentTime > t0 + 1.5) {
    const c = document.getElementById('c').getContext('2d');
    c.drawImage(v, 0, 0, 64, 36);
    const d = c.getImageData(0, 0, 64, 36).data;
    let min = 255, max = 0;
    for (let i = 0; i < d.length; i += 4) {
      const y = (d[i] + d[i + 1] + d[i + 2]) / 3;
      min = Math.min(min, y); max = Math.max(max, y);
    }
    report('ok=1&t=' + v.currentTime.toFixed(2) + '&range=' + (max - min).toFixed(0));
    return;
  }
  setTimeout(check, 250);
};
check();
</script>
</body></html>"#;

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Serves the page and hls.js on its own origin and records `/result?…`.
async fn page_server(results: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind page server");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let results = results.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (ctype, body): (&str, &[u8]) = if path.starts_with("/hls.js") {
                    ("application/javascript", HLS_JS.as_bytes())
                } else if let Some(q) = path.strip_prefix("/result?") {
                    results.lock().push(q.to_string());
                    ("text/plain", b"ok")
                } else {
                    ("text/html", PAGE.as_bytes())
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body).await;
            });
        }
    });
    addr
}

struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Opens the page on `src` and waits for its report.
async fn play(bin: &str, page: SocketAddr, results: &Arc<Mutex<Vec<String>>>, src: &str) -> String {
    results.lock().clear();
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{page}/page.html?src={}", urlencode(src));
    let _browser = Browser(
        Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--mute-audio",
                "--autoplay-policy=no-user-gesture-required",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(&url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while tokio::time::Instant::now() < deadline {
        if let Some(r) = results.lock().first().cloned() {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    "error=no-report-in-90s".into()
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn check(report: &str, what: &str) {
    eprintln!("{what}: {report}");
    let q: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(report.as_bytes())
            .into_owned()
            .collect();
    assert_eq!(
        q.get("ok").map(String::as_str),
        Some("1"),
        "{what}: {report}"
    );
    let t: f64 = q.get("t").and_then(|t| t.parse().ok()).unwrap_or(0.0);
    assert!(t > 0.0, "{what}: currentTime did not advance: {report}");
    let range: f64 = q.get("range").and_then(|r| r.parse().ok()).unwrap_or(0.0);
    assert!(range > 10.0, "{what}: the decoded frame is blank: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_plays_transcoded_and_plain_hls_across_origins() {
    let Some(bin) = chromium() else {
        eprintln!("SKIPPED: Chromium not installed (scripts/deps.sh installs Debian's chromium)");
        return;
    };
    let ffmpeg = Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    let p = Provider::start().await;
    let e = Edge::start(&config(
        "live:\n  stall_timeout: \"8s\"\n  give_up_after: \"30s\"\n  retry_backoff: \"1s\"\n",
    ))
    .await;
    let results = Arc::new(Mutex::new(Vec::new()));
    let page = page_server(results.clone()).await;
    // A plain HLS stream.
    let id = register(&e, json!({ "url": p.url("hls-live/hls_ts/v0/index.m3u8") })).await;
    let src = e.url(&format!("/hls/{id}/playlist.m3u8"));
    let report = play(bin, page, &results, &src).await;
    check(&report, "plain HLS");
    if !ffmpeg {
        eprintln!("SKIPPED (transcoded part): ffmpeg not installed");
        return;
    }
    // m3u-editor's HLS profile, through ffmpeg.
    let template = "-fflags +genpts+discardcorrupt+igndts -i {input_url} -c:v libx264 -preset ultrafast -vf scale=320:-2 -b:v 500k -c:a aac -b:a 64k -hls_time 2 -hls_list_size 30 -f hls {output_args|index.m3u8}";
    let (s, v) = api(
        &e,
        http::Method::POST,
        "/transcode",
        Some(json!({ "url": p.url("live/browser.ts?kbps=800"), "profile": template })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let src = e.url(v["playlist_url"].as_str().unwrap());
    let report = play(bin, page, &results, &src).await;
    check(&report, "transcoded HLS");
}
