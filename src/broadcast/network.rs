//! One network: its directory, its playlist window, what it is doing, and
//! the task that supervises a programme's ffmpeg (learns its segments,
//! deletes old ones, notices the end and sends the callback).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::callback::Callbacks;
use super::command::{segment_name, segment_number, FFMPEG_PLAYLIST};
use super::request::Start;
use super::window::Window;
use crate::registry::Stream;
use crate::transcode::process::{Pipes, Process};

/// How often ffmpeg's playlist is read (a segment is at least 1 s).
const POLL: Duration = Duration::from_millis(250);
/// ffmpeg gets this long after SIGTERM to finish its last segment.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// A programme still running this long after its duration is stuck (an
/// input that stalls between reconnects): it is stopped and reported failed.
const OVERRUN: Duration = Duration::from_secs(60);
/// A programme that made no new segment for this long (or four segment
/// durations, if longer) is stopped and reported failed: its input stalled
/// for longer than ffmpeg's reconnects cover.
const STALL_MIN: Duration = Duration::from_secs(45);
const MAX_FAILED_STARTS: usize = 3;
const FAILED_START_WINDOW: Duration = Duration::from_secs(300);
const FAILED_START_COOLDOWN: Duration = Duration::from_secs(15);
/// stderr lines that mean the input could not be read (m3u-proxy's list):
/// they make the `input_error` detail callback m3u-editor logs.
const INPUT_ERRORS: &[&str] = &[
    "error opening input",
    "failed to resolve hostname",
    "connection refused",
    "connection timed out",
    "server returned 4",
    "server returned 5",
    "invalid data found",
    "no such file or directory",
    "protocol not found",
    "not on whitelist",
];

/// What a network is doing, as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// The programme reached its end (ffmpeg exited 0).
    Stopped,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }
}

/// The current (or last) programme.
#[derive(Debug, Clone)]
pub struct Programme {
    pub start: Arc<Start>,
    pub started_at: DateTime<Utc>,
    pub pid: Option<u32>,
    pub first: u64,
}

#[derive(Debug)]
pub(super) struct State {
    pub phase: Phase,
    /// False after `POST …/stop`: status answers 404, the playlist is still
    /// served until the network is forgotten.
    pub listed: bool,
    pub programme: Option<Programme>,
    pub error: Option<String>,
    /// The running programme's stop switch and end signal.
    pub running: Option<Running>,
    /// When it last stopped running (for `broadcast.keep_stopped`).
    pub idle_since: Option<Instant>,
    pub bytes_written: u64,
    /// Highest segment number seen (on disk or listed).
    pub last_segment: Option<u64>,
    /// Recent starts that failed at once (see [`Network::start_refused_for`]).
    pub failed_starts: Vec<Instant>,
}

#[derive(Debug)]
pub(super) struct Running {
    pub cancel: CancellationToken,
    pub done: watch::Receiver<bool>,
}

pub struct Network {
    pub id: String,
    pub dir: PathBuf,
    /// Start, stop and delete of this network, one at a time.
    pub(super) ops: tokio::sync::Mutex<()>,
    pub(super) state: Mutex<State>,
    window: Mutex<Window>,
    /// Its viewers, counted and evented like HLS viewers.
    pub viewers: Arc<Stream>,
}

impl Network {
    pub(super) fn new(id: &str, dir: PathBuf, viewers: Arc<Stream>) -> Self {
        Network {
            id: id.to_string(),
            dir,
            ops: tokio::sync::Mutex::new(()),
            state: Mutex::new(State {
                phase: Phase::Stopped,
                listed: false,
                programme: None,
                error: None,
                running: None,
                idle_since: Some(Instant::now()),
                bytes_written: 0,
                last_segment: None,
                failed_starts: Vec::new(),
            }),
            window: Mutex::new(Window::new()),
            viewers,
        }
    }

    /// m3u-proxy's retry brake: after [`MAX_FAILED_STARTS`] starts that
    /// failed at once within [`FAILED_START_WINDOW`], starts are refused
    /// for [`FAILED_START_COOLDOWN`] after the last one (a schedule
    /// retrying a dead source every tick would hammer the provider).
    pub fn start_refused_for(&self) -> Option<Duration> {
        let mut st = self.state.lock();
        st.failed_starts
            .retain(|t| t.elapsed() < FAILED_START_WINDOW);
        let last = st.failed_starts.last()?;
        (st.failed_starts.len() >= MAX_FAILED_STARTS)
            .then(|| FAILED_START_COOLDOWN.checked_sub(last.elapsed()))
            .flatten()
    }

    pub(super) fn start_failed(&self) {
        self.state.lock().failed_starts.push(Instant::now());
    }

