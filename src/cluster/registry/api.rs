//! The management routes that read or write shared state, in cluster mode:
//! same paths, same shapes as on one node (`crate::api`), answered from
//! Redis. [`handle`] takes the routes it owns and leaves the rest (`None`)
//! to the node-local handlers.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;
use http::Method;
use serde_json::{json, Value};

use super::{clients, hash, items, streams, text, unavailable, webhooks, Registered, Shared};
use crate::api::{self, json as j, query_bool, query_required, ApiReply, ApiRequest, Page};
use crate::app::App;
use crate::cluster::{Cluster, ClusterError};
use crate::registry::{stream_id_for, Origin, Stream};
use crate::route::Api;

/// Answers `api` from the cluster store, or `None` when the route is node-local.
pub async fn handle(app: &App, c: &Cluster, route: &Api, req: &ApiRequest) -> Option<ApiReply> {
    use Method as M;
    let reply = match (route, &req.method) {
        (Api::Streams, &M::POST) => create(app, c, req).await,
        (Api::Streams, &M::GET) => list(app, c, req).await,
        (Api::Stream(id), &M::GET) => get(app, c, id).await,
        (Api::Stream(id), &M::DELETE) => delete(app, c, id).await,
        (Api::ByMetadata, &M::GET) => by_metadata(app, c, req).await,
        (Api::ByMetadata, &M::DELETE) => delete_by_metadata(app, c, req).await,
        (Api::CountsByMetadata, &M::GET) => counts_by_metadata(app, c, req).await,
        (Api::OldestByMetadata, &M::DELETE) => delete_oldest(app, c, req).await,
        (Api::Clients, &M::GET) => list_clients(app, c, req).await,
        (Api::Stats, &M::GET) => stats(app, c, req).await,
        (Api::Webhooks, &M::GET) => webhooks::list(app, c).await,
        (Api::Webhooks, &M::POST) => webhooks::add(app, c, req).await,
        (Api::Webhooks, &M::DELETE) => webhooks::remove(app, c, req).await,
        (Api::Transcode, &M::POST) => transcode(app, c, req).await,
        (Api::WebhooksTest, _) => {
            // A webhook registered on another node a moment ago is tested
            // here too (the node-local handler sends it).
            webhooks::sync(app, c).await;
            return None;
        }
        (Api::StreamFailover(id), _) => {
            // The node-local handler works on the cached stream.
            return match super::fetch(app, c, id).await {
                Ok(_) => None,
                Err(e) => Some(unavailable(&e)),
            };
        }
        _ => return None,
    };
    Some(reply)
}

fn or_503<T>(r: Result<T, ClusterError>) -> Result<T, ApiReply> {
    r.map_err(|e| unavailable(&e))
}

/// `POST /streams`: the REGISTER script decides (re-POST rule across nodes).
async fn create(app: &App, c: &Cluster, req: &ApiRequest) -> ApiReply {
    let parsed = match api::body::create_stream(&req.body) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let id = stream_id_for(&parsed.spec.url);
    match super::register(app, c, &id, &parsed.spec).await {
        Ok(Registered::Done(_)) => {
            api::streams::create_reply(app, &id, &parsed.spec, parsed.raw_metadata)
        }
        Ok(Registered::Full(max)) => api::streams::too_many_streams(app, max),
        Err(e) => unavailable(&e),
    }
}

/// `POST /transcode`: registered by the node-local handler (ids, profiles,
/// resolvers), then stored in Redis like any API stream (with its source).
async fn transcode(app: &App, c: &Cluster, req: &ApiRequest) -> ApiReply {
    let reply = api::transcode::create(app, req);
    if reply.status != 200 {
        return reply;
    }
    let Some(id) = reply.body["stream_id"].as_str() else {
        return reply;
    };
    let Some(s) = app.registry.get(id).filter(|s| s.origin == Origin::Api) else {
        return reply;
    };
    let spec = s.spec();
    let mut todo = vec![(id.to_owned(), (*spec).clone())];
    if let Some(src) = spec
        .transcode
        .as_ref()
        .and_then(|t| app.registry.get(&t.source))
        .filter(|s| s.origin == Origin::Api)
    {
        todo.insert(0, (src.id.clone(), (*src.spec()).clone()));
    }
    for (id, spec) in todo {
        match super::register(app, c, &id, &spec).await {
            Ok(Registered::Done(_)) => {}
            Ok(Registered::Full(max)) => return api::streams::too_many_streams(app, max),
            Err(e) => return unavailable(&e),
        }
    }
    reply
}

