//! Pass 1: the shape of the file, as serde sees it.
//!
//! Every leaf is `Spanned` so pass 2 can point at the exact value it rejects.
//! Leaves are strings or [`Scalar`]s rather than their final types: a bad
//! URL or duration is a value problem for pass 2 to report alongside all the
//! others, not a reason to stop here. What does stop here is the first
//! structural mistake (unknown key, list where a mapping belongs, missing
//! required key), because serde cannot resume after an error.
//!
//! Key paths come from `serde_path_to_error`, which sees `Spanned<T>` as a
//! struct with a `value` field; [`render_path`] removes those synthetic
//! segments again.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_path_to_error::Segment;
use serde_saphyr::{Error as YamlError, Location, MessageFormatter, Spanned};

use super::Problem;

pub(super) type Leaf<T> = Option<Spanned<T>>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub server: Option<RawServer>,
    pub api: Option<RawApi>,
    pub upstream: Option<RawUpstream>,
    pub providers: Option<Vec<RawProvider>>,
    pub streams: Option<Vec<RawStream>>,
    pub live: Option<RawLive>,
    pub log: Option<RawLog>,
    pub events: Option<RawEvents>,
    pub metrics: Option<RawMetrics>,
    pub hls: Option<RawHls>,
    pub limits: Option<RawLimits>,
    pub transcode: Option<RawTranscode>,
    pub resolvers: Option<RawResolvers>,
    pub security: Option<RawSecurity>,
    pub broadcast: Option<RawBroadcast>,
    pub playlists: Option<Vec<RawPlaylist>>,
    pub playlist: Option<RawPlaylistExport>,
    pub epg: Option<RawEpg>,
    pub hdhomerun: Option<RawHdHomeRun>,
    pub cluster: Option<RawCluster>,
}

