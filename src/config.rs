//! The YAML configuration file: its schema, its defaults and its validation.
//!
//! This module owns everything between the bytes of `m3u-edge.yaml` and a
//! [`Config`] the rest of the program can trust without re-checking: every
//! address parses, every URL is http(s) with a host, every duration and size is
//! in range, stream ids are unique and provider references resolve.
//!
//! Loading happens in two passes so that users see as many mistakes as
//! possible in one go, each as `FILE:LINE:COL: key.path: message`:
//!
//! 1. `raw` deserializes the *shape* (known keys, mappings vs lists vs
//!    scalars) with serde. Every leaf keeps its YAML position. serde stops at
//!    the first shape error, so after one the entry it names is blanked out
//!    (line numbers kept) and the rest read again: every shape problem is
//!    reported, not only the first. A YAML syntax error still ends pass 1.
//! 2. `validate` checks the *values* (URLs, durations, header syntax,
//!    cross references) of whatever pass 1 could read, and collects every
//!    problem it finds.
//!
//! An empty file (or one with only comments) yields [`Config::default`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod error;
mod raw;
mod validate;

#[cfg(test)]
mod tests;

pub use error::{ConfigError, Problem};

/// The upstream `User-Agent` when neither the stream nor its provider sets one.
/// A desktop browser string, because some IPTV panels reject unknown clients.
pub const DEFAULT_USER_AGENT: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) \
     AppleWebKit/537.36 (KHTML, like Gecko) Chrome/115.0.0.0 Safari/537.36";

/// Reads `path` and parses it with [`parse`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
        file: path.to_path_buf(),
        error,
    })?;
    let mut config = parse(&text, path)?;
    config.api.token = token_from_environment(config.api.token.take()).map_err(|message| {
        ConfigError::Invalid {
            file: path.to_path_buf(),
            problems: vec![Problem::new(None, "api.token", &message)],
        }
    })?;
    Ok(config)
}

/// The environment variable that overrides `api.token`.
pub const TOKEN_ENV: &str = "M3U_EDGE_API_TOKEN";
/// The systemd credential (`LoadCredential=api_token:...`) read when neither
/// the YAML nor the environment sets a token.
pub const TOKEN_CREDENTIAL: &str = "api_token";

/// `$M3U_EDGE_API_TOKEN` wins over the file's token; without either, a
/// systemd credential named `api_token` is used. The token never comes from
/// the command line (it would show in `ps`).
fn token_from_environment(from_file: Option<String>) -> Result<Option<String>, String> {
    if let Some(t) = std::env::var_os(TOKEN_ENV).filter(|t| !t.is_empty()) {
        let t = t
            .into_string()
            .map_err(|_| format!("${TOKEN_ENV} is not valid UTF-8"))?;
        return validate::api_token(&t)
            .map(Some)
            .map_err(|e| format!("${TOKEN_ENV}: {e}"));
    }
    if from_file.is_some() {
        return Ok(from_file);
    }
    let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
        return Ok(None);
    };
    let path = Path::new(&dir).join(TOKEN_CREDENTIAL);
    if !path.exists() {
        return Ok(None);
    }
    validate::token_from_file(&path).map(Some)
}