    /// A start that could not run its programme: the status says why.
    pub(super) fn failed(&self, why: &str) {
        let mut st = self.state.lock();
        st.phase = Phase::Failed;
        st.listed = true;
        st.error = Some(why.to_string());
        st.idle_since = Some(Instant::now());
    }

    pub fn is_running(&self) -> bool {
        self.state.lock().running.is_some()
    }

    pub fn is_listed(&self) -> bool {
        self.state.lock().listed
    }

    /// The live playlist, once a segment exists.
    pub fn playlist(&self) -> Option<String> {
        self.window.lock().render()
    }

    /// The path of segment `name` if it is one of this network's names.
    pub fn segment_path(&self, name: &str) -> Option<PathBuf> {
        segment_number(name)?;
        Some(self.dir.join(name))
    }

    /// The status reply (API-COMPAT-FFMPEG.md §6).
    pub fn status_json(&self) -> Value {
        let st = self.state.lock();
        let p = st.programme.as_ref();
        json!({
            "network_id": self.id,
            "status": st.phase.as_str(),
            // The programme's first number until it wrote a later one.
            "current_segment_number": st.last_segment.max(p.map(|p| p.first)).unwrap_or(0),
            "started_at": p.map(|p| crate::api::json::iso(p.started_at)),
            "stream_url": p.map(|p| p.start.stream_url_as_sent.clone()).unwrap_or_default(),
            // Never a server path (m3u-editor does not read it).
            "hls_dir": null,
            "ffmpeg_pid": p.and_then(|p| p.pid).filter(|_| st.running.is_some()),
            "error_message": st.error,
            "bytes_written": st.bytes_written,
            "metadata": p.map(|p| json!(p.start.metadata)).unwrap_or_else(|| json!({})),
            "viewers": self.viewers.client_count(),
        })
    }

