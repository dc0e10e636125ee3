//! m3u-edge: an IPTV streaming proxy on Pingora.
//!
//! | module      | owns |
//! |-------------|------|
//! | `config`    | YAML config: raw serde structs → validated [`config::Config`] |
//! | `app`       | shared handles wired together at start |
//! | `registry`  | streams by id, their clients and metadata (m3u-proxy semantics) |
//! | `state`     | state-file persistence (atomic writes, corrupt files moved aside) |
//! | `provider`  | provider host matching and connection leases |
//! | `hub`       | the live MPEG-TS fan-out: one provider connection per channel |
//! | `upstream`  | source lists, header allowlist (R7), async DNS → Pingora peers |
//! | `conn`      | the front door: connection caps, request header deadline and size |
//! | `route`     | request path → [`route::Route`], pure |
//! | `api`       | management API handlers: request in, status + JSON out |
//! | `proxy`     | the Pingora `ProxyHttp` implementation (the only user of `Session`) |
//! | `housekeeping` | background expiry of unwatched API streams |
//! | `lifecycle` | SIGHUP reload and the order of a graceful shutdown |
//! | `ts`        | MPEG-TS packet parsing for the live hub, pure |
//! | `resolvers` | streamlink and yt-dlp: page URL → media URL (or their stdout), cookies files |
//! | `silence`   | silence detection on live channels (ffmpeg `silencedetect`) → failover |
//! | `playlists` | standalone use: M3U import, `/playlist.m3u`, `/epg.xml`, HDHomeRun |
//!
//! Request flow: `proxy::Edge::request_filter` routes every request. API calls
//! are answered there; `/stream/{id}` continues through `upstream_peer`
//! (source choice) → `upstream_request_filter` (R7 allowlist) →
//! `upstream_response_filter` (redirects, failover, header scrub) →
//! `response_body_filter` (accounting) → `logging`.

pub mod api;
pub mod app;
pub mod broadcast;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod events;
pub mod hls;
pub mod housekeeping;
pub mod hub;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod playlists;
pub mod provider;
pub mod proxy;
pub mod registry;
pub mod resolvers;
pub mod route;
pub mod silence;
pub mod state;
pub mod transcode;
pub mod ts;
pub mod upstream;
