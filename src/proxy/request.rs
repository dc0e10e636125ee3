//! `request_filter`: routing, the management API, and who the client is.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{header, Method};
use pingora::prelude::*;
use pingora::proxy::Session;

use super::ctx::{RequestCtx, Selection};
use super::hls;
use super::live::{self, Mode};
use super::respond;
use crate::api::{self, ApiRequest};
use crate::app::App;
use crate::metrics::LimitCut;
use crate::registry::{ClientHello, Stream};
use crate::route::{self, Route};
use crate::upstream::sources;

/// An API body that stops arriving for this long is answered 408.
const API_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Playlist polls are the hot path: Pingora moves this future into a box on
/// every request, so the larger, colder branches live in boxes of their own.
pub async fn route(app: &Arc<App>, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
    let path = session.req_header().uri.path().to_string();
    let r = route::decode(&path, &app.config.server.root_path);
    ctx.route = Some(r.clone());
    if let Some(depth) = self_depth(app, session) {
        ctx.self_depth = depth;
        if depth > app.config.limits.max_self_hops {
            app.metrics.cut(LimitCut::SelfLoop);
            tracing::warn!(path = %path, depth, "request from m3u-edge to itself refused (a stream URL or provider redirect points back at this proxy)");
            ctx.local_status = Some(508);
            respond::error(
                session,
                508,
                "Loop Detected: m3u-edge was asked to fetch from itself",
            )
            .await?;
            return Ok(true);
        }
    }
    let client_route = matches!(
        r,
        Route::Play(_)
            | Route::HlsPlaylist(_)
            | Route::HlsSegment(_)
            | Route::BroadcastPlaylist(_)
            | Route::BroadcastSegment(..)
    );
    if client_route && session.req_header().method == Method::OPTIONS {
        ctx.local_status = Some(200);
        respond::preflight(session, respond::Cors::Open).await?;
        return Ok(true);
    }
    match r {
        Route::NotFound => {
            ctx.local_status = Some(404);
            respond::error(session, 404, "Not Found").await?;
            Ok(true)
        }
        Route::Api(a) => {
            Box::pin(serve_api(app, session, ctx, &a)).await?;
            Ok(true)
        }
        Route::Metrics => {
            Box::pin(metrics(app, session, ctx)).await?;
            Ok(true)
        }
        Route::OpenApi => {
            Box::pin(openapi(session, ctx)).await?;
            Ok(true)
        }
        Route::Play(id) => Box::pin(play(app, session, ctx, id)).await,
        Route::HlsPlaylist(id) => hls_route(app, session, ctx, id, hls::Asked::Playlist).await,
        Route::HlsSegment(id) => hls_route(app, session, ctx, id, hls::Asked::Segment).await,
        Route::BroadcastPlaylist(id) => {
            Box::pin(super::broadcast::serve(app, session, ctx, &id, None)).await
        }
        Route::BroadcastSegment(id, file) => {
            Box::pin(super::broadcast::serve(app, session, ctx, &id, Some(&file))).await
        }
        Route::Standalone(page, token) => {
            Box::pin(crate::playlists::serve::serve(
                app, session, ctx, page, token,
            ))
            .await?;
            Ok(true)
        }
    }
}

