//! Transcoding load harness (not Criterion: it measures a running system).
//!
//! One 0.8 Mbit/s live channel from the loopback test provider, transcoded
//! by the real release `m3u-edge` with a small H.264 profile. Prints:
//! - zap time to the first byte of the transcoded channel (request → first
//!   body byte), 20 zaps on a warm original channel (another viewer keeps it
//!   open) and 20 on a cold one, p50/p90, beside the floor: ffmpeg run by
//!   the bench itself with the same arguments on the same input (first input
//!   byte → first output byte);
//! - CPU of m3u-edge (without its ffmpeg child) and of the ffmpeg child with
//!   1 and with N viewers of the transcoded channel.
//!
//! Run: `cargo bench --bench transcode` (env: TRANSCODE_SECS (default 20),
//! TRANSCODE_VIEWERS (default 100), TRANSCODE_ZAPS (default 20)).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::edge::Edge;
use support::provider::Provider;

const TEMPLATE: &str = "-i {input_url} -c:v libx264 -preset ultrafast -tune zerolatency -g 25 -vf scale=320:-2 -b:v 500k -c:a aac -b:a 64k -f mpegts {output_args}";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config() -> String {
    "server:\n  listen: \"{listen}\"\n  state_file: \"{state_file}\"\n  grace_period: \"0s\"\n  threads: 2\nlog:\n  level: warn\nlive:\n  stall_timeout: \"8s\"\ntranscode:\n  max_processes: 4\n".to_string()
}

/// utime + stime ticks of a process.
fn ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// Opens `/stream/{id}`: the socket at its body, and request → first body byte.
async fn open(addr: &str, id: &str) -> Option<(TcpStream, Duration)> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET /stream/{id} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            if !head.starts_with(b"HTTP/1.1 200") {
                return None;
            }
            if head.len() > end + 4 {
                return Some((s, t0.elapsed()));
            }
            let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            return (n > 0).then(|| (s, t0.elapsed()));
        }
    }
}

