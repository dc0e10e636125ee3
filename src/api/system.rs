//! `/health`, `/info`, `/stats`, `/clients` and `/test-connection`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};

use super::json::client as j_client;
use super::{body, ApiReply, ApiRequest};
use crate::app::{App, VERSION};

/// m3u-proxy gives `/test-connection` 5 s.
const TEST_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

struct Totals {
    streams: usize,
    active_streams: usize,
    clients: usize,
    bytes: u64,
    segments: u64,
}

impl Totals {
    /// m3u-proxy's stats object (`/health.stats`, `/stats.proxy_stats`).
    fn json(&self, uptime: f64) -> Value {
        json!({
            "total_streams": self.streams,
            "active_streams": self.active_streams,
            "total_clients": self.clients,
            "active_clients": self.clients,
            "total_bytes_served": self.bytes,
            "total_segments_served": self.segments,
            "uptime_seconds": uptime,
        })
    }
}

fn totals(app: &App) -> Totals {
    let streams = app.registry.list();
    let mut t = Totals {
        streams: streams.len(),
        active_streams: 0,
        clients: 0,
        bytes: 0,
        segments: 0,
    };
    for s in &streams {
        let n = s.client_count();
        t.clients += n;
        if n > 0 {
            t.active_streams += 1;
        }
        t.bytes += s.bytes.load(Ordering::Relaxed);
        t.segments += s.segments.load(Ordering::Relaxed);
    }
    t
}

/// `GET /health`.
pub fn health(app: &App) -> ApiReply {
    let t = totals(app);
    let uptime = app.started.elapsed().as_secs_f64();
    ApiReply::ok(json!({
        "status": "healthy",
        "root_path": app.config.server.root_path,
        "version": VERSION,
        "uptime_seconds": uptime,
        "active_streams": t.active_streams,
        "active_clients": t.clients,
        "total_bytes_served": t.bytes,
        "stats": t.json(uptime),
    }))
}

/// `GET /info`: m3u-editor reads `version`, `hardware_acceleration.enabled` and
/// `redis.pooling_enabled` without defaults. m3u-edge has no transcoder and no
/// Redis: it says so in m3u-proxy's shape.
pub fn info(app: &App) -> ApiReply {
    let c = &app.config;
    ApiReply::ok(json!({
        "version": VERSION,
        "ffmpeg_version": app.ffmpeg.version,
        "streamlink_version": null,
        "ytdlp_version": null,
        "hardware_acceleration": {
            "enabled": app.ffmpeg.hwaccel_available,
            "type": match c.transcode.hwaccel {
                crate::config::HwAccel::None => serde_json::Value::Null,
                h => json!(h.as_str()),
            },
            "device": c.transcode.device,
            "ffmpeg_args": crate::transcode::source::with_hwaccel(&["-i".to_string()], &c.transcode)
                .into_iter()
                .filter(|a| a != "-i")
                .collect::<Vec<_>>(),
        },
        "redis": {
            "enabled": false,
            "pooling_enabled": false,
            "host": null,
            "port": null,
            "password": null,
            "db": null,
            "max_clients_per_stream": null,
            "stream_timeout": c.server.stream_idle_ttl.as_secs(),
            "sharing_strategy": "shared_live_hub",
        },
        "transcoding": {
            "enabled": app.ffmpeg.version.is_some(),
            "profiles": crate::transcode::profiles::all(&c.transcode.profiles)
                .into_iter()
                .map(|p| p.name)
                .collect::<Vec<_>>(),
            "max_processes": c.transcode.max_processes,
            "running": app.transcoders.open(),
        },
        "configuration": {
            "root_path": c.server.root_path,
            "public_url": c.server.public_url.as_ref().map(|u| u.to_string()),
            "default_user_agent": c.upstream.user_agent,
            "connect_timeout_seconds": c.upstream.connect_timeout.as_secs_f64(),
            "read_timeout_seconds": c.upstream.read_timeout.as_secs_f64(),
            "stream_idle_ttl_seconds": c.server.stream_idle_ttl.as_secs(),
            "api_token_required": c.api.token.is_some(),
            "providers": c.providers.iter().map(|p| json!({
                "name": p.name,
                "max_connections": p.max_connections,
            })).collect::<Vec<_>>(),
        },
        "worker": {
            "implementation": "m3u-edge (Rust, Pingora)",
            "threads": c.server.threads,
            "pid": std::process::id(),
        },
    }))
}

