//! Signed, opaque references for the URIs the playlist rewriter mints.
//!
//! This file owns the `t=` query value of minted URIs such as
//! `{root}/hls/{stream_id}/segment.ts?t={token}` (DESIGN.md, Management API): the
//! proxy never fetches a URL a client wrote (there is no `?url=` endpoint), only
//! one it signed itself while rewriting a playlist of that stream. Building the
//! URI, looking up the stream and fetching are the caller's job.
//!
//! # Format
//!
//! `base64url(payload) "." base64url(tag)`, no padding, so a token is made of
//! `A-Z a-z 0-9 - _ .` only and survives any query-string round trip unescaped.
//!
//! * payload: `version (1) | kind | flags | stream_id | url | [client_id] | [username]`,
//!   each string a LEB128 length followed by UTF-8 bytes; flag bit 0 / bit 1 say
//!   whether client_id / username follow. Decoding is strict: unknown versions,
//!   flags, kinds or trailing bytes are [`TokenError::Malformed`].
//! * tag: HMAC-SHA256 over [`DOMAIN`] followed by the payload, truncated to its
//!   first 16 bytes (128 bits, NIST SP 800-107 §5.3.4 allows truncation to ≥ 64).
//!   The domain prefix keeps these tags from ever matching another use of the key.
//!
//! The payload is readable by anyone holding a token (it is not encrypted) but
//! cannot be changed; it only names what the playlist itself already exposed to
//! that viewer. Tokens do not expire: they are valid as long as the key and the
//! stream are.
//!
//! Verification checks the length bound, then the tag (in constant time, through
//! `hmac`'s `verify_truncated_left`), and only then parses the payload, so
//! unauthenticated bytes are never interpreted.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::rewrite::Kind;

type HmacSha256 = Hmac<Sha256>;

/// Longest token [`Signer::verify`] accepts, in bytes; longer input is rejected
/// before decoding. A minted token is about 4/3 of the claims' length plus 30
/// bytes, so URLs longer than about 12 KiB yield tokens that will not verify.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Domain separation for the HMAC input.
pub const DOMAIN: &[u8] = b"m3u-edge/hls-ref/v1\0";

/// Bytes of HMAC-SHA256 output kept in a token.
const TAG_LEN: usize = 16;
const VERSION: u8 = 1;
const FLAG_CLIENT: u8 = 1;
const FLAG_USER: u8 = 2;

/// What a token says: which stream's playlist referenced which upstream URL, as
/// what kind of resource, and optionally for which viewer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub stream_id: String,
    /// The resolved upstream URL (absolute http or https).
    pub url: String,
    pub kind: Kind,
    /// Keeps a viewer one client across segment requests (API-COMPAT.md §5).
    pub client_id: Option<String>,
    pub username: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Too long, not base64url, wrong shape, or an undecodable payload.
    #[error("malformed token")]
    Malformed,
    /// Well-formed, but not signed with this key (or altered).
    #[error("bad token signature")]
    BadSignature,
    /// Signed, but for another stream than the one in the request path.
    #[error("token belongs to another stream")]
    WrongStream,
}

/// Mints and verifies tokens with one HMAC key.
pub struct Signer {
    /// Keyed once; cloned per token so the key schedule is not redone.
    /// Replaced only by [`Signer::rekey`] (a cluster node adopting the
    /// shared key at start).
    mac: parking_lot::RwLock<HmacSha256>,
}

impl Clone for Signer {
    fn clone(&self) -> Self {
        Signer {
            mac: parking_lot::RwLock::new(self.mac.read().clone()),
        }
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer { .. }")
    }
}

impl Signer {
    /// A signer with `key`: 32 random bytes (see [`Signer::generate_key`]). HMAC
    /// accepts any length, but a short or guessable key makes tokens forgeable.
    pub fn new(key: &[u8]) -> Self {
        Self {
            mac: parking_lot::RwLock::new(Self::keyed(key)),
        }
    }

    fn keyed(key: &[u8]) -> HmacSha256 {
        HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length")
    }

    /// Signs with `key` from now on; tokens minted before stop verifying.
    pub fn rekey(&self, key: &[u8]) {
        *self.mac.write() = Self::keyed(key);
    }

    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate_key() -> [u8; 32] {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        key
    }