    /// The highest segment number on disk or listed: m3u-proxy's
    /// `final_segment_number` (possibly a partial last segment).
    pub(super) fn final_segment(&self) -> Option<u64> {
        let on_disk = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(segment_number))
            .max();
        let listed = self.window.lock().last_file();
        let seen = self.state.lock().last_segment;
        on_disk.max(listed).max(seen)
    }

    /// Prepares the window and the directory for a programme starting at
    /// file `first`; `fresh` forgets every earlier segment first.
    pub(super) fn begin(
        &self,
        first: u64,
        discontinuity: bool,
        fresh: bool,
        s: &Start,
    ) -> std::io::Result<()> {
        // Never the window's lock and the state's at once (transition()
        // holds the state's while it calls this).
        if fresh {
            self.window.lock().clear();
            remove_dir_contents(&self.dir);
            self.state.lock().last_segment = None;
        }
        std::fs::create_dir_all(&self.dir)?;
        let _ = std::fs::remove_file(self.dir.join(FFMPEG_PLAYLIST));
        self.window.lock().begin(
            first,
            discontinuity,
            s.hls_list_size as usize,
            s.segment_duration,
        );
        Ok(())
    }

    pub(super) fn window_is_empty(&self) -> bool {
        self.window.lock().is_empty()
    }

    /// Reads ffmpeg's playlist: new segments join the window, files that
    /// left it are deleted. Returns how many segments were new.
    fn learn(&self) -> usize {
        let Ok(text) = std::fs::read_to_string(self.dir.join(FFMPEG_PLAYLIST)) else {
            return 0;
        };
        let (added, gone) = self.window.lock().learn(&text);
        let mut bytes = 0;
        for e in &added {
            bytes += std::fs::metadata(self.dir.join(segment_name(e.file)))
                .map(|m| m.len())
                .unwrap_or(0);
        }
        for f in gone {
            let _ = std::fs::remove_file(self.dir.join(segment_name(f)));
        }
        if let Some(last) = added.last() {
            let mut st = self.state.lock();
            st.bytes_written += bytes;
            st.last_segment = Some(st.last_segment.map_or(last.file, |l| l.max(last.file)));
        }
        added.len()
    }

    /// After a programme: segment files the window does not hold (a partial
    /// last one) are deleted.
    fn remove_strays(&self) {
        let w = self.window.lock();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            if let Some(n) = name.to_str().and_then(segment_number) {
                if !w.contains_file(n) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Stops the running programme (if any) and waits for its task to
    /// finish; no callback is sent for it.
    pub(super) async fn stop_programme(&self) {
        let running = self.state.lock().running.take();
        if let Some(mut r) = running {
            r.cancel.cancel();
            while !*r.done.borrow_and_update() {
                if r.done.changed().await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Removes everything inside `dir` (which m3u-edge made).
pub(super) fn remove_dir_contents(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
}

/// What a programme's supervision needs to hold until it ends.
pub(super) struct Held {
    pub process: Process,
    pub pipes: Pipes,
    /// The provider connection slot and the `max_networks` slot.
    pub lease: crate::provider::Lease,
    pub slot: crate::conn::caps::Slot<()>,
}

/// How a programme ended.
enum End {
    Exited(Option<std::process::ExitStatus>),
    Cancelled,
    Overran,
    /// No new segment for a long while (an input that stopped sending).
    Stalled,
}

/// Supervises one programme until ffmpeg ends or it is stopped.
pub(super) async fn supervise(
    net: Arc<Network>,
    held: Held,
    start: Arc<Start>,
    cancel: CancellationToken,
    done: watch::Sender<bool>,
    callbacks: Callbacks,
    next: Option<(Arc<Start>, Launch)>,
) {
    let Held {
        mut process,
        pipes,
        lease,
        slot,
    } = held;
    let began = Instant::now();
    let overrun = (start.duration_seconds > 0)
        .then(|| began + Duration::from_secs(start.duration_seconds) + OVERRUN);
    let mut tick = tokio::time::interval(POLL);
    let mut progress = began;
    let stall = STALL_MIN.max(Duration::from_secs(start.segment_duration * 4));
    let end = loop {
        tokio::select! {
            status = process.wait() => break End::Exited(status),
            _ = cancel.cancelled() => break End::Cancelled,
            _ = tick.tick() => {
                if net.learn() > 0 {
                    progress = Instant::now();
                }
                if overrun.is_some_and(|t| Instant::now() >= t) {
                    break End::Overran;
                }
                if progress.elapsed() >= stall {
                    break End::Stalled;
                }
            }
        }
    };
    let (status, tail) = match end {
        End::Exited(status) => {
            // The stderr reader may still hold the last lines for a moment.
            tokio::time::sleep(Duration::from_millis(150)).await;
            (status, process.stderr_tail())
        }
        End::Cancelled | End::Overran | End::Stalled => {
            let tail = process.stderr_tail();
            (process.stop(STOP_GRACE).await, tail)
        }
    };
    drop(pipes);
    // ffmpeg names its input in errors: never the URL's query or userinfo.
    let redacted = crate::events::redact_url(start.stream_url.as_str());
    let tail: Vec<String> = tail
        .iter()
        .map(|l| {
            l.replace(start.stream_url.as_str(), &redacted)
                .replace(&start.stream_url_as_sent, &redacted)
        })
        .collect();
    net.learn();
    let final_segment = net.final_segment().unwrap_or(0);
    net.remove_strays();
    let streamed = began.elapsed().as_secs_f64();
    let exit_code = exit_code(status);
    if let (End::Exited(_), 0, Some((next, launch))) = (&end, exit_code, next) {
        // m3u-editor's next_stream_config: the next programme starts now,
        // on this programme's provider connection and network slot.
        match transition(
            &net,
            next,
            &launch,
            final_segment + 1,
            lease,
            slot,
            &callbacks,
        ) {
            Ok(new_pid) => {
                let _ = done.send(true);
                tracing::info!(network_id = %net.id, final_segment, new_pid, "broadcast programme ended; next programme started");
                if let Some(url) = start.callback_url.clone() {
                    callbacks
                        .send(
                            &url,
                            &net.id,
                            "programme_ended",
                            start.dvr_mode,
                            json!({
                                "exit_code": 0,
                                "final_segment_number": final_segment,
                                "duration_streamed": streamed,
                                "auto_transitioned": true,
                                "new_pid": new_pid,
                            }),
                        )
                        .await;
                }
                return;
            }
            Err((lease, slot)) => {
                drop(lease);
                drop(slot);
            }
        }
    } else {
        drop(lease);
        drop(slot);
    }
    let mut outcome = match end {
        End::Cancelled => None,
        End::Exited(_) if exit_code == 0 => Some((Phase::Stopped, None)),
        End::Exited(_) => Some((
            Phase::Failed,
            Some(
                error_line(&tail).unwrap_or_else(|| format!("FFmpeg exited with code {exit_code}")),
            ),
        )),
        End::Overran => Some((
            Phase::Failed,
            Some("ffmpeg ran past duration_seconds and was stopped".to_string()),
        )),
        End::Stalled => Some((
            Phase::Failed,
            Some(format!(
                "no new segment for {} s: the input stalled; ffmpeg was stopped",
                stall.as_secs()
            )),
        )),
    };
    {
        let mut st = net.state.lock();
        st.last_segment = Some(
            st.last_segment
                .map_or(final_segment, |l| l.max(final_segment)),
        );
        st.idle_since = Some(Instant::now());
        // A stop or start took the network as it ended: theirs to report
        // (m3u-proxy sends no callback for a stop).
        if st.running.is_none() {
            outcome = None;
        }
        if let Some((phase, error)) = &outcome {
            st.phase = *phase;
            st.error = error.clone();
            st.running = None;
        }
    }
    let _ = done.send(true);
    let Some((phase, error)) = outcome else {
        tracing::info!(network_id = %net.id, final_segment, "broadcast programme stopped");
        return;
    };
    tracing::info!(network_id = %net.id, status = phase.as_str(), exit_code, final_segment, seconds = streamed, error = ?error, "broadcast programme ended");
    let Some(url) = start.callback_url.clone() else {
        return;
    };
    match (phase, error) {
        (Phase::Failed, Some(error)) => {
            if input_error(&tail) {
                callbacks
                    .send(
                        &url,
                        &net.id,
                        "broadcast_failed",
                        start.dvr_mode,
                        json!({ "error": error, "error_type": "input_error" }),
                    )
                    .await;
            }
            callbacks
                .send(
                    &url,
                    &net.id,
                    "broadcast_failed",
                    start.dvr_mode,
                    json!({
                        "exit_code": exit_code,
                        "final_segment_number": final_segment,
                        "duration_streamed": streamed,
                        "error": error,
                    }),
                )
                .await;
        }
        _ => {
            callbacks
                .send(
                    &url,
                    &net.id,
                    "programme_ended",
                    start.dvr_mode,
                    json!({
                        "exit_code": 0,
                        "final_segment_number": final_segment,
                        "duration_streamed": streamed,
                    }),
                )
                .await;
        }
    }
}

/// The exit code m3u-proxy reports: the code, or minus the signal.
fn exit_code(status: Option<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => s.code().or_else(|| s.signal().map(|n| -n)).unwrap_or(-1),
        None => -1,
    }
}

fn input_error(tail: &[String]) -> bool {
    tail.iter().any(|l| {
        let l = l.to_ascii_lowercase();
        INPUT_ERRORS.iter().any(|p| l.contains(p))
    })
}

/// The most telling stderr line: an input error, else the last line.
fn error_line(tail: &[String]) -> Option<String> {
    tail.iter()
        .rev()
        .find(|l| {
            let l = l.to_ascii_lowercase();
            INPUT_ERRORS.iter().any(|p| l.contains(p))
        })
        .or(tail.last())
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

/// What ffmpeg needs besides the request, resolved when the start came in.
#[derive(Debug, Clone)]
pub struct Launch {
    pub ffmpeg: PathBuf,
    pub user_agent: String,
    pub headers: Vec<(String, String)>,
    pub device: Option<String>,
}

impl Launch {
    /// Starts the programme's ffmpeg, its first segment numbered `first`.
    pub fn spawn(&self, net: &Network, s: &Start, first: u64) -> std::io::Result<(Process, Pipes)> {
        let argv = super::command::argv(
            s,
            &super::command::Context {
                dir: &net.dir,
                user_agent: &self.user_agent,
                headers: &self.headers,
                start_number: first,
                device: self.device.as_deref(),
            },
        );
        crate::transcode::process::spawn(
            std::ffi::OsStr::new(&self.ffmpeg),
            &argv,
            &format!("broadcast {}", net.id),
        )
    }
}

type Slots = (crate::provider::Lease, crate::conn::caps::Slot<()>);

/// Starts `next` right after a programme ended, unless a stop or start
/// took the network meanwhile. The new pid, or the slots back.
fn transition(
    net: &Arc<Network>,
    next: Arc<Start>,
    launch: &Launch,
    first: u64,
    lease: crate::provider::Lease,
    slot: crate::conn::caps::Slot<()>,
    callbacks: &Callbacks,
) -> Result<Option<u32>, Slots> {
    // Held across the spawn: a stop waits for it, then sees the new one.
    let mut st = net.state.lock();
    if st.running.is_none() {
        return Err((lease, slot));
    }
    if net.begin(first, true, false, &next).is_err() {
        return Err((lease, slot));
    }
    let (process, pipes) = match launch.spawn(net, &next, first) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(network_id = %net.id, error = %e, "next programme's ffmpeg could not start");
            return Err((lease, slot));
        }
    };
    let pid = process.pid();
    let cancel = CancellationToken::new();
    let (done_tx, done_rx) = watch::channel(false);
    st.phase = Phase::Running;
    st.error = None;
    st.idle_since = None;
    st.programme = Some(Programme {
        start: next.clone(),
        started_at: Utc::now(),
        pid,
        first,
    });
    st.running = Some(Running {
        cancel: cancel.clone(),
        done: done_rx,
    });
    drop(st);
    let task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(supervise(
            net.clone(),
            Held {
                process,
                pipes,
                lease,
                slot,
            },
            next,
            cancel,
            done_tx,
            callbacks.clone(),
            None,
        ));
    tokio::spawn(task);
    Ok(pid)
}