/// Every stream (API ones from Redis, YAML and playlist ones from this
/// node's config) with its cluster-wide client count, oldest first.
async fn view_all(app: &App, c: &Cluster) -> Result<Vec<(Arc<Stream>, Shared)>, ClusterError> {
    let mut shared = streams(c, &["all"]).await?;
    shared.extend(local_readonly(app, c, |_| true).await?);
    Ok(materialize(app, shared))
}

/// YAML and playlist streams passing `keep`, with their shared client counts.
async fn local_readonly(
    app: &App,
    c: &Cluster,
    keep: impl Fn(&Stream) -> bool,
) -> Result<Vec<Shared>, ClusterError> {
    let ids: Vec<String> = app
        .registry
        .list()
        .iter()
        .filter(|s| s.origin.read_only() && keep(s))
        .map(|s| s.id.clone())
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // Chunked: a node may carry a playlist of many thousand channels.
    let mut v = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(2000) {
        let mut args = vec!["ids"];
        args.extend(chunk.iter().map(String::as_str));
        v.extend(streams(c, &args).await?);
    }
    for sh in &mut v {
        if let Some(s) = app.registry.get(&sh.id) {
            sh.created = s.created_at;
            sh.last_access = sh.last_access.max(s.last_access());
        }
    }
    Ok(v)
}

/// Pairs each shared stream with this node's copy, or a detached one made
/// from its spec (nothing is cached by a listing).
fn materialize(app: &App, shared: Vec<Shared>) -> Vec<(Arc<Stream>, Shared)> {
    let mut out: Vec<(Arc<Stream>, Shared)> = shared
        .into_iter()
        .filter_map(|sh| {
            let local = app.registry.get(&sh.id);
            let s = match (local, &sh.spec) {
                (Some(s), Some(spec)) if *s.spec() == *spec => s,
                // YAML and playlist streams are not in Redis; an API
                // stream missing there was deleted, whatever is cached here.
                (Some(s), None) if s.origin.read_only() => s,
                (_, Some(spec)) => Arc::new(Stream::detached(
                    sh.id.clone(),
                    spec.clone(),
                    sh.created,
                    None,
                )),
                (_, None) => return None,
            };
            Some((s, sh))
        })
        .collect();
    out.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.0.id.cmp(&b.0.id)));
    out
}

fn stream_json(app: &App, c: &Cluster, s: &Stream, sh: &Shared) -> Value {
    let mut v = j::stream(app, s);
    // The channel's source is where its owner has it: this node's copy of a
    // stream it only relays (or does not play) keeps its first source.
    let spec = s.spec();
    let of_this_spec = |url: &str| {
        spec.failover_resolver_url.is_some()
            || crate::upstream::sources::is_static_source(&spec, url)
    };
    let shared = sh
        .source
        .as_ref()
        .filter(|src| c.table().owned(&s.id).is_none() && of_this_spec(&src.url));
    if let Some(src) = shared {
        v["current_url"] = json!(src.url);
        v["current_failover_index"] = json!(src.index);
        v["current_source_index"] = json!(src.index);
        v["failover_attempts"] = json!(src.attempts);
        v["last_failover_time"] = json!(src.last_failover.map(j::iso));
    }
    v["client_count"] = json!(sh.clients);
    v["last_access"] = json!(j::iso(sh.last_access.max(s.last_access())));
    v["created_at"] = json!(j::iso(sh.created));
    // Every node's bytes for API streams; this node's own count may be up
    // to a second ahead of what it flushed.
    let local_bytes = v["total_bytes_served"].as_u64().unwrap_or(0);
    let local_segments = v["total_segments_served"].as_u64().unwrap_or(0);
    v["total_bytes_served"] = json!(sh.bytes.max(local_bytes));
    v["total_segments_served"] = json!(sh.segments.max(local_segments));
    v
}

