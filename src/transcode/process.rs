//! ffmpeg (and friends) as child processes: no shell, our pipes, its own
//! process group, killed with m3u-edge, stopped with SIGTERM then SIGKILL,
//! always reaped, stderr to the debug log at a bounded rate.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

/// stderr lines logged per window; the rest are counted and summarised.
const STDERR_LINES: usize = 20;
const STDERR_WINDOW: Duration = Duration::from_secs(10);

/// stderr lines kept for [`Process::stderr_tail`].
const TAIL_LINES: usize = 8;

/// A running child, its pipes taken.
#[derive(Debug)]
pub struct Process {
    child: Child,
    pid: Option<u32>,
    label: String,
    /// The last stderr lines, for an error message when it fails.
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// The pipes of a started process.
pub struct Pipes {
    pub stdin: ChildStdin,
    pub stdout: ChildStdout,
}

/// Starts `program` with `args`: argv as given (no shell), stdin and stdout
/// piped to us, stderr read into the debug log. `label` names it in logs.
pub fn spawn<S: AsRef<OsStr>>(
    program: &OsStr,
    args: &[S],
    label: &str,
) -> std::io::Result<(Process, Pipes)> {
    start(program, args, label, false).map(|(p, pipes, _)| (p, pipes))
}

/// Like [`spawn`], but stderr comes to the caller instead of the debug log
/// (ffmpeg reports filter results such as `silencedetect` there).
pub fn spawn_reading_stderr<S: AsRef<OsStr>>(
    program: &OsStr,
    args: &[S],
    label: &str,
) -> std::io::Result<(Process, Pipes, ChildStderr)> {
    let (p, pipes, stderr) = start(program, args, label, true)?;
    let stderr = stderr.ok_or_else(|| std::io::Error::other("child stderr missing"))?;
    Ok((p, pipes, stderr))
}

fn start<S: AsRef<OsStr>>(
    program: &OsStr,
    args: &[S],
    label: &str,
    keep_stderr: bool,
) -> std::io::Result<(Process, Pipes, Option<ChildStderr>)> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // Fallback if a Process is dropped without stop(): SIGKILL, and
        // tokio reaps it.
        .kill_on_drop(true)
        // Its own group: a stop reaches whatever it forks.
        .process_group(0);
    #[cfg(target_os = "linux")]
    // SAFETY: runs in the child between fork and exec, and calls only
    // prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // Dies with m3u-edge, even if m3u-edge is killed with SIGKILL.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let (Some(stdin), Some(stdout), stderr) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(std::io::Error::other("child pipes missing"));
    };
    // A caller reading stderr itself (silence detection) gets the pipe; the
    // others have it logged and its last lines kept for error messages.
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let stderr = match stderr {
        Some(e) if keep_stderr => Some(e),
        Some(e) => {
            tokio::spawn(log_stderr(e, label.to_string(), tail.clone()));
            None
        }
        None => None,
    };
    tracing::debug!(pid, label, "child started");
    Ok((
        Process {
            child,
            pid,
            label: label.to_string(),
            tail,
        },
        Pipes { stdin, stdout },
        stderr,
    ))
}

impl Process {
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The last few stderr lines (at most 500 characters each), oldest first.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.tail.lock().iter().cloned().collect()
    }

    /// Whether it has exited (reaping it if so).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for it to exit on its own.
    pub async fn wait(&mut self) -> Option<ExitStatus> {
        self.child.wait().await.ok()
    }

    /// SIGTERM to its group, SIGKILL after `grace`, then reaped.
    pub async fn stop(mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_exit() {
            return Some(status);
        }
        signal_group(self.pid, Signal::Term);
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                signal_group(self.pid, Signal::Kill);
                self.child.wait().await.ok()
            }
        };
        tracing::debug!(pid = self.pid, label = %self.label, ?status, "child stopped");
        status
    }
}

enum Signal {
    Term,
    Kill,
}

fn signal_group(pid: Option<u32>, sig: Signal) {
    #[cfg(unix)]
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        use nix::sys::signal::{killpg, Signal as S};
        use nix::unistd::Pid;
        let sig = match sig {
            Signal::Term => S::SIGTERM,
            Signal::Kill => S::SIGKILL,
        };
        // The group may be gone already; nothing to do then.
        let _ = killpg(Pid::from_raw(pid), sig);
    }
}

/// Debug-logs stderr, at most [`STDERR_LINES`] per [`STDERR_WINDOW`]; never
/// to a client.
async fn log_stderr(
    stderr: tokio::process::ChildStderr,
    label: String,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(stderr).lines();
    let mut window = Instant::now();
    let mut shown = 0usize;
    let mut skipped = 0usize;
    while let Ok(Some(line)) = lines.next_line().await {
        {
            let mut t = tail.lock();
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line.chars().take(500).collect());
        }
        if window.elapsed() >= STDERR_WINDOW {
            if skipped > 0 {
                tracing::debug!(label = %label, skipped, "child stderr lines not logged");
            }
            window = Instant::now();
            shown = 0;
            skipped = 0;
        }
        if shown < STDERR_LINES {
            shown += 1;
            tracing::debug!(label = %label, "{}", line.chars().take(500).collect::<String>());
        } else {
            skipped += 1;
        }
    }
}

/// The first line of `program -version`, or None when it cannot run.
pub async fn version(program: &OsStr) -> Option<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        Command::new(program)
            .arg("-version")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn pipes_work_and_stop_terminates_and_reaps() {
        let (p, mut pipes) = spawn(OsStr::new("cat"), &[] as &[&str], "cat").unwrap();
        pipes.stdin.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        pipes.stdout.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        let pid = p.pid().unwrap();
        let status = p.stop(Duration::from_secs(2)).await.unwrap();
        assert!(!status.success());
        // Reaped: no such process any more (not even a zombie).
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[tokio::test]
    async fn a_child_ignoring_sigterm_is_killed_after_the_grace() {
        let (p, _pipes) = spawn(
            OsStr::new("sh"),
            &["-c", "trap '' TERM; while true; do sleep 0.1; done"],
            "stubborn",
        )
        .unwrap();
        let pid = p.pid().unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = p.stop(Duration::from_millis(300)).await;
        assert!(status.is_some());
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error_and_has_no_version() {
        assert!(spawn(OsStr::new("/nonexistent/ffmpeg"), &[] as &[&str], "x").is_err());
        assert!(version(OsStr::new("/nonexistent/ffmpeg")).await.is_none());
    }
}