fn query_pairs(session: &Session) -> Vec<(String, String)> {
    session
        .req_header()
        .uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

/// The first value of query parameter `name`, decoded. Looked up in place:
/// playlist polls ask for a name or two, not every pair.
pub fn query_param(session: &Session, name: &str) -> Option<String> {
    let query = session.req_header().uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The nesting depth of a request m3u-edge made to itself, or None for a
/// real client (see `conn::selfloop`).
fn self_depth(app: &App, session: &Session) -> Option<usize> {
    let peer = session.client_addr()?.as_inet()?;
    app.self_conns.depth_of(*peer)
}

async fn read_body(session: &mut Session, max: usize) -> Result<Option<Bytes>> {
    session.set_read_timeout(Some(API_BODY_TIMEOUT));
    let mut buf = BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if buf.len() + chunk.len() > max {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf.freeze()))
}

async fn serve_api(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    a: &route::Api,
) -> Result<()> {
    let method = session.req_header().method.clone();
    let req = session.req_header();
    let header_str = |name: header::HeaderName| req.headers.get(name).and_then(|v| v.to_str().ok());
    let caller = api::access::Caller {
        peer: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip()),
        host: header_str(header::HOST).or(req.uri.authority().map(|a| a.as_str())),
        origin: header_str(header::ORIGIN),
    };
    let cors_origin = match api::access::check(&app.config.api, caller) {
        Ok(origin) => origin.map(str::to_owned),
        Err(reply) => {
            app.metrics.cut(LimitCut::ApiOrigin);
            ctx.local_status = Some(reply.status);
            return respond::json_with(
                session,
                reply.status,
                &reply.body,
                respond::Cors::Only(None),
            )
            .await;
        }
    };
    let cors = respond::Cors::Only(cors_origin.as_deref());
    if method == Method::OPTIONS {
        ctx.local_status = Some(200);
        return respond::preflight(session, cors).await;
    }
    let query = query_pairs(session);
    let header_token = session
        .req_header()
        .headers
        .get("x-api-token")
        .map(|v| v.as_bytes().to_vec());
    let query_token = query
        .iter()
        .find(|(k, _)| k == "api_token")
        .map(|(_, v)| v.clone());
    let auth = api::authorize(app, a, header_token.as_deref(), query_token.as_deref());
    if let Some(reply) = api::auth_reply(auth) {
        ctx.local_status = Some(reply.status);
        return respond::json_with(session, reply.status, &reply.body, cors).await;
    }
    let Some(body) = read_body(session, app.config.limits.max_body_bytes).await? else {
        app.metrics.cut(LimitCut::BodyBytes);
        ctx.local_status = Some(413);
        let reply = api::ApiReply::detail(413, "Request body too large");
        return respond::json_with(session, 413, &reply.body, cors).await;
    };
    let content_type = session
        .req_header()
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if let Err(reply) = api::access::check_body(&method, content_type, &body) {
        ctx.local_status = Some(reply.status);
        return respond::json_with(session, reply.status, &reply.body, cors).await;
    }
    // HEAD on an API route answers like GET, without the body.
    let method = if method == Method::HEAD {
        Method::GET
    } else {
        method
    };
    let req = ApiRequest {
        method,
        query,
        body,
    };
    let reply = api::handle(app, a, &req).await;
    ctx.local_status = Some(reply.status);
    if reply.status == 405 {
        return respond::method_not_allowed(session, api::allowed_methods(a), cors).await;
    }
    respond::json_with(session, reply.status, &reply.body, cors).await
}

/// The client's address as m3u-proxy records it: first X-Forwarded-For, else the peer.
fn client_ip(session: &Session) -> String {
    let forwarded = session
        .req_header()
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    forwarded.unwrap_or_else(|| {
        session
            .client_addr()
            .and_then(|a| a.as_inet().map(|i| i.ip().to_string()))
            .unwrap_or_else(|| "unknown".into())
    })
}

/// `client_id` from the query, as the player set it (at most 128 characters).
pub fn client_id(session: &Session) -> Option<String> {
    query_param(session, "client_id")
        .filter(|v| !v.is_empty())
        .map(|c| c.chars().take(128).collect())
}

pub fn hello(session: &Session) -> ClientHello {
    let q = |name: &str| query_param(session, name).filter(|v| !v.is_empty());
    let headers = &session.req_header().headers;
    let username = headers
        .get("x-username")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|v| !v.is_empty())
        .or_else(|| q("username"))
        .or_else(|| q("user"))
        .or_else(|| q("u"));
    ClientHello {
        explicit_id: client_id(session),
        ip: client_ip(session),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        username,
    }
}