/// `GET /streams`.
async fn list(app: &App, c: &Cluster, req: &ApiRequest) -> ApiReply {
    let page = match Page::from_query(req) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let all = match or_503(view_all(app, c).await) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let streams: Vec<Value> = page
        .slice(&all)
        .iter()
        .map(|(s, sh)| stream_json(app, c, s, sh))
        .collect();
    let mut out = json!({ "streams": streams, "total": all.len() });
    page.echo(&mut out);
    ApiReply::ok(out)
}

/// `GET /streams/{id}`: the stream and its clients on every node.
async fn get(app: &App, c: &Cluster, id: &str) -> ApiReply {
    let mut shared = match or_503(super::one(c, id).await) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if let Some(s) = app.registry.get(id).filter(|s| s.origin.read_only()) {
        // YAML and playlist streams have no `created` in Redis.
        shared.created = s.created_at;
    }
    let Some((s, sh)) = materialize(app, vec![shared]).pop() else {
        return ApiReply::detail(404, "Stream not found");
    };
    let clients = match or_503(clients::list(c, Some(id)).await) {
        Ok(v) => v,
        Err(e) => return e,
    };
    ApiReply::ok(json!({
        "stream": stream_json(app, c, &s, &sh),
        "client_count": clients.len(),
        "clients": clients,
    }))
}

/// `DELETE /streams/{id}`.
async fn delete(app: &App, c: &Cluster, id: &str) -> ApiReply {
    if let Some(s) = app.registry.get(id).filter(|s| s.origin.read_only()) {
        let what = if s.origin == Origin::Config {
            "declared in the config file"
        } else {
            "imported from a playlist"
        };
        return ApiReply::detail(409, format!("Stream {id} is {what} and cannot be deleted"));
    }
    let v = match or_503(super::invoke(c, &super::lua::DELETE_SCRIPT, &[id]).await) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut r = items(v).into_iter();
    let (Some(spec), Some(gone)) = (r.next(), r.next()) else {
        return ApiReply::detail(404, "Stream not found");
    };
    let spec = super::parse_spec(id, &text(&spec));
    super::deleted_here(app, c, id, spec, items(gone), "manual_deletion");
    ApiReply::ok(json!({ "message": format!("Stream {id} deleted") }))
}

fn metadata_value<'a>(m: &'a BTreeMap<String, String>, field: &str) -> &'a str {
    m.get(field).map_or("", String::as_str)
}

