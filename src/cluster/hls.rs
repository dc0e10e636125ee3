//! HLS fetched once cluster-wide (CLUSTER.md "Relay between nodes"). The node
//! that first needs a provider fetch of an HLS stream (playlist, segment, key
//! or init map) takes the stream's ownership lease with kind `hls` and fetches
//! exactly as a single node does (single-flight, shared caches,
//! `hls::fetch`). Every other node asks the owner instead of the provider:
//! `GET /_cluster/hls/{id}/fetch?t=<token>&epoch=<n>` on its internal
//! listener, where the token is the HLS signed reference naming the URL and
//! its kind (the signing key is the same on every node). The owner answers
//! with the raw bytes, the final URL and the content type; LL-HLS blocking
//! reloads are held at the owner, so one provider request serves the cluster.
//! The asking node caches the answer like a provider's (a playlist for the
//! rest of the owner's copy's life, segments as always), and rewrites per
//! viewer and keeps playlists from going backwards itself.
//!
//! The hook sits below the caches (`hls::fetch::open` and the playlist fetch),
//! so Redis is asked at most once per stream per node (then again only after
//! the owner refused or vanished), never per viewer request.
//!
//! Failures: the owner answers 409 when it is not the owner at that epoch any
//! more (the asker looks the owner up again); an owner that does not answer
//! (killed) makes the asker fetch directly for a second at a time until its
//! session expired and a node takes the stream over; without a session
//! (Redis down) every node fetches for itself, as a single node would, and
//! says so in its log. The owner gives the lease up after 30 s without
//! fetches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::header;
use parking_lot::Mutex;
use pingora::prelude::*;
use pingora::proxy::Session;
use serde::{Deserialize, Serialize};
use serde_json::json;
use url::Url;

use super::ownership::{self, Owner, Take};
use super::{Bus, Cluster};
use crate::app::App;
use crate::hls::fetch::{
    without_directives, FetchError, Opened, Read, SegmentSource, MSN_DIRECTIVE, PART_DIRECTIVE,
};
use crate::hls::token::Claims;
use crate::hls::Kind;
use crate::proxy::{respond, RequestCtx};

/// The ownership kind of HLS streams in `own:{s}`.
pub const KIND: &str = "hls";
/// An owner gives a stream up after this long without fetches.
pub const OWNER_IDLE: Duration = Duration::from_secs(30);
/// After the owner did not answer, fetch directly this long before asking
/// Redis again (it answers with the same owner until its session expired).
const DIRECT_RETRY: Duration = Duration::from_secs(1);
/// How often owners check they still own their streams and release idle ones.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// A node forgets who owns a stream it has not fetched for this long.
const PEER_FORGET: Duration = Duration::from_secs(60);
/// Largest error document read from an owner.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// Response headers of `/_cluster/hls/{id}/fetch`.
pub const FINAL_URL_HEADER: &str = "x-m3u-edge-final-url";
pub const AGE_HEADER: &str = "x-m3u-edge-age-ms";
/// Set on a failed fetch: the body is a [`WireError`].
pub const ERROR_HEADER: &str = "x-m3u-edge-fetch-error";

#[derive(Debug, Clone)]
enum Role {
    /// This node fetches from the provider, on the session it took it with.
    Owner { epoch: u64, session: String },
    /// Another node does.
    Peer(Owner),
    /// Fetch from the provider until then (the owner did not answer, or
    /// Redis could not say who owns it).
    Direct { until: Instant },
}

struct Entry {
    role: Role,
    /// Last fetch (owners: provider fetches and peers' requests).
    used: Instant,
}

/// Where a fetch goes.
enum Via {
    Provider,
    Owner(Owner),
}

/// This node's view of HLS ownership (lives in [`Cluster`]).
#[derive(Default)]
pub struct HlsOwners {
    roles: Mutex<HashMap<String, Entry>>,
    /// One ownership look-up per stream at a time.
    resolving: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    sweeper: OnceLock<()>,
    /// "Fetching directly (no session)" was logged and not taken back yet.
    alone: AtomicBool,
    /// Shutting down: owns nothing any more, takes nothing.
    closing: AtomicBool,
}

impl HlsOwners {
    fn set(&self, stream: &str, role: Role) {
        self.roles.lock().insert(
            stream.to_owned(),
            Entry {
                role,
                used: Instant::now(),
            },
        );
    }

