//! ffmpeg templates → argv, safely.
//!
//! A template comes from m3u-editor (any user of it), the YAML or a
//! built-in profile, and becomes ffmpeg's argv without a shell. It may only
//! shape what ffmpeg does to the one input m3u-edge feeds it (codecs, rates,
//! GOP, scaling and audio filters, maps of input 0, the muxer): every option
//! is checked against an allowlist, exactly one `-i {input_url}` is allowed,
//! and the output is always m3u-edge's own pipe. Anything that could open a
//! file, a URL or a device, or run a second output, is refused with an error
//! that names the token. (The Python proxy passes templates through: a
//! template or a variable with `-y /path/x.ts` wrote files on its host.)
//!
//! Rendering: the template is split like a shell would (quotes honoured, no
//! expansion), then `{name}` / `{name|default}` placeholders are filled in
//! each token: `profile_variables` first, then the defaults below. A value
//! is substituted inside one token and never splits into more, and values
//! must match `^[A-Za-z0-9:._+-]+$`.

use std::collections::BTreeMap;
use std::fmt;

/// HLS segment length when a template asks for HLS without `-hls_time`.
pub const DEFAULT_HLS_TIME: f64 = 2.0;

/// The placeholder for the input; ffmpeg reads m3u-edge's pipe instead.
const INPUT: &str = "input_url";
/// The placeholder for the output; always m3u-edge's pipe.
const OUTPUT: &str = "output_args";

/// What a template asked for, once checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// ffmpeg's argv after the program name: stdin in, MPEG-TS on stdout.
    pub args: Vec<String>,
    /// The template asked for HLS (`-f hls`, `-hls_time`, `-hls_list_size`).
    pub hls: bool,
    /// The muxer the template named (`mpegts` when none).
    pub format: String,
    /// The template copies the video (no re-encoding).
    pub copies_video: bool,
    /// `-hls_time` and `-hls_list_size`, when the template set them.
    pub hls_time: Option<f64>,
    pub hls_list_size: Option<usize>,
}

/// Why a template or variable was refused; the text names the culprit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    /// Unbalanced quotes or the like.
    Syntax(String),
    /// `{name}` with no value and no default.
    UnknownPlaceholder(String),
    /// A `profile_variables` entry with a bad name or value.
    Variable { name: String, why: &'static str },
    /// A token the allowlist refuses.
    Token { token: String, why: String },
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::Syntax(e) => write!(f, "template cannot be parsed: {e}"),
            TemplateError::UnknownPlaceholder(p) => write!(
                f,
                "template placeholder {{{p}}} has no value: give it a default ({{{p}|value}}) or a profile variable"
            ),
            TemplateError::Variable { name, why } => {
                write!(f, "profile variable {name:?} {why}")
            }
            TemplateError::Token { token, why } => write!(f, "template token {token:?} refused: {why}"),
        }
    }
}

impl std::error::Error for TemplateError {}

/// Options a template may use, with how many values each takes. Names are
/// matched without their stream specifier (`-c:v` is `-c`, `-b:a:0` is `-b`).
const OPTIONS: &[(&str, usize)] = &[
    // Codecs and rate control.
    ("c", 1),
    ("codec", 1),
    ("vcodec", 1),
    ("acodec", 1),
    ("b", 1),
    ("maxrate", 1),
    ("minrate", 1),
    ("bufsize", 1),
    ("crf", 1),
    ("cq", 1),
    ("qp", 1),
    ("q", 1),
    ("qscale", 1),
    ("qmin", 1),
    ("qmax", 1),
    ("global_quality", 1),
    ("rc", 1),
    ("preset", 1),
    ("tune", 1),
    ("profile", 1),
    ("level", 1),
    ("tag", 1),
    ("x264opts", 1),
    ("x264-params", 1),
    ("x265-params", 1),
    ("bf", 1),
    ("refs", 1),
    ("coder", 1),
    ("rc-lookahead", 1),
    ("look_ahead", 1),
    ("forced-idr", 1),
    ("low_power", 1),
    ("threads", 1),
    // GOP and timing.
    ("g", 1),
    ("keyint_min", 1),
    ("sc_threshold", 1),
    ("force_key_frames", 1),
    ("r", 1),
    ("fps_mode", 1),
    ("vsync", 1),
    ("async", 1),
    ("copyts", 0),
    ("start_at_zero", 0),
    ("avoid_negative_ts", 1),
    ("max_delay", 1),
    ("muxdelay", 1),
    ("muxpreload", 1),
    ("shortest", 0),
    // Picture and sound.
    ("s", 1),
    ("aspect", 1),
    ("pix_fmt", 1),
    ("ar", 1),
    ("ac", 1),
    ("vf", 1),
    ("af", 1),
    ("filter", 1),
    ("bsf", 1),
    ("an", 0),
    ("vn", 0),
    ("sn", 0),
    ("dn", 0),
    ("map", 1),
    // Muxers.
    ("f", 1),
    ("movflags", 1),
    ("mpegts_flags", 1),
    ("max_muxing_queue_size", 1),
    ("hls_time", 1),
    ("hls_list_size", 1),
    ("hls_flags", 1),
    ("hls_segment_type", 1),
    ("hls_playlist_type", 1),
    ("strict", 1),
    // Input reading (of m3u-edge's pipe).
    ("fflags", 1),
    ("flags", 1),
    ("analyzeduration", 1),
    ("probesize", 1),
    ("thread_queue_size", 1),
    ("err_detect", 1),
    ("re", 0),
    // Decoding on a GPU: the device itself comes from the config.
    ("hwaccel", 1),
    ("hwaccel_output_format", 1),
    // Chatter.
    ("loglevel", 1),
    ("v", 1),
    ("hide_banner", 0),
    ("nostats", 0),
    ("nostdin", 0),
    ("y", 0),
];