/// Parses and validates config text. `file` is only used to label errors.
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        file: file.to_path_buf(),
        problems,
    };
    let (raw, text, mut problems) = raw::deserialize_all(text);
    let Some(raw) = raw else {
        return Err(invalid(problems));
    };
    match validate::build(raw, &text) {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(invalid(problems)),
        Err(more) => {
            problems.extend(more);
            // Stable: problems at one position keep the order they were found.
            problems.sort_by_key(|p| p.at);
            Err(invalid(problems))
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    pub server: ServerConfig,
    pub api: ApiConfig,
    pub upstream: UpstreamConfig,
    pub providers: Vec<ProviderConfig>,
    pub streams: Vec<StreamConfig>,
    pub live: LiveConfig,
    pub log: LogConfig,
    pub events: EventsConfig,
    pub metrics: MetricsConfig,
    pub hls: HlsConfig,
    pub limits: LimitsConfig,
    pub transcode: TranscodeConfig,
    pub resolvers: ResolversConfig,
    pub security: SecurityConfig,
    pub broadcast: BroadcastConfig,
    pub playlists: Vec<PlaylistConfig>,
    pub playlist: PlaylistExportConfig,
    pub epg: EpgConfig,
    pub hdhomerun: HdHomeRunConfig,
    /// `cluster:`: several nodes on Redis (`crate::cluster`). `None`: one
    /// node on its state file, no Redis.
    pub cluster: Option<ClusterConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Pingora worker threads, at least 1.
    pub threads: usize,
    /// URL prefix of every route: starts with `/` and has no trailing `/`;
    /// `""` means routes live at the root.
    pub root_path: String,
    /// Externally visible base URL (http or https) used when building links.
    pub public_url: Option<url::Url>,
    pub state_file: PathBuf,
    pub stream_idle_ttl: Duration,
    /// How long a graceful shutdown or upgrade waits for clients.
    pub grace_period: Duration,
    /// After the grace period: how long cutting the remaining viewers, the
    /// last state save and the webhook flush may take before the process
    /// exits. > 0, at most 5 minutes.
    pub shutdown_timeout: Duration,
    /// Longest time between a change of the persisted state and its write
    /// (changes within it share one write). At most 1 minute.
    pub state_save_delay: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8085)),
            threads: 2,
            root_path: "/m3u-proxy".to_owned(),
            public_url: None,
            state_file: PathBuf::from("m3u-edge-state.json"),
            stream_idle_ttl: Duration::from_secs(15 * 60),
            grace_period: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(5),
            state_save_delay: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApiConfig {
    /// `None` leaves the management API unauthenticated. From `api.token`,
    /// `api.token_file`, or the environment (see [`load`]).
    pub token: Option<String>,
    /// Origins whose browser pages may call the management API (CORS).
    /// None by default: m3u-editor calls it server-side.
    pub cors_origins: Vec<String>,
    /// Without a token, answer management calls from any address (else only
    /// from loopback).
    pub allow_open: bool,
}

/// Caps that keep one client, or many, from exhausting the proxy. 0 = off
/// where the doc says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// A request's header must arrive whole within this.
    pub header_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub keepalive_timeout: Duration,
    /// Request header bytes (request line included); more is a 431.
    pub max_header_bytes: usize,
    /// Request header lines; more is a 431.
    pub max_headers: usize,
    /// Request body bytes of an API call; more is a 413.
    pub max_body_bytes: usize,
    /// Open client connections; 0 = derived from the open-files limit.
    pub max_connections: usize,
    /// Open client connections from one address; 0 = off.
    pub max_connections_per_address: usize,
    /// Registered streams (API and YAML); more is a 507 on `POST /streams`.
    pub max_streams: usize,
    /// Viewers (any kind) of one stream; 0 = off.
    pub max_viewers_per_stream: usize,
    /// Viewers (any kind) from one address across all streams; 0 = off.
    pub max_viewers_per_address: usize,
    /// Listed HLS clients of one stream; 0 = off.
    pub max_hls_clients_per_stream: usize,
    /// Listed HLS clients from one address across all streams; 0 = off.
    pub max_hls_clients_per_address: usize,
    /// Nested requests m3u-edge may make to itself (a stream URL or a
    /// provider redirect pointing back at this proxy); past this, a 508.
    pub max_self_hops: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: 1024 * 1024,
            max_connections: 0,
            max_connections_per_address: 1024,
            max_streams: 100_000,
            max_viewers_per_stream: 0,
            max_viewers_per_address: 0,
            max_hls_clients_per_stream: 1000,
            max_hls_clients_per_address: 100,
            max_self_hops: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub user_agent: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// 0 disables following redirects.
    pub max_redirects: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            user_agent: DEFAULT_USER_AGENT.to_owned(),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
            max_redirects: 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    /// Unique, non-empty.
    pub name: String,
    /// Non-empty; lowercase (IDNA hosts in punycode, as `Url::host_str` gives
    /// them); an entry may be a `*.example.com` wildcard.
    pub hosts: Vec<String>,
    /// `None` = unlimited; never `Some(0)`.
    pub max_connections: Option<u32>,
    pub user_agent: Option<String>,
    /// In file order; names are valid HTTP header names (as written),
    /// values valid, non-empty header values.
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    /// `[A-Za-z0-9_-]{1,64}`; defaults to the lowercase md5 hex of the URL
    /// exactly as written, matching m3u-proxy's ids.
    pub id: String,
    pub url: url::Url,
    pub failover_urls: Vec<url::Url>,
    pub failover_resolver_url: Option<url::Url>,
    /// Always names an entry of [`Config::providers`].
    pub provider: Option<String>,
    pub user_agent: Option<String>,
    pub headers: Vec<(String, String)>,
    /// Scalars as written in the file (`1.50` stays `"1.50"`); never null.
    pub metadata: BTreeMap<String, String>,
    /// `None` = auto-detect.
    pub live: Option<bool>,
    pub sticky: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveConfig {
    /// How much recent video a live hub keeps for late joiners
    /// (YAML key `ring_seconds`, a duration).
    pub ring_seconds: Duration,
    /// Upper bound of that ring in bytes, > 0.
    pub ring_bytes: usize,
    /// > 0.
    pub stall_timeout: Duration,
    pub linger: Duration,
    pub give_up_after: Duration,
    /// A failed source is retried only after this.
    pub retry_backoff: Duration,
    /// After a failover, the primary is tried again after this.
    pub primary_cooldown: Duration,
    pub standby: bool,
}

