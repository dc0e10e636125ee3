//! Resolvers: streamlink and yt-dlp turn a web page (YouTube, Twitch, ...)
//! into media. The preferred result is a plain media URL the live hub fetches
//! itself, so failover, leases, header hygiene, sharing and clean joins all
//! apply ([`resolve`]); only when there is none (an HLS or DASH stream, or
//! separate audio and video) does the tool's stdout become the channel's
//! bytes ([`pipe`]). Arguments from the API pass an allowlist ([`args`]);
//! cookies files are confined to `resolvers.cookies_dir` ([`cookies`]).

pub mod args;
pub mod cookies;
pub mod pipe;
pub mod resolve;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::config::ResolversConfig;

/// Cached resolutions kept at most (oldest dropped first).
const CACHE_CAP: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tool {
    Streamlink,
    #[serde(rename = "ytdlp")]
    YtDlp,
}

impl Tool {
    /// The API's spelling: `streamlink`, `ytdlp` (m3u-editor) or `yt-dlp`.
    pub fn parse(s: &str) -> Option<Tool> {
        match s.trim().to_ascii_lowercase().as_str() {
            "streamlink" => Some(Tool::Streamlink),
            "ytdlp" | "yt-dlp" | "yt_dlp" => Some(Tool::YtDlp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tool::Streamlink => "streamlink",
            Tool::YtDlp => "yt-dlp",
        }
    }

    /// The program to run: `resolvers.streamlink` / `resolvers.yt_dlp`.
    pub fn program(self, cfg: &ResolversConfig) -> &std::path::Path {
        match self {
            Tool::Streamlink => &cfg.streamlink,
            Tool::YtDlp => &cfg.yt_dlp,
        }
    }

    /// The config key naming the program, for error messages.
    pub fn config_key(self) -> &'static str {
        match self {
            Tool::Streamlink => "resolvers.streamlink",
            Tool::YtDlp => "resolvers.yt_dlp",
        }
    }
}

/// What a resolver stream runs (kept in the stream's spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolverSpec {
    pub tool: Tool,
    /// The stream selector (`best`, `bestvideo+bestaudio/best`).
    pub selector: String,
    /// Allowed options, each one `--name=value` or `--flag` ([`args::check`]).
    pub options: Vec<String>,
    /// A cookies file inside `resolvers.cookies_dir` (already confined).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookies: Option<PathBuf>,
    /// `resolver_args` as sent, for the reply.
    #[serde(default)]
    pub raw_args: String,
}

/// The versions of the tools found at start (`None`: not found or not working).
#[derive(Debug, Clone, Default)]
pub struct Versions {
    pub streamlink: Option<String>,
    pub yt_dlp: Option<String>,
}

impl Versions {
    pub fn of(&self, tool: Tool) -> Option<&str> {
        match tool {
            Tool::Streamlink => self.streamlink.as_deref(),
            Tool::YtDlp => self.yt_dlp.as_deref(),
        }
    }
}

/// Runs `<tool> --version` for both (each answers within a second, or fails
/// at once when the program is missing).
pub fn probe(cfg: &ResolversConfig) -> Versions {
    let run = |tool: Tool| {
        let out = std::process::Command::new(tool.program(cfg))
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().next()?.trim();
        // `streamlink 8.6.3` → `8.6.3`; yt-dlp prints the bare version.
        let v = line.strip_prefix("streamlink ").unwrap_or(line).trim();
        (!v.is_empty()).then(|| v.to_string())
    };
    // Side by side: a cold Python start takes most of a second.
    std::thread::scope(|scope| {
        let streamlink = scope.spawn(|| run(Tool::Streamlink));
        let yt_dlp = run(Tool::YtDlp);
        Versions {
            streamlink: streamlink.join().ok().flatten(),
            yt_dlp,
        }
    })
}

/// streamlink's protocol prefixes: `hls://URL` and friends name the kind of
/// stream outright.
pub const PROTOCOL_PREFIXES: [&str; 4] = ["hls://", "hlsvariant://", "httpstream://", "dash://"];

