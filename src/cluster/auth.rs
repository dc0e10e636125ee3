//! Authentication of node-to-node requests (`/_cluster/*`): an HMAC over the
//! request with `cluster.secret`, a node id and a time within ±30 s, checked
//! in constant time. The internal listener answers nothing unauthenticated.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const NODE_HEADER: &str = "x-m3u-edge-node";
pub const TIME_HEADER: &str = "x-m3u-edge-time";
pub const AUTH_HEADER: &str = "x-m3u-edge-auth";

/// Requests older or newer than this are refused (replay window).
const SKEW_SECS: i64 = 30;

const CONTEXT: &[u8] = b"m3u-edge/cluster/v1\0";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("request time outside ±{SKEW_SECS}s of this node's clock")]
    Skew,
    #[error("bad signature")]
    Signature,
}

fn mac(secret: &[u8], method: &str, path_and_query: &str, node: &str, time: i64) -> Hmac<Sha256> {
    // Any key length is accepted by HMAC; the config requires 32+ bytes.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key size");
    for part in [
        CONTEXT,
        method.as_bytes(),
        b"\0",
        path_and_query.as_bytes(),
        b"\0",
        node.as_bytes(),
        b"\0",
        time.to_string().as_bytes(),
    ] {
        m.update(part);
    }
    m
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The headers that authenticate a request from `node`.
pub fn sign(
    secret: &[u8],
    node: &str,
    method: &str,
    path_and_query: &str,
) -> Vec<(&'static str, String)> {
    let time = now();
    let tag = mac(secret, method, path_and_query, node, time).finalize();
    vec![
        (NODE_HEADER, node.to_owned()),
        (TIME_HEADER, time.to_string()),
        (AUTH_HEADER, hex::encode(tag.into_bytes())),
    ]
}

/// Checks a request's headers; the sending node's id on success.
pub fn verify(
    secret: &[u8],
    method: &str,
    path_and_query: &str,
    headers: &http::HeaderMap,
) -> Result<String, AuthError> {
    let get = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or(AuthError::Missing(name))
    };
    let node = get(NODE_HEADER)?;
    let time: i64 = get(TIME_HEADER)?.parse().map_err(|_| AuthError::Skew)?;
    if (now() - time).abs() > SKEW_SECS {
        return Err(AuthError::Skew);
    }
    let tag = hex::decode(get(AUTH_HEADER)?).map_err(|_| AuthError::Signature)?;
    mac(secret, method, path_and_query, node, time)
        .verify_slice(&tag)
        .map_err(|_| AuthError::Signature)?;
    Ok(node.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn signed_requests_verify_and_changed_ones_do_not() {
        let secret = [7u8; 32];
        let h = headers(&sign(&secret, "n1", "GET", "/_cluster/live/x?epoch=3"));
        assert_eq!(
            verify(&secret, "GET", "/_cluster/live/x?epoch=3", &h),
            Ok("n1".into())
        );
        assert_eq!(
            verify(&secret, "GET", "/_cluster/live/x?epoch=4", &h),
            Err(AuthError::Signature)
        );
        assert_eq!(
            verify(&[8u8; 32], "GET", "/_cluster/live/x?epoch=3", &h),
            Err(AuthError::Signature)
        );
        let mut other = h.clone();
        other.insert(NODE_HEADER, "n2".parse().unwrap());
        assert_eq!(
            verify(&secret, "GET", "/_cluster/live/x?epoch=3", &other),
            Err(AuthError::Signature)
        );
        let mut old = h.clone();
        old.insert(TIME_HEADER, (now() - 100).to_string().parse().unwrap());
        assert_eq!(
            verify(&secret, "GET", "/_cluster/live/x?epoch=3", &old),
            Err(AuthError::Skew)
        );
        assert_eq!(
            verify(&secret, "GET", "/", &http::HeaderMap::new()),
            Err(AuthError::Missing(NODE_HEADER))
        );
    }
}