impl Default for LiveConfig {
    fn default() -> Self {
        Self {
            ring_seconds: Duration::from_secs(4),
            ring_bytes: 16 * 1024 * 1024,
            stall_timeout: Duration::from_secs(3),
            linger: Duration::ZERO,
            give_up_after: Duration::from_secs(30),
            retry_backoff: Duration::from_secs(5),
            primary_cooldown: Duration::from_secs(60),
            standby: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A level (`trace`..`error`, `off`, lowercase) or an `EnvFilter`
    /// directive string such as `info,pingora=warn`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
        }
    }
}

/// The `events:` section: the event queue and the webhooks from the file
/// (more can be registered through the API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsConfig {
    /// Capacity of the event queue, 1..=1048576; events beyond it are
    /// dropped and counted, never waited for. Default 4096.
    pub queue_size: usize,
    /// Default none.
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            queue_size: crate::events::DEFAULT_QUEUE_SIZE,
            webhooks: Vec::new(),
        }
    }
}

/// One entry of `events.webhooks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// http or https with a host, normalized like API-registered webhooks
    /// (`crate::events::normalize_url`); unique within the list.
    pub url: url::Url,
    /// Non-empty, no duplicates; default all six event types.
    pub events: Vec<crate::events::EventType>,
    /// In file order; names are valid HTTP header names (as written),
    /// values valid, non-empty header values. Default none.
    pub headers: Vec<(String, String)>,
    /// Per-try timeout, at least 1s. Default 10s.
    pub timeout: Duration,
    /// Retries after the first try, 0..=20. Default 3.
    pub retry_attempts: u32,
    /// HMAC-SHA256 key signing every delivery; non-empty. Default none.
    pub secret: Option<String>,
}

/// The `hls:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HlsConfig {
    /// In-memory budget for shared segments, keys and init maps. Default 64 MiB.
    pub segment_cache_bytes: usize,
    /// Playlists larger than this are refused with 502. Default 4 MiB.
    pub playlist_max_bytes: usize,
    /// Playlists with more lines than this are refused with 502. Default 200 000.
    pub playlist_max_lines: usize,
    /// Largest rewritten playlist (the shared copy, and each viewer's answer).
    /// Default 32 MiB.
    pub rendered_max_bytes: usize,
    /// Largest segment, key or init map held in memory for sharing. Default 256 MiB.
    pub segment_max_bytes: usize,
    /// All segment bytes held by fetches being shared at once; past it new
    /// fetches stream through unshared. Default 256 MiB.
    pub inflight_max_bytes: usize,
    /// Provider response-header time for playlists and segments. Default 10 s.
    pub header_timeout: Duration,
    /// Whole playlist fetch. Default 20 s.
    pub playlist_timeout: Duration,
    /// Whole segment fetch (and a viewer's answer). Default 60 s.
    pub segment_timeout: Duration,
    /// Hex key (at least 16 bytes) signing the minted references. Default:
    /// generated once and kept in the state file.
    pub token_key: Option<Vec<u8>>,
}

