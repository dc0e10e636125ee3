//! Freezes (CLUSTER.md tests 9 and 10 as measurements; the tests only bound
//! them loosely, as a busy 2-core machine makes tight timing asserts flaky):
//!
//! - owner SIGSTOP for 8 s: the provider's peak connections for the channel
//!   while it is frozen (a second owner takes over: 2 is expected) and the
//!   time from SIGCONT until it is back to one (CLUSTER.md: within 1.5 s);
//! - Redis SIGSTOP for 8 s: whether the provider connection was closed while
//!   Redis hung (every node fences after ~4 s) and the time from SIGCONT until
//!   each of the three viewers (one per node) gets bytes again (CLUSTER.md:
//!   within 3 s).
//!
//! No floor: a single node has neither; the targets are CLUSTER.md's.
//!
//! `FREEZE_DEBUG=1` prints when the provider's connection count changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::support::provider::Provider;
use crate::support::redis::RedisServer;
use crate::{cluster, open, pids, reader, CHANNEL, KBPS};

const FREEZE: Duration = Duration::from_secs(8);

/// Samples the provider's open connections for `prefix` every 5 ms into
/// `(when, count)` until `until`.
fn sampler(p: Arc<Provider>, prefix: String, until: Instant) -> Arc<Mutex<Vec<(Instant, usize)>>> {
    let log: Arc<Mutex<Vec<(Instant, usize)>>> = Arc::default();
    let l = log.clone();
    tokio::spawn(async move {
        while Instant::now() < until {
            l.lock().push((Instant::now(), p.open_streams(&prefix)));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    log
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status();
}

/// One owner freeze: (peak while frozen, ms from SIGCONT until one
/// connection again), or None when the run did not start or never settled.
pub async fn owner_run(p: &Arc<Provider>, run: u64) -> Option<(usize, Option<f64>)> {
    let redis = RedisServer::start().await?;
    let path = format!("live/ownerfreeze{run}.ts?kbps={KBPS}");
    let nodes = cluster(&redis, p, &path).await;
    let addrs = pids(&nodes);
    let prefix = format!("/live/ownerfreeze{run}.ts");
    let until = Instant::now() + Duration::from_secs(25);
    // n1 first: it owns the channel; then a viewer on n2 and on n3.
    let (_v1, _) = open(&addrs[0].1, CHANNEL).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _viewers: Vec<_> = addrs[1..]
        .iter()
        .map(|(_, a)| reader(a.clone(), until))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = sampler(p.clone(), prefix, until);
    signal(addrs[0].0, "-STOP");
    tokio::time::sleep(FREEZE).await;
    // Taken before the signal: the node may act before `kill` returns.
    let resumed = Instant::now();
    signal(addrs[0].0, "-CONT");
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    let s = samples.lock();
    if std::env::var("FREEZE_DEBUG").is_ok() {
        let mut last = usize::MAX;
        for (t, n) in s.iter() {
            if *n != last {
                let at = t.saturating_duration_since(resumed).as_secs_f64()
                    - resumed.saturating_duration_since(*t).as_secs_f64();
                println!("  {at:+.3}s relative to SIGCONT: {n} connection(s)");
                last = *n;
            }
        }
    }
    let peak = s
        .iter()
        .filter(|(t, _)| *t < resumed)
        .map(|(_, n)| *n)
        .max()?;
    // Back to one: the first sample from which on it stays ≤ 1, from
    // SIGCONT (0 when that came before: the count never exceeded one then).
    let last_over = s.iter().rposition(|(_, n)| *n > 1);
    let settled = match last_over {
        None => Some(0.0),
        Some(i) => s
            .get(i + 1)
            .map(|(u, _)| u.saturating_duration_since(resumed).as_secs_f64() * 1000.0),
    };
    Some((peak, settled))
}

/// One Redis freeze: whether the provider connection closed while Redis
/// hung, the ms from SIGCONT until it was open again, and per viewer the ms
/// from SIGCONT until its next bytes (None: lost, or no bytes) and its
/// longest wait for bytes across the freeze.
struct RedisRun {
    closed: bool,
    reopened: Option<f64>,
    back: Vec<Option<f64>>,
    longest_wait: Vec<f64>,
}

async fn redis_run(p: &Arc<Provider>, run: u64) -> Option<RedisRun> {
    let redis = RedisServer::start().await?;
    let path = format!("live/redisfreeze{run}.ts?kbps={KBPS}");
    let nodes = cluster(&redis, p, &path).await;
    let addrs = pids(&nodes);
    let prefix = format!("/live/redisfreeze{run}.ts");
    let until = Instant::now() + Duration::from_secs(30);
    let mut viewers = Vec::new();
    for (_, a) in &addrs {
        viewers.push(reader(a.clone(), until));
        // n1 first: the owner.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = sampler(p.clone(), prefix, until);
    redis.pause();
    tokio::time::sleep(FREEZE).await;
    let resumed = Instant::now();
    redis.resume();
    let mut back = Vec::new();
    let mut longest_wait = Vec::new();
    for (log, task) in viewers {
        let kept = task.await.unwrap_or(false);
        let log = log.lock();
        let first = log.iter().copied().find(|t| *t >= resumed);
        back.push(
            first
                .filter(|_| kept)
                .map(|t| t.duration_since(resumed).as_secs_f64() * 1000.0),
        );
        let longest = log
            .windows(2)
            .map(|w| w[1].duration_since(w[0]))
            .max()
            .unwrap_or_default();
        longest_wait.push(longest.as_secs_f64() * 1000.0);
    }
    let s = samples.lock();
    let closed = s.iter().any(|(t, n)| *t < resumed && *n == 0);
    let reopened = s
        .iter()
        .find(|(t, n)| *t >= resumed && *n >= 1)
        .map(|(t, _)| t.duration_since(resumed).as_secs_f64() * 1000.0);
    Some(RedisRun {
        closed,
        reopened,
        back,
        longest_wait,
    })
}

fn cell(ms: Option<f64>) -> String {
    ms.map_or("never".to_owned(), |v| format!("{v:.0}"))
}

/// Prints both tables.
pub async fn report(p: &Arc<Provider>, runs: u64) {
    println!("\nowner frozen: viewers on n2 and n3 of a channel n1 owns; SIGSTOP n1 for {} s, then SIGCONT ({runs} runs, fresh cluster each)", FREEZE.as_secs());
    println!();
    println!("| run | provider connections while frozen (peak) | back to 1 after SIGCONT (ms) | target (CLUSTER.md, ms) |");
    println!("|---:|---:|---:|---:|");
    for run in 0..runs {
        match owner_run(p, run).await {
            Some((peak, settled)) => {
                println!("| {} | {peak} | {} | 1500 |", run + 1, cell(settled))
            }
            None => println!("| {} | (no start) | | |", run + 1),
        }
    }
    println!("\nRedis frozen: a viewer on each node (n1 owns the channel); SIGSTOP redis-server for {} s, then SIGCONT ({runs} runs)", FREEZE.as_secs());
    println!();
    println!("| run | provider connection closed while Redis hung | provider connection open again after SIGCONT (ms) | bytes again after SIGCONT, n1 / n2 / n3 (ms) | longest wait for bytes, n1 / n2 / n3 (ms) | target (CLUSTER.md, ms) |");
    println!("|---:|---|---:|---:|---:|---:|");
    let mut lost = 0;
    for run in 0..runs {
        match redis_run(p, run).await {
            Some(r) => {
                if r.back.iter().any(Option::is_none) {
                    lost += 1;
                }
                let back: Vec<String> = r.back.into_iter().map(cell).collect();
                let waits: Vec<String> = r.longest_wait.iter().map(|w| format!("{w:.0}")).collect();
                println!(
                    "| {} | {} | {} | {} | {} | 3000 |",
                    run + 1,
                    if r.closed { "yes" } else { "no" },
                    cell(r.reopened),
                    back.join(" / "),
                    waits.join(" / ")
                );
            }
            None => println!("| {} | (no start) | | | | |", run + 1),
        }
    }
    if lost > 0 {
        println!(
            "\n\"never\": that viewer's connection ended or got no bytes within 22 s of SIGCONT."
        );
    }
}