/// Muxers a template may name. Live output is MPEG-TS whatever is named
/// (a pipe of MP4 or Matroska cannot be joined mid-stream); `hls` asks for
/// HLS viewers.
const FORMATS: &[&str] = &[
    "mpegts", "hls", "matroska", "mkv", "mp4", "adts", "webm", "mpeg", "flv", "aac", "mp3",
];

/// Filters a template may use: none of them opens a file or a URL
/// (`movie`, `amovie`, `subtitles`, `ass`, `lut3d`, `drawtext` ... do).
const FILTERS: &[&str] = &[
    "scale",
    "scale_vaapi",
    "scale_cuda",
    "scale_npp",
    "scale_qsv",
    "vpp_qsv",
    "fps",
    "format",
    "yadif",
    "yadif_cuda",
    "bwdif",
    "deinterlace_vaapi",
    "deinterlace_qsv",
    "hwupload",
    "hwupload_cuda",
    "hwdownload",
    "setsar",
    "setdar",
    "setpts",
    "pad",
    "crop",
    "transpose",
    "hflip",
    "vflip",
    "fieldorder",
    "null",
    "anull",
    "aresample",
    "asetpts",
    "aformat",
    "volume",
    "pan",
    "loudnorm",
    "dynaudnorm",
    "atempo",
];

