//! Several m3u-edge nodes on one Redis (or Valkey): a shared registry, one
//! provider connection per channel cluster-wide, provider limits and events
//! held across nodes. The design, key schema and failure table are in
//! ../shared/CLUSTER.md; the README's "Cluster" section is the user's view.
//!
//! `Cluster` is built only when `cluster:` is configured (`App.cluster`);
//! without it nothing here runs and m3u-edge works on its state file alone.
//! Redis work runs on the cluster's own small runtime, so no Pingora service
//! runtime carries the Redis connection or the session heartbeat.

pub mod auth;
pub mod bus;
pub mod delivery;
pub mod events;
pub mod hls;
pub mod internal;
pub mod keys;
pub mod leases;
pub mod metrics;
pub mod once;
pub mod owner;
pub mod ownership;
pub mod registry;
pub mod relay;
pub mod ring;
pub mod serve_live;
mod session;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::{broadcast, watch};

use crate::config::ClusterConfig;
pub use bus::{Bus, Envelope};
pub use keys::Keys;
use metrics::ClusterMetrics;

/// Every Redis command gives up after this: the API answers 503 fast rather
/// than hang on a hung Redis.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ClusterError {
    /// Redis did not answer (down, hung, unreachable) or refused the command.
    #[error("cluster store (Redis) unavailable: {0}")]
    Unavailable(String),
    /// This node holds no live session (it lost Redis for too long): it
    /// takes nothing until it has one again.
    #[error("this node is not in the cluster right now (no live session in Redis)")]
    Fenced,
    /// Redis answered something our scripts never return.
    #[error("unexpected answer from the cluster store: {0}")]
    Protocol(String),
}

/// A live node, as `live_nodes` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub addr: SocketAddr,
    pub session: String,
}

/// KEYS: nodes. ARGV: key prefix.
const LIVE_NODES: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local s = redis.call('GET', ARGV[1] .. 'node:' .. id)
  if s then
    local addr = redis.call('HGET', ARGV[1] .. 'nodeinfo:' .. id, 'addr')
    table.insert(out, id)
    table.insert(out, s)
    table.insert(out, addr or '')
  end
end
return out
"#;

static LIVE_NODES_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LIVE_NODES));

/// A Redis URL with its password replaced, for logs and `/stats`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(invalid URL)".to_owned(),
    }
}