    /// The token for `claims`: base64url characters and one `.`, no `=`, `&`, `+`, `/`.
    pub fn mint(&self, claims: &Claims) -> String {
        let payload = encode_payload(claims);
        let tag = self.tag(&payload).finalize().into_bytes();
        let mut token = String::with_capacity((payload.len() + TAG_LEN) * 4 / 3 + 4);
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&tag[..TAG_LEN], &mut token);
        token
    }

    /// Checks `token` and that it was minted for `stream_id` (from the request path).
    pub fn verify(&self, stream_id: &str, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (payload, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        if tag.len() != TAG_LEN {
            return Err(TokenError::Malformed);
        }
        self.tag(&payload)
            .verify_truncated_left(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        let claims = decode_payload(&payload).ok_or(TokenError::Malformed)?;
        if claims.stream_id != stream_id {
            return Err(TokenError::WrongStream);
        }
        Ok(claims)
    }

    fn tag(&self, payload: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.read().clone();
        mac.update(DOMAIN);
        mac.update(payload);
        mac
    }
}

fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Playlist => 0,
        Kind::Segment => 1,
        Kind::Key => 2,
        Kind::Map => 3,
    }
}

fn byte_kind(b: u8) -> Option<Kind> {
    Some(match b {
        0 => Kind::Playlist,
        1 => Kind::Segment,
        2 => Kind::Key,
        3 => Kind::Map,
        _ => return None,
    })
}

