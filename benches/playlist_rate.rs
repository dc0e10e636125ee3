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

/// Set (to a port) when this executable runs as the bare Pingora server.
const BARE_ENV: &str = "PLAYLIST_BARE";
/// The body the bare server answers with: a playlist m3u-edge rendered.
const BARE_BODY_ENV: &str = "PLAYLIST_BARE_BODY";

/// The floor for any Pingora-based proxy on this machine: a Pingora HTTP
/// service whose `request_filter` answers every request with a fixed
/// playlist (no routing, no cache, no rewrite, no client tracking).
struct Bare(bytes::Bytes);

#[async_trait::async_trait]
impl pingora::proxy::ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _: &mut pingora::proxy::Session,
        _: &mut (),
    ) -> pingora::Result<Box<pingora::upstreams::peer::HttpPeer>> {
        pingora::Error::e_explain(pingora::ErrorType::InternalError, "no upstream")
    }

    async fn request_filter(
        &self,
        session: &mut pingora::proxy::Session,
        _: &mut (),
    ) -> pingora::Result<bool> {
        let mut resp = pingora::http::ResponseHeader::build(200, Some(3))?;
        resp.insert_header("content-type", "application/vnd.apple.mpegurl")?;
        resp.insert_header("content-length", self.0.len())?;
        resp.insert_header("cache-control", "no-cache")?;
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(self.0.clone()), true)
            .await?;
        Ok(true)
    }
}

fn bare_main(port: &str) {
    let body = std::env::var(BARE_BODY_ENV)
        .ok()
        .and_then(|p| std::fs::read(p).ok())
        .unwrap_or_default();
    let conf = pingora::server::configuration::ServerConf {
        threads: 2,
        ..Default::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora::proxy::http_proxy_service(&server.configuration, Bare(body.into()));
    // The same client-connection buffers as m3u-edge (src/main.rs).
    svc.add_listener(
        pingora::listeners::ListenerConfig::tcp(format!("127.0.0.1:{port}")).l4_buffer(
            pingora::protocols::l4::stream::L4BufferSettings::new(0, 8 * 1024),
        ),
    );
    server.add_service(svc);
    server.run_forever();
}

/// Runs wrk with `script` against `addr`; the line the table shows.
fn wrk(conns: usize, secs: u64, script: &std::path::Path, addr: &str) -> Option<String> {
    let o = std::process::Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(format!("http://{addr}/"))
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&o.stdout);
    let grab = |key: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .map(|l| l.trim().to_string())
            .unwrap_or_default()
    };
    // wrk counts any answer as a request: say how many were not 2xx/3xx.
    let non_2xx = match grab("Non-2xx") {
        l if l.is_empty() => "all 2xx".to_string(),
        l => l,
    };
    Some(format!(
        "{} | {} | {} | {non_2xx}",
        grab("Requests/sec"),
        grab("50%"),
        grab("99%")
    ))
}

/// Starts the bare Pingora server on a free port with `body`; returns it and its address.
fn start_bare(body_file: &std::path::Path) -> Option<(std::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = std::process::Command::new(std::env::current_exe().ok()?)
        .env(BARE_ENV, port.to_string())
        .env(BARE_BODY_ENV, body_file)
        .env("RUST_LOG", "warn")
        .spawn()
        .ok()?;
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return Some((child, addr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn main() {
    if let Ok(port) = std::env::var(BARE_ENV) {
        bare_main(&port);
        return;
    }
    let conns = env_or("PLAYLIST_CONNS", 100) as usize;
    let secs = env_or("PLAYLIST_SECS", 10);
    let rt = support::bench_runtime();
    rt.block_on(async {
        let p = Provider::start().await;
        // Access logging off (`RUST_LOG=warn`): it costs ~10 % at these rates.
        let e = Edge::start_with(
            // The in-process viewers and wrk's are 2 × `conns` client ids from
            // one address: raise the per-address cap, or most answers are 429s.
            "server:\n  listen: \"{listen}\"\n  state_file: \"{state_file}\"\n  grace_period: \"0s\"\nlog:\n  level: warn\nlimits:\n  max_hls_clients_per_address: 100000\n  max_hls_clients_per_stream: 100000\n",
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
        if std::fs::write(&script, lua).is_err() {
            return;
        }
        match wrk(conns, secs, &script, &addr) {
            Some(line) => println!(
                "\nwrk -t2 -c{conns} -d{secs}s: {line} | provider playlist fetches in total: {}",
                p.hits("/hls-live/hls_ts/v0/index.m3u8")
            ),
            None => {
                println!("\n(wrk not installed: apt-get install wrk for the wrk rows)");
                return;
            }
        }
        // The floor: bare Pingora answering the same playlist, same wrk.
        let mut s = TcpStream::connect(&addr).await.expect("connect");
        let req = format!("GET /m3u-proxy/hls/{id}/playlist.m3u8?client_id=v1 HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        let _ = s.write_all(req.as_bytes()).await;
        let mut buf = Vec::new();
        if read_response(&mut s, &mut buf).await != Some(200) {
            println!("floor skipped: the playlist to replay did not come back with 200");
            return;
        }
        let body_at = buf.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |i| i + 4);
        let body_file = e.dir().join("bare-body.m3u8");
        if std::fs::write(&body_file, &buf[body_at..]).is_err() {
            return;
        }
        if let Some((mut child, bare)) = start_bare(&body_file) {
            if let Some(line) = wrk(conns, secs, &script, &bare) {
                println!(
                    "floor, bare Pingora answering the same {}-byte playlist from request_filter: {line}",
                    buf.len() - body_at
                );
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    });
}
