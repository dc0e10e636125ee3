//! The Pingora side of the standalone routes: who may read them, which base
//! URL links get, and writing the documents.
//!
//! Access: `playlist.token` or `api.token`, given as `?token=` (players
//! cannot send headers), `?api_token=`, `X-API-Token`, or in the path
//! (`/hdhr/{token}/...`, for HDHomeRun clients that append paths to a
//! base URL). With neither token configured, the API's rule applies:
//! loopback only, unless `api.allow_open`.

use bytes::Bytes;
use http::{header, Method};
use percent_encoding::utf8_percent_encode;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use subtle::ConstantTimeEq;

use super::epg::NoGuide;
use super::{export, hdhomerun};
use crate::app::App;
use crate::proxy::respond;
use crate::proxy::RequestCtx;
use crate::route::Page;

/// Answers `page` (the whole response is written here).
pub async fn serve(
    app: &App,
    session: &mut Session,
    ctx: &mut RequestCtx,
    page: Page,
    path_token: Option<String>,
) -> Result<()> {
    let method = session.req_header().method.clone();
    if method == Method::OPTIONS {
        ctx.local_status = Some(200);
        return respond::preflight(session, respond::Cors::Open).await;
    }
    let allowed = if page == Page::LineupPost {
        method == Method::POST
    } else {
        method == Method::GET || method == Method::HEAD
    };
    if !allowed {
        ctx.local_status = Some(405);
        let allow = if page == Page::LineupPost {
            "POST, OPTIONS"
        } else {
            "GET, HEAD, OPTIONS"
        };
        return respond::method_not_allowed(session, allow, respond::Cors::Open).await;
    }
    let hdhr = !matches!(page, Page::Playlist | Page::Epg);
    let open = hdhr && app.config.hdhomerun.open && path_token.is_none();
    let token = match authorize(app, session, path_token) {
        Err(_) if open => Ok(None),
        other => other,
    };
    let token = match token {
        Ok(t) => t,
        Err((status, msg)) => {
            ctx.local_status = Some(status);
            return respond::error(session, status, msg).await;
        }
    };
    if hdhr && !app.config.hdhomerun.enabled {
        ctx.local_status = Some(404);
        return respond::error(
            session,
            404,
            "HDHomeRun emulation is off (hdhomerun.enabled)",
        )
        .await;
    }
    let base = base_url(app, session);
    let query_token = token.as_deref().map(|t| {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("token", t)
            .finish()
    });
    // Where HDHomeRun clients find the other documents: the token rides in
    // the path, since they append `/lineup.json` to it.
    let hdhr_base = match &token {
        Some(t) => format!(
            "{base}/hdhr/{}",
            utf8_percent_encode(t, super::PATH_SEGMENT)
        ),
        None => base.clone(),
    };
    let (status, content_type, body, encoding): (u16, String, Bytes, Option<String>) = match page {
        Page::Playlist => {
            let group = query_param(session, "group");
            let channels = export::channels(app, group.as_deref());
            let guide = app
                .playlists
                .guide_url(&app.config)
                .map(|_| match &query_token {
                    Some(q) => format!("{base}/epg.xml?{q}"),
                    None => format!("{base}/epg.xml"),
                });
            let text = export::render(&channels, &base, guide.as_deref());
            (200, "audio/x-mpegurl".into(), Bytes::from(text), None)
        }
        Page::Epg => match app.playlists.epg.get(app).await {
            Ok(g) => (200, g.content_type, g.body, g.content_encoding),
            Err(NoGuide::NotConfigured) => {
                ctx.local_status = Some(404);
                return respond::error(
                    session,
                    404,
                    "No guide: set epg.url, playlists[].epg_url, or import a playlist with url-tvg",
                )
                .await;
            }
            Err(NoGuide::Failed(_)) => {
                ctx.local_status = Some(502);
                return respond::error(session, 502, "The guide could not be fetched").await;
            }
        },
        Page::Discover => json(hdhomerun::discover(app, &hdhr_base)),
        Page::Lineup => json(hdhomerun::lineup(&export::channels(app, None), &base)),
        Page::LineupStatus => json(hdhomerun::lineup_status()),
        Page::LineupPost => (200, "text/plain".into(), Bytes::new(), None),
        Page::DeviceXml => (
            200,
            "application/xml".into(),
            Bytes::from(hdhomerun::device_xml(app, &hdhr_base)),
            None,
        ),
    };
    ctx.local_status = Some(status);
    let mut resp = ResponseHeader::build(status, Some(6))?;
    resp.insert_header(header::CONTENT_TYPE, content_type)?;
    resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    if let Some(e) = encoding {
        resp.insert_header(header::CONTENT_ENCODING, e)?;
    }
    respond::open_cors(&mut resp)?;
    let head = method == Method::HEAD;
    session.write_response_header(Box::new(resp), head).await?;
    if !head {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

fn json(v: serde_json::Value) -> (u16, String, Bytes, Option<String>) {
    (
        200,
        "application/json".into(),
        Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
        None,
    )
}

/// `Ok(token)`: allowed, with the token to put into links (none when no
/// token is configured).
fn authorize(
    app: &App,
    session: &Session,
    path_token: Option<String>,
) -> std::result::Result<Option<String>, (u16, &'static str)> {
    let config = &app.config;
    let accepted: Vec<&str> = [
        config.playlist.token.as_deref(),
        config.api.token.as_deref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let req = session.req_header();
    if accepted.is_empty() {
        let caller = crate::api::access::Caller {
            peer: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
            host: host(session),
            origin: None,
        };
        return match crate::api::access::check(&config.api, caller) {
            Ok(_) => Ok(None),
            Err(_) => Err((
                403,
                "No token is configured, so this answers only on loopback: \
                 set playlist.token (or api.allow_open: true)",
            )),
        };
    }
    let given = path_token
        .or_else(|| query_param(session, "token"))
        .or_else(|| query_param(session, "api_token"))
        .or_else(|| {
            req.headers
                .get("x-api-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
    let Some(given) = given else {
        return Err((401, "Token required: add ?token= to the URL"));
    };
    let ok = accepted.iter().fold(false, |ok, t| {
        ok | bool::from(given.as_bytes().ct_eq(t.as_bytes()))
    });
    if ok {
        Ok(Some(given))
    } else {
        Err((403, "Invalid token"))
    }
}

fn query_param(session: &Session, name: &str) -> Option<String> {
    let query = session.req_header().uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn host(session: &Session) -> Option<&str> {
    let req = session.req_header();
    req.headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or(req.uri.authority().map(|a| a.as_str()))
}

/// `{public_url}{root_path}`, else `http://{Host}` (plus `root_path` when
/// the request came under it). A Host that is not a plain host[:port] is
/// not echoed into links; the listen address stands in.
pub fn base_url(app: &App, session: &Session) -> String {
    let root = &app.config.server.root_path;
    if let Some(u) = &app.config.server.public_url {
        return format!("{}{root}", u.as_str().trim_end_matches('/'));
    }
    let host = host(session)
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| app.config.server.listen.to_string());
    let path = session.req_header().uri.path();
    let under_root = !root.is_empty()
        && path
            .strip_prefix(root.as_str())
            .is_some_and(|rest| rest.starts_with('/'));
    if under_root {
        format!("http://{host}{root}")
    } else {
        format!("http://{host}")
    }
}
