//! `/streams…` handlers: registration, listing, deletion and the metadata
//! queries m3u-editor uses for connection counting (API-COMPAT.md §2, §8).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};

use super::{body, json as j, query_bool, query_required, ApiReply, ApiRequest};
use crate::app::App;
use crate::registry::{Origin, Stream};
use crate::upstream::sources;

fn not_found() -> ApiReply {
    ApiReply::detail(404, "Stream not found")
}

/// `POST /streams`.
pub fn create(app: &App, req: &ApiRequest) -> ApiReply {
    let parsed = match body::create_stream(&req.body) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let spec = parsed.spec;
    let reg = match app.registry.register(spec.clone()) {
        Ok(r) => r,
        Err(max) => return too_many_streams(app, max),
    };
    if reg.replaced {
        app.persist();
        tracing::info!(stream_id = %reg.stream.id, "stream registered");
    }
    create_reply(app, &reg.stream.id, &spec, parsed.raw_metadata)
}

/// The reply of `POST /streams` for stream `id` registered from `spec`.
pub fn create_reply(
    app: &App,
    id: &str,
    spec: &crate::registry::StreamSpec,
    raw_metadata: Option<Value>,
) -> ApiReply {
    let is_hls = url::Url::parse(&spec.url)
        .map(|u| u.path().to_ascii_lowercase().ends_with(".m3u8"))
        .unwrap_or(false);
    let (stream_type, endpoint) = if is_hls {
        ("hls", format!("/hls/{id}/playlist.m3u8"))
    } else {
        ("direct", format!("/stream/{id}"))
    };
    // The reply echoes the request, as m3u-proxy does, even when an existing
    // stream with viewers was kept unchanged.
    let user_agent = spec
        .user_agent
        .clone()
        .unwrap_or_else(|| app.config.upstream.user_agent.clone());
    let mut out = json!({
        "stream_id": id,
        "primary_url": spec.url,
        "failover_urls": spec.failover_urls,
        "user_agent": user_agent,
        "stream_type": stream_type,
        "stream_endpoint": endpoint,
        "playlist_url": endpoint,
        "direct_url": format!("/stream/{id}"),
        "message": format!("Stream created successfully ({stream_type})"),
    });
    if let Some(m) = raw_metadata.filter(|m| m.as_object().is_some_and(|o| !o.is_empty())) {
        out["metadata"] = m;
    }
    ApiReply::ok(out)
}

/// The 507 of a registration past `limits.max_streams`, counted.
pub fn too_many_streams(app: &App, max: usize) -> ApiReply {
    app.metrics.cut(crate::metrics::LimitCut::Streams);
    ApiReply::detail(
        507,
        format!("Too many streams: limits.max_streams is {max}; delete some first"),
    )
}

/// `GET /streams`: every stream, m3u-proxy's shape. With `?limit=` and/or
/// `?offset=` only that page is listed (oldest first; `total` stays the
/// total, and `limit` and `offset` are echoed), so a proxy with 200 000
/// streams need not build one huge reply.
pub fn list(app: &App, req: &ApiRequest) -> ApiReply {
    let page = match super::Page::from_query(req) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let all = app.registry.list();
    let total = all.len();
    let streams: Vec<Value> = page.slice(&all).iter().map(|s| j::stream(app, s)).collect();
    let mut out = json!({ "streams": streams, "total": total });
    page.echo(&mut out);
    ApiReply::ok(out)
}

/// `GET /streams/{id}`.
pub fn get(app: &App, id: &str) -> ApiReply {
    let Some(s) = app.registry.get(id) else {
        return not_found();
    };
    let clients: Vec<Value> = s.clients().iter().map(|c| j::client(c)).collect();
    ApiReply::ok(json!({
        "stream": j::stream(app, &s),
        "client_count": clients.len(),
        "clients": clients,
    }))
}

/// Removes an API stream and closes its viewers; YAML streams are read-only.
fn remove(app: &App, s: &Arc<Stream>, reason: &str) -> bool {
    if s.origin.read_only() {
        return false;
    }
    app.remove_stream(&s.id, reason)
}

/// `DELETE /streams/{id}`.
pub fn delete(app: &App, id: &str) -> ApiReply {
    let Some(s) = app.registry.get(id) else {
        return not_found();
    };
    if s.origin == Origin::Config {
        return ApiReply::detail(
            409,
            format!("Stream {id} is declared in the config file and cannot be deleted"),
        );
    }
    if s.origin == Origin::Playlist {
        return ApiReply::detail(
            409,
            format!("Stream {id} is imported from a playlist and cannot be deleted"),
        );
    }
    remove(app, &s, "manual_deletion");
    app.persist();
    ApiReply::ok(json!({ "message": format!("Stream {id} deleted") }))
}