/// `GET /streams/by-metadata`.
async fn by_metadata(app: &App, c: &Cluster, req: &ApiRequest) -> ApiReply {
    let (field, value, active_only) = match (
        query_required(req, "field"),
        query_required(req, "value"),
        query_bool(req, "active_only", true),
    ) {
        (Ok(f), Ok(v), Ok(a)) => (f, v, a),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return e,
    };
    // A missing field matches "" (m3u-proxy's str(get(field, ""))): the
    // metadata sets cannot answer that one.
    let found = if value.is_empty() {
        streams(c, &["all"]).await
    } else {
        streams(c, &["meta", field, value]).await
    };
    let mut shared = match or_503(found) {
        Ok(v) => v,
        Err(e) => return e,
    };
    match or_503(
        local_readonly(app, c, |s| {
            metadata_value(&s.spec().metadata, field) == value
        })
        .await,
    ) {
        Ok(v) => shared.extend(v),
        Err(e) => return e,
    }
    let mut matching = Vec::new();
    for (s, sh) in materialize(app, shared) {
        let spec = s.spec();
        if metadata_value(&spec.metadata, field) != value || (active_only && sh.clients == 0) {
            continue;
        }
        matching.push(json!({
            "stream_id": s.id,
            "client_count": sh.clients,
            "metadata": spec.metadata,
            "last_access": j::iso(sh.last_access.max(s.last_access())),
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

/// `GET /streams/counts-by-metadata`.
async fn counts_by_metadata(app: &App, c: &Cluster, req: &ApiRequest) -> ApiReply {
    let (field, values, active_only) = match (
        query_required(req, "field"),
        query_required(req, "values"),
        query_bool(req, "active_only", true),
    ) {
        (Ok(f), Ok(v), Ok(a)) => (f, v, a),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return e,
    };
    let wanted: Vec<&str> = values
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    // API streams: one script; YAML and playlist ones: their shared client counts.
    let mut args = vec![field, if active_only { "1" } else { "0" }];
    args.extend(wanted.iter().copied());
    let api_counts = match or_503(super::invoke(c, &super::lua::COUNTS_SCRIPT, &args).await) {
        Ok(v) => items(v),
        Err(e) => return e,
    };
    let local = match or_503(
        local_readonly(app, c, |s| {
            wanted.contains(&metadata_value(&s.spec().metadata, field))
        })
        .await,
    ) {
        Ok(l) => l,
        Err(e) => return e,
    };
    let mut counts = serde_json::Map::new();
    for (i, v) in wanted.iter().enumerate() {
        let mut n: u64 = api_counts
            .get(i)
            .and_then(|x| text(x).parse().ok())
            .unwrap_or(0);
        for sh in &local {
            let matches = app
                .registry
                .get(&sh.id)
                .is_some_and(|s| metadata_value(&s.spec().metadata, field) == *v);
            if matches && (!active_only || sh.clients > 0) {
                n += 1;
            }
        }
        counts.insert((*v).to_owned(), json!(n));
    }
    ApiReply::ok(json!({ "field": field, "counts": counts }))
}

/// `DELETE /streams/by-metadata`: YAML and playlist streams are handled
/// here as on one node (never deleted; a dropped client is dropped
/// cluster-wide); API streams by one script.
async fn delete_by_metadata(app: &App, c: &Cluster, req: &ApiRequest) -> ApiReply {
    let api::streams::DeleteQuery {
        field,
        value,
        force,
        exclude,
        client_id,
    } = match api::streams::delete_query(req) {
        Ok(q) => q,
        Err(e) => return e,
    };
    let mut skipped = Vec::new();
    for s in app.registry.list() {
        if !s.origin.read_only() || s.spec().metadata.get(field).is_none_or(|v| v != value) {
            continue;
        }
        let excluded =
            exclude.is_some_and(|ex| s.spec().metadata.get("id").is_some_and(|id| id == ex));
        if excluded {
            skipped.push(json!({ "stream_id": s.id, "reason": "excluded_by_channel_id" }));
            continue;
        }
        if !force {
            if let Some(cid) = client_id {
                if let Err(e) = clients::drop(app, c, &s.id, cid).await {
                    return unavailable(&e);
                }
            }
            let remaining = match super::one(c, &s.id).await {
                Ok(sh) => sh.clients,
                Err(e) => return unavailable(&e),
            };
            if remaining > 0 {
                skipped.push(json!({
                    "stream_id": s.id,
                    "reason": "has_active_clients",
                    "active_clients": remaining,
                }));
                continue;
            }
        }
        skipped.push(json!({ "stream_id": s.id, "reason": "configured_stream" }));
    }
    let v = match or_503(
        super::invoke(
            c,
            &super::lua::DELETE_BY_METADATA_SCRIPT,
            &[
                field,
                value,
                exclude.unwrap_or("\0"),
                if force { "1" } else { "0" },
                client_id.unwrap_or("\0"),
            ],
        )
        .await,
    ) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut parts = items(v).into_iter();
    let (deleted_v, skipped_v, dropped_v) = (
        parts.next().map(items).unwrap_or_default(),
        parts.next().map(items).unwrap_or_default(),
        parts.next().map(items).unwrap_or_default(),
    );
    for d in dropped_v {
        let mut d = items(d).into_iter();
        if let (Some(sid), Some(h)) = (d.next(), d.next()) {
            clients::dropped(app, c, &text(&sid), hash(h)).await;
        }
    }
    for s in skipped_v {
        let s = items(s);
        let (id, reason, n) = (
            s.first().map(text).unwrap_or_default(),
            s.get(1).map(text).unwrap_or_default(),
            s.get(2).map(text).unwrap_or_default(),
        );
        if reason == "has_active_clients" {
            skipped.push(json!({
                "stream_id": id,
                "reason": reason,
                "active_clients": n.parse::<u64>().unwrap_or(0),
            }));
        } else {
            skipped.push(json!({ "stream_id": id, "reason": reason }));
        }
    }
    let mut deleted = Vec::new();
    for d in deleted_v {
        let mut d = items(d).into_iter();
        let (Some(id), Some(spec), Some(gone)) = (d.next(), d.next(), d.next()) else {
            continue;
        };
        let id = text(&id);
        let spec = super::parse_spec(&id, &text(&spec));
        super::deleted_here(app, c, &id, spec, items(gone), "metadata_filter_deletion");
        deleted.push(id);
    }
    ApiReply::ok(json!({
        "message": format!("Deleted {} stream(s) matching {field}={value}", deleted.len()),
        "deleted_count": deleted.len(),
        "deleted_streams": deleted,
        "skipped_streams": skipped,
    }))
}

/// `DELETE /streams/oldest-by-metadata` (API streams only, as on one node).
async fn delete_oldest(app: &App, c: &Cluster, req: &ApiRequest) -> ApiReply {
    let (field, value) = match (query_required(req, "field"), query_required(req, "value")) {
        (Ok(f), Ok(v)) => (f, v),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let exclude = req.param("exclude_channel_id").unwrap_or("\0");
    let v = match or_503(
        super::invoke(
            c,
            &super::lua::DELETE_OLDEST_SCRIPT,
            &[field, value, exclude],
        )
        .await,
    ) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut r = items(v).into_iter();
    let (Some(id), Some(created), Some(spec), Some(gone)) =
        (r.next(), r.next(), r.next(), r.next())
    else {
        return ApiReply::ok(json!({
            "message": format!("No stream matching {field}={value}"),
            "deleted_stream": null,
            "deleted_count": 0,
        }));
    };
    let id = text(&id);
    let created = super::ms_time(text(&created).parse().unwrap_or(0));
    let spec = super::parse_spec(&id, &text(&spec));
    super::deleted_here(app, c, &id, spec, items(gone), "oldest_stream_deletion");
    let age = (Utc::now() - created).num_microseconds().unwrap_or(0) as f64 / 1e6;
    ApiReply::ok(json!({
        "message": format!("Deleted oldest stream matching {field}={value}"),
        "deleted_stream": id,
        "deleted_count": 1,
        "stream_age_seconds": age,
    }))
}

/// `GET /clients`: the clients of every node, then this node's network viewers.
async fn list_clients(app: &App, c: &Cluster, req: &ApiRequest) -> ApiReply {
    let page = match Page::from_query(req) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let all = match or_503(all_clients(app, c).await) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut out = json!({
        "total_clients": all.len(),
        "clients": page.slice(&all),
    });
    page.echo(&mut out);
    ApiReply::ok(out)
}

async fn all_clients(app: &App, c: &Cluster) -> Result<Vec<Value>, ClusterError> {
    let mut all = clients::list(c, None).await?;
    all.extend(
        app.broadcasts
            .viewers
            .all_clients()
            .iter()
            .map(|cl| j::client(cl)),
    );
    Ok(all)
}

/// `GET /stats`: the node-local report with the totals, streams and
/// clients of the whole cluster.
async fn stats(app: &App, c: &Cluster, req: &ApiRequest) -> ApiReply {
    let page = match Page::from_query(req) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let (all, clients) = match (view_all(app, c).await, all_clients(app, c).await) {
        (Ok(a), Ok(cl)) => (a, cl),
        (Err(e), _) | (_, Err(e)) => return unavailable(&e),
    };
    let mut reply = api::system::stats(app, req);
    if reply.status != 200 {
        return reply;
    }
    let active = all.iter().filter(|(_, sh)| sh.clients > 0).count();
    let ps = &mut reply.body["proxy_stats"];
    ps["total_streams"] = json!(all.len());
    ps["active_streams"] = json!(active);
    ps["total_clients"] = json!(clients.len());
    ps["total_bytes_served"] = json!(all
        .iter()
        .map(|(s, sh)| sh
            .bytes
            .max(s.bytes.load(std::sync::atomic::Ordering::Relaxed)))
        .sum::<u64>());
    ps["active_clients"] = json!(clients.len());
    reply.body["streams"] = json!(page
        .slice(&all)
        .iter()
        .map(|(s, sh)| stream_json(app, c, s, sh))
        .collect::<Vec<_>>());
    reply.body["clients"] = json!(page.slice(&clients));
    reply
}