impl Default for HlsConfig {
    fn default() -> Self {
        HlsConfig {
            segment_cache_bytes: 64 * 1024 * 1024,
            playlist_max_bytes: 4 * 1024 * 1024,
            playlist_max_lines: 200_000,
            rendered_max_bytes: 32 * 1024 * 1024,
            segment_max_bytes: 256 * 1024 * 1024,
            inflight_max_bytes: 256 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            playlist_timeout: Duration::from_secs(20),
            segment_timeout: Duration::from_secs(60),
            token_key: None,
        }
    }
}

/// The `transcode:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranscodeConfig {
    /// The ffmpeg binary: a path, or a name looked up on PATH.
    pub ffmpeg: PathBuf,
    pub hwaccel: HwAccel,
    /// The GPU device for `vaapi`/`qsv` (e.g. /dev/dri/renderD128).
    pub device: Option<String>,
    /// ffmpeg processes at once; 0 = no cap. A full cap is a 503.
    pub max_processes: usize,
    /// Profiles from the YAML (over the built-in ones of the same name).
    pub profiles: Vec<crate::transcode::profiles::Profile>,
}

impl Default for TranscodeConfig {
    fn default() -> Self {
        Self {
            ffmpeg: PathBuf::from("ffmpeg"),
            hwaccel: HwAccel::None,
            device: None,
            max_processes: 8,
            profiles: Vec::new(),
        }
    }
}

/// The `resolvers:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolversConfig {
    pub streamlink: PathBuf,
    pub yt_dlp: PathBuf,
    /// Cookies files may only come from here; None = none allowed.
    pub cookies_dir: Option<PathBuf>,
    /// How long a resolved media URL is reused; zero: resolve every time.
    pub url_ttl: Duration,
}

impl Default for ResolversConfig {
    fn default() -> Self {
        Self {
            streamlink: PathBuf::from("streamlink"),
            yt_dlp: PathBuf::from("yt-dlp"),
            cookies_dir: None,
            url_ttl: Duration::from_secs(300),
        }
    }
}

/// The `broadcast:` section: m3u-editor's networks (`/broadcast/...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastConfig {
    /// Where each network's segments are written, one `broadcast_{id}`
    /// directory per network; relative to the working directory. Cleaned at
    /// start-up. Default `m3u-edge-broadcast`.
    pub work_dir: PathBuf,
    /// Networks whose ffmpeg runs at once; a start beyond it is a 503.
    /// 0 = no cap. Default 16.
    pub max_networks: usize,
    /// Per-callback timeout (one try, m3u-proxy's behaviour). Default 10 s.
    pub callback_timeout: Duration,
    /// A network that ended, failed or was stopped keeps its last playlist
    /// and segments this long, then its directory is removed. Default 10 min.
    pub keep_stopped: Duration,
}

impl Default for BroadcastConfig {
    fn default() -> Self {
        Self {
            work_dir: PathBuf::from("m3u-edge-broadcast"),
            max_networks: 16,
            callback_timeout: Duration::from_secs(10),
            keep_stopped: Duration::from_secs(600),
        }
    }
}

/// `transcode.hwaccel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HwAccel {
    #[default]
    None,
    Vaapi,
    Qsv,
    Nvenc,
}

impl HwAccel {
    pub fn as_str(self) -> &'static str {
        match self {
            HwAccel::None => "none",
            HwAccel::Vaapi => "vaapi",
            HwAccel::Qsv => "qsv",
            HwAccel::Nvenc => "nvenc",
        }
    }
}

/// The `security:` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SecurityConfig {
    /// Refuse provider, redirect, playlist-URI, resolver, webhook and
    /// test-connection targets whose address (after DNS) is loopback, private,
    /// link-local or otherwise not public. Default false.
    pub deny_private_upstreams: bool,
    /// Networks allowed anyway (`192.168.1.10`, `10.0.0.0/8`). Default none.
    pub private_allowlist: Vec<crate::upstream::guard::Net>,
}