    fn forget(&self, stream: &str) {
        self.roles.lock().remove(stream);
    }

    /// The cached decision for `stream`, if still good.
    fn cached(&self, stream: &str, session: &str) -> Option<Via> {
        let mut roles = self.roles.lock();
        let entry = roles.get_mut(stream)?;
        let now = Instant::now();
        let via = match &entry.role {
            Role::Owner { session: s, .. } if s == session => Via::Provider,
            Role::Peer(o) => Via::Owner(o.clone()),
            Role::Direct { until } if now < *until => Via::Provider,
            // Owned on an old session, or the direct spell is over.
            _ => {
                roles.remove(stream);
                return None;
            }
        };
        entry.used = now;
        Some(via)
    }

    /// Whether this node owns `stream` at `epoch` (then it counts as a fetch).
    fn owns(&self, stream: &str, epoch: u64, session: &str) -> bool {
        let mut roles = self.roles.lock();
        match roles.get_mut(stream) {
            Some(e) if matches!(&e.role, Role::Owner { epoch: n, session: s } if *n == epoch && s == session) =>
            {
                e.used = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// (owned, relayed from another node) streams, for `/stats`.
    pub fn counts(&self) -> (usize, usize) {
        let roles = self.roles.lock();
        let owned = roles
            .values()
            .filter(|e| matches!(e.role, Role::Owner { .. }))
            .count();
        let relayed = roles
            .values()
            .filter(|e| matches!(e.role, Role::Peer(_)))
            .count();
        (owned, relayed)
    }
}

impl Cluster {
    /// `cluster.hls` of `/stats` and `/health`: HLS streams this node
    /// fetches for the cluster, and streams it fetches through their owner.
    pub fn hls_status(&self) -> serde_json::Value {
        let (owned, relayed) = self.hls.counts();
        json!({ "owned": owned, "relayed": relayed })
    }
}

/// Who fetches `stream` for this node: decided once, then cached.
async fn via(c: &Arc<Cluster>, stream: &str) -> Via {
    let owners = &c.hls;
    owners.sweeper.get_or_init(|| {
        c.spawn(sweep(c.clone()));
    });
    if owners.closing.load(Ordering::Relaxed) {
        return Via::Provider;
    }
    if !c.holds_session() {
        if !owners.alone.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                node = c.node_id(),
                "cluster: no session in Redis (unavailable?): this node fetches HLS streams from their providers itself until it is back"
            );
        }
        return Via::Provider;
    }
    if owners.alone.swap(false, Ordering::Relaxed) {
        tracing::info!(
            node = c.node_id(),
            "cluster: session back: HLS streams are fetched by their owners again"
        );
    }
    let session = c.session();
    if let Some(v) = owners.cached(stream, &session) {
        return v;
    }
    let lock = owners
        .resolving
        .lock()
        .entry(stream.to_owned())
        .or_default()
        .clone();
    let held = lock.lock().await;
    let via = match owners.cached(stream, &session) {
        Some(v) => v,
        None => resolve(c, stream).await,
    };
    drop(held);
    let mut resolving = owners.resolving.lock();
    // The map's reference and ours: nobody else is waiting.
    if Arc::strong_count(&lock) == 2 {
        resolving.remove(stream);
    }
    via
}

/// Takes `stream` or learns its owner (one Redis script, on the cluster's runtime).
async fn resolve(c: &Arc<Cluster>, stream: &str) -> Via {
    let (cc, id) = (c.clone(), stream.to_owned());
    let taken = c
        .spawn(async move { ownership::take(&cc, &id, KIND).await })
        .await;
    let (role, via) = match taken {
        Ok(Ok(Take::Mine(o))) => {
            tracing::info!(
                stream_id = stream,
                epoch = o.epoch,
                "cluster: this node is the stream's HLS owner"
            );
            let role = Role::Owner {
                epoch: o.epoch,
                session: o.session,
            };
            (role, Via::Provider)
        }
        Ok(Ok(Take::Theirs(o))) => {
            tracing::debug!(stream_id = stream, owner = %o.node, epoch = o.epoch, "cluster: HLS fetched through the stream's owner");
            (Role::Peer(o.clone()), Via::Owner(o))
        }
        Ok(Err(e)) => {
            tracing::warn!(stream_id = stream, error = %e, "cluster: HLS owner unknown: fetching this stream directly for now");
            let until = Instant::now() + DIRECT_RETRY;
            (Role::Direct { until }, Via::Provider)
        }
        Err(e) => {
            tracing::warn!(stream_id = stream, error = %e, "cluster: HLS ownership look-up failed: fetching directly");
            let until = Instant::now() + DIRECT_RETRY;
            (Role::Direct { until }, Via::Provider)
        }
    };
    c.hls.set(stream, role);
    via
}

/// Releases streams owned but idle for [`OWNER_IDLE`], drops the ones lost
/// (another node took them: this one was fenced), and forgets owners of
/// streams nobody here watches. A `released` notice makes peers ask again.
async fn sweep(c: Arc<Cluster>) {
    let mut bus = c.subscribe();
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            msg = bus.recv() => {
                if let Ok(env) = msg {
                    if let Bus::Released { stream } = env.msg {
                        if env.from != c.node_id() {
                            let mut roles = c.hls.roles.lock();
                            if roles.get(&stream).is_some_and(|e| matches!(e.role, Role::Peer(_))) {
                                roles.remove(&stream);
                            }
                        }
                    }
                }
                continue;
            }
        }
        let session = c.session();
        let now = Instant::now();
        let (mut idle, mut held) = (Vec::new(), Vec::new());
        c.hls.roles.lock().retain(|id, e| match &e.role {
            Role::Owner { session: s, .. } if *s != session => false,
            Role::Owner { epoch, .. } if now.duration_since(e.used) > OWNER_IDLE => {
                idle.push((id.clone(), *epoch));
                false
            }
            Role::Owner { epoch, .. } => {
                held.push((id.clone(), *epoch));
                true
            }
            Role::Peer(_) => now.duration_since(e.used) < PEER_FORGET,
            Role::Direct { until } => now < *until,
        });
        for (id, epoch) in idle {
            if let Ok(true) = ownership::release(&c, &id, epoch).await {
                tracing::info!(stream_id = %id, epoch, "cluster: HLS stream released (no fetches for 30 s)");
                c.publish(Bus::Released { stream: id });
            }
        }
        for (id, epoch) in held {
            if let Ok(false) = ownership::still_mine(&c, &id, epoch).await {
                tracing::warn!(stream_id = %id, epoch, "cluster: HLS ownership lost to another node");
                let mut roles = c.hls.roles.lock();
                if roles
                    .get(&id)
                    .is_some_and(|e| matches!(e.role, Role::Owner { epoch: n, .. } if n == epoch))
                {
                    roles.remove(&id);
                }
            }
        }
    }
}

