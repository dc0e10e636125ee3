//! The body of `POST /broadcast/{id}/start`, checked field by field
//! (API-COMPAT-FFMPEG.md §6). Every value that reaches ffmpeg's argv is
//! checked here against a list or a pattern: codecs, presets and hwaccel
//! come from fixed lists, the resolution is `WxH` (or `720p`), bitrates are
//! numbers. Nothing from the body is ever a path: `output_dir` is ignored,
//! and `stream_url` is an http(s) URL (no `file:`, no local path).
//!
//! Shape errors (a string where a number belongs) are FastAPI-style 422s
//! naming the field; values outside the lists are 400s whose `detail` is a
//! sentence, because m3u-editor shows `detail` to the user as text.

use std::collections::BTreeMap;

use http::header::{HeaderName, HeaderValue};
use serde_json::{Map, Value};
use url::Url;

use crate::api::{body, ApiReply};

/// Seek and duration bound (a week): anything longer is a mistake.
const MAX_SECONDS: u64 = 7 * 24 * 3600;
/// HLS segment length bounds, seconds.
const SEGMENT_SECONDS: (u64, u64) = (1, 60);
/// Playlist length bound; 0 (m3u-proxy's "unlimited", used for DVR) means this.
pub const MAX_LIST: u64 = 1000;
/// Largest first segment number (keeps `live%06d.ts` names bounded).
const MAX_SEGMENT_NUMBER: u64 = 999_999_999_999;

/// Video encoders a network may ask for.
pub const VIDEO_CODECS: &[&str] = &[
    "libx264",
    "libx265",
    "h264_nvenc",
    "hevc_nvenc",
    "h264_vaapi",
    "hevc_vaapi",
    "h264_qsv",
    "hevc_qsv",
    "copy",
];
/// Audio encoders a network may ask for (all fit MPEG-TS).
pub const AUDIO_CODECS: &[&str] = &["aac", "ac3", "eac3", "mp2", "libmp3lame", "copy"];
/// Encoder presets: x264/x265 names and NVENC's.
pub const PRESETS: &[&str] = &[
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "p1",
    "p2",
    "p3",
    "p4",
    "p5",
    "p6",
    "p7",
    "hp",
    "hq",
    "ll",
    "llhq",
    "default",
];
/// Decoders on a GPU (m3u-editor offers none, cuda and vaapi).
pub const HWACCELS: &[&str] = &["cuda", "vaapi", "qsv", "auto"];

/// A checked start request.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    /// As sent (the API echoes it), for status replies.
    pub stream_url_as_sent: String,
    /// What ffmpeg fetches: the URL without its fragment (m3u-editor
    /// appends a `#range=N-` hint that is not part of the resource).
    pub stream_url: Url,
    pub seek_seconds: u64,
    /// 0 = until the input ends.
    pub duration_seconds: u64,
    pub segment_start_number: u64,
    pub add_discontinuity: bool,
    pub segment_duration: u64,
    pub hls_list_size: u64,
    pub transcode: bool,
    /// kbit/s.
    pub video_bitrate: Option<u64>,
    /// kbit/s.
    pub audio_bitrate: u64,
    /// Width and height; -2 keeps the aspect ratio (`720p`).
    pub video_resolution: Option<(i64, i64)>,
    pub video_codec: Option<&'static str>,
    pub audio_codec: Option<&'static str>,
    pub preset: Option<&'static str>,
    /// None also for `none` and empty.
    pub hwaccel: Option<&'static str>,
    pub callback_url: Option<Url>,
    pub headers: Vec<(String, String)>,
    pub dvr_mode: bool,
    pub metadata: BTreeMap<String, String>,
    /// m3u-editor's `next_stream_config`: the programme after this one,
    /// started as soon as this one ends (its own `next_stream_config` is
    /// not read). None when absent or not valid (then the callback path).
    pub next: Option<Box<Start>>,
}

fn bad(msg: String) -> ApiReply {
    ApiReply::detail(400, msg)
}

