//! The management API, drop-in compatible with m3u-proxy 0.4.x (the contract is
//! ../shared/API-COMPAT.md). Handlers take an [`ApiRequest`] and return an
//! [`ApiReply`] (status + JSON); only `proxy` writes them to a client.

pub mod access;
pub mod body;
pub mod json;
pub mod openapi;
pub mod resolver;
pub mod streams;
pub mod system;
pub mod transcode;
pub mod webhooks;

use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::route::Api;

/// A management request, already read off the wire.
#[derive(Debug, Default)]
pub struct ApiRequest {
    pub method: Method,
    pub query: Vec<(String, String)>,
    pub body: Bytes,
}

impl ApiRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiReply {
    pub status: u16,
    pub body: Value,
}

impl ApiReply {
    pub fn ok(body: Value) -> Self {
        ApiReply { status: 200, body }
    }

    /// m3u-proxy's error shape: `{"detail": "..."}`.
    pub fn detail(status: u16, msg: impl Into<String>) -> Self {
        ApiReply {
            status,
            body: json!({ "detail": msg.into() }),
        }
    }

    /// FastAPI-style validation error: `{"detail":[{type,loc,msg,input}]}`.
    pub fn invalid(loc: &[&str], msg: impl Into<String>, input: Value) -> Self {
        ApiReply {
            status: 422,
            body: json!({ "detail": [{
                "type": "value_error",
                "loc": loc,
                "msg": msg.into(),
                "input": input,
            }]}),
        }
    }

    fn method_not_allowed() -> Self {
        Self::detail(405, "Method Not Allowed")
    }
}

/// Outcome of the token check.
#[derive(Debug, PartialEq, Eq)]
pub enum Auth {
    Allowed,
    Missing,
    Wrong,
}

/// `X-API-Token` header or `?api_token=`; constant-time compare. No configured
/// token → open. `/health` answers without a token but checks one that is sent.
pub fn authorize(app: &App, api: &Api, header: Option<&[u8]>, query: Option<&str>) -> Auth {
    let Some(expected) = app.config.api.token.as_deref() else {
        return Auth::Allowed;
    };
    let given = header.or(query.map(str::as_bytes));
    match given {
        None if *api == Api::Health => Auth::Allowed,
        None => Auth::Missing,
        Some(g) if bool::from(g.ct_eq(expected.as_bytes())) => Auth::Allowed,
        Some(_) => Auth::Wrong,
    }
}

pub fn auth_reply(auth: Auth) -> Option<ApiReply> {
    match auth {
        Auth::Allowed => None,
        Auth::Missing => Some(ApiReply::detail(401, "API token required")),
        Auth::Wrong => Some(ApiReply::detail(403, "Invalid API token")),
    }
}

/// Dispatches an authorized request.
pub async fn handle(app: &App, api: &Api, req: &ApiRequest) -> ApiReply {
    use Method as M;
    if let Some(c) = &app.cluster {
        if let Some(reply) = crate::cluster::registry::api::handle(app, c, api, req).await {
            return reply;
        }
    }
    match (api, &req.method) {
        (Api::Health, &M::GET) => system::health(app),
        (Api::Info, &M::GET) => system::info(app),
        (Api::Stats, &M::GET) => system::stats(app, req),
        (Api::Clients, &M::GET) => system::clients(app, req),
        (Api::TestConnection, &M::POST) => system::test_connection(app, req).await,
        (Api::Streams, &M::GET) => streams::list(app, req),
        (Api::Streams, &M::POST) => streams::create(app, req),
        (Api::ByMetadata, &M::GET) => streams::by_metadata(app, req),
        (Api::ByMetadata, &M::DELETE) => streams::delete_by_metadata(app, req),
        (Api::CountsByMetadata, &M::GET) => streams::counts_by_metadata(app, req),
        (Api::OldestByMetadata, &M::DELETE) => streams::delete_oldest(app, req),
        (Api::Stream(id), &M::GET) => streams::get(app, id),
        (Api::Stream(id), &M::DELETE) => streams::delete(app, id),
        (Api::StreamFailover(id), &M::POST) => streams::failover(app, id).await,
        (Api::Webhooks, &M::GET) => webhooks::list(app),
        (Api::Webhooks, &M::POST) => webhooks::add(app, req),
        (Api::Webhooks, &M::DELETE) => webhooks::remove(app, req),
        (Api::WebhooksTest, &M::POST) => webhooks::test(app, req).await,
        (Api::Transcode, &M::POST) => transcode::create(app, req),
        (Api::TranscodeProfiles, &M::GET) => transcode::profiles(app),
        (Api::Broadcasts, &M::GET) => crate::broadcast::api::list(app),
        (Api::BroadcastStart(id), &M::POST) => crate::broadcast::api::start(app, id, req).await,
        (Api::BroadcastStop(id), &M::POST) => crate::broadcast::api::stop(app, id).await,
        (Api::BroadcastStatus(id), &M::GET) => crate::broadcast::api::status(app, id),
        (Api::Broadcast(id), &M::DELETE) => crate::broadcast::api::delete(app, id).await,
        (Api::ValidateCookiesFile, &M::GET) => {
            let checked = crate::resolvers::cookies::validate(
                app.config.resolvers.cookies_dir.as_deref(),
                req.param("path").unwrap_or(""),
                chrono::Utc::now().timestamp(),
            );
            ApiReply::ok(json!({ "valid": checked.valid, "message": checked.message }))
        }
        (Api::Playlists, &M::GET) => crate::playlists::api::status(app),
        (Api::PlaylistsRefresh, &M::POST) => crate::playlists::api::refresh(app, req).await,
        _ => ApiReply::method_not_allowed(),
    }
}

