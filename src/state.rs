//! The state file: API-created streams (and, as they land, other runtime state)
//! survive a restart. Writes are atomic (temp file + fsync + rename) so a crash
//! never leaves half a file; a file that cannot be read is reported and moved
//! aside (under a name no other backup has), never silently dropped. The file
//! holds secrets (the HLS signing key, webhook secrets, stream headers), so it
//! and its temp file are created owner-only (0600).
//!
//! Saving is off the request path: a change only marks the state dirty
//! ([`Saver::mark`]); the background service [`SaverService`] writes it after
//! `server.state_save_delay` (changes in between are coalesced into one
//! write), retries a failed write with backoff, and reports failures through
//! [`Saver::status`] (`/health`, `/stats`, metrics). The shutdown path writes
//! a last time and then closes the file ([`StateFile::close`]).
//!
//! One process at a time: [`StateLock`] is an exclusive `flock` on
//! `<state_file>.lock`, which also names the holder's pid.

use std::fs;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::events::Webhook;
use crate::registry::PersistedStream;

/// Bumped when the format changes incompatibly.
const STATE_VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StateData {
    #[serde(default)]
    pub version: u32,
    #[serde(default)]
    pub streams: Vec<PersistedStream>,
    /// Hex HMAC key of the HLS references, kept so minted URIs survive a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hls_key: Option<String>,
    /// Webhooks registered through the API (YAML ones come from the config).
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: cannot write state: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot serialize state: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: not written: the state file is closed (shutting down or handed over)")]
    Closed { path: PathBuf },
}

/// Mode of the state file and its temp file: it holds secrets.
const STATE_MODE: u32 = 0o600;

pub struct StateFile {
    path: PathBuf,
    /// Serializes writers so two saves never interleave their temp files;
    /// true once [`StateFile::close`]d (no write after that).
    lock: Mutex<bool>,
}

/// What loading found, for the start-up log.
#[derive(Debug)]
pub enum Loaded {
    Missing,
    Ok(StateData),
    /// Unreadable: moved to the given path, starting empty.
    Corrupt {
        moved_to: PathBuf,
        error: String,
    },
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        StateFile {
            path,
            lock: Mutex::new(false),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Loaded {
        let text = match fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
            Err(e) => return self.move_aside(format!("cannot read: {e}")),
        };
        // Written world-readable by an older version: it holds secrets.
        restrict(&self.path);
        match serde_json::from_slice::<StateData>(&text) {
            Ok(d) if d.version <= STATE_VERSION => Loaded::Ok(d),
            Ok(d) => self.move_aside(format!(
                "state version {} is newer than this m3u-edge understands ({STATE_VERSION})",
                d.version
            )),
            Err(e) => self.move_aside(format!("not valid state JSON: {e}")),
        }
    }

    /// Moves the unreadable file to `<path>.corrupt-<UTC time, µs>-<pid>`,
    /// with `-<n>` added if that name exists: a backup never replaces
    /// another, even for two moves within the same second (or microsecond).
    fn move_aside(&self, error: String) -> Loaded {
        let stamp = Utc::now().format("%Y%m%dT%H%M%S%.6f");
        let base = format!(".corrupt-{stamp}-{}", std::process::id());
        let mut last_err = None;
        for n in 0..1000u32 {
            let mut moved_to = self.path.clone().into_os_string();
            moved_to.push(&base);
            if n > 0 {
                moved_to.push(format!("-{n}"));
            }
            let moved_to = PathBuf::from(moved_to);
            // A hard link fails when the name exists, so no backup is ever
            // overwritten (a rename would replace it silently).
            match fs::hard_link(&self.path, &moved_to) {
                Ok(()) => {
                    restrict(&moved_to);
                    return match fs::remove_file(&self.path) {
                        Ok(()) => Loaded::Corrupt { moved_to, error },
                        Err(e) => Loaded::Corrupt {
                            moved_to,
                            error: format!("{error}; copied aside but could not remove it: {e}"),
                        },
                    };
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    // No hard links here (some file systems): a rename to a
                    // name checked free is the next best thing.
                    if !moved_to.exists() {
                        match fs::rename(&self.path, &moved_to) {
                            Ok(()) => return Loaded::Corrupt { moved_to, error },
                            Err(e) => last_err = Some(e),
                        }
                    } else {
                        last_err = Some(e);
                    }
                    break;
                }
            }
        }
        Loaded::Corrupt {
            moved_to: self.path.clone(),
            error: match last_err {
                Some(e) => format!("{error}; could not move it aside: {e}"),
                None => format!("{error}; could not move it aside: no free backup name"),
            },
        }
    }

