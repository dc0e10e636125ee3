//! End-to-end HLS playlist request rate (not Criterion: a running system).
//!
//! The release `m3u-edge` binary in front of the loopback test provider's live
//! sliding-window playlist; `PLAYLIST_CONNS` (default 100) keep-alive viewers,
//! each its own client (`client_id`), request the playlist as fast as they can
//! for `PLAYLIST_SECS` (default 10). Prints requests/s, latency percentiles and
//! how many times the provider was asked (the rest came from the shared
//! single-flight cache). The load generator is raw keep-alive HTTP/1.1 on
//! tokio, sharing the 2 cores with the proxy.
//!
//! Run: `cargo bench --bench playlist_rate`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::edge::Edge;
use support::provider::Provider;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reads one HTTP/1.1 response with a Content-Length; returns its status.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<u16> {
    buf.clear();
    let mut tmp = [0u8; 16 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status: u16 = head.get(9..12)?.parse().ok()?;
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut tmp).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            return Some(status);
        }
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn main() {
    let conns = env_or("PLAYLIST_CONNS", 100) as usize;
    let secs = env_or("PLAYLIST_SECS", 10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let p = Provider::start().await;
        // Access logging off (`RUST_LOG=warn`): it costs ~10 % at these rates.
        let e = Edge::start_with(
            "server:\n  listen: \"{listen}\"\n  state_file: \"{state_file}\"\n  grace_period: \"0s\"\nlog:\n  level: warn\n",
            support::edge::StartOpts {
                env: vec![("RUST_LOG".into(), "warn".into())],
                ..Default::default()
            },
        )
        .await;
        let body = serde_json::json!({"url": p.url("hls-live/hls_ts/v0/index.m3u8?seg_ms=2000&window=6")});
        let (_, v) =
            support::client::api(&e, http::Method::POST, "/streams", None, Some(&body)).await;
        let id = v["stream_id"].as_str().unwrap().to_string();
        let addr = format!("127.0.0.1:{}", e.port());
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for c in 0..conns {
            let (addr, id, done, errors) = (addr.clone(), id.clone(), done.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let Ok(mut s) = TcpStream::connect(&addr).await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return lat;
                };
                let req = format!(
                    "GET /m3u-proxy/hls/{id}/playlist.m3u8?client_id=viewer{c} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: bench\r\n\r\n"
                );
                let mut buf = Vec::with_capacity(8192);
                while Instant::now() < until {
                    let t = Instant::now();
                    if s.write_all(req.as_bytes()).await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    match read_response(&mut s, &mut buf).await {
                        Some(200) => {
                            done.fetch_add(1, Ordering::Relaxed);
                            lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                lat
            }));
        }
        let started = Instant::now();
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap_or_default());
        }
        let wall = started.elapsed().as_secs_f64();
        lat.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(f64::NAN);
        let n = done.load(Ordering::Relaxed);
        println!("HLS live playlist, {conns} keep-alive viewers, {secs} s, release build, 2 cores shared with the load generator");
        println!("| requests | requests/s | p50 ms | p99 ms | errors | provider playlist fetches |");
        println!("|---:|---:|---:|---:|---:|---:|");
        println!(
            "| {n} | {:.0} | {:.2} | {:.2} | {} | {} |",
            n as f64 / wall,
            pct(0.5),
            pct(0.99),
            errors.load(Ordering::Relaxed),
            p.hits("/hls-live/hls_ts/v0/index.m3u8")
        );
        // The same with wrk (the tool the Python proxy's ~800 req/s was
        // measured with), when it is installed: 100 viewer ids in rotation.
        let script = e.dir().join("viewers.lua");
        let lua = format!(
            "n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format(nil, \"/m3u-proxy/hls/{id}/playlist.m3u8?client_id=v\" .. (n % {conns}))\nend\n"
        );
        if std::fs::write(&script, lua).is_ok() {
            let out = std::process::Command::new("wrk")
                .args(["-t2", &format!("-c{conns}"), &format!("-d{secs}s"), "--latency", "-s"])
                .arg(&script)
                .arg(format!("http://{addr}/"))
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    let text = String::from_utf8_lossy(&o.stdout);
                    let grab = |key: &str| {
                        text.lines()
                            .find(|l| l.trim_start().starts_with(key))
                            .map(|l| l.trim().to_string())
                            .unwrap_or_default()
                    };
                    println!(
                        "\nwrk -t2 -c{conns} -d{secs}s: {} | {} | {} | provider playlist fetches in total: {}",
                        grab("Requests/sec"),
                        grab("50%"),
                        grab("99%"),
                        p.hits("/hls-live/hls_ts/v0/index.m3u8")
                    );
                }
                _ => println!("\n(wrk not installed: apt-get install wrk for the wrk row)"),
            }
        }
    });
}
