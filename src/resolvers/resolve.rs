//! Running a resolver: the argv (no shell; the tools' own config files,
//! plugin sideloading and caches off), and the resolution of a page to a
//! media URL (`streamlink --stream-url`, `yt-dlp --get-url`).

use std::ffi::OsString;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use url::Url;

use super::{Resolved, ResolverSpec, Tool};
use crate::app::App;
use crate::registry::StreamSpec;
use crate::transcode::process;

/// How long a resolution may take (a cold yt-dlp on a busy box takes seconds).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Resolver output read at most (a few URLs).
const MAX_OUTPUT: u64 = 64 * 1024;

/// What the tool is asked for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The media URL on stdout.
    Url,
    /// The media itself on stdout.
    Media,
}

/// The argv of `r.tool` for `page`: the stream's user agent and headers, the
/// cookies file, the allowed options, then the page and selector after `--`.
pub fn argv(
    app: &App,
    spec: &StreamSpec,
    r: &ResolverSpec,
    page: &str,
    want: Want,
) -> Vec<OsString> {
    let ua = spec
        .user_agent
        .clone()
        .unwrap_or_else(|| app.config.upstream.user_agent.clone());
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: String| a.push(OsString::from(s));
    match r.tool {
        Tool::Streamlink => {
            for s in [
                "--no-config",
                "--no-plugin-sideloading",
                "--no-plugin-cache",
                "--loglevel=warning",
            ] {
                push(s.into());
            }
            push(format!("--http-header=User-Agent={ua}"));
            for (k, v) in &spec.headers {
                push(format!("--http-header={k}={v}"));
            }
            if let Some(c) = &r.cookies {
                push(format!("--http-cookies-file={}", c.display()));
            }
            push(match want {
                Want::Url => "--stream-url".into(),
                Want::Media => "--stdout".into(),
            });
            for o in &r.options {
                push(o.clone());
            }
            push("--".into());
            push(page.to_string());
            push(r.selector.clone());
        }
        Tool::YtDlp => {
            for s in [
                "--ignore-config",
                "--no-cache-dir",
                "--no-warnings",
                "--no-progress",
                "--no-playlist",
            ] {
                push(s.into());
            }
            push(format!("--add-header=User-Agent:{ua}"));
            for (k, v) in &spec.headers {
                push(format!("--add-header={k}:{v}"));
            }
            if let Some(c) = &r.cookies {
                push(format!("--cookies={}", c.display()));
            }
            match want {
                Want::Url => push("--get-url".into()),
                Want::Media => {
                    push("--quiet".into());
                    push("--output=-".into());
                }
            }
            for o in &r.options {
                push(o.clone());
            }
            push(format!("--format={}", r.selector));
            push("--".into());
            push(page.to_string());
        }
    }
    a
}

/// Whether a URL is media the live hub can pump (not a playlist or manifest).
fn is_plain(u: &Url) -> bool {
    let path = u.path().to_ascii_lowercase();
    matches!(u.scheme(), "http" | "https")
        && u.host_str().is_some()
        && !path.ends_with(".m3u8")
        && !path.ends_with(".m3u")
        && !path.ends_with(".mpd")
}

/// What the tool's `--stream-url`/`--get-url` output means: one plain media
/// URL, or none to fetch (so the tool's stdout it is).
pub fn interpret(stdout: &str) -> Resolved {
    let lines: Vec<&str> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    match lines.as_slice() {
        [one] => match Url::parse(one) {
            Ok(u) if is_plain(&u) => Resolved::Url(u),
            _ => Resolved::Pipe,
        },
        _ => Resolved::Pipe,
    }
}

/// Resolves `page` for stream `id`, from the cache unless `fresh`.
/// Returns the resolution and whether it came from the cache.
pub async fn resolve(
    app: &App,
    id: &str,
    spec: &StreamSpec,
    r: &ResolverSpec,
    page: &str,
    fresh: bool,
) -> Result<(Resolved, bool), String> {
    if !fresh {
        if let Some(hit) = app.resolvers.cached(id, page) {
            return Ok((hit, true));
        }
    }
    let program = r.tool.program(&app.config.resolvers);
    let args = argv(app, spec, r, page, Want::Url);
    let (proc, pipes) = process::spawn(
        program.as_os_str(),
        &args,
        &format!("{} resolve {id}", r.tool.name()),
    )
    .map_err(|e| format!("{} could not start: {e}", r.tool.name()))?;
    drop(pipes.stdin);
    let mut out = Vec::new();
    let read = tokio::time::timeout(
        RESOLVE_TIMEOUT,
        pipes.stdout.take(MAX_OUTPUT).read_to_end(&mut out),
    )
    .await;
    let mut proc = proc;
    let status = match read {
        Ok(_) => tokio::time::timeout(Duration::from_secs(5), proc.wait())
            .await
            .ok()
            .flatten(),
        Err(_) => None,
    };
    let Some(status) = status else {
        proc.stop(Duration::from_secs(1)).await;
        return Err(format!(
            "{} did not answer within {RESOLVE_TIMEOUT:?}",
            r.tool.name()
        ));
    };
    let text = String::from_utf8_lossy(&out);
    if !status.success() {
        // streamlink says why on stdout (`error: No plugin can handle URL`).
        let why = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no output")
            .chars()
            .take(300)
            .collect::<String>();
        return Err(format!("{} failed ({status}): {why}", r.tool.name()));
    }
    let resolved = interpret(&text);
    tracing::info!(stream_id = %id, tool = r.tool.name(), plain_url = matches!(resolved, Resolved::Url(_)), "page resolved");
    app.resolvers.remember(id, page, resolved.clone());
    Ok((resolved, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_plain_url_is_fetched_anything_else_piped() {
        assert!(matches!(
            interpret("https://cdn.example/v.ts?sig=1\n"),
            Resolved::Url(_)
        ));
        assert_eq!(
            interpret("https://cdn.example/index.m3u8\n"),
            Resolved::Pipe
        );
        assert_eq!(
            interpret("https://a/v.mp4\nhttps://a/a.m4a\n"),
            Resolved::Pipe
        );
        assert_eq!(interpret("file:///etc/passwd\n"), Resolved::Pipe);
        assert_eq!(interpret(""), Resolved::Pipe);
    }
}