/// At shutdown (SIGTERM): gives up every HLS stream this node owns, so the
/// next node to fetch takes it at once instead of after the session expired.
pub async fn release_all(c: &Arc<Cluster>) {
    // Requests still in flight here during the grace period fetch for
    // themselves rather than take a stream back for a node about to go.
    c.hls.closing.store(true, Ordering::Relaxed);
    let owned: Vec<(String, u64)> = {
        let mut roles = c.hls.roles.lock();
        let owned = roles
            .iter()
            .filter_map(|(id, e)| match e.role {
                Role::Owner { epoch, .. } => Some((id.clone(), epoch)),
                _ => None,
            })
            .collect::<Vec<_>>();
        roles.clear();
        owned
    };
    if owned.is_empty() {
        return;
    }
    let cc = c.clone();
    let work = c.spawn(async move {
        for (id, epoch) in owned {
            if let Ok(true) = ownership::release(&cc, &id, epoch).await {
                cc.publish(Bus::Released { stream: id });
            }
        }
    });
    if tokio::time::timeout(Duration::from_secs(2), work)
        .await
        .is_err()
    {
        tracing::warn!("cluster: HLS streams not all released at shutdown (Redis slow?)");
    }
}

/// Whether `id` can be written in a path as it is (ids are letters, digits,
/// `_`, `-` and md5 hex; anything else is fetched directly).
fn plain_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'~'))
}

/// What the owner said (short-lived, one per fetch: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Answer {
    Got(Result<Opened, FetchError>),
    /// Not the owner at that epoch (any more).
    NotOwner,
    /// No usable answer: down, hung, or not speaking this protocol.
    Unreachable(String),
}

