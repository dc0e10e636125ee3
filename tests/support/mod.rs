//! Test support shared by every integration test module (and `benches/` via `#[path]`).
//!
//! Owns the loopback world the proxy is tested in: a real IPTV provider
//! (`provider`), the real `m3u-edge` binary on a free port (`edge`), a reqwest client
//! that never follows redirects (`client`), bounded polling (`eventually`) and MPEG-TS
//! stream checks (`ts_check`).
//! It owns no assertions about the proxy itself; those live in the area modules
//! (`live`, `hls`, `vod`, `api`, ...) declared by `tests/tests.rs`.
#![allow(dead_code)]

pub mod client;
pub mod cluster;
pub mod edge;
pub mod eventually;
pub mod hls_reset;
pub mod load;
pub mod procs;
pub mod provider;
pub mod redis;
pub mod resolver_site;
pub mod ts_check;
pub mod webhook;

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Media fixtures shared by all engineers (`/work/shared/fixtures/README.md`).
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures");

/// Absolute path of a fixture file, e.g. `fixture_path("hls_ts/v0/index.m3u8")`.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(FIXTURES).join(name)
}

/// Request headers as the test servers record them: lowercase name → value,
/// repeated headers joined with `", "`.
pub fn header_map(headers: &http::HeaderMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::<String, String>::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    out
}

/// The bytes of a fixture file; panics with the path when it is missing.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// The two-worker tokio runtime the bench harnesses (and their helper
/// servers) run on: the same shape as the proxy on this 2-core machine.
pub fn bench_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
