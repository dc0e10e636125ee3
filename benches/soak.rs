//! Soak harness (not Criterion: a bounded run of the whole system).
//!
//! `SOAK_SECS` (default 600) of: `SOAK_VIEWERS` (default 300) viewers
//! zapping at random across 20 live channels (some with backups), 5 HLS
//! channels and 2 transcoded channels (when ffmpeg is installed); sources
//! that drop, stall, send garbage, redirect, and answer 429/509/500 at
//! random; one webhook receiver that records and one that never answers;
//! API churn (register, by-metadata, delete); a SIGHUP at a quarter and a
//! `-u` handover at half time. At the end, with the viewers gone: provider
//! connections 0, leases 0, ffmpeg children 0, the new process's file
//! descriptors and threads back to what they were when it was quiet, RSS
//! within 10 % of its value after warm-up, and every `stream_started`
//! matched by exactly one `stream_stopped` at the receiver.
//!
//! Run: `cargo bench --bench soak` (env: SOAK_SECS, SOAK_VIEWERS).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::net::TcpListener;

use support::edge::{Edge, BIN};
use support::provider::Provider;
use support::webhook::WebhookReceiver;

const TOKEN: &str = "soak-token";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A tiny xorshift: the soak must not depend on a crate for dice.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn usage(pid: u32) -> Usage {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Usage {
        fds,
        threads: field("Threads:") as usize,
        rss_kib: field("VmRSS:"),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client")
}

/// Where the proxy listens (the same port before and after the handover).
#[derive(Clone)]
struct Target(String);

impl Target {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.0)
    }
}

async fn api(
    e: &Target,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Option<Value> {
    let mut req = http()
        .request(method, e.url(path))
        .header("X-API-Token", TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.ok()?.json().await.ok()
}

/// A webhook endpoint that accepts and never answers.
async fn hanging_webhook() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
            if held.len() > 1000 {
                held.remove(0);
            }
        }
    });
    format!("http://{addr}/hang")
}