fn encode_payload(c: &Claims) -> Vec<u8> {
    let opt_len = |o: &Option<String>| o.as_ref().map_or(0, |s| s.len() + 5);
    let mut out = Vec::with_capacity(
        13 + c.stream_id.len() + c.url.len() + opt_len(&c.client_id) + opt_len(&c.username),
    );
    let flags = if c.client_id.is_some() {
        FLAG_CLIENT
    } else {
        0
    } | if c.username.is_some() { FLAG_USER } else { 0 };
    out.extend_from_slice(&[VERSION, kind_byte(c.kind), flags]);
    for s in [
        Some(&c.stream_id),
        Some(&c.url),
        c.client_id.as_ref(),
        c.username.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        put_str(&mut out, s);
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // LEB128: 7 bits per byte, high bit = more bytes follow.
    let mut n = s.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(s.as_bytes());
}

/// Strict reader over a payload; every step bounds-checks.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn len(&mut self) -> Option<usize> {
        let mut n: usize = 0;
        // MAX_TOKEN_LEN fits in 3 LEB128 bytes; allow 4, reject longer encodings.
        for shift in [0, 7, 14, 21] {
            let b = self.byte()?;
            n |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn str(&mut self) -> Option<String> {
        let len = self.len()?;
        if len > self.0.len() {
            return None;
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        String::from_utf8(s.to_vec()).ok()
    }
}

fn decode_payload(payload: &[u8]) -> Option<Claims> {
    let mut r = Reader(payload);
    if r.byte()? != VERSION {
        return None;
    }
    let kind = byte_kind(r.byte()?)?;
    let flags = r.byte()?;
    if flags & !(FLAG_CLIENT | FLAG_USER) != 0 {
        return None;
    }
    let stream_id = r.str()?;
    let url = r.str()?;
    let client_id = if flags & FLAG_CLIENT != 0 {
        Some(r.str()?)
    } else {
        None
    };
    let username = if flags & FLAG_USER != 0 {
        Some(r.str()?)
    } else {
        None
    };
    if !r.0.is_empty() {
        return None;
    }
    Some(Claims {
        stream_id,
        url,
        kind,
        client_id,
        username,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = *b"0123456789abcdef0123456789abcdef";
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.";

    fn claims(kind: Kind) -> Claims {
        Claims {
            stream_id: "a1b2c3d4e5f6".into(),
            url: "https://provider.example/live/u/p/1234/seg_00017.ts?token=x&exp=9".into(),
            kind,
            client_id: Some("floating-player-42".into()),
            username: Some("anna".into()),
        }
    }

    #[test]
    fn round_trip_every_shape() {
        let signer = Signer::new(&KEY);
        for kind in [Kind::Playlist, Kind::Segment, Kind::Key, Kind::Map] {
            for (client_id, username) in [
                (None, None),
                (Some("c".to_string()), None),
                (None, Some("ü-ser".to_string())),
                (Some(String::new()), Some(String::new())),
            ] {
                let c = Claims {
                    client_id,
                    username,
                    ..claims(kind)
                };
                let token = signer.mint(&c);
                assert!(token.chars().all(|ch| ALPHABET.contains(ch)), "{token}");
                assert_eq!(token.matches('.').count(), 1);
                assert_eq!(signer.verify(&c.stream_id, &token), Ok(c));
            }
        }
        // Long fields use multi-byte lengths.
        let long = Claims {
            url: format!("https://p.example/{}", "x".repeat(5000)),
            ..claims(Kind::Segment)
        };
        assert_eq!(
            signer.verify(&long.stream_id, &signer.mint(&long)),
            Ok(long)
        );
    }

    #[test]
    fn survives_a_query_string_round_trip() {
        let signer = Signer::new(&KEY);
        let c = claims(Kind::Key);
        let token = signer.mint(&c);
        let mut url =
            url::Url::parse("http://edge.example/m3u-proxy/hls/a1b2c3d4e5f6/segment.ts").unwrap();
        url.query_pairs_mut().append_pair("t", &token);
        assert!(
            url.as_str().ends_with(&format!("?t={token}")),
            "escaped: {url}"
        );
        let back = url.query_pairs().find(|(k, _)| k == "t").unwrap().1;
        assert_eq!(signer.verify("a1b2c3d4e5f6", &back), Ok(c));
    }

    #[test]
    fn any_single_character_change_fails() {
        let signer = Signer::new(&KEY);
        let c = claims(Kind::Segment);
        let token = signer.mint(&c);
        let mut tried = 0;
        for (i, old) in token.char_indices() {
            for new in ALPHABET.chars().chain(['=', '+', '/', '%', ' ']) {
                if new == old {
                    continue;
                }
                let mut bad = token.clone();
                bad.replace_range(i..i + 1, new.encode_utf8(&mut [0; 4]));
                let err = signer.verify(&c.stream_id, &bad).unwrap_err();
                assert!(
                    matches!(err, TokenError::BadSignature | TokenError::Malformed),
                    "{bad}: {err:?}"
                );
                tried += 1;
            }
        }
        assert!(tried > 1000);
        // Truncations and extensions too.
        for end in 0..token.len() {
            assert!(signer.verify(&c.stream_id, &token[..end]).is_err());
        }
        for extra in ["A", "AA", ".", "=", "AAAA"] {
            assert!(signer
                .verify(&c.stream_id, &format!("{token}{extra}"))
                .is_err());
            assert!(signer
                .verify(&c.stream_id, &format!("{extra}{token}"))
                .is_err());
        }
    }

    #[test]
    fn cross_stream_and_wrong_key() {
        let signer = Signer::new(&KEY);
        let token = signer.mint(&claims(Kind::Playlist));
        assert_eq!(
            signer.verify("other-stream", &token),
            Err(TokenError::WrongStream)
        );
        assert_eq!(signer.verify("", &token), Err(TokenError::WrongStream));
        let other = Signer::new(&Signer::generate_key());
        assert_eq!(
            other.verify("a1b2c3d4e5f6", &token),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn size_bound() {
        let signer = Signer::new(&KEY);
        let huge = Claims {
            url: format!("https://p.example/{}", "x".repeat(MAX_TOKEN_LEN)),
            ..claims(Kind::Segment)
        };
        let token = signer.mint(&huge);
        assert!(token.len() > MAX_TOKEN_LEN);
        assert_eq!(
            signer.verify(&huge.stream_id, &token),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            signer.verify("s", &"A".repeat(10 * MAX_TOKEN_LEN)),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn garbage_never_panics_or_verifies() {
        let signer = Signer::new(&KEY);
        let fixed = [
            "",
            ".",
            "..",
            "a.b",
            "AAAA.AAAA",
            "AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
            "\u{1F600}.x",
        ];
        for g in fixed {
            assert!(signer.verify("s", g).is_err(), "{g}");
        }
        let mut seed = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 80) as usize;
            let g: String = (0..len)
                .map(|_| ALPHABET.as_bytes()[(next() % ALPHABET.len() as u64) as usize] as char)
                .collect();
            assert!(signer.verify("s", &g).is_err(), "{g}");
            // The payload decoder on arbitrary bytes (as if a tag had matched).
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode_payload(&bytes);
        }
        // Valid tag over an invalid payload (only a key holder could do this).
        for payload in [
            &b""[..],
            b"\x02\x00\x00",
            b"\x01\x09\x00",
            b"\x01\x00\x04",
            b"\x01\x00\x00\x05ab",
            b"\x01\x00\x00\x01s\x00!",
        ] {
            let tag = signer.tag(payload).finalize().into_bytes();
            let token = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(payload),
                URL_SAFE_NO_PAD.encode(&tag[..TAG_LEN])
            );
            assert_eq!(
                signer.verify("s", &token),
                Err(TokenError::Malformed),
                "{payload:?}"
            );
        }
    }

    #[test]
    fn keys_and_debug() {
        let a = Signer::generate_key();
        let b = Signer::generate_key();
        assert_ne!(a, b);
        assert_eq!(format!("{:?}", Signer::new(&a)), "Signer { .. }");
    }
}