fn metadata_value<'a>(s: &'a BTreeMap<String, String>, field: &str) -> Option<&'a String> {
    s.get(field)
}

/// `GET /streams/by-metadata`.
pub fn by_metadata(app: &App, req: &ApiRequest) -> ApiReply {
    let (field, value, active_only) = match (
        query_required(req, "field"),
        query_required(req, "value"),
        query_bool(req, "active_only", true),
    ) {
        (Ok(f), Ok(v), Ok(a)) => (f, v, a),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return e,
    };
    let mut matching = Vec::new();
    for s in app.registry.list() {
        let spec = s.spec();
        // m3u-proxy compares str(metadata.get(field, "")), so a missing field matches "".
        if metadata_value(&spec.metadata, field).map_or("", |v| v.as_str()) != value {
            continue;
        }
        let clients = s.client_count();
        if active_only && clients == 0 {
            continue;
        }
        matching.push(json!({
            "stream_id": s.id,
            "client_count": clients,
            "metadata": spec.metadata,
            "last_access": j::iso(s.last_access()),
            "is_active": true,
            "url": s.failover().current_url,
            "stream_type": s.display_type(),
        }));
    }
    let total_clients: u64 = matching
        .iter()
        .map(|m| m["client_count"].as_u64().unwrap_or(0))
        .sum();
    ApiReply::ok(json!({
        "filter": { "field": field, "value": value },
        "active_only": active_only,
        "total_matching": matching.len(),
        "total_clients": total_clients,
        "matching_streams": matching,
    }))
}

/// `GET /streams/counts-by-metadata`: streams per value, every requested value
/// present (0 when none).
pub fn counts_by_metadata(app: &App, req: &ApiRequest) -> ApiReply {
    let (field, values, active_only) = match (
        query_required(req, "field"),
        query_required(req, "values"),
        query_bool(req, "active_only", true),
    ) {
        (Ok(f), Ok(v), Ok(a)) => (f, v, a),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return e,
    };
    let mut counts: serde_json::Map<String, Value> = values
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| (v.to_string(), json!(0)))
        .collect();
    for s in app.registry.list() {
        let spec = s.spec();
        let v = metadata_value(&spec.metadata, field).map_or("", |v| v.as_str());
        if let Some(n) = counts.get_mut(v) {
            if active_only && s.client_count() == 0 {
                continue;
            }
            *n = json!(n.as_u64().unwrap_or(0) + 1);
        }
    }
    ApiReply::ok(json!({ "field": field, "counts": counts }))
}

/// Streams whose metadata has `field` equal to `value` (a missing field never
/// matches here, unlike the GET).
fn matching_for_delete(app: &App, field: &str, value: &str) -> Vec<Arc<Stream>> {
    app.registry
        .list()
        .into_iter()
        .filter(|s| metadata_value(&s.spec().metadata, field).is_some_and(|v| v == value))
        .collect()
}

fn excluded(s: &Stream, exclude_channel_id: Option<&str>) -> bool {
    exclude_channel_id.is_some_and(|ex| s.spec().metadata.get("id").is_some_and(|id| id == ex))
}

/// The checked query of `DELETE /streams/by-metadata` (here and in
/// cluster mode): `field`, `value`, `force`, `exclude_channel_id`,
/// `client_id`.
pub(crate) struct DeleteQuery<'a> {
    pub field: &'a str,
    pub value: &'a str,
    pub force: bool,
    pub exclude: Option<&'a str>,
    pub client_id: Option<&'a str>,
}

pub(crate) fn delete_query(req: &ApiRequest) -> Result<DeleteQuery<'_>, ApiReply> {
    let (field, value, force) = match (
        query_required(req, "field"),
        query_required(req, "value"),
        query_bool(req, "force", true),
    ) {
        (Ok(f), Ok(v), Ok(force)) => (f, v, force),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Err(e),
    };
    let client_id = req.param("client_id");
    if client_id.is_some_and(|c| c.chars().count() > 128) {
        return Err(ApiReply::invalid(
            &["query", "client_id"],
            "String should have at most 128 characters",
            json!(client_id),
        ));
    }
    Ok(DeleteQuery {
        field,
        value,
        force,
        exclude: req.param("exclude_channel_id"),
        client_id,
    })
}

