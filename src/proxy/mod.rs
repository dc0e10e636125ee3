//! `Edge`: the Pingora `ProxyHttp` every client and API request enters. Phases
//! are listed in call order and stay a few lines each; the work lives in
//! `request` (routing, API, client identity), `upstream` (source choice,
//! redirects, failover before the first byte) and `response` (header hygiene,
//! byte accounting). Only this module touches a Pingora `Session`.

mod broadcast;
mod ctx;
mod hls;
pub(crate) mod live;
mod packaged;
mod protocol;
mod request;
pub mod respond;
mod response;
mod upstream;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;

use crate::app::App;
pub use ctx::RequestCtx;

pub struct Edge {
    pub app: Arc<App>,
    /// The cluster's internal listener: `/_cluster/*` only, authenticated.
    internal: bool,
}

impl Edge {
    pub fn new(app: Arc<App>) -> Self {
        Edge {
            app,
            internal: false,
        }
    }

    /// The proxy of `cluster.listen` (see `crate::cluster::internal`).
    pub fn internal(app: Arc<App>) -> Self {
        Edge {
            app,
            internal: true,
        }
    }
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    /// Routes the request: API and errors are answered here (`Ok(true)`);
    /// `/stream/{id}` continues into the proxy phases with its sources chosen.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if self.internal {
            return crate::cluster::internal::route(&self.app, session, ctx).await;
        }
        if let Some(msg) = protocol::host_problem(session.req_header()) {
            protocol::reject(session, ctx, 400, msg).await?;
            return Ok(true);
        }
        request::route(&self.app, session, ctx).await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        upstream::peer(&self.app, ctx).await
    }

    /// Lists the provider connection's local address, so a request that
    /// arrives from it is known to be m3u-edge itself (`conn::selfloop`).
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let local = digest
            .and_then(|d| d.socket_digest.as_ref())
            .and_then(|s| s.local_addr())
            .and_then(|a| a.as_inet())
            .copied();
        ctx.self_listed = local.map(|l| self.app.self_conns.list(l, ctx.self_depth));
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream::build_request(&self.app, session, upstream_request, ctx)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        upstream::connect_failed(&self.app, ctx, e)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream::response_header(&self.app, upstream_response, ctx)
    }

    /// Proxied responses go only to client routes (`/stream`): open CORS.
    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        respond::open_cors(upstream_response)
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        upstream::error_while_proxy(&self.app, session, ctx, e)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        response::body(&self.app, ctx, body)?;
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        response::fail(&self.app, session, e, ctx).await
    }

    /// A client that goes away, or sends a bad or stalled request, is
    /// normal: a debug line instead of Pingora's ERROR (which a
    /// `pingora=warn` filter cannot silence).
    fn suppress_error_log(&self, session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        if protocol::is_client_side(e, ctx) {
            tracing::debug!(error = %e, request = %self.request_summary(session, ctx), "request ended by the client");
            return true;
        }
        false
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if !ctx.detached {
            response::log(&self.app, session, e, ctx);
        }
        // The client stops being listed, and the provider slot is free, the
        // moment the request is over.
        ctx.guard.take();
        ctx.lease.take();
        ctx.self_listed.take();
    }

    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let path = session.req_header().uri.path();
        match &ctx.stream_id {
            Some(id) => format!("{} {path} stream_id={id}", session.req_header().method),
            None => format!("{} {path}", session.req_header().method),
        }
    }
}