/// The page as the client wrote it for source `url` (the primary or a
/// failover URL of `spec`). `hls://http://host/x` does not survive URL
/// normalisation (it becomes `hls://http//host/x`), so the tool gets the
/// original text.
pub fn page_of(spec: &crate::registry::StreamSpec, url: &Url) -> String {
    std::iter::once(&spec.url)
        .chain(spec.failover_urls.iter())
        .find(|s| Url::parse(s).is_ok_and(|u| u == *url))
        .cloned()
        .unwrap_or_else(|| url.to_string())
}

/// Whether `raw` is a page a resolver may be given: http(s), or one of
/// streamlink's protocol prefixes before an http(s) URL or a bare host.
pub fn is_page_url(raw: &str) -> bool {
    let http = |s: &str| {
        Url::parse(s)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
    };
    let lower = raw.to_ascii_lowercase();
    match PROTOCOL_PREFIXES.iter().find(|p| lower.starts_with(*p)) {
        Some(p) => {
            let rest = &raw[p.len()..];
            http(rest) || (!rest.contains("://") && http(&format!("http://{rest}")))
        }
        None => http(raw),
    }
}

/// Whether a media URL names a file in a container the live hub cannot
/// cut (MP4, WebM, Matroska, ...): ffmpeg remuxes it to MPEG-TS.
pub fn is_container_file(u: &Url) -> bool {
    let path = u.path().to_ascii_lowercase();
    [
        ".mp4", ".m4v", ".mov", ".webm", ".mkv", ".flv", ".m4a", ".mp3", ".aac", ".ogg", ".opus",
        ".wav",
    ]
    .iter()
    .any(|e| path.ends_with(e))
}

/// [`is_container_file`] by a response's Content-Type.
pub fn is_container_type(ct: &str) -> bool {
    let ct = ct.trim().to_ascii_lowercase();
    [
        "video/mp4",
        "video/webm",
        "video/x-matroska",
        "video/quicktime",
        "video/x-flv",
        "audio/",
    ]
    .iter()
    .any(|t| ct.starts_with(t))
}

/// The http(s) URL inside a page (`hls://http://host/x` → `http://host/x`;
/// streamlink assumes https for a bare host).
pub fn page_target(page: &str) -> Option<Url> {
    let lower = page.to_ascii_lowercase();
    let rest = match PROTOCOL_PREFIXES.iter().find(|p| lower.starts_with(*p)) {
        Some(p) => &page[p.len()..],
        None => page,
    };
    let u = Url::parse(rest)
        .or_else(|_| Url::parse(&format!("https://{rest}")))
        .ok()?;
    matches!(u.scheme(), "http" | "https").then_some(u)
}

/// With `security.deny_private_upstreams` on, refuses a page whose host is
/// (or resolves to) a private address, before any tool fetches it. The
/// tool's own redirects are beyond this check; the media URL it names is
/// fetched by the hub, where the policy applies as to any source.
pub async fn check_page(page: &str) -> Result<(), String> {
    use crate::upstream::guard;
    if !guard::denying() {
        return Ok(());
    }
    let target = page_target(page).ok_or_else(|| "not an http(s) page".to_string())?;
    guard::check_url(&target).map_err(|e| e.to_string())?;
    let host = target
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']']);
    let port = target.port_or_known_default().unwrap_or(443);
    let addrs = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::lookup_host((host, port)),
    )
    .await
    .map_err(|_| format!("{host}: DNS timed out"))?
    .map_err(|e| format!("{host}: {e}"))?;
    for addr in addrs {
        guard::check_addr(addr).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What a page resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// One plain media URL: the hub fetches it.
    Url(Url),
    /// No plain URL (HLS, DASH, separate audio and video): the tool's
    /// stdout is the channel's bytes.
    Pipe,
}

