//! Silence detection (`enable_silence_detection`): a live channel whose audio
//! goes quiet (a provider's dead feed with a still picture) fails over to
//! its next source while its viewers stay connected.
//!
//! The check runs beside the channel, off the relay path: ffmpeg's
//! `silencedetect` decodes the audio only (`-vn`) from a cursor on the
//! channel's ring (no extra provider connection, and it does not count as a
//! viewer, so it never keeps a channel open). Every `silence_check_interval`
//! the audio is either in a silence (below `silence_threshold_db` for at
//! least `silence_duration`) or not; after `silence_monitoring_grace_period`
//! from each new source, `silence_failover_threshold` silent checks in a row
//! switch the channel to its next source, in order, with reason `silence`.
//! ffmpeg restarts with each source and is stopped and reaped with the
//! channel.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::ChildStdin;

use crate::app::App;
use crate::hub::{Channel, Phase};
use crate::transcode::process;
use crate::transcode::source::{copy_into, Fed};

/// ffmpeg gets this long after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// After ffmpeg ended by itself (no audio track, bad input), wait this long
/// before starting it again.
const RESTART_AFTER: Duration = Duration::from_secs(10);
/// How often the source is looked at for a switch.
const POLL: Duration = Duration::from_millis(250);

/// The thresholds of one stream (m3u-proxy's fields and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SilenceSpec {
    /// Audio below this level counts as silence (`silence_threshold_db`, -50).
    pub threshold_db: f64,
    /// ...when it lasts this many seconds (`silence_duration`, 3).
    pub duration: f64,
    /// Seconds between checks (`silence_check_interval`, 10).
    pub check_interval: f64,
    /// Silent checks in a row that switch the source (`silence_failover_threshold`, 3).
    pub failover_threshold: u32,
    /// Seconds after a source starts before checks count (`silence_monitoring_grace_period`, 15).
    pub grace: f64,
}

impl Default for SilenceSpec {
    fn default() -> Self {
        SilenceSpec {
            threshold_db: -50.0,
            duration: 3.0,
            check_interval: 10.0,
            failover_threshold: 3,
            grace: 15.0,
        }
    }
}

impl SilenceSpec {
    /// The `silencedetect` filter of these thresholds.
    pub fn filter(&self) -> String {
        format!(
            "silencedetect=noise={}dB:d={}",
            self.threshold_db, self.duration
        )
    }

    /// Checks the ranges (the API answers 422 naming the field otherwise).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let ok = |f: f64, lo: f64, hi: f64| f.is_finite() && f >= lo && f <= hi;
        if !ok(self.threshold_db, -120.0, 0.0) {
            return Err(("silence_threshold_db", "must be from -120 to 0 dB".into()));
        }
        if !ok(self.duration, 0.1, 3600.0) {
            return Err((
                "silence_duration",
                "must be from 0.1 to 3600 seconds".into(),
            ));
        }
        if !ok(self.check_interval, 0.1, 3600.0) {
            return Err((
                "silence_check_interval",
                "must be from 0.1 to 3600 seconds".into(),
            ));
        }
        if !(1..=1000).contains(&self.failover_threshold) {
            return Err((
                "silence_failover_threshold",
                "must be from 1 to 1000".into(),
            ));
        }
        if !ok(self.grace, 0.0, 86400.0) {
            return Err((
                "silence_monitoring_grace_period",
                "must be from 0 to 86400 seconds".into(),
            ));
        }
        Ok(())
    }
}

/// The ffmpeg argv: MPEG-TS on stdin, audio decoded, nothing written.
pub fn ffmpeg_args(s: &SilenceSpec) -> Vec<String> {
    [
        "-hide_banner",
        "-nostats",
        "-loglevel",
        "info",
        "-fflags",
        "+discardcorrupt",
        "-f",
        "mpegts",
        "-i",
        "pipe:0",
        "-vn",
        "-sn",
        "-dn",
        "-map",
        "0:a:0",
        "-af",
        &s.filter(),
        "-f",
        "null",
        "-",
    ]
    .map(String::from)
    .to_vec()
}