/// A whole number as pydantic accepts one: an integer, a float without a
/// fraction or a numeric string. Negative numbers are refused.
fn number(m: &Map<String, Value>, field: &str, default: u64, max: u64) -> Result<u64, ApiReply> {
    let v = match m.get(field) {
        None | Some(Value::Null) => return Ok(default),
        Some(v) => v,
    };
    let n: Option<i128> = match v {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
                    .map(|f| f as i128)
            }),
        Value::String(s) => s.trim().parse::<i128>().ok(),
        _ => None,
    };
    let Some(n) = n else {
        return Err(body::wrong(field, "Input should be a valid integer", v));
    };
    if n < 0 {
        return Err(bad(format!("{field} must not be negative, got {n}")));
    }
    if n > i128::from(max) {
        return Err(bad(format!("{field} must be at most {max}, got {n}")));
    }
    Ok(n as u64)
}

fn flag(m: &Map<String, Value>, field: &str) -> Result<bool, ApiReply> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(body::wrong(field, "Input should be a valid boolean", v)),
    }
}

fn text<'a>(m: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiReply> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim())),
        Some(v) => Err(body::wrong(field, "Input should be a valid string", v)),
    }
}

/// `value` if it is on `list` (case-insensitive), else a 400 naming both.
fn listed(
    field: &str,
    value: Option<&str>,
    list: &'static [&'static str],
) -> Result<Option<&'static str>, ApiReply> {
    let Some(v) = value else { return Ok(None) };
    list.iter()
        .find(|c| c.eq_ignore_ascii_case(v))
        .copied()
        .map(Some)
        .ok_or_else(|| {
            bad(format!(
                "{field} {v:?} is not allowed; use one of: {}",
                list.join(", ")
            ))
        })
}

/// `1280x720`, `1280:720` or `720p`.
pub fn resolution(s: &str) -> Option<(i64, i64)> {
    let dim = |t: &str| {
        t.parse::<i64>()
            .ok()
            .filter(|n| (16..=8192).contains(n) && n % 2 == 0)
    };
    if let Some(h) = s.strip_suffix(['p', 'P']) {
        return dim(h).map(|h| (-2, h));
    }
    let (w, h) = s.split_once(['x', 'X', ':'])?;
    Some((dim(w)?, dim(h)?))
}

/// A bitrate in kbit/s: `4000`, `4000k` or a number.
fn kbits(
    m: &Map<String, Value>,
    field: &str,
    default: Option<u64>,
) -> Result<Option<u64>, ApiReply> {
    let v = match m.get(field) {
        None | Some(Value::Null) => return Ok(default),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(default),
        Some(v) => v,
    };
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let t = s.trim();
            t.strip_suffix(['k', 'K']).unwrap_or(t).parse::<u64>().ok()
        }
        _ => return Err(body::wrong(field, "Input should be a valid string", v)),
    };
    match n {
        Some(n) if (8..=200_000).contains(&n) => Ok(Some(n)),
        _ => Err(bad(format!(
            "{field} must be a bitrate in kbit/s between 8 and 200000, got {v}"
        ))),
    }
}

/// Parses and checks a start body.
pub fn parse(raw: &[u8]) -> Result<Start, ApiReply> {
    let m = body::object(raw)?;
    let mut start = parse_object(&m)?;
    start.next = match m.get("next_stream_config") {
        Some(Value::Object(next)) => match parse_object(next) {
            Ok(n) => Some(Box::new(n)),
            Err(e) => {
                tracing::warn!(detail = %e.body, "next_stream_config not valid: the next programme waits for m3u-editor's start");
                None
            }
        },
        _ => None,
    };
    Ok(start)
}

