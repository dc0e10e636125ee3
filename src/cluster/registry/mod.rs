//! The shared registry (issue #17 item 2): in cluster mode API streams,
//! webhooks, the HLS signing key and clients live in Redis, so every
//! management route answers the same on every node at once.
//!
//! - API reads and writes go to Redis directly (one Lua script per write,
//!   `lua.rs`); Redis unavailable → 503 within about a second (`api.rs`).
//! - Players never wait on Redis for a stream this node knows: specs are
//!   cached in the local [`Registry`](crate::registry::Registry) (read
//!   through on a miss), invalidated over the bus and re-checked every
//!   second while watched (`upkeep.rs`).
//! - Clients are tracked in the background (`clients.rs`): joins and
//!   leaves are queued by the hot path, never awaited.
//! - YAML `streams:` and `playlists:` stay node-local config (the same on
//!   every node); only their clients are shared.

pub mod api;
pub mod clients;
pub mod continuity;
pub mod lua;
pub mod totals;
pub mod upkeep;
pub mod webhooks;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use redis::Value;
use serde_json::{json, Value as Json};

use super::{Bus, Cluster, ClusterError};
use crate::app::App;
use crate::events::EventType;
use crate::registry::{Stream, StreamSpec};

/// A stream as the cluster sees it: its spec in Redis (`None` for a YAML
/// or playlist stream, which every node has from its config) and its live
/// clients on every node.
#[derive(Debug, Clone)]
pub struct Shared {
    pub id: String,
    pub spec: Option<StreamSpec>,
    pub created: DateTime<Utc>,
    pub last_access: DateTime<Utc>,
    pub clients: usize,
    /// Served by every node (flushed once a second).
    pub bytes: u64,
    pub segments: u64,
    /// Where the channel's owner has it (its failover position), when an
    /// owner recorded one: every node answers with the owner's source.
    pub source: Option<SharedSource>,
}

/// A channel's source as its owner recorded it in `stream:{s}`.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedSource {
    pub url: String,
    pub index: i64,
    pub attempts: u64,
    pub last_failover: Option<DateTime<Utc>>,
}

impl SharedSource {
    /// Its `stream:{s}` fields, in [`SharedSource::parse`]'s order (the
    /// STREAMS script and REGISTER's clean-up name them too).
    pub const FIELDS: [&str; 4] = [
        "current_url",
        "failover_index",
        "failover_attempts",
        "last_failover",
    ];

    /// The `stream:{s}` fields recording failover state `f`.
    pub fn fields_of(f: &crate::registry::FailoverState) -> [(&'static str, String); 4] {
        let last = f.last_time.map_or(0, |t| t.timestamp_millis());
        [
            (Self::FIELDS[0], f.current_url.clone()),
            (Self::FIELDS[1], f.index.to_string()),
            (Self::FIELDS[2], f.attempts.to_string()),
            (Self::FIELDS[3], last.to_string()),
        ]
    }

    /// From the four [`SharedSource::FIELDS`] (empty when unset).
    pub fn parse(url: &str, index: &str, attempts: &str, last: &str) -> Option<SharedSource> {
        if url.is_empty() {
            return None;
        }
        Some(SharedSource {
            url: url.to_owned(),
            index: index.parse().ok()?,
            attempts: attempts.parse().unwrap_or(0),
            last_failover: last.parse().ok().filter(|ms| *ms > 0).map(ms_time),
        })
    }
}

/// Milliseconds since the epoch (Redis `TIME`) as a time.
pub fn ms_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(Utc::now)
}

/// A reply element as text (integers too).
pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Okay => "OK".into(),
        _ => String::new(),
    }
}

/// A reply element as an array (anything else: empty).
pub(crate) fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => Vec::new(),
    }
}

/// A flat `HGETALL`-style array as a map.
pub(crate) fn hash(v: Value) -> BTreeMap<String, String> {
    let a = items(v);
    a.chunks_exact(2)
        .map(|kv| (text(&kv[0]), text(&kv[1])))
        .collect()
}

