//! Which URL to try next for a stream: the primary, then `failover_urls` in
//! order, then (when configured) the failover resolver, whose request and reply
//! follow m3u-proxy's (API-COMPAT.md §7).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use super::guard;
use crate::registry::StreamSpec;

/// m3u-proxy gives its resolver 10 s.
pub const RESOLVER_TIMEOUT: Duration = Duration::from_secs(10);

/// The static candidates of a stream: primary first, then failovers in order.
/// URLs were validated when the stream was registered; an unparsable one is
/// skipped rather than trusted.
pub fn static_sources(spec: &StreamSpec) -> Vec<Url> {
    std::iter::once(&spec.url)
        .chain(spec.failover_urls.iter())
        .filter_map(|u| Url::parse(u).ok())
        .collect()
}

/// Whether `url` is one of the stream's static candidates, as written in
/// its spec or as parsed (a switch records the parsed form).
pub fn is_static_source(spec: &StreamSpec, url: &str) -> bool {
    url == spec.url
        || spec.failover_urls.iter().any(|u| u == url)
        || static_sources(spec).iter().any(|u| u.as_str() == url)
}

/// m3u-proxy numbering: -1 = primary, 0.. = index into failover_urls.
pub fn failover_index(position: usize) -> i64 {
    position as i64 - 1
}

#[derive(Debug, Serialize)]
struct ResolverRequest<'a> {
    current_url: &'a str,
    metadata: &'a BTreeMap<String, String>,
    current_failover_index: i64,
    status_code: Option<u16>,
    reason: &'a str,
}

#[derive(Debug, Deserialize)]
struct ResolverReply {
    next_url: Option<String>,
}

/// Asks the resolver for the next URL. `None` when it has none, fails, or
/// answers with something that is not an http(s) URL.
pub async fn ask_resolver(
    http: &reqwest::Client,
    resolver: &str,
    spec: &StreamSpec,
    current_url: &str,
    current_failover_index: i64,
    status_code: Option<u16>,
    reason: &str,
) -> Option<Url> {
    // The resolver URL is the API caller's: security.deny_private_upstreams
    // applies to it (names are checked by the client's resolver).
    if let Err(r) = Url::parse(resolver)
        .map(|u| guard::check_url(&u))
        .unwrap_or(Ok(()))
    {
        tracing::warn!(error = %r, "failover resolver not asked");
        return None;
    }
    let body = ResolverRequest {
        current_url,
        metadata: &spec.metadata,
        current_failover_index,
        status_code,
        reason,
    };
    let resp = http
        .post(resolver)
        .timeout(RESOLVER_TIMEOUT)
        .json(&body)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        tracing::warn!(status = resp.status().as_u16(), "failover resolver refused");
        return None;
    }
    let reply: ResolverReply = resp.json().await.ok()?;
    let next = Url::parse(&reply.next_url?).ok()?;
    matches!(next.scheme(), "http" | "https")
        .then_some(next)
        .filter(|u| u.host_str().is_some())
}