/// The resolvers of a running m3u-edge: tool versions and resolved URLs.
#[derive(Default)]
pub struct Resolvers {
    pub versions: Versions,
    /// `resolvers.url_ttl`.
    ttl: Duration,
    cache: Mutex<HashMap<(String, String), (Resolved, Instant)>>,
}

impl Resolvers {
    pub fn new(cfg: &ResolversConfig) -> Self {
        Resolvers {
            versions: probe(cfg),
            ttl: cfg.url_ttl,
            cache: Mutex::default(),
        }
    }

    /// The resolution of `page` for stream `id` if it is younger than the TTL.
    pub fn cached(&self, id: &str, page: &str) -> Option<Resolved> {
        let mut cache = self.cache.lock();
        let key = (id.to_string(), page.to_string());
        match cache.get(&key) {
            Some((r, at)) if at.elapsed() < self.ttl => Some(r.clone()),
            Some(_) => {
                cache.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn remember(&self, id: &str, page: &str, r: Resolved) {
        if self.ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_CAP {
            cache.retain(|_, (_, at)| at.elapsed() < self.ttl);
            if cache.len() >= CACHE_CAP {
                if let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone())
                {
                    cache.remove(&oldest);
                }
            }
        }
        cache.insert((id.to_string(), page.to_string()), (r, Instant::now()));
    }

    /// Forgets `page`'s resolution (its URL failed: it may have expired).
    pub fn forget(&self, id: &str, page: &str) {
        self.cache
            .lock()
            .remove(&(id.to_string(), page.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_may_carry_streamlink_prefixes_and_keep_their_text() {
        assert!(is_page_url("https://www.youtube.com/watch?v=x"));
        assert!(is_page_url("hls://http://127.0.0.1:8080/live/index.m3u8"));
        assert!(is_page_url("httpstream://cdn.example/live.ts"));
        assert!(!is_page_url("file:///etc/passwd"));
        assert!(!is_page_url("hls://file:///etc/passwd"));
        assert!(!is_page_url("rtmp://x/y"));
        let spec = crate::registry::StreamSpec {
            url: "hls://http://127.0.0.1:8080/a.m3u8".into(),
            failover_urls: vec!["https://b.example/p".into()],
            ..Default::default()
        };
        // The normalised URL (`hls://http//...`) maps back to the text sent.
        let parsed = Url::parse(&spec.url).unwrap();
        assert_ne!(parsed.as_str(), spec.url);
        assert_eq!(page_of(&spec, &parsed), spec.url);
        let b = Url::parse("https://b.example/p").unwrap();
        assert_eq!(page_of(&spec, &b), "https://b.example/p");
    }

    #[test]
    fn the_http_url_inside_a_page() {
        let t = |p: &str| page_target(p).map(|u| u.to_string());
        assert_eq!(
            t("hls://http://127.0.0.1:8/a.m3u8").as_deref(),
            Some("http://127.0.0.1:8/a.m3u8")
        );
        assert_eq!(
            t("httpstream://cdn.example/x.ts").as_deref(),
            Some("https://cdn.example/x.ts")
        );
        assert_eq!(
            t("https://youtube.com/watch?v=1").as_deref(),
            Some("https://youtube.com/watch?v=1")
        );
        assert_eq!(t("hls://file:///etc/passwd"), None);
    }

    #[test]
    fn the_cache_expires_and_forgets() {
        let r = Resolvers {
            ttl: Duration::from_secs(60),
            ..Resolvers::default()
        };
        assert_eq!(r.cached("s", "p"), None);
        r.remember("s", "p", Resolved::Pipe);
        assert_eq!(r.cached("s", "p"), Some(Resolved::Pipe));
        assert_eq!(r.cached("other", "p"), None);
        r.forget("s", "p");
        assert_eq!(r.cached("s", "p"), None);
        // url_ttl 0: nothing is kept.
        let off = Resolvers::default();
        off.remember("s", "p", Resolved::Pipe);
        assert_eq!(off.cached("s", "p"), None);
    }
}
