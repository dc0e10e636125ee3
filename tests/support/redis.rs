//! A real `redis-server` (Debian's package, installed by `scripts/deps.sh
//! --test-tools`) on a free loopback port, for the cluster tests: no
//! persistence, its own temp dir, killed on drop. `pause`/`resume` send
//! SIGSTOP/SIGCONT to simulate a hung Redis.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::edge::free_port;

/// Bounded start: redis-server answers PING within milliseconds normally.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    child: Child,
    port: u16,
    _dir: TempDir,
}

/// The redis-server binary, if installed (`M3U_EDGE_REDIS_SERVER` overrides).
pub fn binary() -> Option<String> {
    if let Ok(p) = std::env::var("M3U_EDGE_REDIS_SERVER") {
        return Some(p);
    }
    let ok = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| "redis-server".to_owned())
}

impl RedisServer {
    /// Starts one, or prints why not and returns `None` (the test skips).
    pub async fn start() -> Option<RedisServer> {
        let Some(bin) = binary() else {
            eprintln!(
                "SKIPPED: redis-server not installed (scripts/deps.sh --test-tools installs it)"
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("m3u-edge-redis")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !server.ping().await {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(server)
    }

    /// PING over a raw socket (the tests need no Redis client for it).
    pub async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(("127.0.0.1", self.port)),
        )
        .await
        else {
            return false;
        };
        if s.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await,
            Ok(Ok(n)) if buf[..n].starts_with(b"+PONG")
        )
    }

    /// Runs one command with `redis-cli`-free RESP over a socket; the raw reply.
    pub async fn command(&self, args: &[&str]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect redis");
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).await.expect("write redis");
        let mut buf = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("redis reply in time")
            .expect("read redis");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGSTOP: Redis hangs (connections stay open, nothing answers).
    pub fn pause(&self) {
        signal(self.child.id(), "-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        signal(self.child.id(), "-CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        signal(self.child.id(), "-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