    /// No write after this (the shutdown path's last save is done, or the
    /// state file was handed to the process taking over).
    pub fn close(&self) {
        *self.lock.lock() = true;
    }

    /// Writes the whole state atomically.
    pub fn save(&self, mut data: StateData) -> Result<(), StateError> {
        data.version = STATE_VERSION;
        let body = serde_json::to_vec_pretty(&data).map_err(|source| StateError::Encode {
            path: self.path.clone(),
            source,
        })?;
        let closed = self.lock.lock();
        if *closed {
            return Err(StateError::Closed {
                path: self.path.clone(),
            });
        }
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir)?;
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(STATE_MODE)
                .open(&tmp)?;
            // The mode above applies only to a new file: a temp file left
            // by a crash (or made by an older version) is fixed here, and
            // the rename below gives the state file the same mode.
            f.set_permissions(fs::Permissions::from_mode(STATE_MODE))?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            // The rename is durable only once the directory is synced.
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if let Ok(d) = fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            Ok(())
        };
        write().map_err(|source| StateError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Makes `path` owner-only (0600) if group or others may read it.
fn restrict(path: &Path) {
    let Ok(meta) = fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        match fs::set_permissions(path, fs::Permissions::from_mode(STATE_MODE)) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                was = format!("{:o}", mode & 0o777),
                "state file made owner-only (0600): it holds secrets"
            ),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "state file is readable by others and could not be made 0600"
            ),
        }
    }
}

/// Where the state file stands, for `/health`, `/stats` and the metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SaveStatus {
    /// False while the latest changes could not be written (a retry is
    /// scheduled): a crash now would lose them.
    pub ok: bool,
    /// Changes not written yet (waiting for the save delay or a retry).
    pub pending: bool,
    pub last_saved_at: Option<DateTime<Utc>>,
    /// The error of the last failed write, while failing.
    pub last_error: Option<String>,
    pub failing_since: Option<DateTime<Utc>>,
    pub consecutive_failures: u32,
    /// Failed writes since start.
    pub failures_total: u64,
}

/// The dirty flag and status of the state file; cheap to call from request
/// handlers ([`Saver::mark`] is two atomic operations).
pub struct Saver {
    dirty: AtomicBool,
    wake: Notify,
    status: Mutex<SaveStatus>,
    /// Bounded delay between a change and its write.
    delay: Duration,
    saves: AtomicU64,
}

/// The first retry of a failed write waits this long; it doubles up to
/// [`RETRY_CAP`].
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(30);

impl Saver {
    pub fn new(delay: Duration) -> Saver {
        Saver {
            dirty: AtomicBool::new(false),
            wake: Notify::new(),
            status: Mutex::new(SaveStatus {
                ok: true,
                ..SaveStatus::default()
            }),
            delay,
            saves: AtomicU64::new(0),
        }
    }

