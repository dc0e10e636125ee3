//! What the benches' simulated viewers share: reading a live body until a
//! deadline while recording the longest wait between reads (a viewer that
//! waited > 1 s is what the bench tables count), and percentiles.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Each read's buffer: large, so the viewer is never the bottleneck.
const READ_BUF: usize = 256 * 1024;

/// Reads `s` until `until`, adding to `bytes` and raising `max_gap_us` to the
/// longest time between two reads. A connection that ends early counts the
/// rest of the window as one wait.
pub async fn read_until(
    s: &mut TcpStream,
    bytes: &AtomicU64,
    max_gap_us: &AtomicU64,
    until: Instant,
) {
    let mut buf = vec![0u8; READ_BUF];
    let mut last = Instant::now();
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                max_gap_us.fetch_max(
                    until.duration_since(last).as_micros() as u64,
                    Ordering::Relaxed,
                );
                return;
            }
            Ok(Ok(n)) => {
                let now = Instant::now();
                max_gap_us.fetch_max(
                    now.duration_since(last).as_micros() as u64,
                    Ordering::Relaxed,
                );
                last = now;
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => break,
        }
    }
}

/// The `p` quantile (0..=1) of `v` (sorted in place); NaN when empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}
