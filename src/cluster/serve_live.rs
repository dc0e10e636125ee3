//! `GET /_cluster/live/{id}?epoch=N` on the internal listener: the owner
//! of a live channel feeds a peer node's relay. The relay is a hub viewer
//! (PAT/PMT + keyframe first, spool spans sent with sendfile, dropped when
//! too slow like any viewer) that keeps the channel open, but not a client:
//! no client events, not in `/clients`.
//!
//! Answers: 200 and TS bytes; 409 `{"phase":"not_owner"}` when this node
//! does not own the channel under that epoch (the caller looks up the owner
//! again); 404 for an unknown stream; 503 with `phase` file, hls, full,
//! unavailable or ended when the channel is not one to relay (the caller
//! sends its viewers where the owner's would go).

use std::sync::Arc;
use std::time::Duration;

use http::header;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::hub::{JoinError, Next, Viewer};
use crate::proxy::respond;

/// `JoinError::Failed` of a channel that closed while being joined.
const CLOSED: &str = "channel closed";

/// Bytes per write, as for a player (proxy/live.rs).
const BATCH: usize = 128 * 1024;

/// Serves one relay request; the status written, for the access log.
pub async fn serve(
    app: &Arc<App>,
    session: &mut Session,
    id: &str,
    query: Option<&str>,
) -> Result<u16> {
    let Some(c) = &app.cluster else {
        respond::error(session, 404, "Not Found").await?;
        return Ok(404);
    };
    let epoch = query
        .into_iter()
        .flat_map(|q| url::form_urlencoded::parse(q.as_bytes()))
        .find(|(k, _)| k == "epoch")
        .and_then(|(_, v)| v.parse::<u64>().ok());
    let Some(epoch) = epoch else {
        respond::error(session, 400, "epoch (a number) is required").await?;
        return Ok(400);
    };
    if app.registry.get(id).is_none() {
        respond::error(session, 404, &format!("Stream not found: {id}")).await?;
        return Ok(404);
    }
    let owned = c
        .table()
        .owned(id)
        .filter(|o| o.epoch == epoch && !o.served.is_cancelled());
    let joined = match &owned {
        Some(o) => app.hub.join_open(app, &o.ch).await,
        None => None,
    };
    // A channel that closed meanwhile is not ours to serve either.
    let joined = joined.filter(|j| !matches!(j, Err(JoinError::Failed(why)) if why == CLOSED));
    let (Some(o), Some(joined)) = (owned, joined) else {
        let body = json!({
            "detail": format!("This node does not own stream {id} under epoch {epoch}"),
            "phase": "not_owner",
        });
        respond::json(session, 409, &body).await?;
        return Ok(409);
    };
    let viewer = match joined {
        Ok(v) => v,
        Err(e) => {
            let body = match e {
                JoinError::File => json!({"detail": "a file, not a live channel", "phase": "file"}),
                JoinError::Hls => json!({"detail": "an HLS stream", "phase": "hls"}),
                JoinError::Full(f) => json!({
                    "detail": f.detail(),
                    "phase": "full",
                    "provider": f.provider,
                    "max_connections": f.max_connections,
                    "reason": f.reason,
                }),
                JoinError::Unavailable(code) => {
                    json!({"detail": "no source could be opened", "phase": "unavailable", "code": code})
                }
                JoinError::Failed(why) => json!({"detail": why, "phase": "ended"}),
            };
            respond::json(session, 503, &body).await?;
            return Ok(503);
        }
    };
    let mut resp = ResponseHeader::build(200, Some(3))?;
    resp.insert_header(header::CONTENT_TYPE, "video/mp2t")?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    resp.insert_header(header::CONNECTION, "close")?;
    session.write_response_header(Box::new(resp), false).await?;
    let Some(io) = crate::proxy::live::detach(session).await else {
        return Err(Error::explain(
            InternalError,
            "relays are served over plain HTTP/1 on TCP only",
        ));
    };
    let write_timeout = crate::hub::write_timeout(&app.config.live);
    let app = app.clone();
    let c = c.clone();
    tokio::spawn(async move {
        c.metrics.relays_served.inc();
        feed(&app, io, viewer, o.served, write_timeout).await;
        c.metrics.relays_served.dec();
    });
    Ok(200)
}

/// Writes the channel to the peer until it leaves, falls behind, the
/// channel ends or this node stops owning it.
async fn feed(
    app: &App,
    mut io: TcpStream,
    mut viewer: Viewer,
    served: CancellationToken,
    write_timeout: Duration,
) {
    let mut probe = [0u8; 16];
    loop {
        let next = tokio::select! {
            biased;
            _ = served.cancelled() => break,
            _ = io.read(&mut probe) => break,
            n = viewer.next(BATCH) => n,
        };
        let wrote = tokio::time::timeout(write_timeout, async {
            match &next {
                Next::Span(span) => span.send(&io).await,
                Next::Data(b) => io.write_all(b).await,
                Next::Lagged | Next::Ended => Err(std::io::ErrorKind::Other.into()),
            }
        })
        .await;
        match wrote {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                tracing::warn!(stream_id = %viewer.channel().stream.id, "relay peer too slow: write timed out, dropped");
                break;
            }
        }
        let n = match &next {
            Next::Span(s) => s.len(),
            Next::Data(b) => b.len(),
            _ => 0,
        };
        app.metrics.bytes_out.inc_by(n as u64);
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
}