pub struct Cluster {
    config: ClusterConfig,
    keys: Keys,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    client: redis::Client,
    /// Multiplexed, reconnects in the background; clones share it.
    conn: ConnectionManager,
    session: session::Session,
    bus: bus::BusHandles,
    bus_rx: Mutex<Option<tokio::sync::mpsc::Receiver<Envelope>>>,
    /// Bumped when Redis answers again after failing.
    recovered: watch::Sender<u64>,
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
    peer_http: reqwest::Client,
    /// Live nodes as last read (status.rs).
    peers: Mutex<Vec<NodeInfo>>,
    pub metrics: ClusterMetrics,
    started_ms: i64,
    /// Live channels this node owns or relays (relay.rs).
    relays: owner::Table,
    /// Who fetches each HLS stream (hls.rs).
    pub hls: hls::HlsOwners,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Cluster {
    /// Builds the cluster handle; connects lazily. Call [`Cluster::start`]
    /// once the process is set up (after Pingora's daemon fork).
    pub fn new(
        config: &ClusterConfig,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Arc<Cluster>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cluster")
            .enable_all()
            .build()?;
        let client = redis::Client::open(config.redis_url.as_str())?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = {
            let _in = runtime.enter();
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?
        };
        let (bus, bus_rx) = bus::handles();
        let peer_http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(1))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Arc::new(Cluster {
            keys: Keys::new(&config.name),
            config: config.clone(),
            handle: runtime.handle().clone(),
            runtime: Mutex::new(Some(runtime)),
            client,
            conn,
            session: session::Session::new(),
            bus,
            bus_rx: Mutex::new(Some(bus_rx)),
            recovered: watch::Sender::new(0),
            up: AtomicBool::new(false),
            last_error: Mutex::new(None),
            peer_http,
            peers: Mutex::new(Vec::new()),
            metrics: ClusterMetrics::new(registry)?,
            started_ms: chrono::Utc::now().timestamp_millis(),
            relays: owner::Table::default(),
            hls: hls::HlsOwners::default(),
        }))
    }

    /// Starts the heartbeat, the fencing watchdog and the bus.
    pub fn start(self: &Arc<Self>) {
        self.spawn(session::heartbeat(self.clone()));
        self.spawn(session::watchdog(self.clone()));
        if let Some(rx) = self.bus_rx.lock().take() {
            self.spawn(bus::publisher(self.clone(), rx));
        }
        self.spawn(bus::subscriber(self.clone()));
        self.spawn(status::peer_gauge(self.clone()));
        tracing::info!(
            node = self.node_id(),
            redis = %redact_url(&self.config.redis_url),
            listen = %self.config.listen,
            advertise = %self.config.advertise,
            "cluster mode"
        );
    }

    /// Stops the heartbeat, bus and every task spawned with
    /// [`Cluster::spawn`]; the session then expires after `node_ttl` and
    /// other nodes take over. The last step of a shutdown.
    pub fn shutdown(&self) {
        // A runtime may not be dropped inside another one (tests and the
        // shutdown path run in async contexts): its threads go in the
        // background.
        if let Some(rt) = self.runtime.lock().take() {
            rt.shutdown_background();
        }
    }

    /// Waits until the node holds a session, at most `timeout`.
    pub async fn joined(&self, timeout: Duration) -> bool {
        let mut rx = self.session.session_changes();
        let wait = async {
            while self.session_left().is_zero() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// [`Cluster::joined`] for the main thread, before Pingora runs.
    pub fn join_blocking(&self, timeout: Duration) -> bool {
        self.handle.block_on(self.joined(timeout))
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    pub fn advertise(&self) -> SocketAddr {
        self.config.advertise
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A handle on the shared Redis connection (cheap clone). Commands on it
    /// time out after [`COMMAND_TIMEOUT`]; prefer [`Cluster::run`], which
    /// also records the outcome.
    pub async fn redis(&self) -> Result<ConnectionManager, ClusterError> {
        Ok(self.conn.clone())
    }

    /// Runs one Redis call with the timeout, counting failures and keeping
    /// `redis_up` current.
    pub async fn run<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        match tokio::time::timeout(COMMAND_TIMEOUT, call).await {
            Ok(Ok(v)) => {
                self.set_up(true);
                Ok(v)
            }
            Ok(Err(e)) => {
                let msg = e.to_string();
                if e.kind() == redis::ErrorKind::UnexpectedReturnType {
                    return Err(ClusterError::Protocol(msg));
                }
                self.note_error(&msg);
                Err(ClusterError::Unavailable(msg))
            }
            Err(_) => {
                self.note_error("timed out");
                Err(ClusterError::Unavailable(format!(
                    "no answer within {}",
                    humantime::format_duration(COMMAND_TIMEOUT)
                )))
            }
        }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
        self.metrics.redis_up.set(i64::from(up));
    }

    fn note_error(&self, msg: &str) {
        self.metrics.redis_errors.inc();
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                node = self.node_id(),
                error = msg,
                "cluster: Redis unavailable"
            );
        }
        self.metrics.redis_up.set(0);
        *self.last_error.lock() = Some(msg.to_owned());
    }

    /// The latest Redis command (or heartbeat) succeeded.
    pub fn redis_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// The current session token (changes when the node fences).
    pub fn session(&self) -> String {
        self.session.token()
    }

    /// How long this node may still act as owner on its session.
    pub fn session_left(&self) -> Duration {
        self.session.left()
    }

    /// False while fenced: no session, or one about to run out.
    pub fn holds_session(&self) -> bool {
        !self.session_left().is_zero()
    }

    /// Bumped every time this node fences: owners close their provider
    /// connections at once.
    pub fn fence_changes(&self) -> watch::Receiver<u64> {
        self.session.fence_changes()
    }

    /// Bumped every time a new session opens: owners retake channels that
    /// still have viewers.
    pub fn session_changes(&self) -> watch::Receiver<u64> {
        self.session.session_changes()
    }

    /// Nodes whose session is alive (this one included once joined).
    pub async fn live_nodes(&self) -> Result<Vec<NodeInfo>, ClusterError> {
        let flat: Vec<String> = self
            .run(
                LIVE_NODES_SCRIPT
                    .key(self.keys.nodes())
                    .arg(self.keys.prefix())
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
        Ok(flat
            .chunks_exact(3)
            .filter_map(|c| {
                Some(NodeInfo {
                    id: c[0].clone(),
                    session: c[1].clone(),
                    addr: c[2].parse().ok()?,
                })
            })
            .collect())
    }

    /// This node's position among `nodes` in the take-over order of
    /// `stream_id` (0 goes first); `nodes.len()` when it is not among them.
    pub fn takeover_rank(&self, stream_id: &str, nodes: &[NodeInfo]) -> usize {
        let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        ring::rank(stream_id, &addrs, self.advertise()).unwrap_or(addrs.len())
    }

    /// Sends `msg` to every node (this one too). Never blocks.
    pub fn publish(&self, msg: Bus) {
        let env = Envelope {
            from: self.node_id().to_owned(),
            msg,
        };
        if self.bus.outbox.try_send(env).is_err() {
            tracing::debug!("cluster bus: outbox full, message dropped");
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Envelope> {
        self.bus.inbox.subscribe()
    }

    /// Runs `fut` on the cluster's runtime.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(fut)
    }

    /// Headers authenticating a request of this node to a peer.
    pub fn sign(&self, method: &str, path_and_query: &str) -> Vec<(&'static str, String)> {
        auth::sign(&self.config.secret, self.node_id(), method, path_and_query)
    }

    pub fn verify(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &http::HeaderMap,
    ) -> Result<String, auth::AuthError> {
        auth::verify(&self.config.secret, method, path_and_query, headers)
    }

    /// Live channels this node owns or relays.
    pub fn table(&self) -> &owner::Table {
        &self.relays
    }

    /// For node-to-node requests: no proxy, no redirects, 1 s to connect.
    pub fn peer_http(&self) -> &reqwest::Client {
        &self.peer_http
    }
}
