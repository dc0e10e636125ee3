//! The JSON shapes m3u-editor reads: the stream object S and client object C of
//! API-COMPAT.md §3, field names exactly as m3u-proxy spells them.

use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::app::App;
use crate::registry::{Client, Stream};

/// ISO-8601 with microseconds and an explicit `+00:00`, as m3u-proxy writes.
pub fn iso(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

/// Stream object S.
pub fn stream(app: &App, s: &Stream) -> Value {
    let spec = s.spec();
    let f = s.failover();
    let primary = url::Url::parse(&spec.url).ok();
    let user_agent = primary
        .as_ref()
        .map(|u| app.user_agent_for(&spec, u))
        .unwrap_or_else(|| app.config.upstream.user_agent.clone());
    let headers: serde_json::Map<String, Value> = spec
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "stream_id": s.id,
        "original_url": spec.url,
        "current_url": f.current_url,
        "user_agent": user_agent,
        "client_count": s.client_count(),
        "total_bytes_served": s.bytes.load(Ordering::Relaxed),
        "total_segments_served": s.segments.load(Ordering::Relaxed),
        "error_count": s.errors.load(Ordering::Relaxed),
        "is_active": true,
        "has_failover": !spec.failover_urls.is_empty() || spec.failover_resolver_url.is_some(),
        "failover_urls": spec.failover_urls,
        "failover_resolver_url": spec.failover_resolver_url,
        "current_failover_index": f.index,
        "failover_attempts": f.attempts,
        "last_failover_time": f.last_time.map(iso),
        "stream_type": s.display_type(),
        "created_at": iso(s.created_at),
        "last_access": iso(s.last_access()),
        "metadata": spec.metadata,
        "headers": headers,
        "use_sticky_session": spec.sticky,
        "live": spec.live,
        "source": s.origin,
        "sources": s.health.lock().clone(),
        "current_source_index": f.index,
    })
}

/// Client object C.
pub fn client(c: &Client) -> Value {
    json!({
        "client_id": c.id,
        "stream_id": c.stream_id,
        "user_agent": c.user_agent,
        "ip_address": c.ip,
        "username": c.username,
        "bytes_served": c.bytes.load(Ordering::Relaxed),
        "segments_served": c.segments.load(Ordering::Relaxed),
        "created_at": iso(c.created_at),
        "last_access": iso(c.last_access()),
        "is_connected": true,
    })
}
