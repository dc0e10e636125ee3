//! The fallback when a page has no plain media URL: the resolver writes the
//! media to its stdout (`streamlink --stdout`, `yt-dlp -o -`), read like a
//! provider's body. The process lives as long as the body: when the
//! channel's reader lets go of it, the tool gets SIGTERM, then SIGKILL, and
//! is reaped.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio_util::io::ReaderStream;

use super::resolve::{argv, Want};
use super::ResolverSpec;
use crate::app::App;
use crate::registry::StreamSpec;
use crate::transcode::process::{self, Process};
use crate::transcode::source::Body;

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
    let (proc, pipes) = process::spawn(
        program.as_os_str(),
        &args,
        &format!("{} {id}", r.tool.name()),
    )
    .map_err(|e| format!("{} could not start: {e}", r.tool.name()))?;
    drop(pipes.stdin);
    let mut stdout = pipes.stdout;
    let mut first = vec![0u8; READ_CHUNK];
    let n = match tokio::time::timeout(FIRST_OUTPUT, stdout.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        other => {
            let status = proc.stop(STOP_GRACE).await;
            return Err(match other {
                Err(_) => format!("{} wrote nothing for {FIRST_OUTPUT:?}", r.tool.name()),
                _ => format!("{} ended before writing ({status:?})", r.tool.name()),
            });
        }
    };
    first.truncate(n);
    let guard = Guard(Some(proc));
    let body = ReaderStream::with_capacity(stdout, READ_CHUNK)
        .take_while(|r| futures::future::ready(r.is_ok()))
        .filter_map(move |r| {
            // The guard lives as long as the body: dropping the body stops the tool.
            let _ = &guard;
            futures::future::ready(r.ok().map(Ok))
        });
    Ok((Box::pin(body), Bytes::from(first)))
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