/// `/metrics`: gauges are read at scrape time, counters were kept as things happened.
async fn metrics(app: &App, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    let method = &session.req_header().method;
    if method != Method::GET && method != Method::HEAD {
        ctx.local_status = Some(405);
        return respond::method_not_allowed(session, "GET, HEAD", respond::Cors::Only(None)).await;
    }
    app.refresh_gauges();
    let (content_type, body) = app.metrics.render();
    let mut resp = pingora::http::ResponseHeader::build(200, Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, content_type)?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    let head = session.req_header().method == Method::HEAD;
    ctx.local_status = Some(200);
    session.write_response_header(Box::new(resp), head).await?;
    if !head {
        session
            .write_response_body(Some(Bytes::from(body)), true)
            .await?;
    }
    Ok(())
}

/// `/openapi.json`: the API description, byte for byte as in the repository.
/// Public like the client routes: any page may read it (API explorers).
async fn openapi(session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    let body = api::openapi::SPEC.as_bytes();
    let mut resp = pingora::http::ResponseHeader::build(200, Some(5))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    respond::open_cors(&mut resp)?;
    let head = session.req_header().method == Method::HEAD;
    ctx.local_status = Some(200);
    session.write_response_header(Box::new(resp), head).await?;
    if !head {
        session
            .write_response_body(Some(Bytes::from_static(body)), true)
            .await?;
    }
    Ok(())
}

/// The registered stream a client route names, or the 405/404 already sent.
async fn client_stream(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    id: String,
) -> Result<Option<Arc<Stream>>> {
    let method = session.req_header().method.clone();
    let mut found = app.registry.get(&id);
    if let (None, Some(c), true) = (
        &found,
        &app.cluster,
        method == Method::GET || method == Method::HEAD,
    ) {
        // Registered on another node a moment ago: read through to Redis.
        match crate::cluster::registry::fetch(app, c, &id).await {
            Ok(s) => found = s,
            Err(e) => {
                ctx.stream_id = Some(id);
                ctx.local_status = Some(503);
                respond::error(session, 503, &e.to_string()).await?;
                return Ok(None);
            }
        }
    }
    ctx.stream_id = Some(id);
    let refusal = if method != Method::GET && method != Method::HEAD {
        (405, "Method Not Allowed")
    } else if found.is_none() {
        (404, "Stream not found")
    } else {
        return Ok(found);
    };
    ctx.local_status = Some(refusal.0);
    if refusal.0 == 405 {
        respond::method_not_allowed(session, "GET, HEAD", respond::Cors::Open).await?;
    } else {
        respond::error(session, refusal.0, refusal.1).await?;
    }
    Ok(None)
}

/// `/hls/{id}/...`: HLS playlists and segments of a registered stream.
async fn hls_route(
    app: &Arc<App>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    id: String,
    asked: hls::Asked,
) -> Result<bool> {
    match client_stream(app, session, ctx, id).await? {
        Some(stream) => hls::serve(app, session, ctx, &stream, asked).await,
        None => Ok(true),
    }
}

/// `/stream/{id}`: per-client proxying with failover before the first byte.
async fn play(
    app: &Arc<App>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    id: String,
) -> Result<bool> {
    let Some(stream) = client_stream(app, session, ctx, id).await? else {
        return Ok(true);
    };
    match live::mode(&stream) {
        Mode::Hls => return hls::serve(app, session, ctx, &stream, hls::Asked::Playlist).await,
        Mode::Hub => {
            if live::serve(app, session, ctx, &stream).await? {
                return Ok(true);
            }
        }
        Mode::Proxy => {}
    }
    // Per-client proxying: drop a hub client guard, this request attaches anew.
    ctx.guard = None;
    let spec = stream.spec();
    // Start at the source the stream is on (a failover may have moved it),
    // then every other source in order.
    let mut candidates = Vec::new();
    if let Some(cur) = stream.current_source() {
        candidates.push(cur);
    }
    for u in sources::static_sources(&spec) {
        if !candidates.contains(&u) {
            candidates.push(u);
        }
    }
    ctx.sel = Selection::new(candidates);
    ctx.spec = Some(spec);
    let guard = match app.registry.attach(&stream, &hello(session)) {
        Ok(g) => g,
        Err(why) => {
            respond::refused(app, session, ctx, why).await?;
            return Ok(true);
        }
    };
    tracing::debug!(stream_id = %stream.id, client = %guard.client.id, "client attached");
    ctx.guard = Some(guard);
    Ok(false)
}
