//! The source of a transcoded live channel: ffmpeg, fed from the original
//! stream's live channel as one more viewer of it, its MPEG-TS stdout read
//! like a provider's body. So raw and transcoded viewers of one channel cost
//! one provider connection, N viewers of one profile cost one ffmpeg, and
//! joins, slow-viewer drops, failover and teardown are the hub's.
//!
//! Teardown: when the transcoded channel's reader lets go of the body (its
//! last viewer left, the stream was deleted, or ffmpeg failed), the feeder
//! leaves the original channel (whose provider connection closes if nobody
//! else watches it) and ffmpeg gets SIGTERM, then SIGKILL, and is reaped.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, ChildStdout};
use tokio::task::JoinHandle;
use tokio_util::io::ReaderStream;

use super::process::{self, Process};
use crate::app::App;
use crate::config::{HwAccel, TranscodeConfig};
use crate::conn::caps::Slot;
use crate::hub::{Next, Viewer};
use crate::registry::TranscodeSpec;

/// How long ffmpeg gets after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// ffmpeg output is read in pieces of this size.
const READ_CHUNK: usize = 64 * 1024;
/// Beyond the provider's own time, what ffmpeg may take to start writing.
const FIRST_OUTPUT_EXTRA: Duration = Duration::from_secs(10);

/// What the hub reader pumps.
pub type Body = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

/// Why a transcoded source could not open.
#[derive(Debug)]
pub enum OpenError {
    /// `transcode.max_processes` ffmpeg processes run already.
    Full(usize),
    Failed(String),
}

/// Starts ffmpeg for `spec` and waits for its first output: `(body, first bytes)`.
pub async fn open(
    app: &Arc<App>,
    stream_id: &str,
    spec: &TranscodeSpec,
) -> Result<(Body, Bytes), OpenError> {
    let slot = app
        .transcoders
        .take(None)
        .map_err(|_| OpenError::Full(app.config.transcode.max_processes))?;
    let source = app
        .registry
        .get(&spec.source)
        .ok_or_else(|| OpenError::Failed("its source stream is gone".into()))?;
    let cfg = &app.config.transcode;
    let args = with_hwaccel(&spec.args, cfg);
    let (proc, pipes) = process::spawn(
        cfg.ffmpeg.as_os_str(),
        &args,
        &format!("ffmpeg {stream_id}"),
    )
    .map_err(|e| OpenError::Failed(format!("ffmpeg could not start: {e}")))?;
    let feeder = tokio::spawn(feed(
        app.clone(),
        source,
        stream_id.to_string(),
        pipes.stdin,
    ));
    let mut stdout = pipes.stdout;
    let wait =
        app.config.upstream.connect_timeout + app.config.upstream.read_timeout + FIRST_OUTPUT_EXTRA;
    let mut first = vec![0u8; READ_CHUNK];
    let n = match tokio::time::timeout(wait, stdout.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        other => {
            feeder.abort();
            let status = proc.stop(STOP_GRACE).await;
            let why = match other {
                Err(_) => format!("ffmpeg wrote nothing for {wait:?}"),
                _ => format!("ffmpeg ended before writing ({status:?})"),
            };
            return Err(OpenError::Failed(why));
        }
    };
    first.truncate(n);
    let guard = Guard {
        process: Some(proc),
        feeder,
        _slot: slot,
    };
    Ok((stdout_body(stdout, READ_CHUNK, guard), Bytes::from(first)))
}

/// Copies the source channel's bytes into ffmpeg's stdin until either ends.
/// Boxed with its `Send` spelled out: joining a channel spawns its reader,
/// which may open a transcode, which joins a channel; an opaque future type
/// would be defined in terms of itself.
fn feed(
    app: Arc<App>,
    source: Arc<crate::registry::Stream>,
    transcoded: String,
    stdin: ChildStdin,
) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(feed_inner(app, source, transcoded, stdin))
}

async fn feed_inner(
    app: Arc<App>,
    source: Arc<crate::registry::Stream>,
    transcoded: String,
    mut stdin: ChildStdin,
) {
    // Listed as a client of the source while it reads: the source is in use
    // (a re-POST of its URL keeps it, as for any watched stream).
    let hello = crate::registry::ClientHello {
        explicit_id: Some(format!("transcode-{transcoded}")),
        ip: format!("transcode:{transcoded}"),
        user_agent: "m3u-edge transcoder".into(),
        username: None,
    };
    let _client = match app.registry.attach(&source, &hello) {
        Ok(g) => g,
        Err(why) => {
            tracing::warn!(stream_id = %source.id, reason = why.message(), "transcode source refused");
            return;
        }
    };
    // ffmpeg may fall behind the ring (a slow start on a busy box): then it
    // rejoins at the live edge, a jump it decodes through, instead of ending.
    loop {
        let mut viewer = match app.hub.join(&app, &source).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(stream_id = %source.id, error = ?e, "transcode source unavailable");
                return;
            }
        };
        if let Fed::Done = copy_into(&mut viewer, &mut stdin, READ_CHUNK * 2).await {
            return;
        }
        tracing::debug!(stream_id = %source.id, transcoded = %transcoded, "transcoder fell behind its source: rejoining at the live edge");
    }
}

/// How [`copy_into`] ended.
pub enum Fed {
    /// The child fell behind the ring: join again at the live edge.
    Lagged,
    /// The channel or the child ended.
    Done,
}

