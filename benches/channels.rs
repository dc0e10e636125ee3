//! Many channels per node (not Criterion: it measures a running system).
//!
//! N live channels × 2 viewers each from the loopback test provider through
//! the real release `m3u-edge` binary, at 4 and 8 Mbit/s. Per step: proxy CPU
//! (cores, from /proc utime+stime), RSS, its anonymous and shared parts
//! (RssAnon, RssShmem), the bytes of its in-memory spool files (memfd, which
//! are never mapped so RssShmem does not show them), /proc/meminfo Shmem
//! growth (machine-wide, so noisy), memory per channel against the bytes of
//! `ring_seconds` at the bitrate, viewers that ever waited > 1 s; then the
//! same memory once the viewers left (channels lingering) and after the
//! channels closed. Then zap times: one viewer changing channel 100 times
//! among 10 warm channels (request → first body byte, which the hub makes a
//! decodable start: PAT first) and 100 times to cold ones, beside the
//! provider's own time to first byte.
//!
//! The floor is another build of m3u-edge run by the same bench in the same
//! run (`CHANNELS_BASE_BIN`, e.g. main's release binary): every row is
//! measured for both.
//!
//! Run: `CHANNELS_BASE_BIN=/path/to/old/m3u-edge cargo bench --bench channels`
//! (env: CHANNELS_SECS (default 10), CHANNELS_STEPS="10,100,300",
//! CHANNELS_KBPS="4000,8000", CHANNELS_RING_SECS="4").

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::edge::Edge;
use support::provider::Provider;

const VIEWERS_PER_CHANNEL: usize = 2;
const LINGER_SECS: u64 = 3;

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// What /proc says about a process (KiB unless named otherwise).
#[derive(Default, Clone, Copy)]
struct Usage {
    ticks: u64,
    rss: u64,
    anon: u64,
    shmem: u64,
    /// Bytes held by the process's memfd files.
    memfd_bytes: u64,
    memfds: usize,
    /// Machine-wide /proc/meminfo Shmem.
    meminfo_shmem: u64,
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn usage(pid: u32) -> Usage {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (mut memfd_bytes, mut memfds) = (0, 0);
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            let is_memfd = std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:"));
            if is_memfd {
                if let Ok(m) = std::fs::metadata(e.path()) {
                    memfd_bytes += m.blocks() * 512;
                    memfds += 1;
                }
            }
        }
    }
    Usage {
        ticks,
        rss: status_kib(&status, "VmRSS:"),
        anon: status_kib(&status, "RssAnon:"),
        shmem: status_kib(&status, "RssShmem:"),
        memfd_bytes,
        memfds,
        meminfo_shmem: status_kib(&meminfo, "Shmem:"),
    }
}

impl Usage {
    /// Anonymous memory plus spool bytes above `base`, in bytes.
    fn held_over(&self, base: &Usage) -> f64 {
        (self.anon as f64 - base.anon as f64) * 1024.0 + self.memfd_bytes as f64
    }
}

const MIB: f64 = 1024.0 * 1024.0;

struct ViewerStats {
    bytes: AtomicU64,
    max_gap_us: AtomicU64,
}

/// Opens `/stream/{id}` with a raw request; returns the stream, the time to
/// the first body byte and those first body bytes.
async fn open(addr: &str, path: &str) -> Option<(TcpStream, Duration, Vec<u8>)> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: channels\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = Vec::with_capacity(4096);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            if !head.starts_with(b"HTTP/1.1 200") {
                return None;
            }
            let mut body = head.split_off(end + 4);
            if body.is_empty() {
                let n = s.read(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                body.extend_from_slice(&buf[..n]);
            }
            return Some((s, t0.elapsed(), body));
        }
    }
}

async fn viewer(addr: String, path: String, stats: Arc<ViewerStats>, until: Instant) {
    let Some((mut s, _, first)) = open(&addr, &path).await else {
        stats.max_gap_us.store(u64::MAX, Ordering::Relaxed);
        return;
    };
    stats.bytes.fetch_add(first.len() as u64, Ordering::Relaxed);
    support::load::read_until(&mut s, &stats.bytes, &stats.max_gap_us, until).await;
}