/// Keeps reading a viewer's socket until `until`.
async fn drain(mut s: TcpStream, until: Instant) {
    let mut buf = vec![0u8; 256 * 1024];
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn api_post(e: &Edge, path: &str, body: serde_json::Value) -> serde_json::Value {
    let resp = reqwest::Client::new()
        .post(e.url(path))
        .json(&body)
        .send()
        .await
        .expect("api");
    resp.json().await.expect("json")
}

/// The floor: ffmpeg with the proxy's own arguments, fed the provider's live
/// bytes by the bench: first input byte → first output byte.
async fn ffmpeg_floor(args: &[String], source_url: &str) -> Option<f64> {
    let mut child = tokio::process::Command::new("ffmpeg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let mut stdout = child.stdout.take()?;
    let mut resp = reqwest::get(source_url).await.ok()?;
    let first = resp.chunk().await.ok()??;
    let t0 = Instant::now();
    stdin.write_all(&first).await.ok()?;
    let feed = tokio::spawn(async move {
        while let Ok(Some(c)) = resp.chunk().await {
            if stdin.write_all(&c).await.is_err() {
                break;
            }
        }
    });
    let mut b = [0u8; 188];
    let got = tokio::time::timeout(Duration::from_secs(30), stdout.read(&mut b)).await;
    let took = t0.elapsed().as_secs_f64() * 1000.0;
    feed.abort();
    let _ = child.kill().await;
    matches!(got, Ok(Ok(n)) if n > 0).then_some(took)
}

async fn zaps(e: &Edge, p: &Provider, warm: bool, n: u64) -> Vec<f64> {
    let addr = format!("127.0.0.1:{}", e.port());
    let mut out = Vec::new();
    for i in 0..n {
        let url = p.url(&format!(
            "live/zap{}{i}.ts?kbps=800",
            if warm { "w" } else { "c" }
        ));
        let raw = api_post(e, "/streams", serde_json::json!({ "url": url })).await;
        let t = api_post(
            e,
            "/transcode",
            serde_json::json!({ "url": url, "profile": TEMPLATE }),
        )
        .await;
        let (Some(raw_id), Some(id)) = (raw["stream_id"].as_str(), t["stream_id"].as_str()) else {
            continue;
        };
        // Warm: a raw viewer has the original channel open, past its start.
        let keep = if warm {
            let v = open(&addr, raw_id).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            v
        } else {
            None
        };
        if let Some((s, took)) = open(&addr, id).await {
            out.push(took.as_secs_f64() * 1000.0);
            drop(s);
        }
        drop(keep);
        // Let the channel, ffmpeg and the provider connection go.
        let pid = e.pid().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while (!support::procs::children_named(pid, "ffmpeg").is_empty()
            || p.open_streams("/live/") > 0)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
}

/// CPU (cores) of m3u-edge and of its ffmpeg over `secs` with `n` viewers.
async fn cpu_with(e: &Edge, id: &str, n: u64, secs: u64) -> (f64, f64, usize) {
    let addr = format!("127.0.0.1:{}", e.port());
    let pid = e.pid().unwrap_or(0);
    let warm_until = Instant::now() + Duration::from_secs(secs + 5);
    let mut tasks = Vec::new();
    for _ in 0..n {
        if let Some((s, _)) = open(&addr, id).await {
            tasks.push(tokio::spawn(drain(s, warm_until + Duration::from_secs(1))));
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kids = support::procs::children_named(pid, "ffmpeg");
    let (e0, f0): (u64, u64) = (ticks(pid), kids.iter().map(|k| ticks(*k)).sum());
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (e1, f1): (u64, u64) = (ticks(pid), kids.iter().map(|k| ticks(*k)).sum());
    let wall = t0.elapsed().as_secs_f64();
    for t in tasks {
        t.abort();
    }
    (
        (e1 - e0) as f64 / 100.0 / wall,
        (f1 - f0) as f64 / 100.0 / wall,
        kids.len(),
    )
}

fn main() {
    let secs = env_num("TRANSCODE_SECS", 20);
    let viewers = env_num("TRANSCODE_VIEWERS", 100);
    let n_zaps = env_num("TRANSCODE_ZAPS", 20);
    let rt = support::bench_runtime();
    rt.block_on(async {
        let p = Provider::start().await;
        let e = Edge::start(&config()).await;
        println!("transcoding: one 0.8 Mbit/s 640x360 channel → H.264 320 px (x264 ultrafast), release build");
        // The floor, with the arguments m3u-edge renders for the template.
        let probe = api_post(&e, "/transcode", serde_json::json!({ "url": p.url("live/floor.ts?kbps=800"), "profile": TEMPLATE })).await;
        let args: Vec<String> = probe["ffmpeg_args"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let mut floor = Vec::new();
        for _ in 0..n_zaps.min(10) {
            if let Some(ms) = ffmpeg_floor(&args, &p.url("live/floor.ts?kbps=800")).await {
                floor.push(ms);
            }
        }
        let mut warm = zaps(&e, &p, true, n_zaps).await;
        let mut cold = zaps(&e, &p, false, n_zaps).await;
        println!("\n| zap to first byte | n | p50 (ms) | p90 (ms) |");
        println!("|---|---:|---:|---:|");
        println!("| floor: ffmpeg alone, first input byte → first output byte | {} | {:.0} | {:.0} |", floor.len(), pct(&mut floor, 0.5), pct(&mut floor, 0.9));
        println!("| m3u-edge, warm original channel | {} | {:.0} | {:.0} |", warm.len(), pct(&mut warm, 0.5), pct(&mut warm, 0.9));
        println!("| m3u-edge, cold (provider connect + ffmpeg) | {} | {:.0} | {:.0} |", cold.len(), pct(&mut cold, 0.5), pct(&mut cold, 0.9));
        // CPU with 1 and with N viewers of one transcoded channel.
        let url = p.url("live/cpu.ts?kbps=800");
        let t = api_post(&e, "/transcode", serde_json::json!({ "url": url, "profile": TEMPLATE })).await;
        let id = t["stream_id"].as_str().unwrap_or("").to_string();
        println!("\n| viewers of one transcoded channel | m3u-edge CPU (cores) | ffmpeg CPU (cores) | ffmpeg processes | provider connections |");
        println!("|---:|---:|---:|---:|---:|");
        for n in [1, viewers] {
            let (edge_cpu, ff_cpu, kids) = cpu_with(&e, &id, n, secs).await;
            println!("| {n} | {edge_cpu:.3} | {ff_cpu:.3} | {kids} | {} |", p.open_streams("/live/"));
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    });
}