/// `GET /stats`.
pub fn stats(app: &App) -> ApiReply {
    let t = totals(app);
    let streams: Vec<Value> = app
        .registry
        .list()
        .iter()
        .map(|s| super::json::stream(app, s))
        .collect();
    let mut proxy_stats = t.json(app.started.elapsed().as_secs_f64());
    proxy_stats["bytes_in"] = json!(app.metrics.bytes_in.get());
    proxy_stats["bytes_out"] = json!(app.metrics.bytes_out.get());
    proxy_stats["failovers"] = json!(app
        .registry
        .list()
        .iter()
        .map(|s| s.failover().attempts)
        .sum::<u64>());
    proxy_stats["slow_viewers_dropped"] =
        json!(app.hub.slow_viewers_dropped.load(Ordering::Relaxed));
    proxy_stats["events_dropped"] = json!(app.events.dropped());
    proxy_stats["hls_cached_segment_bytes"] = json!(app.hls.cached_segment_bytes());
    proxy_stats["hls_sequence_regressions"] =
        json!(app.hls.sequence_regressions.load(Ordering::Relaxed));
    ApiReply::ok(json!({
        "proxy_stats": proxy_stats,
        "providers": app.leases.usage().into_iter().map(|(name, in_use, max)| json!({
            "name": name,
            "connections": in_use,
            "max_connections": max,
        })).collect::<Vec<_>>(),
        "live_channels": app.hub.channels().iter().map(|c| json!({
            "stream_id": c.stream.id,
            "viewers": c.viewers(),
            "failovers": c.failovers.load(Ordering::Relaxed),
            "slow_viewers_dropped": c.dropped_viewers.load(Ordering::Relaxed),
            "last_failover_gap_ms": c.last_gap_ms.load(Ordering::Relaxed),
            "uptime_seconds": c.created.elapsed().as_secs_f64(),
        })).collect::<Vec<_>>(),
        "slow_viewers_dropped": app.hub.slow_viewers_dropped.load(Ordering::Relaxed),
        "streams": streams,
        "clients": app.registry.all_clients().iter().map(|c| j_client(c)).collect::<Vec<_>>(),
    }))
}

/// `GET /clients`.
pub fn clients(app: &App) -> ApiReply {
    let clients: Vec<Value> = app
        .registry
        .all_clients()
        .iter()
        .map(|c| j_client(c))
        .collect();
    ApiReply::ok(json!({ "total_clients": clients.len(), "clients": clients }))
}

/// `POST /test-connection`: always 200; the result is in `success`. The URL
/// is fetched with the default upstream user agent, nothing of the caller's.
pub async fn test_connection(app: &App, req: &ApiRequest) -> ApiReply {
    let m = match body::object(&req.body) {
        Ok(m) => m,
        Err(e) => return e,
    };
    let url = match m.get("url") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => {
            return ApiReply::invalid(&["body", "url"], "Field required", Value::Null)
        }
        Some(v) => {
            return ApiReply::invalid(
                &["body", "url"],
                "Input should be a valid string",
                v.clone(),
            )
        }
    };
    if let Err(e) = body::check_url("url", &url) {
        return e;
    }
    let result = app
        .http
        .get(&url)
        .timeout(TEST_CONNECTION_TIMEOUT)
        .send()
        .await;
    match result {
        Ok(resp) => {
            let code = resp.status().as_u16();
            let success = resp.status().is_success();
            ApiReply::ok(json!({
                "success": success,
                "message": if success { "Connection successful".to_string() } else { format!("Upstream answered HTTP {code}") },
                "status_code": code,
                "url_tested": url,
            }))
        }
        Err(e) => {
            let kind = if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "connect"
            } else {
                "request"
            };
            ApiReply::ok(json!({
                "success": false,
                "message": format!("Connection failed ({kind})"),
                "url_tested": url,
                "error": e.without_url().to_string(),
            }))
        }
    }
}