async fn register(e: &Edge, url: &str) -> String {
    let body = serde_json::json!({ "url": url });
    let (_, v) = support::client::api(e, http::Method::POST, "/streams", None, Some(&body)).await;
    v["stream_id"].as_str().expect("stream_id").to_string()
}

/// A build under test: its name in the table and its binary.
#[derive(Clone)]
struct Build {
    name: &'static str,
    bin: Option<PathBuf>,
}

async fn edge(build: &Build, live: &str) -> Edge {
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\n  state_file: \"{{state_file}}\"\n  grace_period: \"0s\"\n  threads: 2\nlog:\n  level: warn\nlive:\n{live}"
    );
    Edge::start_with(
        &yaml,
        support::edge::StartOpts {
            env: vec![("RUST_LOG".into(), "warn".into())],
            bin: build.bin.clone(),
            ..Default::default()
        },
    )
    .await
}

/// One step: `n` channels × 2 viewers at `kbps`. Returns table rows.
async fn step(p: &Provider, build: &Build, n: usize, kbps: u64, ring: u64, secs: u64) -> String {
    let e = edge(
        build,
        &format!("  ring_seconds: {ring}s\n  linger: {LINGER_SECS}s\n"),
    )
    .await;
    let pid = e.pid().expect("pid");
    let addr = format!("127.0.0.1:{}", e.port());
    let mut paths = Vec::new();
    for i in 0..n {
        let id = register(
            &e,
            &p.url(&format!(
                "live/{}-{kbps}-{n}-{i}.ts?kbps={kbps}",
                build.name
            )),
        )
        .await;
        paths.push(format!("/stream/{id}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = usage(pid);
    // Every ring full (ring_seconds) before measuring, plus time to join.
    let setup = Duration::from_secs(ring + 3 + n as u64 / 50);
    let until = Instant::now() + setup + Duration::from_secs(secs);
    let mut stats = Vec::new();
    let mut tasks = Vec::new();
    for path in &paths {
        for _ in 0..VIEWERS_PER_CHANNEL {
            let s = Arc::new(ViewerStats {
                bytes: AtomicU64::new(0),
                max_gap_us: AtomicU64::new(0),
            });
            tasks.push(tokio::spawn(viewer(
                addr.clone(),
                path.clone(),
                s.clone(),
                until,
            )));
            stats.push(s);
        }
    }
    tokio::time::sleep(setup).await;
    let b0: Vec<u64> = stats
        .iter()
        .map(|s| s.bytes.load(Ordering::Relaxed))
        .collect();
    for s in &stats {
        // A viewer that never connected stays marked.
        let _ = s
            .max_gap_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| {
                (g != u64::MAX).then_some(0)
            });
    }
    let u0 = usage(pid);
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let u1 = usage(pid);
    let wall = w0.elapsed().as_secs_f64();
    let b1: Vec<u64> = stats
        .iter()
        .map(|s| s.bytes.load(Ordering::Relaxed))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    // The viewers are gone: the channels linger.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lingering = usage(pid);
    // Linger over: the channels closed (and housekeeping may trim the heap).
    tokio::time::sleep(Duration::from_secs(LINGER_SECS + 3)).await;
    let closed = usage(pid);
    drop(e);

    let viewers = stats.len();
    let cores = (u1.ticks - u0.ticks) as f64 / 100.0 / wall;
    let mut rates: Vec<f64> = b0
        .iter()
        .zip(&b1)
        .map(|(a, b)| (b - a) as f64 * 8.0 / wall / 1e6)
        .collect();
    let waited = stats
        .iter()
        .filter(|s| s.max_gap_us.load(Ordering::Relaxed) > 1_000_000)
        .count();
    let ring_bytes = (ring * kbps * 1000 / 8) as f64;
    let per_ch = u1.held_over(&base) / n as f64;
    let per_ch_linger = lingering.held_over(&base) / n as f64;
    let min = rates.iter().cloned().fold(f64::INFINITY, f64::min);
    let med = support::load::percentile(&mut rates, 0.5);
    // When the machine cannot keep the bitrate up, the ring holds
    // ring_seconds of what actually arrived.
    let ring_delivered = ring as f64 * med * 1e6 / 8.0;
    format!(
        "| {} | {:.0} | {n} × {VIEWERS_PER_CHANNEL} | {cores:.3} | {:.0} | {:.1} | {:.1} / {:.1} | {:.1} | {:+.1} | {:.2} | {:.2}× / {:.2}× | {:.2} | {:.1} / {:.1} / {} | {min:.2} / {med:.2} | {waited} |",
        build.name,
        kbps as f64 / 1000.0,
        cores / viewers as f64 * 1e6,
        u1.rss as f64 / 1024.0,
        u1.anon as f64 / 1024.0,
        u1.shmem as f64 / 1024.0,
        u1.memfd_bytes as f64 / MIB,
        (u1.meminfo_shmem as f64 - base.meminfo_shmem as f64) / 1024.0,
        per_ch / MIB,
        per_ch / ring_bytes,
        per_ch / ring_delivered,
        per_ch_linger / MIB,
        closed.rss as f64 / 1024.0,
        closed.memfd_bytes as f64 / MIB,
        closed.memfds,
    )
}

/// Whether `b` starts with a TS packet of the PAT (PID 0): a decodable start.
fn starts_with_pat(b: &[u8]) -> bool {
    b.len() >= 3 && b[0] == 0x47 && (u16::from(b[1] & 0x1f) << 8 | u16::from(b[2])) == 0
}

/// A decodable start: the hub's join prefix (PAT first) or, on a cold
/// channel, the provider's own first bytes (the fixture's start).
fn clean_start(b: &[u8], source: &[u8]) -> bool {
    starts_with_pat(b) || (b.len() >= 188 && b[..188] == source[..188])
}

/// Request → first body byte in ms: p50 / p99.
fn summary(v: &mut [f64]) -> String {
    format!(
        "{:.1} / {:.1}",
        support::load::percentile(v, 0.5),
        support::load::percentile(v, 0.99)
    )
}

/// 100 zaps among 10 warm channels, and 100 to cold ones (unless `warm_only`).
async fn zaps(p: &Provider, build: &Build, kbps: u64, ring: u64, warm_only: bool) -> String {
    let e = edge(build, &format!("  linger: 0s\n  ring_seconds: {ring}s\n")).await;
    let addr = format!("127.0.0.1:{}", e.port());
    let mut warm = Vec::new();
    for i in 0..10 {
        let id = register(
            &e,
            &p.url(&format!(
                "live/zapw-{}-{ring}-{i}.ts?kbps={kbps}",
                build.name
            )),
        )
        .await;
        warm.push(format!("/stream/{id}"));
    }
    // A viewer on each keeps it warm.
    let until = Instant::now() + Duration::from_secs(120);
    let holders: Vec<_> = warm
        .iter()
        .map(|path| {
            let s = Arc::new(ViewerStats {
                bytes: AtomicU64::new(0),
                max_gap_us: AtomicU64::new(0),
            });
            tokio::spawn(viewer(addr.clone(), path.clone(), s, until))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let source = support::fixture("sample.ts");
    let (mut w, mut w_bad) = (Vec::new(), 0);
    let mut x: u32 = 0x2545_f491;
    for i in 0..100 {
        // Zaps come at random points of each channel's GOP.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        tokio::time::sleep(Duration::from_millis(u64::from(x % 400))).await;
        let path = &warm[(i * 3) % 10];
        match open(&addr, path).await {
            Some((_s, t, first)) => {
                w.push(t.as_secs_f64() * 1000.0);
                if !clean_start(&first, &source) {
                    w_bad += 1;
                }
            }
            None => w_bad += 1,
        }
    }
    for h in holders {
        h.abort();
    }
    if warm_only {
        return format!("{} / {w_bad}", summary(&mut w));
    }
    let (mut c, mut c_bad) = (Vec::new(), 0);
    for i in 0..100 {
        let id = register(
            &e,
            &p.url(&format!("live/zapc-{}-{i}.ts?kbps={kbps}", build.name)),
        )
        .await;
        match open(&addr, &format!("/stream/{id}")).await {
            Some((_s, t, first)) => {
                c.push(t.as_secs_f64() * 1000.0);
                if !clean_start(&first, &source) {
                    c_bad += 1;
                }
            }
            None => c_bad += 1,
        }
    }
    format!(
        "| {} | {} | {w_bad} | {} | {c_bad} |",
        build.name,
        summary(&mut w),
        summary(&mut c)
    )
}

/// The provider's own request → first body byte, 100 fresh channels.
async fn provider_first_byte(p: &Provider, kbps: u64) -> String {
    let addr = p.addr().to_string();
    let mut v = Vec::new();
    for i in 0..100 {
        if let Some((_s, t, _)) = open(&addr, &format!("/live/direct-{i}.ts?kbps={kbps}")).await {
            v.push(t.as_secs_f64() * 1000.0);
        }
    }
    summary(&mut v)
}

fn main() {
    let secs = env_list("CHANNELS_SECS", "10")
        .first()
        .copied()
        .unwrap_or(10);
    let steps = env_list("CHANNELS_STEPS", "10,100,300");
    let rates = env_list("CHANNELS_KBPS", "4000,8000");
    let rings = env_list("CHANNELS_RING_SECS", "4");
    let mut builds = vec![Build {
        name: "m3u-edge",
        bin: None,
    }];
    if let Ok(b) = std::env::var("CHANNELS_BASE_BIN") {
        builds.push(Build {
            name: "floor",
            bin: Some(PathBuf::from(b)),
        });
    }
    let rt = support::bench_runtime();
    rt.block_on(async {
        let p = Provider::start().await;
        println!("channels × viewers, {secs} s per step; memory per channel = (RssAnon growth + memfd bytes) / channels; ring = ring_seconds × bitrate");
        println!();
        println!("| build | Mbit/s | channels × viewers | CPU (cores) | CPU per viewer (µcore) | RSS (MiB) | RssAnon / RssShmem (MiB) | memfd (MiB) | meminfo Shmem Δ (MiB) | per channel (MiB) | per channel / ring (nominal / delivered rate) | lingering, per channel (MiB) | closed: RSS / memfd (MiB) / memfds | rate min / median (Mbit/s) | waited > 1 s |");
        println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for &ring in &rings {
            if rings.len() > 1 {
                println!("| ring_seconds = {ring} | | | | | | | | | | | | | | |");
            }
            for &kbps in &rates {
                for &n in &steps {
                    for b in &builds {
                        let row = step(&p, b, n as usize, kbps, ring, secs).await;
                        println!("{row}");
                    }
                }
            }
        }
        println!();
        let kbps = rates.first().copied().unwrap_or(4000);
        println!("zap at {} Mbit/s, request → first body byte (ms)", kbps as f64 / 1000.0);
        println!();
        println!("| build | 100 zaps among 10 warm channels p50 / p99 | not a clean start | 100 zaps to cold channels p50 / p99 | not a clean start |");
        println!("|---|---:|---:|---:|---:|");
        for b in &builds {
            println!("{}", zaps(&p, b, kbps, 4, false).await);
        }
        println!(
            "| provider alone (cold floor) | | | {} | |",
            provider_first_byte(&p, kbps).await
        );
        // Is ring_seconds = 4 right? A join is instant only when the ring
        // holds a keyframe. The fixture at its own rate (766 kbit/s) has a
        // keyframe every 2 s, as IPTV channels commonly do.
        println!();
        println!("warm zap (ms, p50 / p99 / not a clean start) by ring_seconds, 766 kbit/s with a keyframe every 2 s");
        println!();
        println!("| ring_seconds | 1 | 2 | 4 | 8 |");
        println!("|---|---:|---:|---:|---:|");
        let mut row = String::from("| m3u-edge |");
        for ring in [1, 2, 4, 8] {
            row += &format!(" {} |", zaps(&p, &builds[0], 766, ring, true).await);
        }
        println!("{row}");
    });
}
