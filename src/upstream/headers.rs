//! R7, client protection: the provider request is built from scratch out of an
//! allowlist, and the client response keeps only headers a player needs. The
//! provider never sees a client's IP, cookies, referer, auth or user agent; the
//! client never sees provider cookies, server names, tokens or URLs.

use http::header::{self, HeaderName};
use pingora::http::{RequestHeader, ResponseHeader};
use url::Url;

/// Client request headers that are safe and useful to pass to the provider.
const FORWARDED: [HeaderName; 5] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::ACCEPT,
];

/// Provider response headers a player may see. Framing headers stay so Pingora
/// can frame the body; everything else (Set-Cookie, Server, Via, X-*, Location,
/// Link, Alt-Svc, ...) is dropped.
const KEPT: [HeaderName; 12] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::ACCEPT_RANGES,
    header::TRANSFER_ENCODING,
    header::LAST_MODIFIED,
    header::ETAG,
    header::CACHE_CONTROL,
    header::EXPIRES,
    header::DATE,
    header::AGE,
    header::CONTENT_ENCODING,
];

/// Hop-by-hop and framing headers: m3u-edge frames its own requests, so a
/// stream, provider or webhook header of these names would sit beside ours
/// and could split or smuggle a request (RFC 9110 §7.6.1, RFC 9112 §6).
const RESERVED: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "content-length",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether `name` may not be set as an extra request header (see [`RESERVED`]).
pub fn is_reserved(name: &str) -> bool {
    RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name))
}

/// The request to send upstream for `target`: method and allowlisted headers of
/// the client request, plus the stream's user agent and headers.
pub fn upstream_request(
    client: &RequestHeader,
    target: &Url,
    user_agent: &str,
    extra: &[(String, String)],
) -> pingora::Result<RequestHeader> {
    let path = match target.query() {
        Some(q) => format!("{}?{}", target.path(), q),
        None => target.path().to_string(),
    };
    let mut req = RequestHeader::build(client.method.clone(), path.as_bytes(), None)?;
    req.insert_header(header::HOST, host_header(target))?;
    for name in FORWARDED.iter() {
        for v in client.headers.get_all(name) {
            req.append_header(name.clone(), v.clone())?;
        }
    }
    // Bodies are relayed (and playlists rewritten) as they are, uncompressed.
    req.insert_header(header::ACCEPT_ENCODING, "identity")?;
    req.insert_header(header::USER_AGENT, user_agent)?;
    // The provider socket must close when the stream ends: a pooled idle
    // connection would still count against the account's connection limit.
    req.insert_header(header::CONNECTION, "close")?;
    for (k, v) in extra {
        req.insert_header(k.clone(), v.as_str())?;
    }
    Ok(req)
}

/// `Host` as the provider expects it: default ports omitted.
pub fn host_header(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// Drops every provider response header a player does not need.
pub fn scrub_response(resp: &mut ResponseHeader) {
    let drop: Vec<HeaderName> = resp
        .headers
        .keys()
        .filter(|k| !KEPT.contains(k))
        .cloned()
        .collect();
    for name in drop {
        resp.remove_header(&name);
    }
}

/// Content type guessed from the URL path, for providers that send none.
pub fn content_type_for(url: &Url) -> &'static str {
    let path = url.path().to_ascii_lowercase();
    let ext = path.rsplit('.').next().unwrap_or("");
    match ext {
        "ts" => "video/mp2t",
        "mp4" | "m4v" => "video/mp4",
        "mkv" => "video/x-matroska",
        "webm" => "video/webm",
        "avi" => "video/x-msvideo",
        "m3u8" => "application/vnd.apple.mpegurl",
        "m4s" => "video/iso.segment",
        "aac" => "audio/aac",
        _ if path.contains("/live/") => "video/mp2t",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowlisted_headers_go_upstream() {
        let mut client = RequestHeader::build("GET", b"/stream/x", None).unwrap();
        for (k, v) in [
            ("range", "bytes=0-9"),
            ("x-forwarded-for", "10.0.0.1"),
            ("cookie", "a=b"),
            ("authorization", "Bearer x"),
            ("referer", "http://me"),
            ("user-agent", "VLC"),
            ("accept", "*/*"),
        ] {
            client.insert_header(k, v).unwrap();
        }
        let url = Url::parse("http://prov.example:8080/a/b.ts?tok=1").unwrap();
        let req =
            upstream_request(&client, &url, "UA/1", &[("X-Custom".into(), "1".into())]).unwrap();
        let names: Vec<_> = req.headers.keys().map(|k| k.as_str().to_string()).collect();
        assert!(names.contains(&"range".to_string()));
        for bad in ["x-forwarded-for", "cookie", "authorization", "referer"] {
            assert!(!names.contains(&bad.to_string()), "{bad} leaked");
        }
        assert_eq!(req.headers["user-agent"], "UA/1");
        assert_eq!(req.headers["host"], "prov.example:8080");
        assert_eq!(req.uri.to_string(), "/a/b.ts?tok=1");
    }

    #[test]
    fn provider_headers_are_scrubbed() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (k, v) in [
            ("set-cookie", "s=1"),
            ("server", "nginx"),
            ("via", "1.1 x"),
            ("x-token", "t"),
            ("content-type", "video/mp2t"),
            ("content-length", "10"),
        ] {
            resp.insert_header(k, v).unwrap();
        }
        scrub_response(&mut resp);
        let names: Vec<_> = resp
            .headers
            .keys()
            .map(|k| k.as_str().to_string())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