/// Copies `viewer`'s bytes into a child's `stdin`, up to `max` at a time,
/// until the child falls behind the ring or either side ends.
pub async fn copy_into(viewer: &mut Viewer, stdin: &mut ChildStdin, max: usize) -> Fed {
    loop {
        let data = match viewer.next(max).await {
            Next::Data(b) => b,
            Next::Span(span) => match span.bytes() {
                Ok(b) => b,
                Err(_) => return Fed::Lagged,
            },
            Next::Lagged => return Fed::Lagged,
            Next::Ended => return Fed::Done,
        };
        if stdin.write_all(&data).await.is_err() {
            return Fed::Done;
        }
    }
}

/// The body of a child's `stdout`, read `chunk` bytes at a time, holding
/// `guard` (what stops the child) for as long as the body lives.
pub fn stdout_body<G: Send + 'static>(stdout: ChildStdout, chunk: usize, guard: G) -> Body {
    let body = ReaderStream::with_capacity(stdout, chunk)
        .take_while(|r| futures::future::ready(r.is_ok()))
        .filter_map(move |r| {
            // Dropping the body drops the guard, which stops the child.
            let _ = &guard;
            futures::future::ready(r.ok().map(Ok))
        });
    Box::pin(body)
}

/// Owns what a running transcode holds.
struct Guard {
    process: Option<Process>,
    feeder: JoinHandle<()>,
    _slot: Slot<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.feeder.abort();
        if let Some(p) = self.process.take() {
            // Reaped in the background: a Drop cannot wait.
            tokio::spawn(p.stop(STOP_GRACE));
        }
    }
}

/// Adds the decode and encode arguments of `transcode.hwaccel`: decoding on
/// the GPU before the input, and the software encoders swapped for the
/// GPU's.
pub fn with_hwaccel(args: &[String], cfg: &TranscodeConfig) -> Vec<String> {
    let device = cfg
        .device
        .clone()
        .unwrap_or_else(|| "/dev/dri/renderD128".into());
    let (decode, h264, hevc): (Vec<String>, &str, &str) = match cfg.hwaccel {
        HwAccel::None => return args.to_vec(),
        HwAccel::Vaapi => (
            ["-hwaccel", "vaapi", "-vaapi_device", &device]
                .map(String::from)
                .to_vec(),
            "h264_vaapi",
            "hevc_vaapi",
        ),
        HwAccel::Qsv => (
            ["-hwaccel", "qsv", "-qsv_device", &device]
                .map(String::from)
                .to_vec(),
            "h264_qsv",
            "hevc_qsv",
        ),
        HwAccel::Nvenc => (
            ["-hwaccel", "cuda"].map(String::from).to_vec(),
            "h264_nvenc",
            "hevc_nvenc",
        ),
    };
    let mut out = Vec::with_capacity(args.len() + decode.len() + 2);
    for a in args {
        if a == "-i" {
            out.extend(decode.iter().cloned());
        }
        out.push(match a.as_str() {
            "libx264" => h264.to_string(),
            "libx265" => hevc.to_string(),
            _ => a.clone(),
        });
    }
    if cfg.hwaccel == HwAccel::Vaapi {
        // Frames decoded in system memory go up to the GPU for the encoder.
        let at = out
            .iter()
            .position(|a| a == "pipe:0")
            .map_or(out.len(), |i| i + 1);
        out.splice(
            at..at,
            ["-vf".to_string(), "format=nv12,hwupload".to_string()],
        );
    }
    out
}

/// What the ffmpeg found can do, probed once at start.
#[derive(Debug, Clone, Default)]
pub struct Ffmpeg {
    /// The first line of `ffmpeg -version`; None when it cannot run.
    pub version: Option<String>,
    /// The configured `transcode.hwaccel` is in `ffmpeg -hwaccels`.
    pub hwaccel_available: bool,
}

/// Runs `ffmpeg -version` and `ffmpeg -hwaccels` (each returns at once).
pub fn probe(cfg: &TranscodeConfig) -> Ffmpeg {
    let run = |args: &[&str]| {
        std::process::Command::new(&cfg.ffmpeg)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let version = run(&["-version"]).and_then(|t| t.lines().next().map(|l| l.trim().to_string()));
    let hwaccel_available = version.is_some()
        && cfg.hwaccel != HwAccel::None
        && run(&["-hide_banner", "-hwaccels"]).is_some_and(|t| {
            t.lines().skip(1).any(|l| {
                let l = l.trim();
                l == cfg.hwaccel.as_str() || (cfg.hwaccel == HwAccel::Nvenc && l == "cuda")
            })
        });
    Ffmpeg {
        version,
        hwaccel_available,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hwaccel_adds_decode_arguments_and_swaps_encoders() {
        let args: Vec<String> = ["-i", "pipe:0", "-c:v", "libx264", "-f", "mpegts", "pipe:1"]
            .map(String::from)
            .to_vec();
        let mut cfg = TranscodeConfig::default();
        assert_eq!(with_hwaccel(&args, &cfg), args);
        cfg.hwaccel = HwAccel::Nvenc;
        assert_eq!(
            with_hwaccel(&args, &cfg).join(" "),
            "-hwaccel cuda -i pipe:0 -c:v h264_nvenc -f mpegts pipe:1"
        );
        cfg.hwaccel = HwAccel::Vaapi;
        cfg.device = Some("/dev/dri/renderD129".into());
        assert_eq!(
            with_hwaccel(&args, &cfg).join(" "),
            "-hwaccel vaapi -vaapi_device /dev/dri/renderD129 -i pipe:0 -vf format=nv12,hwupload -c:v h264_vaapi -f mpegts pipe:1"
        );
    }
}
