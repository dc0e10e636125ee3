//! HLS support: the pure playlist rewriter and the signed references it points
//! players at (plus the shared provider fetcher, see below).
//!
//! * [`rewrite`] — parses an HLS playlist (RFC 8216, with the LL-HLS tags of
//!   RFC 8216bis) in one linear pass and replaces every URI a player would fetch
//!   (variant and rendition playlists, segments, parts, preload hints, keys, init
//!   maps, rendition reports) with a URI the caller mints, keeping every other byte.
//!   [`rewrite::inspect`] gives the same facts ([`rewrite::PlaylistInfo`]: master or
//!   media, media sequence, target duration, ENDLIST) without rewriting.
//! * [`token`] — HMAC-SHA256 signed, opaque tokens binding a stream id, an upstream
//!   URL, its [`Kind`] and optionally the viewer, for minted URIs such as
//!   `{root}/hls/{stream_id}/segment.ts?t={token}`: the proxy only ever fetches
//!   URLs it found in a playlist of that stream itself.
//!
//! * [`render`] — the rewritten playlist all viewers of one playlist generation
//!   share, with each viewer's identity spliced in as a short query suffix.
//!
//! * [`reset`] — tells a lagging backend (refused) from a provider whose
//!   media sequence restarted (a new epoch), per playlist.
//! * [`timeline`] — maps each playlist a player follows onto one monotonic
//!   numbering across failovers and resets (offsets per source epoch,
//!   discontinuities, LL-HLS `_HLS_msn` translation).
//!
//! `rewrite`, `token`, `reset` and `timeline` are pure (no I/O, no async, no pingora). Fetching and
//! caching are elsewhere: [`fetch`] shares one provider fetch among viewers
//! (single-flight playlists and segments), and the proxy builds the client-facing
//! URIs from the tokens and checks tokens on the way back in.

pub mod fetch;
pub mod render;
pub mod reset;
pub mod rewrite;
pub mod timeline;
pub mod token;

pub use rewrite::Kind;
