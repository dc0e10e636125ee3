//! Cluster load harness (issue #17 item 8; not Criterion: it measures running
//! systems). Three release `m3u-edge` nodes on one `redis-server`, all on this
//! machine, beside the same build as a single node without `cluster:` (the
//! floor, measured in the same run):
//!
//! 1. One 8 Mbit/s live channel from the loopback test provider, V viewers on
//!    each node (3 × V; V = 500 by default): provider connections (peak, must
//!    be 1), CPU per node (cores, /proc utime+stime), delivered rate and
//!    viewers that waited > 1 s; the floor is one node with V viewers.
//! 2. Take-over gap: a viewer on n2 and on n3 of a channel n1 owns; `kill -9`
//!    n1; time from the kill until a remote viewer gets bytes again (p50 and
//!    max over R runs, a fresh cluster each run).
//! 3. HLS (1 s segments): P players per node polling every second: provider
//!    playlist fetches per second and segment fetches vs distinct segments,
//!    beside P players on the single node; and a take-over: a player on each
//!    node, `kill -9` of the HLS owner, the longest wait between new segments
//!    on the other nodes beside the same measure before the kill (the 1 s
//!    segment cadence is the floor).
//! 4. Freezes (benches/cluster/freeze.rs): the owner, then Redis, SIGSTOPped
//!    for 8 s: provider connections meanwhile and the recovery after SIGCONT
//!    (CLUSTER.md tests 9 and 10, measured; R runs, at most 3).
//! 5. API latency on a non-owner node (n2 while n1 owns the channel):
//!    `GET /streams/{id}` and `POST /streams`, p50 / p99 over N calls each,
//!    beside the same calls on the single node.
//!
//! Streams are configured in each node's YAML by id, so the bench runs whether
//! or not the shared registry is there; `POST /streams` registers new ones.
//!
//! Run: `cargo bench --bench cluster` (env: CLUSTER_VIEWERS per node (500),
//! CLUSTER_SECS measured window (10), CLUSTER_RUNS take-over runs (10; freezes: at most 3; HLS
//! take-over: at most 5), CLUSTER_HLS_PLAYERS per node (50), CLUSTER_API_CALLS
//! (200), CLUSTER_ONLY=freeze: only section 4). Quick check:
//! `CLUSTER_VIEWERS=50 CLUSTER_RUNS=2`.
//! Skips (with a message) when redis-server is not installed.

#[path = "cluster/freeze.rs"]
mod freeze;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::cluster::{cluster_yaml, wait_joined};
use support::edge::{free_port, Edge, StartOpts};
use support::provider::Provider;
use support::redis::RedisServer;

const KBPS: u64 = 8000;
const CHANNEL: &str = "bench";
/// An HLS stream (1 s segments) configured beside the channel.
const HLS: &str = "hlsbench";
const HLS_PLAYLIST: &str = "/hls-live/hls_ts/v0/index.m3u8";
/// The same reference-signing key on every node.
const TOKEN_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// A node's YAML (without `cluster:`): the channel configured by id.
fn body(p: &Provider, path: &str) -> String {
    format!(
        "server:\n  listen: \"{{listen}}\"\n  state_file: \"{{state_file}}\"\n  grace_period: \"0s\"\n  threads: 2\nlog:\n  level: warn\nhls:\n  token_key: \"{TOKEN_KEY}\"\nstreams:\n  - id: {CHANNEL}\n    url: \"{}\"\n  - id: {HLS}\n    url: \"{}\"\n",
        p.url(path),
        p.url(&format!("{}?seg_ms=1000", &HLS_PLAYLIST[1..]))
    )
}

fn quiet() -> StartOpts {
    StartOpts {
        env: vec![("RUST_LOG".into(), "warn".into())],
        ..Default::default()
    }
}

async fn single(p: &Provider, path: &str) -> Edge {
    Edge::start_with(&body(p, path), quiet()).await
}

/// Nodes n1..n3 on `redis`, access logs off like the single node.
async fn cluster(redis: &RedisServer, p: &Provider, path: &str) -> Vec<Edge> {
    let mut nodes = Vec::new();
    for k in 1..=3 {
        let yaml = format!(
            "{}\n{}",
            body(p, path),
            cluster_yaml(&redis.url(), &format!("n{k}"), free_port())
        );
        let e = Edge::start_with(&yaml, quiet()).await;
        wait_joined(&e).await;
        nodes.push(e);
    }
    nodes
}