/// Runs a registry script with the key prefix as ARGV[1] and `args` after it.
pub(crate) async fn invoke(
    c: &Cluster,
    script: &redis::Script,
    args: &[&str],
) -> Result<Value, ClusterError> {
    let mut inv = script.prepare_invoke();
    inv.arg(c.keys().prefix());
    for a in args {
        inv.arg(*a);
    }
    let mut conn = c.redis().await?;
    c.run(async move { inv.invoke_async::<Value>(&mut conn).await })
        .await
}

/// The spec stored for an API stream; a spec that no longer parses (a
/// newer node wrote it) reads as absent rather than failing the request.
fn parse_spec(id: &str, raw: &str) -> Option<StreamSpec> {
    if raw.is_empty() {
        return None;
    }
    match serde_json::from_str(raw) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(stream_id = %id, error = %e, "cluster: stored stream spec unreadable");
            None
        }
    }
}

/// Runs the STREAMS script: `all`, `meta` field value, or `ids` id...
pub async fn streams(c: &Cluster, args: &[&str]) -> Result<Vec<Shared>, ClusterError> {
    let v = invoke(c, &lua::STREAMS_SCRIPT, args).await?;
    let flat = items(v);
    Ok(flat
        .chunks_exact(11)
        .map(|r| {
            let id = text(&r[0]);
            Shared {
                source: SharedSource::parse(
                    &text(&r[7]),
                    &text(&r[8]),
                    &text(&r[9]),
                    &text(&r[10]),
                ),
                spec: parse_spec(&id, &text(&r[1])),
                created: ms_time(text(&r[2]).parse().unwrap_or(0)),
                last_access: ms_time(text(&r[3]).parse().unwrap_or(0)),
                clients: text(&r[4]).parse().unwrap_or(0),
                bytes: text(&r[5]).parse().unwrap_or(0),
                segments: text(&r[6]).parse().unwrap_or(0),
                id,
            }
        })
        .collect())
}

/// One stream as Redis holds it (`None`: no such API stream).
pub async fn one(c: &Cluster, id: &str) -> Result<Shared, ClusterError> {
    let mut v = streams(c, &["ids", id]).await?;
    v.pop()
        .ok_or_else(|| ClusterError::Protocol("STREAMS returned nothing".into()))
}

/// The local stream `id`, reading its spec from Redis on a miss (the
/// player's node may not have seen the POST). `Ok(None)`: no such stream.
pub async fn fetch(app: &App, c: &Cluster, id: &str) -> Result<Option<Arc<Stream>>, ClusterError> {
    if let Some(s) = app.registry.get(id) {
        return Ok(Some(s));
    }
    let shared = one(c, id).await?;
    let Some(spec) = shared.spec else {
        return Ok(None);
    };
    // A transcode reads its source channel here too.
    if let Some(t) = &spec.transcode {
        if t.source != id && app.registry.get(&t.source).is_none() {
            let src = one(c, &t.source).await?;
            if let Some(s) = src.spec {
                app.registry.cache_api(&t.source, s, src.created);
            }
        }
    }
    Ok(Some(app.registry.cache_api(id, spec, shared.created)))
}

/// The metadata of stream `id` for an event: this node's copy, else Redis's.
pub async fn metadata_for(app: &App, c: &Cluster, id: &str) -> BTreeMap<String, String> {
    if let Some(s) = app.registry.get(id) {
        return s.spec().metadata.clone();
    }
    one(c, id)
        .await
        .ok()
        .and_then(|sh| sh.spec)
        .map(|s| s.metadata)
        .unwrap_or_default()
}

/// What [`register`] did.
#[derive(Debug)]
pub enum Registered {
    /// The stream, as stored now (a kept stream keeps its old spec).
    Done(Arc<Stream>),
    /// `limits.max_streams` reached (the cap).
    Full(usize),
}