    /// The persisted state changed: it is written within the save delay.
    pub fn mark(&self) {
        self.dirty.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::SeqCst)
    }

    /// Clears the dirty flag before a write (a change during the write
    /// marks it again, so it gets its own write).
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::SeqCst)
    }

    pub fn status(&self) -> SaveStatus {
        let mut s = self.status.lock().clone();
        s.pending = self.is_dirty();
        s
    }

    /// True while the latest write failed.
    pub fn failing(&self) -> bool {
        !self.status.lock().ok
    }

    /// Successful writes since start.
    pub fn saves(&self) -> u64 {
        self.saves.load(Ordering::Relaxed)
    }

    /// Records the outcome of a write; a failure marks the state dirty
    /// again so it is retried.
    pub fn record(&self, result: &Result<(), StateError>, metrics: &crate::metrics::Metrics) {
        let mut s = self.status.lock();
        match result {
            Ok(()) => {
                if !s.ok {
                    tracing::info!(
                        failures = s.consecutive_failures,
                        "state file written again after failures"
                    );
                }
                s.ok = true;
                s.last_saved_at = Some(Utc::now());
                s.last_error = None;
                s.failing_since = None;
                s.consecutive_failures = 0;
                self.saves.fetch_add(1, Ordering::Relaxed);
                metrics.state_saves.with_label_values(&["ok"]).inc();
                metrics.state_save_failing.set(0);
            }
            // Nothing was attempted: not a failure of the disk.
            Err(StateError::Closed { .. }) => {}
            Err(e) => {
                s.ok = false;
                s.last_error = Some(e.to_string());
                s.failing_since.get_or_insert_with(Utc::now);
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                s.failures_total += 1;
                metrics.state_saves.with_label_values(&["failed"]).inc();
                metrics.state_save_failing.set(1);
                self.dirty.store(true, Ordering::SeqCst);
                tracing::error!(error = %e, failures = s.consecutive_failures, "state not saved; will retry");
            }
        }
    }
}

/// Writes the state file in the background: after a change, once the save
/// delay has passed (so a burst of registrations costs one write), and
/// again with backoff while writes fail. Runs until the process exits; the
/// shutdown path writes the last time itself.
pub struct SaverService {
    pub app: Arc<crate::app::App>,
}

#[async_trait]
impl BackgroundService for SaverService {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let saver = &self.app.saver;
        let mut backoff = RETRY_BASE;
        loop {
            if !saver.is_dirty() {
                // `notify_one` keeps a permit: a mark between the check and
                // this wait is not lost.
                saver.wake.notified().await;
                continue;
            }
            tokio::time::sleep(saver.delay).await;
            if !saver.take_dirty() {
                continue;
            }
            let app = self.app.clone();
            let result = tokio::task::spawn_blocking(move || app.save_state())
                .await
                .unwrap_or_else(|e| {
                    Err(StateError::Write {
                        path: self.app.state.path().to_path_buf(),
                        source: std::io::Error::other(format!("save task failed: {e}")),
                    })
                });
            match result {
                Ok(()) => backoff = RETRY_BASE,
                Err(StateError::Closed { .. }) => return,
                Err(_) => {
                    // `record` marked it dirty again: retry after the backoff.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_CAP);
                }
            }
        }
    }
}

/// The exclusive lock of a state file: `<state_file>.lock`, locked with
/// `flock` and holding the holder's pid. Released when dropped (or when the
/// process ends, however it ends).
pub struct StateLock {
    #[cfg(target_os = "linux")]
    file: Option<nix::fcntl::Flock<fs::File>>,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "state file {} is in use by another m3u-edge ({holder}; lock file {}): \
         stop that one first, or start this one with -u to take over from it",
        state.display(),
        lock.display()
    )]
    Held {
        state: PathBuf,
        lock: PathBuf,
        holder: String,
    },
    #[error("cannot lock state file {} (lock file {}): {source}", state.display(), lock.display())]
    Io {
        state: PathBuf,
        lock: PathBuf,
        source: std::io::Error,
    },
}

impl StateLock {
    /// `<state_file>.lock`.
    pub fn lock_path(state: &Path) -> PathBuf {
        let mut p = state.as_os_str().to_owned();
        p.push(".lock");
        PathBuf::from(p)
    }