/// (utime + stime) ticks of a process (100 per second on Linux).
fn ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// Opens `/stream/{id}`; the stream positioned at the body once a body byte came.
async fn open(addr: &str, id: &str) -> Option<(TcpStream, usize)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET /stream/{id} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: bench\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = Vec::with_capacity(4096);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
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
            let body = head.len() - (end + 4);
            if body > 0 {
                return Some((s, body));
            }
            let n = s.read(&mut buf).await.ok()?;
            return (n > 0).then_some((s, n));
        }
    }
}

/// A viewer of the channel that records when each read returned, until
/// `until`; its task ends false when the connection was lost.
fn reader(
    addr: String,
    until: Instant,
) -> (Arc<Mutex<Vec<Instant>>>, tokio::task::JoinHandle<bool>) {
    let log: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let l = log.clone();
    let task = tokio::spawn(async move {
        let Some((mut s, _)) = open(&addr, CHANNEL).await else {
            return false;
        };
        let mut buf = vec![0u8; 256 * 1024];
        while Instant::now() < until {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(_)) => l.lock().push(Instant::now()),
                Err(_) => break,
            }
        }
        true
    });
    (log, task)
}

#[derive(Default)]
struct ViewerStats {
    bytes: AtomicU64,
    max_gap_us: AtomicU64,
}

async fn viewer(addr: String, stats: Arc<ViewerStats>, joined: Arc<AtomicUsize>, until: Instant) {
    let Some((mut s, n)) = open(&addr, CHANNEL).await else {
        return;
    };
    joined.fetch_add(1, Ordering::Relaxed);
    stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
    support::load::read_until(&mut s, &stats.bytes, &stats.max_gap_us, until).await;
}

/// One step: `per_node` viewers on each of `addrs` (the pids measured), the
/// provider's peak connections for the channel while they watch.
struct Step {
    cores: Vec<f64>,
    rate_min: f64,
    rate_median: f64,
    waited: usize,
    joined: usize,
    wanted: usize,
    provider_peak: usize,
}