/// `POST /streams` (and transcodes, resolvers) in cluster mode: the
/// REGISTER script applies the re-POST rule against the clients of every
/// node; the stored spec is then cached here and other nodes are told.
pub async fn register(
    app: &App,
    c: &Cluster,
    id: &str,
    spec: &StreamSpec,
) -> Result<Registered, ClusterError> {
    if let Some(s) = app.registry.get(id).filter(|s| s.origin.read_only()) {
        // A YAML or playlist stream wins, as on one node.
        return Ok(Registered::Done(s));
    }
    let max = app.config.limits.max_streams;
    let local = app
        .registry
        .list()
        .iter()
        .filter(|s| s.origin.read_only())
        .count();
    let cap = if max == 0 {
        0
    } else if local >= max {
        return Ok(Registered::Full(max));
    } else {
        max - local
    };
    let json = serde_json::to_string(spec)
        .map_err(|e| ClusterError::Protocol(format!("stream spec: {e}")))?;
    let v = invoke(c, &lua::REGISTER_SCRIPT, &[id, &json, &cap.to_string()]).await?;
    let r = items(v);
    let outcome = r.first().map(text).unwrap_or_default();
    if outcome == "full" {
        return Ok(Registered::Full(max));
    }
    let (Some(stored), Some(created)) = (r.get(1).map(text), r.get(2).map(text)) else {
        return Err(ClusterError::Protocol(format!(
            "REGISTER answered {outcome:?}"
        )));
    };
    let stored = parse_spec(id, &stored).unwrap_or_else(|| spec.clone());
    let created = ms_time(created.parse().unwrap_or(0));
    let s = app.registry.cache_api(id, stored, created);
    s.touch();
    if outcome == "created" || outcome == "replaced" {
        tracing::info!(stream_id = %id, outcome, "stream registered (cluster)");
        c.publish(Bus::StreamChanged { id: id.to_owned() });
    }
    Ok(Registered::Done(s))
}

/// A stream was deleted from Redis by this node: its local copy goes (its
/// viewers here are cut), the clients the script removed get their
/// `client_disconnected`, the stream its `stream_stopped` with `reason`,
/// and the other nodes are told.
pub fn deleted_here(
    app: &App,
    c: &Cluster,
    id: &str,
    spec: Option<StreamSpec>,
    clients: Vec<Value>,
    reason: &str,
) {
    let local = app.registry.get(id);
    let metadata = local
        .as_ref()
        .map(|s| s.spec().metadata.clone())
        .or_else(|| spec.as_ref().map(|s| s.metadata.clone()))
        .unwrap_or_default();
    for h in clients {
        let h = hash(h);
        clients::emit_gone(app, id, &metadata, &h, "stream_deleted");
    }
    let stream = local.unwrap_or_else(|| {
        Arc::new(Stream::detached(
            id.to_owned(),
            spec.unwrap_or_default(),
            Utc::now(),
            Some(app.events.clone()),
        ))
    });
    app.evict_stream(id, reason);
    stream.stopped(reason);
    c.publish(Bus::StreamDeleted { id: id.to_owned() });
}

/// Emits `event_type` for stream `id` with its `metadata`, as
/// `Stream::emit` does, for a stream this node may not hold.
pub fn emit(
    app: &App,
    id: &str,
    metadata: &BTreeMap<String, String>,
    event_type: EventType,
    mut data: Json,
) {
    if !app.events.wants(event_type) {
        return;
    }
    if let Json::Object(m) = &mut data {
        m.insert("metadata".into(), json!(metadata));
    }
    app.events.emit(event_type, id, data);
}

/// The 503 of a management call that needs Redis.
pub fn unavailable(e: &ClusterError) -> crate::api::ApiReply {
    crate::api::ApiReply::detail(
        503,
        format!("{e}; the management API needs the cluster store, retry shortly"),
    )
}
