//! `resolver_args` from the API, checked against an allowlist. m3u-proxy hands
//! them to the whole CLI (`best --exec "before_dl:touch F"` ran a command on
//! its host); here they are split like a shell would (no shell runs), every
//! option is looked up in a short list of harmless ones, its value checked,
//! and the argv rebuilt in one canonical `--name=value` form so no value can
//! be read by the tool as an option of its own.

use super::Tool;

/// What an allowed option takes.
#[derive(Clone, Copy)]
enum Value {
    /// A whole number in this range.
    Count(u32, u32),
    /// An HTTP header: `Name=Value` (streamlink) or `Name:Value` (yt-dlp).
    Header(char),
    /// A format selector or sort order (`bestvideo[height<=720]+bestaudio/best`).
    Selector,
    /// A flag without a value.
    Flag,
}

/// `(accepted spellings, canonical name, value)`.
type Allowed = (&'static [&'static str], &'static str, Value);

const STREAMLINK: &[Allowed] = &[
    (&["--hls-live-edge"], "--hls-live-edge", Value::Count(1, 20)),
    (
        &["--stream-segment-threads"],
        "--stream-segment-threads",
        Value::Count(1, 10),
    ),
    (&["--http-header"], "--http-header", Value::Header('=')),
    (&["--retry-streams"], "--retry-streams", Value::Count(0, 60)),
    (&["--retry-max"], "--retry-max", Value::Count(0, 100)),
    (&["--retry-open"], "--retry-open", Value::Count(1, 100)),
    (
        &["--stream-segment-attempts"],
        "--stream-segment-attempts",
        Value::Count(1, 100),
    ),
    (
        &["--stream-segment-timeout"],
        "--stream-segment-timeout",
        Value::Count(1, 600),
    ),
    (
        &["--stream-timeout"],
        "--stream-timeout",
        Value::Count(1, 600),
    ),
    (
        &["--hls-playlist-reload-attempts"],
        "--hls-playlist-reload-attempts",
        Value::Count(1, 100),
    ),
    (&["--hls-live-restart"], "--hls-live-restart", Value::Flag),
];

const YTDLP: &[Allowed] = &[
    (&["-f", "--format"], "--format", Value::Selector),
    (&["-S", "--format-sort"], "--format-sort", Value::Selector),
    (&["--no-playlist"], "--no-playlist", Value::Flag),
    (&["--add-header"], "--add-header", Value::Header(':')),
    (&["-R", "--retries"], "--retries", Value::Count(0, 100)),
    (
        &["--fragment-retries"],
        "--fragment-retries",
        Value::Count(0, 100),
    ),
    (
        &["--extractor-retries"],
        "--extractor-retries",
        Value::Count(0, 100),
    ),
];

/// `resolver_args` as the tool will get them: the stream selector and the
/// allowed options, each `--name=value` or `--flag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub selector: String,
    pub options: Vec<String>,
}

/// The contract's default selector when `resolver_args` is empty.
pub fn default_selector(tool: Tool) -> &'static str {
    match tool {
        Tool::Streamlink => "best",
        Tool::YtDlp => "bestvideo+bestaudio/best",
    }
}

/// Checks `raw` for `tool`. `Err` names the first option or value refused.
pub fn check(tool: Tool, raw: &str) -> Result<Checked, String> {
    let words = shell_words::split(raw)
        .map_err(|e| format!("resolver_args could not be split into words: {e}"))?;
    let table = match tool {
        Tool::Streamlink => STREAMLINK,
        Tool::YtDlp => YTDLP,
    };
    let mut selector: Option<String> = None;
    let mut options = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        if !word.starts_with('-') || word == "-" {
            if selector.is_some() {
                return Err(format!(
                    "resolver_args: only one stream selector is allowed, got a second one: '{word}'"
                ));
            }
            check_selector(&word)?;
            selector = Some(word);
            continue;
        }
        let (name, inline) = match word.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (word.clone(), None),
        };
        let Some((_, canonical, kind)) = table.iter().find(|(names, _, _)| names.contains(&&*name))
        else {
            return Err(format!(
                "resolver_args: option '{name}' is not allowed for {} (allowed: {})",
                tool.name(),
                allowed_list(table)
            ));
        };
        if let Value::Flag = kind {
            if inline.is_some() {
                return Err(format!("resolver_args: option '{name}' takes no value"));
            }
            options.push((*canonical).to_string());
            continue;
        }
        let Some(value) = inline.or_else(|| words.next()) else {
            return Err(format!("resolver_args: option '{name}' needs a value"));
        };
        check_value(&name, *kind, &value)?;
        if *canonical == "--format" {
            // yt-dlp's `-f` is the selector itself.
            if selector.is_some() {
                return Err("resolver_args: only one stream selector is allowed".into());
            }
            selector = Some(value);
            continue;
        }
        options.push(format!("{canonical}={value}"));
    }
    Ok(Checked {
        selector: selector.unwrap_or_else(|| default_selector(tool).to_string()),
        options,
    })
}

