//! Runs the real `m3u-edge` binary for integration tests: writes the test's YAML to a
//! temp dir, starts `CARGO_BIN_EXE_m3u-edge -c config.yaml` on a free loopback port,
//! waits (bounded) for `/health`, and kills it on drop — printing the tail of its log
//! when the test is failing, so a red test shows what the proxy said.
//!
//! Placeholders replaced in the YAML before it is written:
//! `{listen}` → `127.0.0.1:PORT`, `{state_file}` → `<temp dir>/state.json`,
//! `{dir}` → the temp dir (for any other file a test wants next to the config).
//!
//! It knows nothing about the config schema beyond those placeholders; tests own the
//! YAML. Restarts (`restart`, `restart_with`) keep the temp dir, state file and port.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The binary under test (built by cargo for integration tests).
pub const BIN: &str = env!("CARGO_BIN_EXE_m3u-edge");

/// Bounded start: a debug Pingora build on a loaded 2-core box can take seconds to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// SIGTERM grace before SIGKILL; the proxy's own shutdown grace should be far shorter.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounded wait for the port to be free again on restart.
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines of proxy log printed when a test panics.
const LOG_TAIL_LINES: usize = 200;

/// Proxy variables removed from the child's environment: loopback tests must never be
/// routed through a proxy of the machine running them.
const PROXY_ENV: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
];

/// Options for [`Edge::start_with`]. `Default` = fresh temp dir, fresh port, `RUST_LOG=info`,
/// wait for `/health`.
#[derive(Default)]
pub struct StartOpts {
    /// Reuse this directory (and thus its `state.json`) instead of a fresh one; get it
    /// from [`Edge::into_dir`].
    pub dir: Option<TempDir>,
    /// Listen on this port instead of a fresh one.
    pub port: Option<u16>,
    /// Extra environment (applied after `RUST_LOG=info`, so it can override it).
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments after `-c CONFIG`.
    pub args: Vec<String>,
    /// Return right after spawning instead of waiting for `/health`.
    pub no_wait: bool,
    /// Run this binary instead of [`BIN`] (benches compare another build).
    pub bin: Option<PathBuf>,
}

/// A running (or stopped) `m3u-edge` process with its temp dir.
pub struct Edge {
    child: Option<Child>,
    /// `Some` until moved out by `restart`/`into_dir`.
    dir: Option<TempDir>,
    dir_path: PathBuf,
    port: u16,
    yaml: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    bin: PathBuf,
}

/// A free loopback port: bind port 0, read it, drop the listener. The kernel may
/// hand a port it just freed out again (two calls in a row gave a cluster node's
/// internal listener and its public one the same port), so a port is given out
/// at most once per test process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Replaces the placeholders documented in the module doc.
pub fn render(yaml: &str, port: u16, dir: &Path) -> String {
    yaml.replace("{listen}", &format!("127.0.0.1:{port}"))
        .replace(
            "{state_file}",
            &dir.join("state.json").display().to_string(),
        )
        .replace("{dir}", &dir.display().to_string())
}

impl Edge {
    /// Starts the proxy with `yaml` (placeholders replaced) and waits for `/health`.
    pub async fn start(yaml: &str) -> Edge {
        Edge::start_with(yaml, StartOpts::default()).await
    }

    pub async fn start_with(yaml: &str, opts: StartOpts) -> Edge {
        let dir = match opts.dir {
            Some(d) => d,
            None => tempfile::Builder::new()
                .prefix("m3u-edge-test")
                .tempdir()
                .expect("temp dir"),
        };
        let port = opts.port.unwrap_or_else(free_port);
        let mut edge = Edge {
            child: None,
            dir_path: dir.path().to_path_buf(),
            dir: Some(dir),
            port,
            yaml: yaml.to_string(),
            env: opts.env,
            args: opts.args,
            bin: opts.bin.unwrap_or_else(|| PathBuf::from(BIN)),
        };
        edge.spawn().await;
        if !opts.no_wait {
            edge.wait_healthy().await;
        }
        edge
    }

