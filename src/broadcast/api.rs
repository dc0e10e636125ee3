//! The management routes of broadcasts (API-COMPAT-FFMPEG.md §6): start,
//! stop, status, list and delete, with m3u-proxy's reply shapes and
//! `{"detail": ...}` errors (m3u-editor shows `detail`).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::command::segment_name;
use super::network::{self, Held, Launch, Phase, Programme, Running};
use super::request::{self, Start};
use crate::api::{ApiReply, ApiRequest};
use crate::app::App;

/// A start answers once the first segment is being written, ffmpeg has
/// exited, or this passed (m3u-proxy answers after about 3 s; m3u-editor
/// waits 30 s).
const START_WAIT: Duration = Duration::from_secs(3);

/// `GET /broadcast`.
pub fn list(app: &App) -> ApiReply {
    let items: Vec<Value> = app
        .broadcasts
        .listed()
        .iter()
        .map(|n| n.status_json())
        .collect();
    let count = items.len();
    ApiReply::ok(json!({ "broadcasts": items, "count": count }))
}

/// `GET /broadcast/{id}/status`.
pub fn status(app: &App, id: &str) -> ApiReply {
    match app.broadcasts.get(id).filter(|n| n.is_listed()) {
        Some(n) => ApiReply::ok(n.status_json()),
        None => ApiReply::detail(404, "Broadcast not found"),
    }
}

/// `POST /broadcast/{id}/stop`: ffmpeg stopped (SIGTERM, SIGKILL after
/// 5 s), no callback; the status answers 404 afterwards while the playlist
/// stays served until the network is deleted or forgotten.
pub async fn stop(app: &App, id: &str) -> ApiReply {
    let Some(net) = app.broadcasts.get(id) else {
        return ApiReply::detail(404, "Broadcast not found");
    };
    let _op = net.ops.lock().await;
    if !net.is_listed() {
        return ApiReply::detail(404, "Broadcast not found");
    }
    net.stop_programme().await;
    let final_segment = net.final_segment().unwrap_or(0);
    {
        let mut st = net.state.lock();
        st.listed = false;
        if st.phase == Phase::Running {
            st.phase = Phase::Stopped;
        }
        st.idle_since = Some(std::time::Instant::now());
    }
    tracing::info!(network_id = %id, final_segment, "broadcast stopped");
    ApiReply::ok(json!({
        "message": "Broadcast stopped",
        "network_id": id,
        "final_segment_number": final_segment,
        "status": "stopped",
    }))
}

/// `DELETE /broadcast/{id}`: ffmpeg stopped, files removed; 200 whether or
/// not the network existed (m3u-editor calls it after every stop).
pub async fn delete(app: &App, id: &str) -> ApiReply {
    if let Some(net) = app.broadcasts.get(id) {
        let _op = net.ops.lock().await;
        app.broadcasts.forget(&net, "broadcast_deleted").await;
        tracing::info!(network_id = %id, "broadcast deleted");
    } else {
        let _ = std::fs::remove_dir_all(app.broadcasts.dir_of(id));
    }
    ApiReply::ok(json!({ "message": format!("Broadcast {id} cleaned up successfully") }))
}

/// The user agent and headers ffmpeg sends: a registered stream of that URL
/// first, then its provider, then `upstream.user_agent`; the request's
/// headers win over both.
fn identity(app: &App, s: &Start) -> (String, Vec<(String, String)>, Option<String>) {
    let registered = app
        .registry
        .get(&crate::registry::stream_id_for(&s.stream_url_as_sent))
        .map(|st| st.spec());
    let provider = match &registered {
        Some(spec) => app.providers.for_stream(spec, &s.stream_url),
        None => app.providers.by_url(&s.stream_url),
    };
    let ua = registered
        .as_ref()
        .and_then(|r| r.user_agent.clone())
        .or_else(|| provider.and_then(|p| p.user_agent.clone()))
        .unwrap_or_else(|| app.config.upstream.user_agent.clone());
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
        headers.push((k.to_string(), v.to_string()));
    };
    for (k, v) in provider.iter().flat_map(|p| p.headers.iter()) {
        set(k, v);
    }
    for (k, v) in registered.iter().flat_map(|r| r.headers.iter()) {
        set(k, v);
    }
    for (k, v) in &s.headers {
        set(k, v);
    }
    (ua, headers, provider.map(|p| p.name.clone()))
}

/// Refuses a stream URL whose host is not allowed by
/// `security.deny_private_upstreams` (ffmpeg resolves it again itself).
async fn check_target(url: &url::Url) -> Result<(), ApiReply> {
    if !crate::upstream::guard::denying() {
        return Ok(());
    }
    let refused = || {
        ApiReply::detail(
            400,
            "stream_url points to a private address (security.deny_private_upstreams)",
        )
    };
    crate::upstream::guard::check_url(url).map_err(|_| refused())?;
    let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']);
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ApiReply::detail(400, format!("stream_url host cannot be resolved: {e}")))?
        .collect();
    if addrs
        .iter()
        .any(|a| crate::upstream::guard::check_addr(*a).is_err())
    {
        return Err(refused());
    }
    Ok(())
}