fn allowed_list(table: &[Allowed]) -> String {
    let mut names: Vec<&str> = table
        .iter()
        .flat_map(|(n, _, _)| n.iter().copied())
        .collect();
    names.insert(0, "a stream selector");
    names.join(", ")
}

/// Characters of quality names (`best`, `720p,480p`) and yt-dlp format
/// selectors and sort orders (`bv*[height<=720]+ba/b`, `res:720,fps`).
fn check_selector(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+,./[]<>=!*:?^$|~()".contains(c) || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "resolver_args: '{s}' is not a valid stream selector (letters, digits and _+,./[]<>=!*:?^$|~()- only)"
        ))
    }
}

fn check_value(name: &str, kind: Value, v: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("resolver_args: value of '{name}' {why}: '{v}'"));
    if v.starts_with('-') {
        return bad("may not start with '-'");
    }
    match kind {
        Value::Count(lo, hi) => match v.parse::<u32>() {
            Ok(n) if (lo..=hi).contains(&n) => Ok(()),
            _ => bad(&format!("must be a whole number from {lo} to {hi}")),
        },
        Value::Header(sep) => {
            let Some((k, val)) = v.split_once(sep) else {
                return bad(&format!("must be Name{sep}Value"));
            };
            if http::HeaderName::from_bytes(k.trim().as_bytes()).is_err()
                || http::HeaderValue::from_str(val.trim()).is_err()
            {
                return bad("is not a valid HTTP header");
            }
            Ok(())
        }
        Value::Selector => check_selector(v),
        Value::Flag => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_args_mean_the_contract_defaults() {
        let c = check(Tool::Streamlink, "").unwrap();
        assert_eq!(c.selector, "best");
        assert!(c.options.is_empty());
        let c = check(Tool::YtDlp, "  ").unwrap();
        assert_eq!(c.selector, "bestvideo+bestaudio/best");
    }

    #[test]
    fn m3u_editors_defaults_pass_in_canonical_form() {
        let c = check(Tool::Streamlink, "best --hls-live-edge 3").unwrap();
        assert_eq!(c.selector, "best");
        assert_eq!(c.options, ["--hls-live-edge=3"]);
        let c = check(Tool::YtDlp, "bestvideo+bestaudio/best --no-playlist").unwrap();
        assert_eq!(c.selector, "bestvideo+bestaudio/best");
        assert_eq!(c.options, ["--no-playlist"]);
        let c = check(
            Tool::YtDlp,
            "-f 'bv*[height<=720]+ba/b' -S res:720 --add-header 'Referer: http://x/'",
        )
        .unwrap();
        assert_eq!(c.selector, "bv*[height<=720]+ba/b");
        assert_eq!(
            c.options,
            ["--format-sort=res:720", "--add-header=Referer: http://x/"]
        );
    }

    #[test]
    fn dangerous_options_are_refused_by_name() {
        for (tool, args, name) in [
            (
                Tool::YtDlp,
                "best --exec 'before_dl:touch /tmp/x'",
                "--exec",
            ),
            (Tool::YtDlp, "-o /tmp/x", "-o"),
            (
                Tool::YtDlp,
                "--config-locations /etc/x",
                "--config-locations",
            ),
            (Tool::YtDlp, "--exe=x", "--exe"),
            (Tool::Streamlink, "best --plugin-dirs /tmp", "--plugin-dirs"),
            (Tool::Streamlink, "best --output=/tmp/x", "--output"),
            (Tool::Streamlink, "best --config /tmp/c", "--config"),
            (Tool::Streamlink, "best -p vlc", "-p"),
            (
                Tool::Streamlink,
                "best --hls-live-edge=3 --record x",
                "--record",
            ),
            (Tool::Streamlink, "best --no-playlist", "--no-playlist"),
        ] {
            let e = check(tool, args).unwrap_err();
            assert!(e.contains(&format!("'{name}'")), "{args}: {e}");
        }
    }

    #[test]
    fn values_cannot_smuggle_options() {
        assert!(check(Tool::Streamlink, "best --http-header --exec=x").is_err());
        assert!(check(Tool::Streamlink, "best --hls-live-edge 999").is_err());
        assert!(check(Tool::Streamlink, "best --hls-live-edge").is_err());
        assert!(check(Tool::Streamlink, "best worst").is_err());
        assert!(check(Tool::Streamlink, "'best;rm -rf /'").is_err());
        assert!(check(Tool::Streamlink, "best 'unterminated").is_err());
        assert!(check(Tool::YtDlp, "--no-playlist=1").is_err());
        let c = check(Tool::Streamlink, "720p,best --http-header 'X-A=b c'").unwrap();
        assert_eq!(c.options, ["--http-header=X-A=b c"]);
    }
}
