//! One programme's ffmpeg argv, built from a checked [`Start`] only (no
//! template, no value from the API that was not checked against a list).
//!
//! ffmpeg fetches `stream_url` itself (it must seek with HTTP ranges), with
//! the stream's user agent and headers, and may use network protocols only
//! (`-protocol_whitelist`): no `file:`, no `concat:`, no `subfile:`, also
//! not through a playlist or a redirect. It writes `live%06d.ts` segments
//! and its own playlist into the network's directory; m3u-edge renders the
//! playlist players see (`window`).

use std::path::Path;

use super::request::Start;

/// The protocols ffmpeg may open for the input (HLS inputs included).
pub const PROTOCOLS: &str = "http,https,tcp,tls,crypto";
/// ffmpeg's own playlist in the network directory; never served.
pub const FFMPEG_PLAYLIST: &str = "programme.m3u8";

/// What else the argv needs besides the request.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub dir: &'a Path,
    pub user_agent: &'a str,
    /// Provider headers first, then the request's (which win).
    pub headers: &'a [(String, String)],
    /// The first segment's number.
    pub start_number: u64,
    /// `transcode.device` for vaapi/qsv decoding.
    pub device: Option<&'a str>,
}

/// `live000123.ts`: the name ffmpeg gives segment `n` (`live%06d.ts`).
pub fn segment_name(n: u64) -> String {
    format!("live{n:06}.ts")
}