/// `DELETE /streams/by-metadata`.
pub fn delete_by_metadata(app: &App, req: &ApiRequest) -> ApiReply {
    let DeleteQuery {
        field,
        value,
        force,
        exclude,
        client_id,
    } = match delete_query(req) {
        Ok(q) => q,
        Err(e) => return e,
    };
    let mut deleted = Vec::new();
    let mut skipped = Vec::new();
    for s in matching_for_delete(app, field, value) {
        if excluded(&s, exclude) {
            skipped.push(json!({ "stream_id": s.id, "reason": "excluded_by_channel_id" }));
            continue;
        }
        if !force {
            // The leaving player's connection is closed now, not left dangling
            // as m3u-proxy 0.4.5 does.
            if let Some(cid) = client_id {
                if s.disconnect_client(cid).is_some() {
                    app.metrics.client_drop(crate::metrics::DropReason::Api);
                }
            }
            let remaining = s.client_count();
            if remaining > 0 {
                skipped.push(json!({
                    "stream_id": s.id,
                    "reason": "has_active_clients",
                    "active_clients": remaining,
                }));
                continue;
            }
        }
        if s.origin.read_only() {
            skipped.push(json!({ "stream_id": s.id, "reason": "configured_stream" }));
            continue;
        }
        if remove(app, &s, "metadata_filter_deletion") {
            deleted.push(s.id.clone());
        }
    }
    if !deleted.is_empty() {
        app.persist();
    }
    ApiReply::ok(json!({
        "message": format!("Deleted {} stream(s) matching {field}={value}", deleted.len()),
        "deleted_count": deleted.len(),
        "deleted_streams": deleted,
        "skipped_streams": skipped,
    }))
}

/// `DELETE /streams/oldest-by-metadata`: the one matching stream with the
/// earliest `created_at`.
pub fn delete_oldest(app: &App, req: &ApiRequest) -> ApiReply {
    let (field, value) = match (query_required(req, "field"), query_required(req, "value")) {
        (Ok(f), Ok(v)) => (f, v),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let exclude = req.param("exclude_channel_id");
    let oldest = matching_for_delete(app, field, value)
        .into_iter()
        .filter(|s| s.origin == Origin::Api && !excluded(s, exclude))
        .min_by_key(|s| s.created_at);
    let Some(s) = oldest else {
        return ApiReply::ok(json!({
            "message": format!("No stream matching {field}={value}"),
            "deleted_stream": null,
            "deleted_count": 0,
        }));
    };
    let age = (chrono::Utc::now() - s.created_at)
        .num_microseconds()
        .unwrap_or(0) as f64
        / 1e6;
    remove(app, &s, "oldest_stream_deletion");
    app.persist();
    ApiReply::ok(json!({
        "message": format!("Deleted oldest stream matching {field}={value}"),
        "deleted_stream": s.id,
        "deleted_count": 1,
        "stream_age_seconds": age,
    }))
}

/// `POST /streams/{id}/failover`: moves the stream to its next source (the
/// resolver when configured, else the next of `failover_urls`). New requests
/// start there.
pub async fn failover(app: &App, id: &str) -> ApiReply {
    let Some(s) = app.registry.get(id) else {
        return not_found();
    };
    if let Some(c) = app
        .cluster
        .as_ref()
        .filter(|c| c.table().owned(id).is_none())
    {
        // The next source counts from where the channel's owner has it,
        // not from this node's copy.
        crate::cluster::owner::adopt_shared(c, &s).await;
    }
    let spec = s.spec();
    let f = s.failover();
    let next = if let Some(resolver) = &spec.failover_resolver_url {
        match sources::ask_resolver(
            &app.http,
            resolver,
            &spec,
            &f.current_url,
            f.index,
            None,
            "manual",
        )
        .await
        {
            Some(u) => Some((f.index + 1, u.to_string())),
            None => return ApiReply::detail(500, "Failover resolver returned no next URL"),
        }
    } else if spec.failover_urls.is_empty() {
        return ApiReply::detail(400, "No failover URLs configured for this stream");
    } else {
        let idx = f.index + 1;
        spec.failover_urls
            .get(idx as usize)
            .map(|u| (idx, u.clone()))
    };
    let Some((index, url)) = next else {
        return ApiReply::detail(500, "No failover URL left to switch to");
    };
    s.record_failover(index, &url, "forced");
    if let Some(c) = &app.cluster {
        // The channel's owner may run on another node.
        crate::cluster::relay::failover_everywhere(c, id, &s.failover()).await;
    }
    let live = app.hub.force_failover(id);
    tracing::warn!(stream_id = %id, index, live, "failover forced through the API");
    ApiReply::ok(json!({
        "message": "Failover triggered",
        "new_url": url,
        "failover_index": index,
        "failover_attempts": s.failover().attempts,
        "active_clients": s.client_count(),
        "stream_type": s.display_type(),
    }))
}