/// Top-level keys, for the message about a document that is not a mapping.
const SECTIONS: &str =
    "server, api, upstream, providers, streams, live, log, events, metrics, hls, limits, transcode, resolvers, security, broadcast, playlists, playlist, epg, hdhomerun, cluster";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub listen: Leaf<String>,
    pub threads: Leaf<Scalar>,
    pub root_path: Leaf<String>,
    pub public_url: Leaf<String>,
    pub state_file: Leaf<String>,
    pub stream_idle_ttl: Leaf<Scalar>,
    pub grace_period: Leaf<Scalar>,
    pub shutdown_timeout: Leaf<Scalar>,
    pub state_save_delay: Leaf<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    pub token: Leaf<String>,
    pub token_file: Leaf<String>,
    pub cors_origins: Option<Spanned<Vec<Spanned<String>>>>,
    pub allow_open: Leaf<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTranscode {
    pub ffmpeg: Leaf<String>,
    pub hwaccel: Leaf<String>,
    pub device: Leaf<String>,
    pub max_processes: Leaf<Scalar>,
    pub profiles: Option<Vec<RawProfile>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBroadcast {
    pub work_dir: Leaf<String>,
    pub max_networks: Leaf<Scalar>,
    pub callback_timeout: Leaf<Scalar>,
    pub keep_stopped: Leaf<Scalar>,
}

/// `cluster:`: the keys without which a node cannot join are required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub name: Leaf<String>,
    pub redis_url: Spanned<String>,
    pub node_id: Leaf<String>,
    pub listen: Spanned<String>,
    pub advertise: Leaf<String>,
    pub secret: Spanned<String>,
    pub node_ttl: Leaf<Scalar>,
    pub heartbeat: Leaf<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResolvers {
    pub streamlink: Leaf<String>,
    pub yt_dlp: Leaf<String>,
    pub cookies_dir: Leaf<String>,
    pub url_ttl: Leaf<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProfile {
    pub name: Spanned<String>,
    pub description: Leaf<String>,
    pub template: Spanned<String>,
    /// Default values of the template's placeholders, as a mapping.
    pub defaults: Option<RawHeaders>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub header_timeout: Leaf<Scalar>,
    pub keepalive_timeout: Leaf<Scalar>,
    pub max_header_bytes: Leaf<Scalar>,
    pub max_headers: Leaf<Scalar>,
    pub max_body_bytes: Leaf<Scalar>,
    pub max_connections: Leaf<Scalar>,
    pub max_connections_per_address: Leaf<Scalar>,
    pub max_streams: Leaf<Scalar>,
    pub max_viewers_per_stream: Leaf<Scalar>,
    pub max_viewers_per_address: Leaf<Scalar>,
    pub max_hls_clients_per_stream: Leaf<Scalar>,
    pub max_hls_clients_per_address: Leaf<Scalar>,
    pub max_self_hops: Leaf<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub user_agent: Leaf<String>,
    pub connect_timeout: Leaf<Scalar>,
    pub read_timeout: Leaf<Scalar>,
    pub max_redirects: Leaf<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub name: Spanned<String>,
    pub hosts: Spanned<Vec<Spanned<String>>>,
    pub max_connections: Leaf<Scalar>,
    pub user_agent: Leaf<String>,
    pub headers: Option<RawHeaders>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStream {
    pub id: Leaf<String>,
    pub url: Spanned<String>,
    pub failover_urls: Option<Vec<Spanned<String>>>,
    pub failover_resolver_url: Leaf<String>,
    pub provider: Leaf<String>,
    pub user_agent: Leaf<String>,
    pub headers: Option<RawHeaders>,
    /// Values are deserialized as strings, which serde-saphyr hands over
    /// exactly as written (`1.50`, `yes`, `0x1F`). Null is refused, as the
    /// API refuses it (422), so both kinds of stream hold the same values.
    pub metadata: Option<BTreeMap<String, String>>,
    pub live: Leaf<Scalar>,
    pub sticky: Leaf<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLive {
    pub ring_seconds: Leaf<Scalar>,
    pub ring_bytes: Leaf<Scalar>,
    pub stall_timeout: Leaf<Scalar>,
    pub linger: Leaf<Scalar>,
    pub give_up_after: Leaf<Scalar>,
    pub retry_backoff: Leaf<Scalar>,
    pub primary_cooldown: Leaf<Scalar>,
    pub standby: Leaf<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub level: Leaf<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEvents {
    pub queue_size: Leaf<Scalar>,
    pub webhooks: Option<Vec<RawWebhook>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub url: Spanned<String>,
    pub events: Option<Spanned<Vec<Spanned<String>>>>,
    pub headers: Option<RawHeaders>,
    pub timeout: Leaf<Scalar>,
    pub retry_attempts: Leaf<Scalar>,
    pub secret: Leaf<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub listen: Leaf<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHls {
    pub segment_cache_bytes: Leaf<Scalar>,
    pub playlist_max_bytes: Leaf<Scalar>,
    pub playlist_max_lines: Leaf<Scalar>,
    pub rendered_max_bytes: Leaf<Scalar>,
    pub segment_max_bytes: Leaf<Scalar>,
    pub inflight_max_bytes: Leaf<Scalar>,
    pub header_timeout: Leaf<Scalar>,
    pub playlist_timeout: Leaf<Scalar>,
    pub segment_timeout: Leaf<Scalar>,
    pub token_key: Leaf<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecurity {
    pub deny_private_upstreams: Leaf<Scalar>,
    pub private_allowlist: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `playlists[]`: a provider's channel list to import (standalone use).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlaylist {
    pub name: Spanned<String>,
    pub url: Spanned<String>,
    pub provider: Leaf<String>,
    pub refresh: Leaf<Scalar>,
    pub include: Option<RawPlaylistFilter>,
    pub exclude: Option<RawPlaylistFilter>,
    pub live: Leaf<Scalar>,
    pub epg_url: Leaf<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlaylistFilter {
    pub group: Leaf<String>,
    pub name: Leaf<String>,
}

/// `playlist`: the exported `/playlist.m3u`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlaylistExport {
    pub token: Leaf<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEpg {
    pub url: Leaf<String>,
    pub refresh: Leaf<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHdHomeRun {
    pub enabled: Leaf<Scalar>,
    pub friendly_name: Leaf<String>,
    pub device_id: Leaf<String>,
    pub tuner_count: Leaf<Scalar>,
    pub ssdp: Leaf<Scalar>,
    pub open: Leaf<Scalar>,
}

/// A YAML scalar with the type YAML resolved for it, for keys that take a
/// number, boolean, duration or size.
///
/// A list or mapping is accepted here too (its content skipped) and refused
/// in pass 2: that way the error points at the value rather than at its key,
/// says what the key expects, and does not stop the other checks.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    List,
    Mapping,
}

impl Scalar {
    /// serde's wording for an unexpected value, so messages read alike
    /// whichever pass produced them.
    pub fn describe(&self) -> String {
        match self {
            Scalar::Null => "null".to_owned(),
            Scalar::Bool(b) => format!("boolean `{b}`"),
            Scalar::Int(i) => format!("integer `{i}`"),
            Scalar::Float(f) => format!("floating point `{f:?}`"),
            Scalar::Str(s) => format!("string {s:?}"),
            Scalar::List => "list".to_owned(),
            Scalar::Mapping => "mapping".to_owned(),
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;

        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value")
            }
            // Skipping cannot recurse without bound: serde-saphyr's default
            // budget caps nesting at 64 levels.
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::List)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Mapping)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u128<E>(self, v: u128) -> Result<Scalar, E> {
                // Beyond i128 is beyond every limit we check, so saturating
                // still yields the right "too large" message.
                Ok(Scalar::Int(i128::try_from(v).unwrap_or(i128::MAX)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(v))
            }
            fn visit_unit<E>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
        }

        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// A `headers:` mapping in file order. Keys are plain strings (not
/// `Spanned`) so key paths keep the header name; pass 2 finds the key's
/// column from the value's position.
#[derive(Debug, Default)]
pub(super) struct RawHeaders(pub Vec<(String, Spanned<String>)>);

impl<'de> Deserialize<'de> for RawHeaders {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeadersVisitor;

        impl<'de> Visitor<'de> for HeadersVisitor {
            type Value = RawHeaders;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of header names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeaders, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(RawHeaders(out))
            }
            fn visit_unit<E: de::Error>(self) -> Result<RawHeaders, E> {
                Ok(RawHeaders::default())
            }
        }

        deserializer.deserialize_map(HeadersVisitor)
    }
}

/// 1-based (line, column) of a located value.
pub(super) fn position(location: &Location) -> Option<(u64, u64)> {
    (*location != Location::UNKNOWN && location.line() > 0)
        .then(|| (location.line(), location.column()))
}

/// Where a spanned value was used (an alias counts where it is referenced).
pub(super) fn spanned_at<T>(spanned: &Spanned<T>) -> Option<(u64, u64)> {
    position(&spanned.referenced).or_else(|| position(&spanned.defined))
}

/// Pass 1. `Ok(RawConfig::default())` for an empty document.
/// Pass 1 over `text`, going on after a shape error: the entry the error
/// points at (its line and every more-indented line after it) is blanked
/// out, keeping line numbers, and the rest is deserialized again, so one
/// run reports every unknown key, wrong type or missing field, and pass 2
/// still checks the values of everything else. Returns what could be read
/// (`None` after a syntax error, which cannot be stepped over), the text
/// it was read from, and the shape problems in file order.
pub(super) fn deserialize_all(text: &str) -> (Option<RawConfig>, String, Vec<Problem>) {
    /// Bounds the work on a file that is wrong everywhere.
    const MAX_SHAPE_PROBLEMS: usize = 64;
    let mut work = text.to_owned();
    let mut problems: Vec<Problem> = Vec::new();
    // Key paths already blanked out, whose absence is then no news.
    let mut blanked: Vec<String> = Vec::new();
    loop {
        match deserialize(&work) {
            Ok(raw) => {
                problems.sort_by_key(|p: &Problem| p.at);
                return (Some(raw), work, problems);
            }
            Err((problem, recoverable)) => {
                let next = problem
                    .at
                    .filter(|_| recoverable && problems.len() + 1 < MAX_SHAPE_PROBLEMS)
                    .and_then(|(line, _)| blank_entry(&work, line));
                let consequence = problem
                    .message
                    .strip_prefix("missing required key `")
                    .and_then(|m| m.strip_suffix('`'))
                    .is_some_and(|key| {
                        let full = if problem.path.is_empty() {
                            key.to_owned()
                        } else {
                            format!("{}.{key}", problem.path)
                        };
                        blanked.contains(&full)
                    });
                if next.is_some() {
                    blanked.push(problem.path.clone());
                }
                // A missing key is reported where serde noticed it (a
                // key of the entry); blanking walks up the entry, finding
                // it again: report it once, at its first line.
                match problems
                    .iter_mut()
                    .find(|p| p.path == problem.path && p.message == problem.message)
                {
                    _ if consequence => {}
                    Some(seen) => seen.at = seen.at.min(problem.at).or(problem.at),
                    None => problems.push(problem),
                }
                match next {
                    Some(next) => work = next,
                    None => {
                        problems.sort_by_key(|p: &Problem| p.at);
                        return (None, work, problems);
                    }
                }
            }
        }
    }
}

/// `text` with line `line` (1-based) and the more-indented lines that
/// follow it (its value, or the rest of its list item) replaced by blank
/// lines. `None` when that changes nothing (no progress possible).
fn blank_entry(text: &str, line: u64) -> Option<String> {
    let index = usize::try_from(line).ok()?.checked_sub(1)?;
    let lines: Vec<&str> = text.split('\n').collect();
    let first = lines.get(index)?;
    if first.trim().is_empty() {
        return None;
    }
    let indent = |l: &str| l.len() - l.trim_start_matches(' ').len();
    let base = indent(first);
    let mut end = index + 1;
    while let Some(l) = lines.get(end) {
        let t = l.trim();
        if !t.is_empty() && !t.starts_with('#') && indent(l) <= base {
            break;
        }
        end += 1;
    }
    // An anchor defined there may be used elsewhere: blanking it would
    // report a made-up "unknown reference". Stop at the first problem then.
    let defines_anchor = lines[index..end].iter().any(|l| {
        l.split_whitespace()
            .any(|w| w.len() > 1 && w.starts_with('&'))
    });
    if defines_anchor {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if !(index..end).contains(&i) {
            out.push_str(l);
        }
    }
    Some(out)
}

/// Pass 1 over `text`; the error says whether going on past it makes sense
/// (a shape error) or not (YAML syntax).
pub(super) fn deserialize(text: &str) -> Result<RawConfig, (Problem, bool)> {
    let mut options = serde_saphyr::Options::default();
    // We render our own one-line messages; snippets would only cost time.
    options.with_snippet = false;
    let mut failed_at = None;
    let result = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize::<_, Option<RawConfig>>(de).map_err(|e| {
            failed_at = Some(e.path().clone());
            e.into_inner()
        })
    });
    match result {
        Ok(raw) => Ok(raw.unwrap_or_default()),
        Err(outer) => {
            let err = innermost(&outer);
            let path = failed_at
                .as_ref()
                .map(|p| render_path(p, err))
                .unwrap_or_default();
            let message = message(err, &path);
            // The outer error knows where an alias was used, the inner one
            // only where its anchor was defined.
            let at = outer.location().or_else(|| err.location());
            let recoverable = matches!(
                err,
                YamlError::SerdeInvalidType { .. }
                    | YamlError::SerdeInvalidValue { .. }
                    | YamlError::SerdeInvalidLength { .. }
                    | YamlError::SerdeUnknownVariant { .. }
                    | YamlError::SerdeUnknownField { .. }
                    | YamlError::SerdeMissingField { .. }
                    | YamlError::DuplicateMappingKey { .. }
                    | YamlError::NullIntoString { .. }
                    | YamlError::Unexpected { .. }
                    | YamlError::InvalidBooleanStrict { .. }
            );
            Err((
                Problem::new(at.as_ref().and_then(position), &path, &message),
                recoverable,
            ))
        }
    }
}

/// The error itself, without the wrappers that only add rendering context.
fn innermost(err: &YamlError) -> &YamlError {
    match err {
        YamlError::WithSnippet { error, .. } | YamlError::AliasError { error, .. } => {
            innermost(error)
        }
        other => other,
    }
}

/// Keys whose own keys are chosen by the user (header names, metadata keys):
/// a `value` key below them is real, not `Spanned`'s synthetic field.
const USER_MAPS: [&str; 2] = ["headers", "metadata"];

/// `streams[1].failover_urls[0]` from serde_path_to_error's segments.
pub(super) fn render_path(path: &serde_path_to_error::Path, err: &YamlError) -> String {
    let segments: Vec<&Segment> = path.iter().collect();
    let unknown_field = matches!(err, YamlError::SerdeUnknownField { .. });
    let mut out = String::new();
    let mut below_user_map = false;
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match segment {
            Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
                below_user_map = false;
            }
            Segment::Map { key } if below_user_map => {
                push_key(&mut out, key);
                below_user_map = false;
            }
            // An unknown key the user named `value` is still worth naming.
            Segment::Map { key } if key == "value" && !(last && unknown_field) => {}
            Segment::Map { key } => {
                push_key(&mut out, key);
                below_user_map = USER_MAPS.contains(&key.as_str());
            }
            Segment::Enum { variant } => push_key(&mut out, variant),
            Segment::Unknown => match err {
                // serde_path_to_error cannot name a key it failed to store;
                // the duplicate-key error can.
                YamlError::DuplicateMappingKey { key: Some(key), .. } if last => {
                    push_key(&mut out, key)
                }
                _ => push_key(&mut out, "?"),
            },
        }
    }
    // Only hostile nesting gets here; the start of the path says enough.
    if out.len() > MAX_PATH {
        let cut = (0..=MAX_PATH)
            .rev()
            .find(|&i| out.is_char_boundary(i))
            .unwrap_or(0);
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

const MAX_PATH: usize = 120;

/// Appends `.key`, or `["odd key"]` when the key would make the path ambiguous.
pub(super) fn push_key(out: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(key);
    } else {
        out.push_str(&format!("[{key:?}]"));
    }
}

/// One line, without serde-saphyr's "at line X, column Y" suffix (the
/// location goes in front) and without its hints aimed at programmers.
fn message(err: &YamlError, path: &str) -> String {
    match err {
        YamlError::Unexpected { expected, .. } => match *expected {
            "mapping start" if path.is_empty() => {
                format!("the file must be a mapping of sections ({SECTIONS})")
            }
            "mapping start" => "expected a mapping (`key: value` lines)".to_owned(),
            "sequence start" => "expected a list".to_owned(),
            "string scalar" => "expected a single value, not a list or mapping".to_owned(),
            other => format!("expected {other}"),
        },
        YamlError::NullIntoString { .. } => {
            "a value is required here, not null (write \"\" for empty text)".to_owned()
        }
        YamlError::SerdeMissingField { field, .. } => format!("missing required key `{field}`"),
        YamlError::SerdeUnknownField {
            field, expected, ..
        } => {
            let mut msg = format!(
                "unknown field `{field}`, expected one of: {}",
                expected.join(", ")
            );
            if let Some(near) = closest(field, expected) {
                msg.push_str(&format!(" (did you mean `{near}`?)"));
            }
            msg
        }
        YamlError::DuplicateMappingKey { key: Some(key), .. } => {
            format!("key `{key}` appears twice in the same mapping")
        }
        YamlError::MultipleDocuments { .. } => {
            "the file must hold a single YAML document (remove the extra `---`)".to_owned()
        }
        other => {
            let text: Cow<'_, str> = serde_saphyr::UserMessageFormatter.format_message(other);
            text.into_owned()
        }
    }
}

/// The expected key a typo most likely meant, if any is close enough.
fn closest<'a>(typed: &str, expected: &[&'a str]) -> Option<&'a str> {
    expected
        .iter()
        .map(|e| (edit_distance(typed, e), *e))
        .filter(|(d, e)| *d <= 1.max(e.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, e)| e)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}