/// `POST /broadcast/{id}/start`: starts a programme, or moves a running
/// network on to the next one (its ffmpeg stopped first, numbering
/// continued after a discontinuity).
pub async fn start(app: &App, id: &str, req: &ApiRequest) -> ApiReply {
    let s = match request::parse(&req.body) {
        Ok(s) => Arc::new(s),
        Err(e) => return e,
    };
    if let Err(e) = check_target(&s.stream_url).await {
        return e;
    }
    let b = &app.broadcasts;
    let net = b.get_or_create(id);
    let _op = net.ops.lock().await;
    if let Some(wait) = net.start_refused_for() {
        return ApiReply::detail(
            500,
            format!(
                "Exceeded max start retries for broadcast {id}; retry allowed after {}s",
                wait.as_secs().max(1)
            ),
        );
    }
    let was_running = net.is_running();
    // Taken before the old programme stops: a full cap refuses a new
    // network, never a running one's next programme.
    let slot = if was_running {
        b.running.take_anyway(None)
    } else {
        match b.running.take(None) {
            Ok(s) => s,
            Err(_) => {
                return ApiReply::detail(
                    503,
                    format!(
                        "Too many broadcasts running (broadcast.max_networks = {})",
                        b.config.max_networks
                    ),
                )
            }
        }
    };
    let (ua, headers, provider) = identity(app, &s);
    net.stop_programme().await;
    let lease = match app
        .leases
        .acquire(provider.as_deref(), std::time::Duration::ZERO)
        .await
    {
        Ok(l) => l,
        Err(full) => {
            let msg = format!(
                "Provider {} is at its limit of {} connections",
                full.provider, full.max_connections
            );
            if was_running {
                net.failed(&msg);
            }
            return ApiReply::detail(503, msg);
        }
    };
    // Numbering (API-COMPAT-FFMPEG.md §6): 0 on a running network continues
    // after the last segment; 0 without a discontinuity on a network that
    // is not running starts afresh; a number that would go back continues.
    let last = net.final_segment();
    let mut first = s.segment_start_number;
    let mut discontinuity = s.add_discontinuity;
    let mut fresh = false;
    if was_running && first == 0 {
        first = last.map_or(0, |l| l + 1);
        discontinuity = true;
    } else if first == 0 && !discontinuity {
        fresh = true;
    } else if let Some(l) = last.filter(|l| first <= *l) {
        tracing::warn!(network_id = %id, asked = first, last = l, "segment_start_number would reuse a number; continuing after the last segment");
        first = l + 1;
    }
    // Earlier segments still listed: their timestamps end here.
    if !fresh && !net.window_is_empty() {
        discontinuity = true;
    }
    if let Err(e) = net.begin(first, discontinuity, fresh, &s) {
        let msg = format!("Broadcast directory cannot be written: {e}");
        net.failed(&msg);
        return ApiReply::detail(500, msg);
    }
    let launch = |user_agent: String, headers: Vec<(String, String)>| Launch {
        ffmpeg: app.config.transcode.ffmpeg.clone(),
        user_agent,
        headers,
        device: app.config.transcode.device.clone(),
    };
    // The next programme (m3u-editor's next_stream_config) starts on this
    // one's provider connection: only when it is the same provider.
    let next = s.next.as_ref().and_then(|n| {
        let (nua, nheaders, nprovider) = identity(app, n);
        (nprovider == provider).then(|| (Arc::new((**n).clone()), launch(nua, nheaders)))
    });
    let spawned = launch(ua, headers).spawn(&net, &s, first);
    let (process, pipes) = match spawned {
        Ok(p) => p,
        Err(e) => {
            net.failed(&format!("ffmpeg could not be started: {e}"));
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                503
            } else {
                500
            };
            return ApiReply::detail(code, format!("ffmpeg could not be started: {e}"));
        }
    };
    let pid = process.pid();
    let cancel = CancellationToken::new();
    let (done_tx, done_rx) = watch::channel(false);
    {
        let mut st = net.state.lock();
        st.phase = Phase::Running;
        st.listed = true;
        st.error = None;
        st.idle_since = None;
        st.programme = Some(Programme {
            start: s.clone(),
            started_at: chrono::Utc::now(),
            pid,
            first,
        });
        st.running = Some(Running {
            cancel: cancel.clone(),
            done: done_rx.clone(),
        });
    }
    tracing::info!(network_id = %id, pid, first, discontinuity, transcode = s.transcode, seek = s.seek_seconds, duration = s.duration_seconds, url = %crate::events::redact_url(s.stream_url.as_str()), "broadcast programme started");
    tokio::spawn(network::supervise(
        net.clone(),
        Held {
            process,
            pipes,
            lease,
            slot,
        },
        s.clone(),
        cancel,
        done_tx,
        b.callbacks.clone(),
        next,
    ));
    // Wait for the first segment file (the input opened) or an early end.
    let first_file = net.dir.join(segment_name(first));
    let mut done = done_rx;
    let deadline = tokio::time::Instant::now() + START_WAIT;
    while !*done.borrow_and_update() && !first_file.exists() {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            r = done.changed() => if r.is_err() { break },
        }
    }
    let failed = {
        let st = net.state.lock();
        (st.phase == Phase::Failed).then(|| st.error.clone().unwrap_or_default())
    };
    if let Some(error) = failed {
        net.start_failed();
        return ApiReply::detail(
            500,
            format!("Broadcast {id} failed shortly after start: {error}"),
        );
    }
    ApiReply::ok(net.status_json())
}