fn parse_object(m: &Map<String, Value>) -> Result<Start, ApiReply> {
    let stream_url_as_sent = body::required_str(m, "stream_url")?;
    body::check_url("stream_url", &stream_url_as_sent)?;
    let mut stream_url = Url::parse(&stream_url_as_sent)
        .map_err(|e| bad(format!("stream_url is not a URL: {e}")))?;
    stream_url.set_fragment(None);
    let callback_url = match text(m, "callback_url")? {
        Some(s) => {
            body::check_url("callback_url", s)?;
            Some(Url::parse(s).map_err(|e| bad(format!("callback_url is not a URL: {e}")))?)
        }
        None => None,
    };
    let segment_duration = number(m, "segment_duration", 6, SEGMENT_SECONDS.1)?;
    if segment_duration < SEGMENT_SECONDS.0 {
        return Err(bad(format!(
            "segment_duration must be between {} and {} seconds",
            SEGMENT_SECONDS.0, SEGMENT_SECONDS.1
        )));
    }
    let hls_list_size = match number(m, "hls_list_size", 20, MAX_LIST)? {
        0 => MAX_LIST,
        n => n,
    };
    let video_resolution = match text(m, "video_resolution")? {
        Some(s) => Some(resolution(s).ok_or_else(|| {
            bad(format!(
                "video_resolution {s:?} is not allowed; use WIDTHxHEIGHT (even numbers, e.g. 1280x720) or 720p"
            ))
        })?),
        None => None,
    };
    let hwaccel = match text(m, "hwaccel")? {
        Some(h) if h.eq_ignore_ascii_case("none") => None,
        h => listed("hwaccel", h, HWACCELS)?,
    };
    let mut headers = Vec::new();
    match m.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            for (k, v) in o {
                let field = format!("headers.{k}");
                let value = match v {
                    Value::String(s) => s.trim().to_string(),
                    Value::Number(_) | Value::Bool(_) => v.to_string(),
                    _ => return Err(body::wrong(&field, "Input should be a valid string", v)),
                };
                let name = k.trim();
                if HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(body::wrong(&field, "not a valid HTTP header name", v));
                }
                if crate::upstream::headers::is_reserved(name)
                    || name.eq_ignore_ascii_case("host")
                    || name.eq_ignore_ascii_case("user-agent")
                {
                    return Err(body::wrong(
                        &field,
                        "Host, User-Agent, hop-by-hop and framing headers are set by m3u-edge itself",
                        v,
                    ));
                }
                if value.is_empty() {
                    continue;
                }
                // Refuses CR and LF too: one value cannot add a header.
                if HeaderValue::from_str(&value).is_err() {
                    return Err(body::wrong(&field, "not a valid HTTP header value", v));
                }
                headers.push((name.to_string(), value));
            }
        }
        Some(v) => {
            return Err(body::wrong(
                "headers",
                "Input should be a valid dictionary",
                v,
            ))
        }
    }
    let mut metadata = BTreeMap::new();
    match m.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            for (k, v) in o {
                if let Some(s) = body::python_str(v) {
                    metadata.insert(k.clone(), s);
                }
            }
        }
        Some(v) => {
            return Err(body::wrong(
                "metadata",
                "Input should be a valid dictionary",
                v,
            ))
        }
    }
    Ok(Start {
        stream_url_as_sent,
        stream_url,
        seek_seconds: number(m, "seek_seconds", 0, MAX_SECONDS)?,
        duration_seconds: number(m, "duration_seconds", 0, MAX_SECONDS)?,
        segment_start_number: number(m, "segment_start_number", 0, MAX_SEGMENT_NUMBER)?,
        add_discontinuity: flag(m, "add_discontinuity")?,
        segment_duration,
        hls_list_size,
        transcode: flag(m, "transcode")?,
        video_bitrate: kbits(m, "video_bitrate", None)?,
        audio_bitrate: kbits(m, "audio_bitrate", Some(192))?.unwrap_or(192),
        video_resolution,
        video_codec: listed("video_codec", text(m, "video_codec")?, VIDEO_CODECS)?,
        audio_codec: listed("audio_codec", text(m, "audio_codec")?, AUDIO_CODECS)?,
        preset: listed("preset", text(m, "preset")?, PRESETS)?,
        hwaccel,
        callback_url,
        headers,
        dvr_mode: flag(m, "dvr_mode")?,
        metadata,
        next: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(v: Value) -> Result<Start, ApiReply> {
        parse(v.to_string().as_bytes())
    }

    #[test]
    fn the_editors_body_with_its_nulls_parses() {
        // NetworkBroadcastService::start as m3u-editor sends it.
        let s = parse_json(json!({
            "stream_url": "http://media.example/Videos/1/stream.mp4?static=true#range=1000-",
            "seek_seconds": 30, "duration_seconds": 1800, "segment_start_number": 0,
            "add_discontinuity": false, "segment_duration": 6, "hls_list_size": 20,
            "transcode": true, "video_bitrate": "4000", "audio_bitrate": 192,
            "video_resolution": "1280x720", "video_codec": null, "audio_codec": null,
            "preset": null, "hwaccel": "none", "preferred_audio_language": null,
            "subtitles_enabled": false, "subtitle_url": null, "subtitle_language": null,
            "subtitle_seek_seconds": 30, "callback_url": "http://editor/api/m3u-proxy/broadcast/callback",
            "next_stream_config": null, "output_dir": "/dev/shm",
            "headers": {"X-Plex-Token": "abc"}
        }))
        .unwrap();
        assert_eq!(
            s.stream_url.as_str(),
            "http://media.example/Videos/1/stream.mp4?static=true"
        );
        assert_eq!(s.video_bitrate, Some(4000));
        assert_eq!(s.video_resolution, Some((1280, 720)));
        assert_eq!(s.hwaccel, None);
        assert_eq!(
            s.headers,
            vec![("X-Plex-Token".to_string(), "abc".to_string())]
        );
        assert_eq!((s.seek_seconds, s.duration_seconds), (30, 1800));
        assert!(s.next.is_none());
        let s = parse_json(json!({
            "stream_url": "http://a.example/1.mp4",
            "next_stream_config": {"stream_url": "http://a.example/2.mp4", "duration_seconds": 60,
                                   "next_stream_config": {"stream_url": "http://a.example/3.mp4"}}
        }))
        .unwrap();
        let next = s.next.unwrap();
        assert_eq!(next.stream_url.as_str(), "http://a.example/2.mp4");
        assert_eq!(next.duration_seconds, 60);
        assert!(next.next.is_none(), "one programme ahead only");
        let s = parse_json(json!({"stream_url": "http://a.example/1.mp4",
                                  "next_stream_config": {"stream_url": "file:///etc/passwd"}}))
        .unwrap();
        assert!(s.next.is_none());
    }

    #[test]
    fn values_outside_the_lists_are_refused_naming_the_field() {
        let base = json!({"stream_url": "http://a.example/x.mp4"});
        for (field, value) in [
            ("video_codec", json!("libx264 -y /tmp/x")),
            ("preset", json!("fast -f null")),
            ("hwaccel", json!("opencl")),
            ("video_resolution", json!("1280x720,drawtext=x")),
            ("video_bitrate", json!("1M -y")),
            ("segment_duration", json!(0)),
            ("seek_seconds", json!(-5)),
        ] {
            let mut b = base.clone();
            b[field] = value;
            let r = parse_json(b).unwrap_err();
            assert_eq!(r.status, 400, "{field}");
            assert!(
                r.body["detail"].as_str().unwrap().contains(field),
                "{field}: {}",
                r.body
            );
        }
        for url in [
            "file:///etc/passwd",
            "/etc/passwd",
            "rtmp://a/b",
            "concat:http://a",
        ] {
            let r = parse_json(json!({"stream_url": url})).unwrap_err();
            assert_eq!(r.status, 422, "{url}");
        }
        let r = parse_json(
            json!({"stream_url": "http://a.example/x", "headers": {"X-A": "1\r\nX-B: 2"}}),
        )
        .unwrap_err();
        assert_eq!(r.status, 422);
        let r = parse_json(json!({"stream_url": "http://a.example/x", "seek_seconds": "abc"}))
            .unwrap_err();
        assert_eq!(r.status, 422);
    }

    #[test]
    fn resolutions() {
        assert_eq!(resolution("1920x1080"), Some((1920, 1080)));
        assert_eq!(resolution("854:480"), Some((854, 480)));
        assert_eq!(resolution("720p"), Some((-2, 720)));
        assert_eq!(resolution("1921x1080"), None);
        assert_eq!(resolution("iw/2:ih/2"), None);
    }
}
