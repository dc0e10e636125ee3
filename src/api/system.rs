//! `/health`, `/info`, `/stats`, `/clients` and `/test-connection`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
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
    // Viewers of m3u-editor's networks are clients too (not of a stream).
    t.clients += app.broadcasts.viewers.all_clients().len();
    t
}

/// Every client: the streams' and the networks' viewers.
fn every_client(app: &App) -> Vec<Arc<crate::registry::Client>> {
    let mut all = app.registry.all_clients();
    all.extend(app.broadcasts.viewers.all_clients());
    all
}

/// The state file's status for `/health` and `/stats`.
fn state_json(app: &App) -> Value {
    let s = app.saver.status();
    json!({
        "path": app.state.path().display().to_string(),
        "ok": s.ok,
        "pending": s.pending,
        "last_saved_at": s.last_saved_at,
        "last_error": s.last_error,
        "failing_since": s.failing_since,
        "consecutive_failures": s.consecutive_failures,
        "failures_total": s.failures_total,
    })
}

/// `GET /health`. `status` is `degraded` (still 200: m3u-editor reads any
/// 2xx as up, and streaming works) while the state file cannot be written,
/// so changes since then would be lost by a crash; `state_file` says why.
pub fn health(app: &App) -> ApiReply {
    let t = totals(app);
    let uptime = app.started.elapsed().as_secs_f64();
    let status = if app.saver.failing() {
        "degraded"
    } else {
        "healthy"
    };
    let mut body = json!({
        "status": status,
        "state_file": state_json(app),
        "root_path": app.config.server.root_path,
        "version": VERSION,
        "uptime_seconds": uptime,
        "active_streams": t.active_streams,
        "active_clients": t.clients,
        "total_bytes_served": t.bytes,
        "stats": t.json(uptime),
    });
    if let Some(c) = &app.cluster {
        body["cluster"] = c.status();
        app.cluster_totals.patch_health(&mut body);
        // A node cut off from Redis has fenced itself: 503 so the load
        // balancer sends players to the nodes that can serve them.
        if !c.healthy() {
            body["status"] = json!("unhealthy");
            return ApiReply { status: 503, body };
        }
    }
    ApiReply::ok(body)
}

/// `GET /info`: m3u-editor reads `version`, `hardware_acceleration.enabled` and
/// `redis.pooling_enabled` without defaults. m3u-edge has no transcoder and no
/// Redis: it says so in m3u-proxy's shape.
pub fn info(app: &App) -> ApiReply {
    let c = &app.config;
    let redis_url = c
        .cluster
        .as_ref()
        .and_then(|k| url::Url::parse(&k.redis_url).ok());
    ApiReply::ok(json!({
        "version": VERSION,
        "ffmpeg_version": app.ffmpeg.version,
        "streamlink_version": app.resolvers.versions.streamlink,
        "ytdlp_version": app.resolvers.versions.yt_dlp,
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
            "enabled": app.cluster.is_some(),
            "pooling_enabled": false,
            "host": redis_url.as_ref().and_then(|u| u.host_str().map(str::to_owned)),
            "port": redis_url.as_ref().and_then(|u| u.port_or_known_default()),
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
/// With `?limit=&offset=`, `streams` and `clients` hold only that page
/// (the totals in `proxy_stats` stay whole), as for `/streams`.
pub fn stats(app: &App, req: &ApiRequest) -> ApiReply {
    let page = match super::Page::from_query(req) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let t = totals(app);
    let streams: Vec<Value> = page
        .slice(&app.registry.list())
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
    proxy_stats["state_save_failures"] = json!(app.saver.status().failures_total);
    proxy_stats["hls_sequence_regressions"] =
        json!(app.hls.sequence_regressions.load(Ordering::Relaxed));
    proxy_stats["hls_sequence_resets"] = json!(app.hls.sequence_resets.load(Ordering::Relaxed));
    let mut body = json!({
        "proxy_stats": proxy_stats,
        "playlists": app.playlists.stats(),
        "providers": app.leases.usage().into_iter().zip(app.leases.local_usage()).map(|((name, in_use, max), (_, here))| json!({
            "name": name,
            "connections": in_use,
            "node_connections": here,
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
        "state_file": state_json(app),
        "streams": streams,
        "clients": page.slice(&every_client(app)).iter().map(|c| j_client(c)).collect::<Vec<_>>(),
    });
    if let Some(c) = &app.cluster {
        body["cluster"] = c.status();
    }
    ApiReply::ok(body)
}

/// `GET /clients`: every client, m3u-proxy's shape. With `?limit=` and/or
/// `?offset=` only that page is listed (`total_clients` stays the total,
/// and `limit` and `offset` are echoed).
pub fn clients(app: &App, req: &ApiRequest) -> ApiReply {
    let page = match super::Page::from_query(req) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let all = every_client(app);
    let total = all.len();
    let clients: Vec<Value> = page.slice(&all).iter().map(|c| j_client(c)).collect();
    let mut out = json!({ "total_clients": total, "clients": clients });
    page.echo(&mut out);
    ApiReply::ok(out)
}

/// `POST /test-connection`: always 200; the result is in `success`. The URL
/// is fetched with the default upstream user agent, nothing of the caller's.
/// The answer says whether an HTTP server answered (and its status), nothing
/// about why not; `security.deny_private_upstreams` applies.
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
    let started = tokio::time::Instant::now();
    let refused = |r: &crate::upstream::guard::Refused| {
        ApiReply::ok(json!({
            "success": false,
            "message": format!("Connection failed: {r}"),
            "url_tested": url,
            "error": "refused",
        }))
    };
    if let Some(r) = url::Url::parse(&url)
        .ok()
        .and_then(|u| crate::upstream::guard::check_url(&u).err())
    {
        return refused(&r);
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
            if let Some(r) = crate::upstream::guard::find_refused(&e) {
                return refused(r);
            }
            // One answer for every failure, given after the full timeout: a
            // closed port, a filtered one and an open one that does not speak
            // HTTP look the same (issue #14 h: not a port scanner).
            tokio::time::sleep_until(started + TEST_CONNECTION_TIMEOUT).await;
            ApiReply::ok(json!({
                "success": false,
                "message": "Not reachable via HTTP",
                "url_tested": url,
                "error": "not reachable",
            }))
        }
    }
}