/// The `metrics:` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetricsConfig {
    /// An extra listener serving only `/metrics` (no token), e.g.
    /// `127.0.0.1:9100`; never equal to `server.listen`. The main listener
    /// serves `/metrics` too. Default none.
    pub listen: Option<SocketAddr>,
}

/// `playlists[]`: a provider channel list imported as streams (standalone
/// use, see `crate::playlists`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaylistConfig {
    /// Unique; names the list in logs, `/stats` and the streams' metadata.
    pub name: String,
    pub source: PlaylistSource,
    /// Leases, user agent and headers of the fetch and of every entry.
    pub provider: Option<String>,
    /// How often the list is fetched again (at least 10 s; default 6 h).
    pub refresh: Duration,
    /// Regular expressions (already checked to compile).
    pub include: PlaylistFilter,
    pub exclude: PlaylistFilter,
    /// `live` of every entry (`None`: decided per stream, as for the API).
    pub live: Option<bool>,
    /// The XMLTV guide; `None`: the list's own `url-tvg` header.
    pub epg_url: Option<url::Url>,
}

/// Where a playlist is read from. A file path only ever comes from the
/// YAML (nothing a client sends can name one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaylistSource {
    Url(url::Url),
    File(PathBuf),
}

/// Patterns on an entry's `group-title` and name; absent = no condition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlaylistFilter {
    pub group: Option<String>,
    pub name: Option<String>,
}

/// `playlist`: the exported `/playlist.m3u` (and `/epg.xml`, HDHomeRun).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlaylistExportConfig {
    /// A token for players only (`?token=`): the management token need not
    /// be typed into every TV.
    pub token: Option<String>,
}

/// `epg`: the XMLTV guide served at `/epg.xml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpgConfig {
    /// Wins over the playlists' `epg_url` and `url-tvg`.
    pub url: Option<url::Url>,
    /// How long a fetched guide is served before it is fetched again.
    pub refresh: Duration,
}

impl Default for EpgConfig {
    fn default() -> Self {
        EpgConfig {
            url: None,
            refresh: Duration::from_secs(3600),
        }
    }
}

/// `hdhomerun`: look like an HDHomeRun tuner to Plex, Emby and Jellyfin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HdHomeRunConfig {
    pub enabled: bool,
    pub friendly_name: String,
    /// 8 hex digits; `None`: derived from the listen address and state file.
    pub device_id: Option<String>,
    /// `None`: the sum of the providers' `max_connections`.
    pub tuner_count: Option<u32>,
    /// Answer SSDP discovery (UDP 1900) on the LAN.
    pub ssdp: bool,
    /// The HDHomeRun documents answer without a token (media servers that
    /// take only host:port).
    pub open: bool,
}

impl Default for HdHomeRunConfig {
    fn default() -> Self {
        HdHomeRunConfig {
            enabled: true,
            friendly_name: "m3u-edge".to_owned(),
            device_id: None,
            tuner_count: None,
            ssdp: false,
            open: false,
        }
    }
}

/// The `cluster:` section (../shared/CLUSTER.md).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Key prefix `m3e:{<name>}:`: one Redis can hold several clusters.
    pub name: String,
    /// `redis://` or `rediss://`, with password and database as Redis takes them.
    pub redis_url: String,
    pub node_id: String,
    /// The internal listener: `/_cluster/*` only.
    pub listen: SocketAddr,
    /// How peers reach `listen`.
    pub advertise: SocketAddr,
    /// HMAC key of node-to-node requests, at least 32 bytes.
    pub secret: Vec<u8>,
    pub node_ttl: Duration,
    pub heartbeat: Duration,
}

impl std::fmt::Debug for ClusterConfig {
    // The secret and the Redis password stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("name", &self.name)
            .field("redis_url", &crate::cluster::redact_url(&self.redis_url))
            .field("node_id", &self.node_id)
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("node_ttl", &self.node_ttl)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}