/// Renders `template` with `vars` (the caller's `profile_variables`) over
/// `defaults` (the profile's), and checks every token.
pub fn render(
    template: &str,
    vars: &BTreeMap<String, String>,
    defaults: &BTreeMap<String, String>,
) -> Result<Rendered, TemplateError> {
    for (name, value) in vars {
        check_variable(name, value)?;
    }
    let words = shell_words::split(template).map_err(|e| TemplateError::Syntax(e.to_string()))?;
    let mut pre_input: Vec<String> = Vec::new();
    let mut post_input: Vec<String> = Vec::new();
    let mut seen_input = false;
    let mut output_seen = false;
    let mut hls = false;
    let mut format: Option<String> = None;
    let mut maps = false;
    let mut copies_video = false;
    let mut hls_time = None;
    let mut hls_list_size = None;
    let mut force_keys = false;
    let mut i = 0;
    while i < words.len() {
        let raw = &words[i];
        i += 1;
        if output_seen {
            return Err(refused(raw, "nothing may follow the output"));
        }
        if let Some(name) = whole_placeholder(raw) {
            match name {
                INPUT => return Err(refused(raw, "{input_url} only goes after -i")),
                OUTPUT => {
                    output_seen = true;
                    continue;
                }
                _ => {}
            }
        }
        let token = fill(raw, vars, defaults)?;
        if token == "-i" {
            let Some(next) = words.get(i) else {
                return Err(refused(raw, "-i needs {input_url}"));
            };
            if whole_placeholder(next) != Some(INPUT) {
                return Err(refused(next, "the only input is -i {input_url}"));
            }
            if seen_input {
                return Err(refused(next, "only one input (-i) is allowed"));
            }
            seen_input = true;
            i += 1;
            continue;
        }
        let Some(option) = token.strip_prefix('-').filter(|o| !o.is_empty()) else {
            // A bare word: an output path, or `pipe:1` that means ours.
            if matches!(token.as_str(), "pipe:1" | "pipe:" | "-") {
                output_seen = true;
                continue;
            }
            return Err(refused(
                raw,
                "the output is m3u-edge's own; remove output paths",
            ));
        };
        let base = option.split(':').next().unwrap_or(option);
        let Some(&(_, arity)) = OPTIONS.iter().find(|(n, _)| *n == base) else {
            return Err(refused(raw, "option not allowed in a template"));
        };
        let out = if seen_input {
            &mut post_input
        } else {
            &mut pre_input
        };
        if base == "y" || base == "nostdin" || base == "hide_banner" {
            continue;
        }
        out.push(token.clone());
        if arity == 0 {
            continue;
        }
        let Some(raw_value) = words.get(i) else {
            return Err(refused(raw, "option needs a value"));
        };
        i += 1;
        if whole_placeholder(raw_value).is_some_and(|p| p == INPUT || p == OUTPUT) {
            return Err(refused(raw_value, "not a value for this option"));
        }
        let value = fill(raw_value, vars, defaults)?;
        check_value(base, &value).map_err(|why| refused(raw_value, why))?;
        match base {
            "f" if seen_input => {
                hls |= value == "hls";
                format = Some(value.clone());
                // The muxer is ours (see below): drop the template's.
                out.pop();
                continue;
            }
            "hls_time" | "hls_list_size" | "hls_flags" | "hls_segment_type"
            | "hls_playlist_type" => {
                hls = true;
                match base {
                    "hls_time" => {
                        hls_time = value.parse::<f64>().ok().filter(|t| *t > 0.0 && *t <= 60.0)
                    }
                    "hls_list_size" => hls_list_size = value.parse::<usize>().ok(),
                    _ => {}
                }
                // HLS muxer options mean nothing to the MPEG-TS pipe.
                out.pop();
                continue;
            }
            "map" => maps = true,
            "force_key_frames" => force_keys = true,
            "c" | "codec" | "vcodec" if value == "copy" => {
                let video =
                    base == "vcodec" || option == base || option.starts_with(&format!("{base}:v"));
                copies_video |= video;
            }
            _ => {}
        }
        out.push(value);
    }
    if !seen_input {
        return Err(TemplateError::Token {
            token: template.chars().take(60).collect(),
            why: "a template must read -i {input_url}".into(),
        });
    }
    let mut args = vec!["-hide_banner".into(), "-nostdin".into()];
    if !pre_input.iter().any(|t| t == "-loglevel" || t == "-v") {
        args.extend(["-loglevel".into(), "warning".into()]);
    }
    // The input starts at PAT/PMT and a keyframe (a hub join): one second of
    // probing finds every stream, where ffmpeg's default 5 s would delay
    // every start by as much.
    if !pre_input.iter().any(|t| t == "-analyzeduration") {
        args.extend(["-analyzeduration".into(), "1000000".into()]);
    }
    args.extend(pre_input);
    args.extend(["-i".into(), "pipe:0".into()]);
    args.extend(post_input);
    if hls && !copies_video && !force_keys {
        // HLS segments start at keyframes: make one every segment, whatever
        // the encoder's GOP (x264's default of 10 s would hold the first
        // playlist back for as long).
        let every = hls_time.unwrap_or(DEFAULT_HLS_TIME);
        args.extend([
            "-force_key_frames".into(),
            format!("expr:gte(t,n_forced*{every})"),
        ]);
    }
    if !maps {
        args.extend(["-map", "0:v:0?", "-map", "0:a:0?"].map(String::from));
    }
    args.extend(["-f", "mpegts", "pipe:1"].map(String::from));
    Ok(Rendered {
        args,
        hls,
        format: format.unwrap_or_else(|| "mpegts".into()),
        copies_video,
        hls_time,
        hls_list_size,
    })
}

fn refused(token: &str, why: impl Into<String>) -> TemplateError {
    TemplateError::Token {
        token: token.to_string(),
        why: why.into(),
    }
}

/// `profile_variables`: names of word characters, values of the safe set.
pub fn check_variable(name: &str, value: &str) -> Result<(), TemplateError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(TemplateError::Variable {
            name: name.into(),
            why: "must be a name of letters, digits and _",
        });
    }
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":._+-".contains(&b));
    if !ok {
        return Err(TemplateError::Variable {
            name: name.into(),
            why: "must match ^[A-Za-z0-9:._+-]+$",
        });
    }
    Ok(())
}