/// One viewer: zaps between random channels until `stop`.
async fn viewer(
    e: Target,
    ids: Arc<Vec<(String, bool)>>,
    stop: Arc<AtomicBool>,
    seed: u64,
    bytes: Arc<AtomicU64>,
) {
    let mut dice = Dice(seed | 1);
    let client = http();
    while !stop.load(Ordering::Relaxed) {
        let (id, hls) = &ids[dice.below(ids.len() as u64) as usize];
        let watch = Duration::from_millis(1000 + dice.below(9000));
        let until = Instant::now() + watch;
        if *hls {
            let url = e.url(&format!("/hls/{id}/playlist.m3u8?client_id=soak{seed}"));
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                if let Ok(r) = client.get(&url).send().await {
                    let text = r.text().await.unwrap_or_default();
                    if let Some(seg) = text
                        .lines()
                        .rev()
                        .find(|l| !l.starts_with('#') && !l.is_empty())
                    {
                        let seg_url = if seg.starts_with("http") {
                            seg.to_string()
                        } else {
                            e.url(seg)
                        };
                        if let Ok(r) = client.get(&seg_url).send().await {
                            bytes.fetch_add(
                                r.bytes().await.map(|b| b.len() as u64).unwrap_or(0),
                                Ordering::Relaxed,
                            );
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
        } else if let Ok(mut r) = client.get(e.url(&format!("/stream/{id}"))).send().await {
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_secs(5), r.chunk()).await {
                    Ok(Ok(Some(c))) => {
                        bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
                    }
                    _ => break,
                }
            }
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Waits until the proxy is quiet: no clients, no channels.
async fn quiet(e: &Target, p: &Provider) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let stats = api(e, reqwest::Method::GET, "/stats", None)
            .await
            .unwrap_or(Value::Null);
        let clients = stats["proxy_stats"]["total_clients"].as_u64().unwrap_or(1);
        let live = p.open_streams("/live/");
        if clients == 0 && live == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn main() {
    let secs = env_num("SOAK_SECS", 600);
    let n_viewers = env_num("SOAK_VIEWERS", 300);
    let ffmpeg = Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    let rt = support::bench_runtime();
    rt.block_on(async move {
        let p = Arc::new(Provider::start().await);
        let hook = WebhookReceiver::start().await;
        let hang = hanging_webhook().await;
        let yaml = format!(
            "server:\n  listen: \"{{listen}}\"\n  state_file: \"{{state_file}}\"\n  grace_period: \"3s\"\n  stream_idle_ttl: \"10m\"\nhls:\n  segment_cache_bytes: 8MiB\napi:\n  token: \"{TOKEN}\"\nlog:\n  level: warn\nlive:\n  stall_timeout: \"2s\"\n  give_up_after: \"10s\"\n  retry_backoff: \"1s\"\nupstream:\n  connect_timeout: \"2s\"\n  read_timeout: \"3s\"\nproviders:\n  - name: soakprov\n    hosts: [\"127.0.0.1\"]\n    max_connections: 40\nevents:\n  webhooks:\n    - url: \"{}\"\n      timeout: \"2s\"\n      retry_attempts: 1\n    - url: \"{hang}\"\n      timeout: \"2s\"\n      retry_attempts: 0\n",
            hook.url("/soak")
        );
        let mut old = Edge::start_with(&yaml, support::edge::StartOpts { env: vec![("RUST_LOG".into(), "warn".into())], ..Default::default() }).await;
        let edge = Target(old.base());
        let start_pid = old.pid().unwrap_or(0);
        let start_usage = usage(start_pid);

        // Channels: 20 live (a few misbehave), 5 HLS, 2 transcoded.
        let mut ids: Vec<(String, bool)> = Vec::new();
        let mut live_paths = Vec::new();
        for i in 0..20 {
            let path = format!("/live/soak{i}.ts");
            let query = match i % 10 {
                3 => "?kbps=400&drop_after=400000",
                5 => "?kbps=400&stall_after=300000",
                7 => "?kbps=400&garbage=1",
                _ => "?kbps=400",
            };
            let url = if i % 10 == 9 {
                p.url(&format!("redirect/1/live/soak{i}.ts?kbps=400"))
            } else {
                p.url(&format!("{}{query}", &path[1..]))
            };
            let body = json!({
                "url": url,
                "failover_urls": [p.url(&format!("live/backup{i}.ts?kbps=400"))],
                "metadata": {"playlist_uuid": format!("pl{}", i % 3), "channel": i},
            });
            if let Some(v) = api(&edge, reqwest::Method::POST, "/streams", Some(body)).await {
                if let Some(id) = v["stream_id"].as_str() {
                    ids.push((id.to_string(), false));
                }
            }
            live_paths.push(path);
        }
        for i in 0..5 {
            let url = p.url(&format!("hls-live/hls_ts/v0/index.m3u8?soak={i}"));
            if let Some(v) = api(&edge, reqwest::Method::POST, "/streams", Some(json!({ "url": url }))).await {
                if let Some(id) = v["stream_id"].as_str() {
                    ids.push((id.to_string(), true));
                }
            }
        }
        if ffmpeg {
            for i in 0..2 {
                let body = json!({
                    "url": p.url(&format!("live/soak{i}.ts?kbps=400")),
                    "profile": "-i {input_url} -c:v libx264 -preset ultrafast -g 25 -vf scale=160:-2 -c:a aac -b:a 48k -f mpegts {output_args}",
                });
                if let Some(v) = api(&edge, reqwest::Method::POST, "/transcode", Some(body)).await {
                    if let Some(id) = v["stream_id"].as_str() {
                        ids.push((id.to_string(), false));
                    }
                }
            }
        }
        let ids = Arc::new(ids);
        println!(
            "soak: {secs} s, {n_viewers} viewers over {} channels (20 live, 5 HLS, {} transcoded), release build",
            ids.len(),
            if ffmpeg { 2 } else { 0 }
        );

        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for v in 0..n_viewers {
            tasks.push(tokio::spawn(viewer(edge.clone(), ids.clone(), stop.clone(), 0x9E37_79B9 + v * 7919, bytes.clone())));
        }
        // Chaos: providers answer 429/509/500 at random for a while.
        let chaos = {
            let (stop, p2) = (stop.clone(), p.clone());
            let paths = live_paths.clone();
            tokio::spawn(async move {
                let mut dice = Dice(42);
                while !stop.load(Ordering::Relaxed) {
                    let path = &paths[dice.below(paths.len() as u64) as usize];
                    let code = [429u16, 509, 500][dice.below(3) as usize];
                    p2.set_status(path, code);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    p2.clear_status(path);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            })
        };
        // API churn.
        let churn = {
            let (stop, e, p2) = (stop.clone(), edge.clone(), p.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let url = p2.url(&format!("live/churn{}.ts", n % 50));
                    let _ = api(&e, reqwest::Method::POST, "/streams", Some(json!({ "url": url, "metadata": {"churn": "1"} }))).await;
                    let _ = api(&e, reqwest::Method::GET, "/streams/by-metadata?field=churn&value=1", None).await;
                    let _ = api(&e, reqwest::Method::GET, "/streams/counts-by-metadata?field=playlist_uuid&values=pl0,pl1,pl2", None).await;
                    let _ = api(&e, reqwest::Method::DELETE, "/streams/by-metadata?field=churn&value=1", None).await;
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                }
            })
        };

        let t0 = Instant::now();
        let quarter = Duration::from_secs(secs / 4);
        tokio::time::sleep(quarter).await;
        let _ = Command::new("kill").args(["-HUP", &start_pid.to_string()]).status();
        println!("t={:.0}s: SIGHUP sent", t0.elapsed().as_secs_f64());
        // The handover at half time leaves the new process half the run.
        tokio::time::sleep(quarter).await;
        // The -u handover.
        let log = std::fs::File::create(old.dir().join("edge-new.log")).expect("log");
        let mut new = Command::new(BIN)
            .args(["-u", "-c"])
            .arg(old.config_path())
            .current_dir(old.dir())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn new");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = Command::new("kill").args(["-QUIT", &start_pid.to_string()]).status();
        let gone = Instant::now() + Duration::from_secs(30);
        while old.is_running() && Instant::now() < gone {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let new_pid = new.id();
        println!("t={:.0}s: -u handover: old process exited: {}", t0.elapsed().as_secs_f64(), !old.is_running());
        // The new process under load: its RSS every 15 s. Warm-up is its
        // first two minutes: the HLS segment cache (8 MiB here; its segment
        // URLs are all new) is full by then, and RSS may grow no further.
        let handed_over = Instant::now();
        let mut samples = Vec::new();
        let mut warm = usage(new_pid);
        while t0.elapsed() < Duration::from_secs(secs) {
            tokio::time::sleep(Duration::from_secs(15)).await;
            let u = usage(new_pid);
            samples.push(format!("{:.1}", u.rss_kib as f64 / 1024.0));
            if handed_over.elapsed() <= Duration::from_secs(125) {
                warm = u;
            }
        }
        let loaded = usage(new_pid);
        println!("new process RSS under load every 15 s (MiB): {}", samples.join(", "));
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
        chaos.abort();
        churn.abort();
        p.clear_overrides();
        quiet(&edge, &p).await;
        // HLS viewers leave by going idle; give the sweep (and its heap
        // trim, every 30 s) time.
        tokio::time::sleep(Duration::from_secs(35)).await;
        let end = usage(new_pid);
        let stats = api(&edge, reqwest::Method::GET, "/stats", None).await.unwrap_or(Value::Null);
        let leases: u64 = stats["providers"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["connections"].as_u64().or(p["in_use"].as_u64())).sum())
            .unwrap_or(0);
        let kids = support::procs::children_named(new_pid, "ffmpeg").len();
        let provider_conns = p.open_streams("/live/");
        // Events: per stream, every stream_started is matched by one
        // stream_stopped. During the handover both processes run a channel
        // of the same stream for a moment (the old one's stop comes after
        // the new one's start), so a stream may be open twice, never more.
        let mut open: HashMap<String, i64> = HashMap::new();
        let mut too_many = 0;
        // Deleting a stream nobody watched also says stream_stopped (as
        // m3u-proxy does): not a stop of a started one.
        let mut stops_without_start = 0;
        for ev in hook.received() {
            let body = &ev.body;
            let id = body["stream_id"].as_str().unwrap_or("").to_string();
            match body["event_type"].as_str() {
                Some("stream_started") => {
                    let n = open.entry(id).or_insert(0);
                    *n += 1;
                    if *n > 2 {
                        too_many += 1;
                    }
                }
                Some("stream_stopped") => {
                    let n = open.entry(id).or_insert(0);
                    if *n == 0 {
                        stops_without_start += 1;
                    } else {
                        *n -= 1;
                    }
                }
                _ => {}
            }
        }
        let unmatched: i64 = open.values().sum::<i64>() + too_many;
        let started = hook.events_of("stream_started").len();
        let stopped = hook.events_of("stream_stopped").len();
        println!("\nbytes to viewers: {:.1} MB; events received: {} ({} stream_started, {} stream_stopped, {} of them for streams deleted unwatched)", bytes.load(Ordering::Relaxed) as f64 / 1e6, hook.received().len(), started, stopped, stops_without_start);
        println!("\n| check | value | expected | |");
        println!("|---|---:|---:|---|");
        let row = |name: &str, v: String, want: String, ok: bool| {
            println!("| {name} | {v} | {want} | {} |", if ok { "ok" } else { "FAIL" });
            ok
        };
        let mut all = true;
        all &= row("provider connections", provider_conns.to_string(), "0".into(), provider_conns == 0);
        all &= row("leases in use (/stats)", leases.to_string(), "0".into(), leases == 0);
        all &= row("ffmpeg children", kids.to_string(), "0".into(), kids == 0);
        all &= row("open fds, end vs start (first process)", format!("{} vs {}", end.fds, start_usage.fds), "equal".into(), end.fds <= start_usage.fds + 2);
        all &= row("threads, end vs start", format!("{} vs {}", end.threads, start_usage.threads), "equal".into(), end.threads <= start_usage.threads);
        all &= row("RSS end vs after warm-up (MiB)", format!("{:.1} vs {:.1}", end.rss_kib as f64 / 1024.0, warm.rss_kib as f64 / 1024.0), "≤ 110 %".into(), end.rss_kib as f64 <= warm.rss_kib as f64 * 1.10);
        all &= row("stream_started without one stream_stopped", unmatched.to_string(), "0".into(), unmatched == 0);
        println!("(RSS under load at the end: {:.1} MiB; first process at start: {:.1} MiB)", loaded.rss_kib as f64 / 1024.0, start_usage.rss_kib as f64 / 1024.0);
        println!("\nsoak: {}", if all { "PASS" } else { "FAIL" });
        let _ = new.kill();
        let _ = new.wait();
        drop(old);
    });
}