/// In a cluster where another node owns `stream_id`: its answer for `url`,
/// as if the provider had answered. `None`: fetch from the provider (no
/// cluster, this node owns it, or the owner cannot be reached).
pub async fn open_via_owner(
    app: &App,
    stream_id: &str,
    url: &Url,
    kind: Kind,
    range: Option<&str>,
    header_timeout: Duration,
) -> Option<Result<Opened, FetchError>> {
    let c = app.cluster.as_ref()?;
    if !plain_id(stream_id) {
        return None;
    }
    // Twice: an owner that says it is not (any more) makes us look again.
    for _ in 0..2 {
        let owner = match via(c, stream_id).await {
            Via::Provider => return None,
            Via::Owner(o) => o,
        };
        match ask(app, c, &owner, stream_id, url, kind, range, header_timeout).await {
            Answer::Got(r) => {
                c.metrics.hls_via_owner.inc();
                return Some(r);
            }
            Answer::NotOwner => c.hls.forget(stream_id),
            Answer::Unreachable(why) => {
                c.metrics.hls_owner_unreachable.inc();
                tracing::warn!(stream_id, owner = %owner.node, error = %why, "cluster: the stream's HLS owner does not answer: fetching directly until ownership moves");
                let until = Instant::now() + DIRECT_RETRY;
                c.hls.set(stream_id, Role::Direct { until });
                return None;
            }
        }
    }
    None
}

#[allow(clippy::too_many_arguments)]
async fn ask(
    app: &App,
    c: &Cluster,
    owner: &Owner,
    stream_id: &str,
    url: &Url,
    kind: Kind,
    range: Option<&str>,
    header_timeout: Duration,
) -> Answer {
    // Blocking-reload directives travel beside the reference, so the owner
    // shares one held provider request among all nodes.
    let (target, directives) = if kind == Kind::Playlist {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| k == MSN_DIRECTIVE || k == PART_DIRECTIVE)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        (without_directives(url), pairs)
    } else {
        (url.clone(), Vec::new())
    };
    let token = app.signer.mint(&Claims {
        stream_id: stream_id.to_owned(),
        url: target.to_string(),
        kind,
        client_id: None,
        username: None,
    });
    let mut path = format!(
        "/_cluster/hls/{stream_id}/fetch?t={token}&epoch={}",
        owner.epoch
    );
    for (k, v) in &directives {
        // Numbers (the owner refuses anything else).
        if v.bytes().all(|b| b.is_ascii_digit()) {
            path.push_str(&format!("&{k}={v}"));
        }
    }
    let mut req = c.peer_http().get(format!("http://{}{path}", owner.addr));
    for (k, v) in c.sign("GET", &path) {
        req = req.header(k, v);
    }
    if let Some(r) = range {
        req = req.header(header::RANGE, r);
    }
    let resp = match tokio::time::timeout(header_timeout, req.send()).await {
        Err(_) => return Answer::Unreachable("no answer in time".into()),
        Ok(Err(e)) => return Answer::Unreachable(e.to_string()),
        Ok(Ok(r)) => r,
    };
    let status = resp.status().as_u16();
    if status == 409 {
        return Answer::NotOwner;
    }
    if resp.headers().contains_key(ERROR_HEADER) {
        let body = match tokio::time::timeout(header_timeout, resp.bytes()).await {
            Ok(Ok(b)) if b.len() <= MAX_ERROR_BODY => b,
            _ => return Answer::Got(Err(FetchError::Read)),
        };
        return Answer::Got(Err(match serde_json::from_slice::<WireError>(&body) {
            Ok(w) => w.into_error(),
            Err(_) => FetchError::Read,
        }));
    }
    if status >= 400 && status != 416 {
        // Not an answer of this protocol (old node, wrong secret...).
        return Answer::Unreachable(format!("HTTP {status}"));
    }
    let header_str = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let final_url = header_str(FINAL_URL_HEADER)
        .and_then(|u| Url::parse(&u).ok())
        .unwrap_or(target);
    let age = header_str(AGE_HEADER)
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_millis);
    // Not a provider connection: the owner holds that lease.
    let Ok(lease) = app.leases.try_acquire(None) else {
        return Answer::Unreachable("no lease".into());
    };
    Answer::Got(Ok(Opened {
        resp,
        final_url,
        lease,
        via_owner: Some(age),
    }))
}

/// A [`FetchError`] between nodes, so a peer fails (or fails over) exactly
/// as the owner would have.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum WireError {
    Connect,
    Timeout,
    Status {
        status: u16,
    },
    TooLarge {
        max: usize,
    },
    Malformed {
        detail: String,
    },
    Read,
    Private {
        detail: String,
    },
    Redirect {
        detail: String,
    },
    Full {
        provider: String,
        max_connections: u32,
    },
    Limit {
        detail: String,
    },
}

