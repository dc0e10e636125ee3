//! The fallbacks when a page has no plain MPEG-TS URL: the resolver writes
//! the media to its stdout (`streamlink --stdout`, `yt-dlp -o -`), or ffmpeg
//! remuxes a file such as MP4 to MPEG-TS ([`remux`]); either is read like a
//! provider's body. The process lives as long as the body: when the
//! channel's reader lets go of it, the tool gets SIGTERM, then SIGKILL, and
//! is reaped.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::resolve::{argv, Want};
use super::ResolverSpec;
use crate::app::App;
use crate::registry::StreamSpec;
use crate::transcode::process::{self, Process};
use crate::transcode::source::{stdout_body, Body};

const STOP_GRACE: Duration = Duration::from_secs(2);
const READ_CHUNK: usize = 64 * 1024;
/// What the tool may take to start writing (it resolves the page first).
const FIRST_OUTPUT: Duration = Duration::from_secs(30);

/// Starts the tool on `page` and waits for its first bytes: `(body, first)`.
pub async fn open(
    app: &App,
    id: &str,
    spec: &StreamSpec,
    r: &ResolverSpec,
    page: &str,
) -> Result<(Body, Bytes), String> {
    let program = r.tool.program(&app.config.resolvers);
    let args = argv(app, spec, r, page, Want::Media);
    run(program.as_os_str(), &args, r.tool.name(), id).await
}

/// Media that is not MPEG-TS (MP4, WebM, Matroska, ...: what yt-dlp names
/// for most videos) remuxed by ffmpeg to MPEG-TS at its own pace (`-re`),
/// so the hub can share it and viewers can join mid-stream. The stream's
/// user agent and headers go with ffmpeg's request.
pub async fn remux(
    app: &App,
    id: &str,
    spec: &StreamSpec,
    media: &url::Url,
) -> Result<(Body, Bytes), String> {
    let ua = app.user_agent_for(spec, media);
    let headers: String = app
        .headers_for(spec, media)
        .into_iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let mut args: Vec<String> = ["-hide_banner", "-nostdin", "-loglevel", "error", "-re"]
        .map(String::from)
        .to_vec();
    args.extend(["-user_agent".into(), ua]);
    if !headers.is_empty() {
        args.extend(["-headers".into(), headers]);
    }
    args.extend(
        [
            "-i",
            media.as_str(),
            "-map",
            "0:v:0?",
            "-map",
            "0:a:0?",
            "-c",
            "copy",
            "-f",
            "mpegts",
            "pipe:1",
        ]
        .map(String::from),
    );
    run(
        app.config.transcode.ffmpeg.as_os_str(),
        &args,
        "ffmpeg (remux)",
        id,
    )
    .await
}

/// Starts `program` and waits for its first bytes on stdout.
async fn run(
    program: &std::ffi::OsStr,
    args: &[impl AsRef<std::ffi::OsStr>],
    name: &str,
    id: &str,
) -> Result<(Body, Bytes), String> {
    let (proc, pipes) = process::spawn(program, args, &format!("{name} {id}"))
        .map_err(|e| format!("{name} could not start: {e}"))?;
    drop(pipes.stdin);
    let mut stdout = pipes.stdout;
    let mut first = vec![0u8; READ_CHUNK];
    let n = match tokio::time::timeout(FIRST_OUTPUT, stdout.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        other => {
            let status = proc.stop(STOP_GRACE).await;
            return Err(match other {
                Err(_) => format!("{name} wrote nothing for {FIRST_OUTPUT:?}"),
                _ => format!("{name} ended before writing ({status:?})"),
            });
        }
    };
    first.truncate(n);
    let guard = Guard(Some(proc));
    Ok((stdout_body(stdout, READ_CHUNK, guard), Bytes::from(first)))
}

struct Guard(Option<Process>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            // Reaped in the background: a Drop cannot wait.
            tokio::spawn(p.stop(STOP_GRACE));
        }
    }
}