/// Watches `ch` until it closes. Spawned by the channel's reader.
pub async fn watch(app: Arc<App>, ch: Arc<Channel>, spec: SilenceSpec) {
    let mut phase = ch.phase_watch();
    loop {
        // Wait for bytes to flow.
        loop {
            if ch.is_closed() {
                return;
            }
            match ch.phase() {
                Phase::Live => break,
                Phase::Connecting => {}
                // A file, an HLS playlist, or the end: nothing to watch.
                _ => return,
            }
            tokio::select! {
                _ = ch.cancelled() => return,
                r = phase.changed() => if r.is_err() { return },
            }
        }
        match check_source(&app, &ch, &spec).await {
            Checked::Closed => return,
            Checked::SourceChanged => {}
            Checked::Triggered if !has_other_source(&ch) => {
                // Reconnecting the one source would only cut the viewers off.
                tracing::warn!(stream_id = %ch.stream.id, "silence detected, but the stream has no other source");
            }
            Checked::Triggered => {
                tracing::warn!(stream_id = %ch.stream.id, "silence detected: switching to the next source");
                let epoch = ch.source_epoch();
                ch.request_failover("silence detected");
                // Until the reader moved on (or the channel closed).
                while ch.source_epoch() == epoch && !ch.is_closed() {
                    tokio::select! {
                        _ = ch.cancelled() => return,
                        _ = tokio::time::sleep(POLL) => {}
                    }
                }
            }
            Checked::Ended(why) => {
                tracing::debug!(stream_id = %ch.stream.id, %why, "silence check ended; restarting later");
                tokio::select! {
                    _ = ch.cancelled() => return,
                    _ = tokio::time::sleep(RESTART_AFTER) => {}
                }
            }
        }
    }
}

/// Whether a switch could land anywhere else.
fn has_other_source(ch: &Channel) -> bool {
    let spec = ch.stream.spec();
    !spec.failover_urls.is_empty() || spec.failover_resolver_url.is_some()
}

enum Checked {
    Closed,
    SourceChanged,
    Triggered,
    Ended(String),
}

/// Runs ffmpeg over the current source until silence triggers, the source
/// changes, the channel closes or ffmpeg ends. ffmpeg is stopped and reaped
/// before this returns.
async fn check_source(app: &Arc<App>, ch: &Arc<Channel>, spec: &SilenceSpec) -> Checked {
    let epoch = ch.source_epoch();
    let (proc, pipes, stderr) = match process::spawn_reading_stderr(
        app.config.transcode.ffmpeg.as_os_str(),
        &ffmpeg_args(spec),
        &format!("silencedetect {}", ch.stream.id),
    ) {
        Ok(p) => p,
        Err(e) => return Checked::Ended(format!("ffmpeg could not start: {e}")),
    };
    let feeder = tokio::spawn(feed(app.clone(), ch.clone(), pipes.stdin));
    let mut lines = BufReader::new(stderr).lines();
    let interval = Duration::from_secs_f64(spec.check_interval);
    let grace_end = tokio::time::Instant::now() + Duration::from_secs_f64(spec.grace);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(POLL);
    let mut silent = false;
    let mut silent_checks = 0u32;
    let outcome = loop {
        tokio::select! {
            _ = ch.cancelled() => break Checked::Closed,
            _ = poll.tick() => {
                if ch.source_epoch() != epoch {
                    break Checked::SourceChanged;
                }
            }
            line = lines.next_line() => match line {
                Ok(Some(l)) => {
                    if l.contains("silence_start:") {
                        silent = true;
                    } else if l.contains("silence_end:") {
                        silent = false;
                    }
                }
                _ => break Checked::Ended("ffmpeg ended".into()),
            },
            _ = tick.tick() => {
                if tokio::time::Instant::now() < grace_end {
                    continue;
                }
                if silent {
                    silent_checks += 1;
                    tracing::debug!(stream_id = %ch.stream.id, silent_checks, "silent check");
                } else {
                    silent_checks = 0;
                }
                if silent_checks >= spec.failover_threshold {
                    break Checked::Triggered;
                }
            }
        }
    };
    feeder.abort();
    proc.stop(STOP_GRACE).await;
    outcome
}

/// Copies the channel's bytes into ffmpeg from the live edge; rejoins at the
/// edge if ffmpeg falls behind the ring.
async fn feed(app: Arc<App>, ch: Arc<Channel>, mut stdin: ChildStdin) {
    loop {
        let Some(mut tap) = app.hub.tap(&ch) else {
            return;
        };
        if let Fed::Done = copy_into(&mut tap, &mut stdin, 128 * 1024).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_and_ranges() {
        let s = SilenceSpec::default();
        assert_eq!(s.filter(), "silencedetect=noise=-50dB:d=3");
        assert!(s.check().is_ok());
        let bad = SilenceSpec {
            threshold_db: 10.0,
            ..SilenceSpec::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "silence_threshold_db");
        let bad = SilenceSpec {
            failover_threshold: 0,
            ..SilenceSpec::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "silence_failover_threshold");
    }
}