    /// Writes the config and spawns the process (port must be free).
    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "edge already running");
        wait_port_free(self.port).await;
        let config = render(&self.yaml, self.port, &self.dir_path);
        std::fs::write(self.config_path(), config).expect("write config.yaml");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open edge.log");
        let _ = writeln!(
            log,
            "==== test harness: starting {} -c {} on port {} ====",
            self.bin.display(),
            self.config_path().display(),
            self.port
        );
        let stderr = log.try_clone().expect("clone log handle");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(self.config_path())
            .args(&self.args)
            .current_dir(&self.dir_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        for var in PROXY_ENV {
            cmd.env_remove(var);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display())),
        );
    }

    /// Polls `GET /health` until any HTTP answer (the API may want a token: any status
    /// means the listener is up). Panics with the log if the process exits or 20 s pass.
    pub async fn wait_healthy(&mut self) {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(1))
            .build()
            .expect("reqwest client");
        let url = self.url("/health");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                // Drop prints the log tail while this panic unwinds.
                panic!(
                    "m3u-edge exited during start ({status}); log: {}",
                    self.log_path().display()
                );
            }
            if client.get(&url).send().await.is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "m3u-edge did not answer {url} within {START_TIMEOUT:?}; log: {}",
                    self.log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT/path` (a missing leading `/` is added).
    pub fn url(&self, path: &str) -> String {
        if path.starts_with('/') {
            format!("{}{}", self.base(), path)
        } else {
            format!("{}/{}", self.base(), path)
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir_path.join("config.yaml")
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir_path.join("state.json")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir_path.join("edge.log")
    }

    /// Everything the process wrote to stdout and stderr (all runs, with restart markers).
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Polls the log until it contains `needle`; returns whether it did within `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        super::eventually::eventually(timeout, || self.log().contains(needle)).await
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has exited (it is then reaped and forgotten).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit status (None if it was
    /// not running).
    pub async fn stop(&mut self) -> Option<ExitStatus> {
        let pid = self.child.as_ref()?.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait().ok();
                self.child = None;
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL at once (a crash, as far as the proxy's state file is concerned).
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// Stops the process and starts it again with the same dir, config, state file and
    /// port, then waits for `/health`.
    pub async fn restart(mut self) -> Edge {
        self.stop().await;
        self.spawn().await;
        self.wait_healthy().await;
        self
    }

    /// Like [`Edge::restart`] with a new YAML (same placeholders, same dir and port).
    pub async fn restart_with(mut self, yaml: &str) -> Edge {
        self.stop().await;
        self.yaml = yaml.to_string();
        self.spawn().await;
        self.wait_healthy().await;
        self
    }

    /// Stops the process and hands over its temp dir (state file included) for
    /// `StartOpts { dir: Some(..) }`.
    pub async fn into_dir(mut self) -> TempDir {
        self.stop().await;
        self.dir.take().expect("edge temp dir")
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "---- m3u-edge log ({}; last {} lines) ----\n{}\n---- end of m3u-edge log ----",
                self.log_path().display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Waits until `127.0.0.1:port` can be bound (a previous run may still hold it).
async fn wait_port_free(port: u16) {
    let deadline = Instant::now() + REBIND_TIMEOUT;
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        if Instant::now() >= deadline {
            panic!("port {port} still busy after {REBIND_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `m3u-edge -t -c <file>` on `yaml` (placeholders replaced, like [`Edge::start`])
/// and returns its output; killed after 30 s so a hanging check cannot hang the test.
pub fn check_config(yaml: &str) -> Output {
    let dir = tempfile::Builder::new()
        .prefix("m3u-edge-check")
        .tempdir()
        .expect("temp dir");
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, render(yaml, free_port(), dir.path())).expect("write config");
    run_bounded(&["-t", "-c", &path.display().to_string()], dir.path())
}

/// Runs the binary with `args` (e.g. `["-t", "-c", path]`), bounded to 30 s.
pub fn run_bin(args: &[&str]) -> Output {
    let dir = tempfile::Builder::new()
        .prefix("m3u-edge-run")
        .tempdir()
        .expect("temp dir");
    run_bounded(args, dir.path())
}

fn run_bounded(args: &[&str], dir: &Path) -> Output {
    const RUN_TIMEOUT: Duration = Duration::from_secs(30);
    let out_path = dir.join("stdout.txt");
    let err_path = dir.join("stderr.txt");
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"));
    for var in PROXY_ENV {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let status = child.wait().expect("wait");
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .open(&err_path)
                .and_then(|mut f| writeln!(f, "test harness: killed after {RUN_TIMEOUT:?}"));
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}