impl WireError {
    pub fn from_error(e: &FetchError) -> WireError {
        match e {
            FetchError::Connect => WireError::Connect,
            FetchError::Timeout => WireError::Timeout,
            FetchError::Status(s) => WireError::Status { status: *s },
            FetchError::TooLarge(n) => WireError::TooLarge { max: *n },
            FetchError::Malformed(d) => WireError::Malformed { detail: d.clone() },
            FetchError::Read => WireError::Read,
            FetchError::Private(d) => WireError::Private { detail: d.clone() },
            FetchError::Redirect(d) => WireError::Redirect {
                detail: (*d).to_owned(),
            },
            FetchError::Full {
                provider,
                max_connections,
            } => WireError::Full {
                provider: provider.clone(),
                max_connections: *max_connections,
            },
            FetchError::Limit(d) => WireError::Limit { detail: d.clone() },
        }
    }

    pub fn into_error(self) -> FetchError {
        match self {
            WireError::Connect => FetchError::Connect,
            WireError::Timeout => FetchError::Timeout,
            WireError::Status { status } => FetchError::Status(status),
            WireError::TooLarge { max } => FetchError::TooLarge(max),
            WireError::Malformed { detail } => FetchError::Malformed(detail),
            WireError::Read => FetchError::Read,
            WireError::Private { detail } => FetchError::Private(detail),
            // The reason is one of a few fixed texts at the owner.
            WireError::Redirect { .. } => FetchError::Redirect("refused at the stream's HLS owner"),
            WireError::Full {
                provider,
                max_connections,
            } => FetchError::Full {
                provider,
                max_connections,
            },
            WireError::Limit { detail } => FetchError::Limit(detail),
        }
    }
}

/// `/_cluster/hls/{id}/fetch`: the stream's id, if the path is that.
pub fn fetch_path(path: &str) -> Option<&str> {
    path.strip_prefix("/_cluster/hls/")?
        .strip_suffix("/fetch")
        .filter(|id| plain_id(id))
}

async fn fail(session: &mut Session, e: &FetchError) -> Result<u16> {
    let mut resp = pingora::http::ResponseHeader::build(502, Some(3))?;
    let body = serde_json::to_vec(&WireError::from_error(e)).unwrap_or_default();
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(ERROR_HEADER, "1")?;
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(bytes::Bytes::from(body)), true)
        .await?;
    Ok(502)
}

