//! The internal listener (`cluster.listen`): node-to-node requests only.
//! Every request must carry a valid signature (`auth.rs`) or gets 401;
//! `/_cluster/*` routes exist only here (the public listener answers 404).

use std::sync::Arc;

use pingora::prelude::*;
use pingora::proxy::Session;
use serde_json::json;

use crate::app::App;
use crate::proxy::respond;
use crate::proxy::RequestCtx;

/// Answers one request on the internal listener; always handled here.
pub async fn route(app: &Arc<App>, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
    let Some(cluster) = app.cluster.clone() else {
        ctx.local_status = Some(404);
        respond::error(session, 404, "Not Found").await?;
        return Ok(true);
    };
    let req = session.req_header();
    let method = req.method.as_str().to_owned();
    let path_and_query = req
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let path = req.uri.path().to_owned();
    let peer = match cluster.verify(&method, &path_and_query, &req.headers) {
        Ok(node) => node,
        Err(e) => {
            tracing::warn!(client = ?session.client_addr(), error = %e, path = %path, "cluster: unauthenticated internal request refused");
            ctx.local_status = Some(401);
            respond::error(session, 401, &format!("cluster authentication failed: {e}")).await?;
            return Ok(true);
        }
    };
    tracing::debug!(peer = %peer, %method, path = %path, "cluster request");
    let status = match (method.as_str(), path.as_str()) {
        ("GET", "/_cluster/ping") => {
            respond::json(session, 200, &json!({ "node": cluster.node_id() })).await?;
            200
        }
        ("GET", p) if p.starts_with("/_cluster/live/") => {
            let id = p.trim_start_matches("/_cluster/live/").to_owned();
            let query = session.req_header().uri.query().map(str::to_owned);
            let status = super::serve_live::serve(app, session, &id, query.as_deref()).await?;
            // A relay's socket left Pingora's session: nothing more to log.
            ctx.detached = status == 200;
            status
        }
        _ => {
            respond::error(session, 404, "Not Found").await?;
            404
        }
    };
    ctx.local_status = Some(status);
    Ok(true)
}