/// The `Allow` header of a 405 on `api` (HEAD wherever GET is; OPTIONS is
/// the CORS preflight every route answers).
pub fn allowed_methods(api: &Api) -> &'static str {
    match api {
        Api::Health | Api::Info | Api::Stats | Api::Clients | Api::CountsByMetadata => {
            "GET, HEAD, OPTIONS"
        }
        Api::Streams => "GET, HEAD, POST, OPTIONS",
        Api::ByMetadata | Api::Stream(_) => "GET, HEAD, DELETE, OPTIONS",
        Api::OldestByMetadata => "DELETE, OPTIONS",
        Api::StreamFailover(_) | Api::TestConnection | Api::WebhooksTest | Api::Transcode => {
            "POST, OPTIONS"
        }
        Api::TranscodeProfiles | Api::ValidateCookiesFile => "GET, HEAD, OPTIONS",
        Api::Webhooks => "GET, HEAD, POST, DELETE, OPTIONS",
        Api::Broadcasts | Api::BroadcastStatus(_) => "GET, HEAD, OPTIONS",
        Api::BroadcastStart(_) | Api::BroadcastStop(_) => "POST, OPTIONS",
        Api::Broadcast(_) => "DELETE, OPTIONS",
        Api::Playlists => "GET, HEAD, OPTIONS",
        Api::PlaylistsRefresh => "POST, OPTIONS",
    }
}

/// m3u-proxy's query booleans: 1/0/true/false/yes/no/on/off, any case.
pub fn query_bool(req: &ApiRequest, name: &str, default: bool) -> Result<bool, ApiReply> {
    match req.param(name) {
        None => Ok(default),
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(ApiReply::invalid(
                &["query", name],
                "Input should be a valid boolean",
                Value::String(v.to_string()),
            )),
        },
    }
}

/// Optional pagination of a list (`?limit=&offset=`): absent, the whole
/// list, as m3u-proxy (and m3u-editor, which sends neither) expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Page {
    pub limit: Option<usize>,
    pub offset: Option<usize>,
}

impl Page {
    pub fn from_query(req: &ApiRequest) -> Result<Page, ApiReply> {
        let number = |name: &str| -> Result<Option<usize>, ApiReply> {
            match req.param(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    ApiReply::invalid(
                        &["query", name],
                        "Input should be a valid non-negative integer",
                        Value::String(v.to_string()),
                    )
                }),
            }
        };
        Ok(Page {
            limit: number("limit")?,
            offset: number("offset")?,
        })
    }

    /// The page of `items`.
    pub fn slice<'a, T>(&self, items: &'a [T]) -> &'a [T] {
        let start = self.offset.unwrap_or(0).min(items.len());
        let end = match self.limit {
            Some(l) => start.saturating_add(l).min(items.len()),
            None => items.len(),
        };
        &items[start..end]
    }

    /// Adds `limit` and `offset` to a paginated reply.
    pub fn echo(&self, out: &mut Value) {
        if *self != Page::default() {
            out["limit"] = json!(self.limit);
            out["offset"] = json!(self.offset.unwrap_or(0));
        }
    }
}

/// A required query parameter, or the 422 naming it.
pub fn query_required<'a>(req: &'a ApiRequest, name: &str) -> Result<&'a str, ApiReply> {
    req.param(name)
        .ok_or_else(|| ApiReply::invalid(&["query", name], "Field required", Value::Null))
}
