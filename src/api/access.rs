//! Who may call the management API, beyond the token: the browser-facing
//! rules that keep a web page from driving or reading it.
//!
//! - `Origin` (sent by browsers on every cross-origin request, and on
//!   same-origin POSTs): only `api.cors_origins` may call. A page on another
//!   site can neither read `/streams` (provider URLs and credentials) nor
//!   send a "simple" cross-site POST that needs no preflight.
//! - A body must be declared `application/json`: a `text/plain` or form
//!   POST is what a cross-site page can send without a preflight.
//! - Without a token (and without `api.allow_open`), only loopback clients,
//!   naming the host as an address or `localhost`: a DNS-rebinding page
//!   (its own name resolving to 127.0.0.1) is refused by its `Host`.

use std::net::IpAddr;

use http::Method;

use super::ApiReply;
use crate::config::ApiConfig;

/// What the request says about where it comes from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    /// The socket peer (never `X-Forwarded-For`, which anyone can write).
    pub peer: Option<IpAddr>,
    pub host: Option<&'a str>,
    pub origin: Option<&'a str>,
}

/// `Ok(origin)`: allowed, and the origin to answer CORS to (if any).
pub fn check<'a>(api: &ApiConfig, caller: Caller<'a>) -> Result<Option<&'a str>, ApiReply> {
    let origin =
        match caller.origin {
            None => None,
            Some(o) if origin_allowed(api, o) => Some(o),
            Some(_) => return Err(ApiReply::detail(
                403,
                "Origin not allowed: add it to api.cors_origins to call the API from a web page",
            )),
        };
    if api.token.is_none() && !api.allow_open {
        if !caller
            .peer
            .is_some_and(|ip| ip.is_loopback() || is_mapped_loopback(ip))
        {
            return Err(ApiReply::detail(
                403,
                "The API has no token, so it answers only on loopback: \
                 set api.token (or api.allow_open: true)",
            ));
        }
        if !caller.host.is_some_and(local_host) {
            return Err(ApiReply::detail(
                403,
                "The API has no token, so it answers only to Host: localhost or an address",
            ));
        }
    }
    Ok(origin)
}

/// A body that carries data must be declared JSON. `Err` is the 415.
/// An empty one (nothing, `[]` or `{}`: m3u-editor's bodiless POSTs) asks
/// for nothing and passes as it is.
pub fn check_body(
    method: &Method,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<(), ApiReply> {
    let trimmed = body.trim_ascii();
    if matches!(trimmed, b"" | b"[]" | b"{}") || *method == Method::GET || *method == Method::HEAD {
        return Ok(());
    }
    let essence = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some("application/json") => Ok(()),
        Some(t) if t.starts_with("application/") && t.ends_with("+json") => Ok(()),
        _ => Err(ApiReply::detail(
            415,
            "Content-Type must be application/json",
        )),
    }
}

fn origin_allowed(api: &ApiConfig, origin: &str) -> bool {
    api.cors_origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

fn is_mapped_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        IpAddr::V4(_) => false,
    }
}

/// `localhost`, `*.localhost` or an IP address, with or without a port.
fn local_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest
            .split(']')
            .next()
            .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok());
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(name, _)| name)
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.parse::<IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(token: bool, open: bool, origins: &[&str]) -> ApiConfig {
        ApiConfig {
            token: token.then(|| "t".to_owned()),
            cors_origins: origins.iter().map(|s| s.to_string()).collect(),
            allow_open: open,
        }
    }

    fn caller<'a>(peer: &str, host: &'a str, origin: Option<&'a str>) -> Caller<'a> {
        Caller {
            peer: peer.parse().ok(),
            host: Some(host),
            origin,
        }
    }

    #[test]
    fn without_a_token_only_loopback_by_address_or_localhost() {
        let a = api(false, false, &[]);
        assert!(check(&a, caller("127.0.0.1", "127.0.0.1:8085", None)).is_ok());
        assert!(check(&a, caller("::1", "[::1]:8085", None)).is_ok());
        assert!(check(&a, caller("::ffff:127.0.0.1", "localhost:8085", None)).is_ok());
        assert!(check(&a, caller("127.0.0.1", "localhost", None)).is_ok());
        // DNS rebinding: a loopback peer that names another host.
        let e = check(&a, caller("127.0.0.1", "evil.example:8085", None)).unwrap_err();
        assert_eq!(e.status, 403);
        assert_eq!(
            check(&a, caller("192.0.2.7", "192.0.2.1:8085", None))
                .unwrap_err()
                .status,
            403
        );
        // A token or allow_open lifts both.
        assert!(check(
            &api(true, false, &[]),
            caller("192.0.2.7", "proxy:8085", None)
        )
        .is_ok());
        assert!(check(
            &api(false, true, &[]),
            caller("192.0.2.7", "proxy:8085", None)
        )
        .is_ok());
    }

    #[test]
    fn origins_only_from_the_list() {
        let a = api(true, false, &["https://editor.example"]);
        let ok = check(&a, caller("192.0.2.7", "p", Some("https://editor.example")));
        assert_eq!(ok.unwrap(), Some("https://editor.example"));
        let e = check(&a, caller("192.0.2.7", "p", Some("https://evil.example"))).unwrap_err();
        assert_eq!(e.status, 403);
        assert_eq!(check(&a, caller("192.0.2.7", "p", None)).unwrap(), None);
        let any = api(true, false, &["*"]);
        assert!(check(&any, caller("192.0.2.7", "p", Some("https://x.example"))).is_ok());
    }

    #[test]
    fn bodies_must_be_json() {
        let post = Method::POST;
        let data = br#"{"url":"http://a/b"}"#;
        assert!(check_body(&post, Some("application/json"), data).is_ok());
        assert!(check_body(&post, Some("Application/JSON; charset=utf-8"), data).is_ok());
        assert!(check_body(&post, Some("application/merge-patch+json"), data).is_ok());
        assert_eq!(
            check_body(&post, Some("text/plain"), data)
                .unwrap_err()
                .status,
            415
        );
        assert_eq!(check_body(&post, None, data).unwrap_err().status, 415);
        for empty in [&b""[..], b"[]", b" {} "] {
            assert!(check_body(&post, Some("text/plain"), empty).is_ok());
        }
    }
}