    /// Takes the lock now, or says who holds it.
    pub fn try_acquire(state: &Path) -> Result<StateLock, LockError> {
        let lock = Self::lock_path(state);
        let io = |source| LockError::Io {
            state: state.to_path_buf(),
            lock: lock.clone(),
            source,
        };
        if let Some(dir) = lock.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&lock)
            .map_err(io)?;
        #[cfg(target_os = "linux")]
        {
            use nix::fcntl::{Flock, FlockArg};
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => {
                    let mut me = StateLock {
                        file: Some(locked),
                        path: lock.clone(),
                    };
                    me.write_pid().map_err(io)?;
                    Ok(me)
                }
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    let holder = match text.trim().parse::<u32>() {
                        Ok(pid) => format!("pid {pid}"),
                        Err(_) => "pid unknown".to_owned(),
                    };
                    Err(LockError::Held {
                        state: state.to_path_buf(),
                        lock,
                        holder,
                    })
                }
                Err((_, errno)) => Err(io(std::io::Error::from(errno))),
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            drop(file);
            Ok(StateLock { path: lock })
        }
    }

    /// Takes the lock, waiting up to `timeout` for its holder to let go
    /// (`-u`: the old process releases it once it stops accepting).
    pub fn acquire_within(state: &Path, timeout: Duration) -> Result<StateLock, LockError> {
        let deadline = Instant::now() + timeout;
        let mut logged = false;
        loop {
            match Self::try_acquire(state) {
                Err(LockError::Held { holder, .. }) if Instant::now() < deadline => {
                    if !logged {
                        tracing::info!(
                            state_file = %state.display(),
                            %holder,
                            "waiting for the running m3u-edge to hand over the state file"
                        );
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    /// Writes this process's pid into the lock file (again after a daemon
    /// fork changed it).
    pub fn write_pid(&mut self) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(f) = self.file.as_mut() {
            f.set_len(0)?;
            f.rewind()?;
            writeln!(&mut **f, "{}", std::process::id())?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        fs::write(&p, b"{not json").unwrap();
        let s = StateFile::new(p.clone());
        match s.load() {
            Loaded::Corrupt { moved_to, .. } => {
                assert!(moved_to.exists());
                assert!(!p.exists());
            }
            other => panic!("expected corrupt, got {other:?}"),
        }
    }

    #[test]
    fn corrupt_files_moved_aside_in_the_same_second_keep_both_backups() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let s = StateFile::new(p.clone());
        let mut backups = Vec::new();
        for body in [&b"{first"[..], b"{second", b"{third"] {
            fs::write(&p, body).unwrap();
            match s.load() {
                Loaded::Corrupt { moved_to, .. } => backups.push(moved_to),
                other => panic!("expected corrupt, got {other:?}"),
            }
        }
        let mut names = backups.clone();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 3, "{backups:?}");
        let kept: Vec<Vec<u8>> = backups.iter().map(|b| fs::read(b).unwrap()).collect();
        assert_eq!(
            kept,
            [b"{first".to_vec(), b"{second".to_vec(), b"{third".to_vec()]
        );
    }

    #[test]
    fn state_and_temp_files_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        // An existing world-readable file and a stale temp file.
        fs::write(&p, b"{}").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let tmp = dir.path().join("state.json.tmp");
        fs::write(&tmp, b"").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o666)).unwrap();
        let s = StateFile::new(p.clone());
        s.save(StateData::default()).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        // Loading an old world-readable file fixes it too, and a corrupt
        // one's backup is owner-only.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(s.load(), Loaded::Ok(_)));
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        fs::write(&p, b"{bad").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        match s.load() {
            Loaded::Corrupt { moved_to, .. } => {
                let mode = fs::metadata(&moved_to).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{mode:o}");
            }
            other => panic!("expected corrupt, got {other:?}"),
        }
        let fresh = StateFile::new(dir.path().join("new/state.json"));
        fresh.save(StateData::default()).unwrap();
        let mode = fs::metadata(fresh.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
    }

    #[test]
    fn closed_state_file_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateFile::new(dir.path().join("state.json"));
        s.close();
        assert!(matches!(
            s.save(StateData::default()),
            Err(StateError::Closed { .. })
        ));
        assert!(!s.path().exists());
    }

    #[test]
    fn a_held_lock_names_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let first = StateLock::try_acquire(&p).unwrap();
        let text = fs::read_to_string(first.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        match StateLock::try_acquire(&p) {
            Err(e @ LockError::Held { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("pid {}", std::process::id())),
                    "{msg}"
                );
                assert!(msg.contains("state.json"), "{msg}");
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("locked twice"),
        }
        drop(first);
        let again = StateLock::acquire_within(&p, Duration::from_secs(2));
        assert!(again.is_ok(), "not released on drop");
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateFile::new(dir.path().join("sub/state.json"));
        s.save(StateData::default()).unwrap();
        assert!(matches!(s.load(), Loaded::Ok(d) if d.streams.is_empty()));
    }
}