/// The segment number of a file name, if it is one of ours.
pub fn segment_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("live")?.strip_suffix(".ts")?;
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// ffmpeg's argv after the program name.
pub fn argv(s: &Start, cx: &Context<'_>) -> Vec<String> {
    let mut a: Vec<String> = Vec::with_capacity(64);
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&[
        "-hide_banner",
        "-nostdin",
        "-nostats",
        "-loglevel",
        "error",
        "-y",
    ]);
    if s.transcode {
        if let Some(hw) = s.hwaccel {
            push(&["-hwaccel", hw]);
            if let (Some(dev), "vaapi" | "qsv") = (cx.device, hw) {
                push(&["-hwaccel_device", dev]);
            }
        }
    }
    push(&["-protocol_whitelist", PROTOCOLS]);
    push(&["-user_agent", cx.user_agent]);
    if !cx.headers.is_empty() {
        let mut h = String::new();
        for (k, v) in cx.headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        push(&["-headers", &h]);
    }
    // A read that blocks this long fails (then -reconnect tries again): a
    // dead peer must not hold a network "running" for ever. Microseconds.
    push(&["-rw_timeout", "15000000"]);
    push(&[
        "-reconnect",
        "1",
        "-reconnect_streamed",
        "1",
        "-reconnect_delay_max",
        "10",
    ]);
    if s.seek_seconds > 0 {
        push(&["-ss", &s.seek_seconds.to_string()]);
    }
    // Real time: a schedule plays at the wall clock's pace.
    push(&["-re", "-i", s.stream_url.as_str()]);
    if s.duration_seconds > 0 {
        push(&["-t", &s.duration_seconds.to_string()]);
    }
    // Video and audio only; either may be missing (radio, silent video).
    push(&["-map", "0:v:0?", "-map", "0:a:0?"]);
    if s.transcode {
        let vcodec = s.video_codec.unwrap_or("libx264");
        push(&["-c:v", vcodec]);
        if vcodec != "copy" {
            push(&["-preset", s.preset.unwrap_or("veryfast")]);
            if let Some(b) = s.video_bitrate {
                push(&["-b:v", &format!("{b}k")]);
            }
            if let Some((w, h)) = s.video_resolution {
                push(&["-vf", &format!("scale={w}:{h}")]);
            }
            // A keyframe at every segment boundary: segments start clean
            // and are as long as asked, whatever the source's GOP.
            push(&[
                "-force_key_frames",
                &format!("expr:gte(t,n_forced*{})", s.segment_duration),
            ]);
        }
        let acodec = s.audio_codec.unwrap_or("aac");
        push(&["-c:a", acodec]);
        if acodec != "copy" {
            // 48 kHz stereo: sources at other rates played slow and deep
            // through m3u-proxy's broadcasts without it.
            push(&[
                "-b:a",
                &format!("{}k", s.audio_bitrate),
                "-ar",
                "48000",
                "-ac",
                "2",
            ]);
        }
    } else {
        push(&["-c:v", "copy", "-c:a", "copy"]);
    }
    let dir = cx.dir.display().to_string();
    push(&[
        "-f",
        "hls",
        "-hls_time",
        &s.segment_duration.to_string(),
        // ffmpeg's own list only has to outlast a poll (window.rs keeps the
        // real window across programmes and deletes old files itself).
        "-hls_list_size",
        "10",
        "-start_number",
        &cx.start_number.to_string(),
        "-hls_flags",
        "program_date_time+omit_endlist+independent_segments",
        "-hls_segment_type",
        "mpegts",
        "-hls_segment_filename",
        &format!("{dir}/live%06d.ts"),
        &format!("{dir}/{FFMPEG_PLAYLIST}"),
    ]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(body: serde_json::Value) -> Start {
        super::super::request::parse(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn copy_argv_has_the_input_options_before_the_input_and_our_output_last() {
        let s = start(serde_json::json!({
            "stream_url": "http://p.example/v.mp4#range=5-", "seek_seconds": 30,
            "duration_seconds": 60, "segment_duration": 4, "output_dir": "/etc"
        }));
        let headers = vec![("X-Plex-Token".to_string(), "t".to_string())];
        let a = argv(
            &s,
            &Context {
                dir: Path::new("/w/broadcast_n"),
                user_agent: "UA/1",
                headers: &headers,
                start_number: 7,
                device: None,
            },
        );
        let at = |x: &str| a.iter().position(|t| t == x).unwrap();
        assert!(at("-protocol_whitelist") < at("-i"));
        assert!(at("-ss") < at("-i") && at("-t") > at("-i"));
        assert_eq!(a[at("-i") + 1], "http://p.example/v.mp4");
        assert_eq!(a[at("-headers") + 1], "X-Plex-Token: t\r\n");
        assert_eq!(a[at("-start_number") + 1], "7");
        assert_eq!(
            a[at("-hls_segment_filename") + 1],
            "/w/broadcast_n/live%06d.ts"
        );
        assert_eq!(a.last().unwrap(), "/w/broadcast_n/programme.m3u8");
        assert!(!a.iter().any(|t| t.contains("/etc")));
        assert!(a.windows(2).any(|w| w == ["-c:v", "copy"]));
    }

    #[test]
    fn transcode_uses_only_listed_values() {
        let s = start(serde_json::json!({
            "stream_url": "http://p.example/v.mp4", "transcode": true,
            "video_resolution": "720p", "video_bitrate": "1500", "hwaccel": "vaapi",
            "preset": "fast", "video_codec": "h264_vaapi"
        }));
        let a = argv(
            &s,
            &Context {
                dir: Path::new("/w"),
                user_agent: "UA",
                headers: &[],
                start_number: 0,
                device: Some("/dev/dri/renderD128"),
            },
        );
        let joined = a.join(" ");
        assert!(joined.contains("-hwaccel vaapi -hwaccel_device /dev/dri/renderD128"));
        assert!(joined.contains("-c:v h264_vaapi -preset fast -b:v 1500k -vf scale=-2:720"));
        assert!(joined.contains("-c:a aac -b:a 192k -ar 48000 -ac 2"));
    }

    #[test]
    fn segment_names_round_trip_and_nothing_else_is_one() {
        assert_eq!(segment_name(12), "live000012.ts");
        assert_eq!(segment_number("live000012.ts"), Some(12));
        assert_eq!(segment_number("live1234567.ts"), Some(1_234_567));
        for bad in [
            "live.ts",
            "../live1.ts",
            "live1.ts.bak",
            "live-1.ts",
            "programme.m3u8",
            "live1a.ts",
        ] {
            assert_eq!(segment_number(bad), None, "{bad}");
        }
    }
}