async fn step(
    p: &Provider,
    path: &str,
    nodes: &[(u32, String)],
    per_node: usize,
    secs: u64,
) -> Step {
    let prefix = format!("/{}", path.split('?').next().unwrap_or(path));
    // Sample the provider's open connections for the channel all along.
    let peak = AtomicUsize::new(0);
    let sampler = async {
        loop {
            peak.fetch_max(p.open_streams(&prefix), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut s = tokio::select! {
        s = watch(nodes, per_node, secs) => s,
        _ = sampler => unreachable!("the sampler never ends"),
    };
    s.provider_peak = peak.load(Ordering::Relaxed);
    s
}

async fn watch(nodes: &[(u32, String)], per_node: usize, secs: u64) -> Step {
    // The first viewer on the first node makes it the channel's owner.
    let joined = Arc::new(AtomicUsize::new(0));
    let warm_until = Instant::now() + Duration::from_secs(3600);
    let warm_stats = Arc::new(ViewerStats::default());
    let warm = tokio::spawn(viewer(
        nodes[0].1.clone(),
        warm_stats.clone(),
        Arc::new(AtomicUsize::new(0)),
        warm_until,
    ));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let total = per_node * nodes.len();
    let setup = Duration::from_secs(5 + total as u64 / 100);
    let until = Instant::now() + setup + Duration::from_secs(secs);
    let stats: Vec<Arc<ViewerStats>> = (0..total).map(|_| Arc::default()).collect();
    let mut tasks = Vec::new();
    for (i, s) in stats.iter().enumerate() {
        let addr = nodes[i % nodes.len()].1.clone();
        tasks.push(tokio::spawn(viewer(addr, s.clone(), joined.clone(), until)));
    }
    tokio::time::sleep(setup).await;
    let b0: Vec<u64> = stats
        .iter()
        .map(|s| s.bytes.load(Ordering::Relaxed))
        .collect();
    for s in &stats {
        s.max_gap_us.store(0, Ordering::Relaxed);
    }
    let t0: Vec<u64> = nodes.iter().map(|(pid, _)| ticks(*pid)).collect();
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let t1: Vec<u64> = nodes.iter().map(|(pid, _)| ticks(*pid)).collect();
    let wall = w0.elapsed().as_secs_f64();
    let b1: Vec<u64> = stats
        .iter()
        .map(|s| s.bytes.load(Ordering::Relaxed))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    warm.abort();
    let mut rates: Vec<f64> = b0
        .iter()
        .zip(&b1)
        .map(|(a, b)| (b - a) as f64 * 8.0 / wall / 1e6)
        .collect();
    let rate_min = rates.iter().cloned().fold(f64::INFINITY, f64::min);
    Step {
        cores: t0
            .iter()
            .zip(&t1)
            .map(|(a, b)| (b - a) as f64 / 100.0 / wall)
            .collect(),
        rate_min,
        rate_median: support::load::percentile(&mut rates, 0.5),
        waited: stats
            .iter()
            .filter(|s| s.max_gap_us.load(Ordering::Relaxed) > 1_000_000)
            .count(),
        joined: joined.load(Ordering::Relaxed),
        wanted: total,
        provider_peak: 0,
    }
}

fn pids(nodes: &[Edge]) -> Vec<(u32, String)> {
    nodes
        .iter()
        .map(|e| (e.pid().unwrap_or(0), format!("127.0.0.1:{}", e.port())))
        .collect()
}

/// One take-over run: returns (gap ms, the provider's peak connections for
/// the channel while both remote viewers watched before the kill), or None
/// when a remote viewer lost its connection.
async fn takeover_run(p: &Provider, run: u64) -> Option<(Option<f64>, usize)> {
    let redis = RedisServer::start().await?;
    let path = format!("live/takeover{run}.ts?kbps={KBPS}");
    let mut nodes = cluster(&redis, p, &path).await;
    let addrs = pids(&nodes);
    let prefix = format!("/live/takeover{run}.ts");
    // n1 first: it owns the channel (local-first placement).
    let (_owner_viewer, _) = open(&addrs[0].1, CHANNEL).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Kill after 2 s; CLUSTER.md expects a ~5–6 s gap: 10 s after the kill.
    let until = Instant::now() + Duration::from_secs(12);
    let (reads, tasks): (Vec<_>, Vec<_>) = addrs[1..]
        .iter()
        .map(|(_, a)| reader(a.clone(), until))
        .unzip();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak_before = p.open_streams(&prefix);
    nodes[0].kill();
    let killed = Instant::now();
    let mut kept = true;
    for t in tasks {
        kept &= t.await.unwrap_or(false);
    }
    if !kept {
        return None;
    }
    // Per remote viewer: the first read after the longest pause following the
    // kill; a viewer that never paused over 200 ms had no gap at all.
    let mut gap: Option<f64> = None;
    for log in &reads {
        let log = log.lock();
        let after: Vec<Instant> = log.iter().copied().filter(|t| *t >= killed).collect();
        let mut prev = log.iter().copied().rfind(|t| *t < killed).unwrap_or(killed);
        let mut longest = (Duration::ZERO, killed);
        for t in &after {
            if t.duration_since(prev) > longest.0 {
                longest = (t.duration_since(prev), *t);
            }
            prev = *t;
        }
        if after.is_empty() {
            return None;
        }
        let g = if longest.0 > Duration::from_millis(200) {
            longest.1.duration_since(killed).as_secs_f64() * 1000.0
        } else {
            0.0
        };
        gap = Some(gap.map_or(g, |x: f64| x.max(g)));
    }
    Some((gap, peak_before))
}

/// HLS take-over: a player on each node (n1 first: it owns the stream),
/// polling every 200 ms; `kill -9` n1 after 3 s. Returns, for the players on
/// n2 and n3, the longest wait between two new segments delivered after the
/// kill and before it (the floor: the segment cadence, 1 s), in ms, and the
/// requests that failed after the kill.
async fn hls_takeover_run(p: &Provider) -> Option<(f64, f64, usize)> {
    let redis = RedisServer::start().await?;
    let mut nodes = cluster(&redis, p, &format!("live/unused.ts?kbps={KBPS}")).await;
    let bases: Vec<String> = nodes.iter().map(|e| e.base()).collect();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let first = client
        .get(format!("{}/hls/{HLS}/playlist.m3u8", bases[0]))
        .send()
        .await;
    if !matches!(first, Ok(r) if r.status() == 200) {
        return None;
    }
    let until = Instant::now() + Duration::from_secs(12);
    let mut tasks = Vec::new();
    for (i, base) in bases.iter().enumerate() {
        let (client, base) = (client.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let (mut seen, mut got, mut failed) =
                (std::collections::HashSet::new(), Vec::new(), Vec::new());
            while Instant::now() < until {
                let url = format!("{base}/hls/{HLS}/playlist.m3u8?client_id=t{i}");
                let body = match client.get(url).send().await {
                    Ok(r) if r.status() == 200 => r.bytes().await.ok(),
                    _ => None,
                };
                let Some(b) = body else {
                    failed.push(Instant::now());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let text = String::from_utf8_lossy(&b).into_owned();
                for u in text
                    .lines()
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                {
                    if seen.contains(u) {
                        continue;
                    }
                    if ok(client.get(format!("{base}{u}")).send().await, |s| s == 200).await {
                        seen.insert(u.to_owned());
                        got.push(Instant::now());
                    } else {
                        failed.push(Instant::now());
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (got, failed)
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    nodes[0].kill();
    let killed = Instant::now();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.ok()?);
    }
    let longest = |times: &[Instant], from: Instant, to: Instant| {
        let inside: Vec<Instant> = times
            .iter()
            .copied()
            .filter(|t| *t >= from && *t <= to)
            .collect();
        inside
            .windows(2)
            .map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1000.0)
            .fold(0.0, f64::max)
    };
    let (mut after, mut before, mut failed) = (0.0f64, 0.0f64, 0);
    for (got, fails) in results.iter().skip(1) {
        // From the last segment before the kill to the end.
        let from = got.iter().copied().rfind(|t| *t < killed).unwrap_or(killed);
        after = after.max(longest(got, from, until));
        before = before.max(longest(got, killed - Duration::from_millis(2500), killed));
        failed += fails.iter().filter(|t| **t >= killed).count();
    }
    Some((after, before, failed))
}

/// p50 / p99 (ms) of `n` calls made by `call`.
async fn latency<F, Fut>(n: u64, mut call: F) -> (f64, f64, usize)
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut v = Vec::new();
    let mut failed = 0;
    for i in 0..n {
        let t = Instant::now();
        if !call(i).await {
            failed += 1;
        }
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    (
        support::load::percentile(&mut v, 0.5),
        support::load::percentile(&mut v, 0.99),
        failed,
    )
}

/// HLS players (`per_node` on each of `bases`) polling the playlist every
/// second and fetching each new segment once, for `secs`: what the provider
/// saw. Returns the table row's cells.
async fn hls_step(p: &Provider, bases: &[String], per_node: usize, secs: u64) -> String {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let polls0 = p.hits(HLS_PLAYLIST);
    let segs0 = p.requests().len();
    let until = Instant::now() + Duration::from_secs(secs);
    let requests = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, base) in bases.iter().enumerate() {
        for k in 0..per_node {
            let (client, base) = (client.clone(), base.clone());
            let (requests, failed) = (requests.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let mut seen = std::collections::HashSet::new();
                let get = |url: String| {
                    let client = client.clone();
                    let (requests, failed) = (requests.clone(), failed.clone());
                    async move {
                        requests.fetch_add(1, Ordering::Relaxed);
                        let body = match client.get(url).send().await {
                            Ok(r) if r.status() == 200 => r.bytes().await.ok(),
                            _ => None,
                        };
                        if body.is_none() {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        body
                    }
                };
                while Instant::now() < until {
                    let url = format!("{base}/hls/{HLS}/playlist.m3u8?client_id=n{i}p{k}");
                    if let Some(b) = get(url).await {
                        let text = String::from_utf8_lossy(&b).into_owned();
                        for u in text
                            .lines()
                            .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        {
                            if seen.insert(u.to_owned()) {
                                get(format!("{base}{u}")).await;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall = started.elapsed().as_secs_f64();
    let polls = p.hits(HLS_PLAYLIST) - polls0;
    let segs: Vec<String> = p.requests()[segs0..]
        .iter()
        .filter(|r| r.path_only().starts_with("/hls-live/") && r.path_only().ends_with(".ts"))
        .map(|r| r.path.clone())
        .collect();
    let distinct: std::collections::HashSet<&String> = segs.iter().collect();
    format!(
        "{:.2} | {} / {} | {} / {} |",
        polls as f64 / wall,
        segs.len(),
        distinct.len(),
        failed.load(Ordering::Relaxed),
        requests.load(Ordering::Relaxed)
    )
}

/// Whether the answer came whole with a status `want` accepts.
async fn ok(r: reqwest::Result<reqwest::Response>, want: impl Fn(u16) -> bool) -> bool {
    match r {
        Ok(r) => want(r.status().as_u16()) && r.bytes().await.is_ok(),
        Err(_) => false,
    }
}

async fn api_latency(
    client: &reqwest::Client,
    base: &str,
    p: &Provider,
    tag: &str,
    n: u64,
) -> String {
    let get = latency(n, |_| {
        let url = format!("{base}/streams/{CHANNEL}");
        async move { ok(client.get(url).send().await, |s| s == 200).await }
    })
    .await;
    let post = latency(n, |i| {
        let url = format!("{base}/streams");
        let body = serde_json::json!({"url": p.url(&format!("live/api-{tag}-{i}.ts"))});
        async move {
            ok(client.post(url).json(&body).send().await, |s| {
                (200..300).contains(&s)
            })
            .await
        }
    })
    .await;
    format!(
        "{:>6.2} / {:>6.2} | {} | {:>6.2} / {:>6.2} | {} |",
        get.0, get.1, get.2, post.0, post.1, post.2
    )
}

fn main() {
    let per_node = env_num("CLUSTER_VIEWERS", 500) as usize;
    let secs = env_num("CLUSTER_SECS", 10);
    let runs = env_num("CLUSTER_RUNS", 10);
    let calls = env_num("CLUSTER_API_CALLS", 200);
    let rt = support::bench_runtime();
    rt.block_on(async {
        if support::redis::binary().is_none() {
            println!("SKIPPED: redis-server not installed (scripts/deps.sh --test-tools)");
            return;
        }
        let p = Arc::new(Provider::start().await);
        if std::env::var("CLUSTER_ONLY").is_ok_and(|v| v == "freeze") {
            freeze::report(&p, runs.min(3)).await;
            return;
        }
        println!("cluster: 3 nodes + redis-server on this machine vs one node without `cluster:` (the floor), release build");
        println!("\none {} Mbit/s channel, {per_node} viewers per node, {secs} s measured", KBPS / 1000);
        println!();
        println!("| setup | viewers | provider connections (peak) | CPU per node (cores) | floor: one node, {per_node} viewers (cores) | per node / floor | rate min / median (Mbit/s) | waited > 1 s | joined |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let path = format!("live/single.ts?kbps={KBPS}");
        let e = single(&p, &path).await;
        let floor = step(&p, &path, &pids(std::slice::from_ref(&e)), per_node, secs).await;
        drop(e);
        let floor_cores = floor.cores[0];
        println!(
            "| single node (floor) | {} | {} | {:.2} | {floor_cores:.2} | 1.00 | {:.2} / {:.2} | {} | {}/{} |",
            per_node, floor.provider_peak, floor_cores, floor.rate_min, floor.rate_median, floor.waited, floor.joined, floor.wanted
        );
        let Some(redis) = RedisServer::start().await else {
            return;
        };
        let path = format!("live/cluster.ts?kbps={KBPS}");
        let nodes = cluster(&redis, &p, &path).await;
        let s = step(&p, &path, &pids(&nodes), per_node, secs).await;
        let per: Vec<String> = s.cores.iter().map(|c| format!("{c:.2}")).collect();
        let ratios: Vec<String> = s.cores.iter().map(|c| format!("{:.2}", c / floor_cores)).collect();
        println!(
            "| 3 nodes (n1 owner) | 3 × {per_node} | {} | {} | {floor_cores:.2} | {} | {:.2} / {:.2} | {} | {}/{} |",
            s.provider_peak,
            per.join(" / "),
            ratios.join(" / "),
            s.rate_min,
            s.rate_median,
            s.waited,
            s.joined,
            s.wanted
        );
        if s.provider_peak > 1 {
            println!("\nprovider connections > 1: this build does not relay live channels between nodes (each node opened its own).");
        }

        // HLS fetched once cluster-wide: players on the three nodes vs one node.
        let hls_players = env_num("CLUSTER_HLS_PLAYERS", 50) as usize;
        let hls_secs = 10;
        println!("\nHLS, 1 s segments: {hls_players} players per node polling every second, {hls_secs} s");
        println!();
        println!("| setup | players | provider playlist fetches / s | provider segment fetches / distinct segments | failed / player requests |");
        println!("|---|---:|---:|---:|---:|");
        let bases: Vec<String> = nodes.iter().map(|e| e.base()).collect();
        println!(
            "| 3 nodes | 3 × {hls_players} | {}",
            hls_step(&p, &bases, hls_players, hls_secs).await
        );
        let e = single(&p, &format!("live/hls-single.ts?kbps={KBPS}")).await;
        println!(
            "| single node (floor) | {hls_players} | {}",
            hls_step(&p, &[e.base()], hls_players, hls_secs).await
        );
        drop(e);

        // API latency on a non-owner node while n1 owns the channel.
        let client = reqwest::Client::builder().no_proxy().build().expect("client");
        let owner_viewer = open(&format!("127.0.0.1:{}", nodes[0].port()), CHANNEL).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!("\nAPI latency (ms), {calls} sequential calls each on one keep-alive connection");
        println!();
        println!("| node | GET /streams/{{id}} p50 / p99 | failed | POST /streams p50 / p99 | failed |");
        println!("|---|---:|---:|---:|---:|");
        let n2 = nodes[1].base();
        println!("| n2 (not the owner), cluster | {}", api_latency(&client, &n2, &p, "n2", calls).await);
        drop(owner_viewer);
        drop(nodes);
        drop(redis);
        let e = single(&p, &format!("live/api-single.ts?kbps={KBPS}")).await;
        println!("| single node (floor) | {}", api_latency(&client, &e.base(), &p, "single", calls).await);
        drop(e);

        println!("\ntake-over: viewers on n2 and n3 of a channel n1 owns; kill -9 n1; time until a remote viewer gets bytes again ({runs} runs, fresh cluster each)");
        println!();
        let mut gaps = Vec::new();
        let (mut lost, mut no_gap, mut peaks) = (0, 0, Vec::new());
        for run in 0..runs {
            match takeover_run(&p, run).await {
                Some((Some(g), peak)) => {
                    if g == 0.0 {
                        no_gap += 1;
                    } else {
                        gaps.push(g);
                    }
                    peaks.push(peak);
                }
                Some((None, peak)) => peaks.push(peak),
                None => lost += 1,
            }
        }
        let max = gaps.iter().cloned().fold(0.0, f64::max);
        let p50 = support::load::percentile(&mut gaps, 0.5);
        println!("| runs | gap p50 (ms) | gap max (ms) | floor: node_ttl (ms) | no pause > 200 ms | a remote viewer lost | provider connections before the kill |");
        println!("|---:|---:|---:|---:|---:|---:|---|");
        println!(
            "| {runs} | {p50:.0} | {max:.0} | 5000 | {no_gap} | {lost} | {:?} |",
            peaks
        );
        if peaks.iter().any(|&n| n > 1) {
            println!("\nmore than one provider connection before the kill: remote viewers had their own, so the gap does not measure a take-over on this build.");
        }

        let hls_runs = runs.min(5);
        println!("\nHLS take-over: a player on each node, n1 owns the stream (1 s segments); kill -9 n1; longest wait between new segments for the players on n2 and n3 ({hls_runs} runs)");
        println!();
        println!("| run | after the kill (ms) | floor: before the kill (ms) | failed requests after the kill |");
        println!("|---:|---:|---:|---:|");
        for run in 0..hls_runs {
            match hls_takeover_run(&p).await {
                Some((after, before, failed)) => {
                    println!("| {} | {after:.0} | {before:.0} | {failed} |", run + 1)
                }
                None => println!("| {} | (no start) | | |", run + 1),
            }
        }

        freeze::report(&p, runs.min(3)).await;
    });
}