/// `{name}` or `{name|default}` when it is the whole token: its name.
fn whole_placeholder(token: &str) -> Option<&str> {
    let inner = token.strip_prefix('{')?.strip_suffix('}')?;
    let name = inner.split('|').next().unwrap_or(inner);
    (!name.contains('{') && !name.contains('}')).then_some(name)
}

/// Fills every `{name}` / `{name|default}` in one token.
fn fill(
    token: &str,
    vars: &BTreeMap<String, String>,
    defaults: &BTreeMap<String, String>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(token.len());
    let mut rest = token;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let inner = &rest[start + 1..start + len];
        let (name, default) = match inner.split_once('|') {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            // Not a placeholder (a filter expression, say): keep as written.
            out.push_str(&rest[..start + len + 1]);
            rest = &rest[start + len + 1..];
            continue;
        }
        if name == INPUT || name == OUTPUT {
            return Err(refused(token, "{input_url} and {output_args} stand alone"));
        }
        let value = vars
            .get(name)
            .or_else(|| defaults.get(name))
            .map(String::as_str)
            .or(default)
            .ok_or_else(|| TemplateError::UnknownPlaceholder(name.into()))?;
        if default.is_some_and(|d| d == value) {
            // A template's own default is checked like a variable too.
            check_variable(name, value)?;
        }
        out.push_str(&rest[..start]);
        out.push_str(value);
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Values of options: no protocols or paths anywhere, and the option's own rules.
fn check_value(option: &str, value: &str) -> Result<(), String> {
    if value.contains("://") || value.starts_with('/') || value.contains("..") {
        return Err("URLs and paths are not allowed in a template".into());
    }
    for proto in [
        "file:", "pipe:", "tcp:", "udp:", "http:", "https:", "rtmp:", "data:", "concat:",
        "subfile:",
    ] {
        if value.to_ascii_lowercase().starts_with(proto) {
            return Err("protocols are not allowed in a template".into());
        }
    }
    match option {
        "f" if !FORMATS.contains(&value) => Err(format!(
            "muxer not allowed (use one of {})",
            FORMATS.join(", ")
        )),
        "map" if !(value == "0" || value.starts_with("0:") || value.starts_with("-0:")) => {
            Err("maps may only pick streams of input 0".into())
        }
        "vf" | "af" | "filter" => check_filters(value),
        _ => Ok(()),
    }
}

/// A filter graph uses only allowlisted filters.
fn check_filters(graph: &str) -> Result<(), String> {
    for part in graph.split([',', ';']) {
        // Drop link labels: `[in]scale=...[out]`.
        let mut f = part.trim();
        while let Some(rest) = f.strip_prefix('[') {
            f = rest.split_once(']').map_or("", |(_, r)| r).trim_start();
        }
        let name = f.split(['=', '[']).next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        if !FILTERS.contains(&name) {
            return Err(format!("filter {name:?} is not allowed in a template"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// m3u-editor's own templates (API-COMPAT-FFMPEG §3) pass unchanged.
    #[test]
    fn the_editors_templates_pass() {
        let live = "-fflags +genpts+discardcorrupt+igndts -i {input_url} -c:v libx264 -preset faster -b:v {bitrate|2000k} -maxrate {maxrate|2500k} -bufsize {bufsize|2500k} -c:a aac -b:a {audio_bitrate|128k} -f mpegts {output_args|pipe:1}";
        let r = render(live, &none(), &none()).unwrap();
        assert!(!r.hls);
        assert_eq!(
            r.args.join(" "),
            "-hide_banner -nostdin -loglevel warning -analyzeduration 1000000 \
             -fflags +genpts+discardcorrupt+igndts -i pipe:0 \
             -c:v libx264 -preset faster -b:v 2000k -maxrate 2500k -bufsize 2500k -c:a aac -b:a 128k \
             -map 0:v:0? -map 0:a:0? -f mpegts pipe:1"
        );
        let hls = "-fflags +genpts+discardcorrupt+igndts -i {input_url} -c:v libx264 -preset faster -b:v {bitrate|2000k} -maxrate {maxrate|2500k} -bufsize {bufsize|2500k} -c:a aac -b:a {audio_bitrate|128k} -hls_time 2 -hls_list_size 30 -hls_flags program_date_time -f hls {output_args|index.m3u8}";
        let r = render(hls, &none(), &none()).unwrap();
        assert!(r.hls);
        assert_eq!((r.hls_time, r.hls_list_size), (Some(2.0), Some(30)));
        assert!(r
            .args
            .windows(2)
            .any(|w| w == ["-force_key_frames", "expr:gte(t,n_forced*2)"]));
        assert!(r
            .args
            .ends_with(&["-f".into(), "mpegts".into(), "pipe:1".into()]));
        assert!(!r.args.iter().any(|a| a.starts_with("-hls")));
        let fmp4 = format!(
            "{} -hls_segment_type fmp4 -f hls {{output_args|index.m3u8}}",
            &hls[..hls.find(" -f hls").unwrap()]
        );
        assert!(render(&fmp4, &none(), &none()).unwrap().hls);
    }

    #[test]
    fn variables_fill_placeholders_and_win_over_defaults() {
        let t = "-i {input_url} -b:v {video_bitrate|2M} -s {size}";
        let d = vars(&[("size", "1280x720")]);
        let r = render(t, &vars(&[("video_bitrate", "3M")]), &d).unwrap();
        assert!(r.args.windows(2).any(|w| w == ["-b:v", "3M"]));
        assert!(r.args.windows(2).any(|w| w == ["-s", "1280x720"]));
        assert_eq!(
            render("-i {input_url} -b:v {nope}", &none(), &none()).unwrap_err(),
            TemplateError::UnknownPlaceholder("nope".into())
        );
    }

    #[test]
    fn variables_cannot_smuggle_arguments() {
        let t = "-i {input_url} -b:v {video_bitrate|2M}";
        for bad in ["1M -y /tmp/x.ts", "1M;rm", "a b", "$(id)", ""] {
            let e = render(t, &vars(&[("video_bitrate", bad)]), &none()).unwrap_err();
            assert!(matches!(e, TemplateError::Variable { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn files_urls_and_second_outputs_are_refused_naming_the_token() {
        for (t, culprit) in [
            ("-i {input_url} -c copy -y /tmp/out.ts", "/tmp/out.ts"),
            ("-i {input_url} -c copy out.ts", "out.ts"),
            ("-i {input_url} -i /etc/passwd", "/etc/passwd"),
            ("-i /etc/passwd", "/etc/passwd"),
            ("-i http://evil.example/x.ts", "http://evil.example/x.ts"),
            ("-i {input_url} -vf movie=/etc/passwd", "movie=/etc/passwd"),
            ("-i {input_url} -vf subtitles=/x.srt", "subtitles=/x.srt"),
            ("-i {input_url} -af amovie=x.wav", "amovie=x.wav"),
            ("-i {input_url} -dump_attachment:t x", "-dump_attachment:t"),
            ("-i {input_url} -attach x.ttf", "-attach"),
            ("-i {input_url} -progress x", "-progress"),
            ("-i {input_url} -report", "-report"),
            ("-i {input_url} -f image2", "image2"),
            ("-i {input_url} -f tee", "tee"),
            ("-i {input_url} -map 1:v", "1:v"),
            (
                "-i {input_url} -hwaccel_device /dev/dri/card0",
                "-hwaccel_device",
            ),
            (
                "-i {input_url} -filter_complex [0:v]scale=1:1",
                "-filter_complex",
            ),
            ("-i {input_url} -f mpegts {output_args} extra", "extra"),
            ("-i {input_url} -metadata title=x", "-metadata"),
        ] {
            match render(t, &none(), &none()) {
                Err(TemplateError::Token { token, .. }) => assert_eq!(token, culprit, "{t}"),
                other => panic!("{t}: {other:?}"),
            }
        }
        assert!(matches!(
            render("-c:v libx264", &none(), &none()),
            Err(TemplateError::Token { .. })
        ));
        assert!(matches!(
            render("-i '{input_url}", &none(), &none()),
            Err(TemplateError::Syntax(_))
        ));
    }

    #[test]
    fn quotes_keep_a_filter_with_spaces_in_one_token() {
        let r = render(
            "-i {input_url} -vf 'scale=1280:-2, fps=25'",
            &none(),
            &none(),
        )
        .unwrap();
        assert!(r
            .args
            .windows(2)
            .any(|w| w == ["-vf", "scale=1280:-2, fps=25"]));
        assert!(
            render("-i {input_url} -c copy", &none(), &none())
                .unwrap()
                .copies_video
        );
    }
}