/// Serves a peer's fetch of stream `id` (the owner's side); returns the status.
pub async fn serve(
    app: &Arc<App>,
    c: &Cluster,
    session: &mut Session,
    ctx: &mut RequestCtx,
    id: &str,
) -> Result<u16> {
    let query: HashMap<String, String> = session
        .req_header()
        .uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let param = |name: &str| query.get(name).cloned();
    let (token, epoch) = (
        param("t"),
        param("epoch").and_then(|e| e.parse::<u64>().ok()),
    );
    let (Some(token), Some(epoch)) = (token, epoch) else {
        respond::error(session, 400, "t and epoch are required").await?;
        return Ok(400);
    };
    // Registered on another node a moment ago: read through to Redis.
    let stream = match super::registry::fetch(app, c, id).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            respond::error(session, 404, "Stream not found").await?;
            return Ok(404);
        }
        Err(e) => {
            respond::error(session, 503, &e.to_string()).await?;
            return Ok(503);
        }
    };
    let claims = match app.signer.verify(id, &token) {
        Ok(c) => c,
        Err(e) => {
            respond::error(session, 403, &format!("Invalid stream reference: {e}")).await?;
            return Ok(403);
        }
    };
    if !c.holds_session() || !c.hls.owns(id, epoch, &c.session()) {
        let body = json!({"detail": format!("node {} is not the HLS owner of {id} at epoch {epoch}", c.node_id())});
        respond::json(session, 409, &body).await?;
        return Ok(409);
    }
    let Ok(url) = Url::parse(&claims.url) else {
        respond::error(session, 403, "Invalid stream reference").await?;
        return Ok(403);
    };
    c.metrics.hls_served.inc();
    let spec = stream.spec();
    if claims.kind == Kind::Playlist {
        let number = |name: &str| param(name).map(|v| v.parse::<u64>());
        let (msn, part) = match (number(MSN_DIRECTIVE), number(PART_DIRECTIVE)) {
            (Some(Err(_)), _) | (_, Some(Err(_))) => {
                respond::error(session, 400, "bad blocking-reload directive").await?;
                return Ok(400);
            }
            (m, p) => (m.and_then(Result::ok), p.and_then(Result::ok)),
        };
        let p = match app.hls.playlist(app, id, &spec, &url).await {
            Ok(p) => p,
            Err(e) => return fail(session, &e).await,
        };
        let p = match msn {
            Some(msn) if !p.info.has(msn, part) => app
                .hls
                .playlist_at(app, id, &spec, &url, p.source.epoch, msn, part)
                .await
                .unwrap_or(p),
            _ => p,
        };
        let content_type = p
            .content_type
            .clone()
            .unwrap_or_else(|| "application/vnd.apple.mpegurl".into());
        let extra = [
            (
                http::HeaderName::from_static(FINAL_URL_HEADER),
                p.base.to_string(),
            ),
            (
                http::HeaderName::from_static(AGE_HEADER),
                p.age().as_millis().to_string(),
            ),
        ];
        crate::proxy::hls::write(
            app,
            session,
            ctx,
            200,
            &content_type,
            &extra,
            p.body.clone(),
        )
        .await?;
        return Ok(200);
    }
    let range = session
        .req_header()
        .headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let default_type = crate::proxy::hls::default_type(claims.kind, &url);
    let direct = match app
        .hls
        .segment(app, id, &spec, &url, range.as_deref())
        .await
    {
        Err(e) => return fail(session, &e).await,
        Ok(SegmentSource::Direct(o)) => *o,
        Ok(SegmentSource::Shared(f)) => match f.head().await {
            Err(e) => return fail(session, &e).await,
            Ok(Read::Head(h)) => {
                let ct = h
                    .content_type
                    .clone()
                    .unwrap_or_else(|| default_type.into());
                crate::proxy::hls::serve_shared(app, session, ctx, &f, &h, &ct, range.as_deref())
                    .await?;
                return Ok(ctx.local_status.unwrap_or(200));
            }
            Ok(Read::Direct) => {
                let timeout = app.config.hls.header_timeout;
                match crate::hls::fetch::open(app, id, &spec, &url, range.as_deref(), timeout).await
                {
                    Ok(o) => o,
                    Err(e) => return fail(session, &e).await,
                }
            }
        },
    };
    let status = direct.resp.status().as_u16();
    if status >= 300 && status != 416 {
        return fail(session, &FetchError::Status(status)).await;
    }
    let ct = direct
        .resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| default_type.to_owned(), str::to_owned);
    crate::proxy::hls::serve_direct(app, session, ctx, direct, &ct, range.is_none()).await?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cross_nodes_unchanged() {
        let all = [
            FetchError::Connect,
            FetchError::Timeout,
            FetchError::Status(404),
            FetchError::TooLarge(10),
            FetchError::Malformed("x".into()),
            FetchError::Read,
            FetchError::Private("10.0.0.1 is private".into()),
            FetchError::Full {
                provider: "p".into(),
                max_connections: 2,
            },
            FetchError::Limit("too big".into()),
        ];
        for e in all {
            let wire = serde_json::to_vec(&WireError::from_error(&e)).unwrap();
            let back: WireError = serde_json::from_slice(&wire).unwrap();
            let back = back.into_error();
            assert_eq!(back.to_string(), e.to_string());
            assert_eq!(back.is_source_failure(), e.is_source_failure());
            assert_eq!(back.client_status(), e.client_status());
        }
        let r = WireError::from_error(&FetchError::Redirect("too many redirects")).into_error();
        assert!(matches!(r, FetchError::Redirect(_)));
    }

    #[test]
    fn fetch_paths_name_plain_ids_only() {
        assert_eq!(fetch_path("/_cluster/hls/abc-1_2/fetch"), Some("abc-1_2"));
        assert_eq!(fetch_path("/_cluster/hls//fetch"), None);
        assert_eq!(fetch_path("/_cluster/hls/a/b/fetch"), None);
        assert_eq!(fetch_path("/_cluster/hls/a%20b/fetch"), None);
        assert_eq!(fetch_path("/_cluster/live/a"), None);
    }
}
