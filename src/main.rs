//! `m3u-edge -c FILE`: validate the YAML, build the app, hand the services to
//! Pingora. Our config is checked before Pingora's bootstrap so `-t` and bad
//! configs never reach Pingora (whose own `-t` exits inside bootstrap).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pingora::prelude::*;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::services::background::background_service;

use m3u_edge::app::App;
use m3u_edge::conn::FrontDoor;
use m3u_edge::housekeeping::Housekeeper;
use m3u_edge::lifecycle::Lifecycle;
use m3u_edge::proxy::Edge;
use m3u_edge::state::{SaverService, StateLock};
use m3u_edge::{config, logging};

/// Read buffer of a client connection (Pingora's default is 64 KiB). None:
/// Pingora reads request headers straight into its own header buffer, and a
/// live viewer keeps its connection for hours while only being written to.
const DOWNSTREAM_READ_BUFFER: usize = 0;
/// Write buffer of a client connection (Pingora's default is 1460 bytes).
/// A response header and a playlist body then leave in one send() instead
/// of two, which is a third of the cost of a playlist poll.
const DOWNSTREAM_WRITE_BUFFER: usize = 8 * 1024;

#[derive(Parser, Debug)]
#[command(name = "m3u-edge", version, about = "IPTV streaming proxy on Pingora")]
struct Cli {
    /// The YAML config file.
    #[arg(short = 'c', long = "conf", default_value = "conf/m3u-edge.yaml")]
    conf: PathBuf,
    /// Check the config and exit: 0 when valid, 1 with the errors otherwise.
    #[arg(short = 't', long = "test")]
    test: bool,
    /// Run in the background (Pingora daemon mode).
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
    /// Take over the listening sockets of a running instance (Pingora upgrade).
    #[arg(short = 'u', long = "upgrade")]
    upgrade: bool,
}

/// How long `-u` waits for the running instance to release the state file.
const UPGRADE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Fails when `addr` cannot be bound (another process listens there), with
/// the config key to change.
fn check_free(addr: std::net::SocketAddr, key: &str) -> anyhow::Result<()> {
    match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            drop(l);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
            "cannot listen on {addr} ({key}): the address is in use by another process \
             (another m3u-edge? use -u to take over from it)"
        ),
        Err(e) => anyhow::bail!("cannot listen on {addr} ({key}): {e}"),
    }
}

/// How long start-up waits for the cluster session before serving anyway.
const CLUSTER_JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::load(&cli.conf) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("m3u-edge: invalid config:");
            for m in e.messages() {
                eprintln!("  {m}");
            }
            return ExitCode::from(1);
        }
    };
    if cli.test {
        println!("{}: ok", cli.conf.display());
        return ExitCode::SUCCESS;
    }
    logging::init(&config.log.level);
    match run(cli, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("m3u-edge: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli, config: config::Config) -> anyhow::Result<()> {
    let listen = config.server.listen;
    let grace = config.server.grace_period.as_secs_f64().ceil() as u64;
    let threads = config.server.threads;
    match (&config.api.token, config.api.allow_open) {
        (Some(_), _) => {}
        (None, false) => tracing::warn!(
            "api.token is not set: the management API answers only to loopback clients \
             (Host: localhost or an address); set api.token (or api.allow_open: true)"
        ),
        (None, true) => tracing::warn!(
            "api.token is not set and api.allow_open is true: the management API is OPEN \
             to anyone who can reach {listen}"
        ),
    }
    tracing::info!(config = %cli.conf.display(), %listen, root_path = %config.server.root_path, "starting m3u-edge {}", m3u_edge::app::VERSION);

    // One process per state file, and a busy port is an error, not an
    // endless retry: both checked before Pingora starts. With `-u` the
    // sockets come from the running instance and the state file is free
    // once it has handed them over (see lifecycle.rs).
    if cli.upgrade && config.cluster.is_some() {
        // Two processes of one node would share one node id and session.
        anyhow::bail!(
            "-u (upgrade) is not supported in cluster mode: restart nodes one at a time; \
             their channels move to the other nodes and back"
        );
    }
    let state_file = config.server.state_file.clone();
    let mut lock = None;
    if !cli.upgrade {
        lock = Some(StateLock::try_acquire(&state_file)?);
        check_free(listen, "server.listen")?;
        if let Some(addr) = config.metrics.listen {
            check_free(addr, "metrics.listen")?;
        }
        if let Some(c) = &config.cluster {
            check_free(c.listen, "cluster.listen")?;
        }
    }
    let shutdown_timeout = config.server.shutdown_timeout.as_secs_f64().ceil() as u64;

    let opt = Opt {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let conf = ServerConf {
        threads,
        // A backstop only: lifecycle.rs ends the process once viewers are
        // cut, the state written and the events delivered.
        grace_period_seconds: Some(grace + shutdown_timeout + 1),
        graceful_shutdown_timeout_seconds: Some(1),
        // Redirect hops and failover sources each take one attempt.
        max_retries: 64,
        pid_file: format!("/tmp/m3u-edge-{}.pid", listen.port()),
        upgrade_sock: format!("/tmp/m3u-edge-{}-upgrade.sock", listen.port()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let lock = match lock {
        Some(l) => l,
        // The old process unlocks once it has handed over its sockets and
        // stopped accepting (5 s after SIGQUIT, Pingora's close timeout).
        None => StateLock::acquire_within(&state_file, UPGRADE_LOCK_WAIT)?,
    };
    let app = App::new(config)?;
    app.hold_lock(lock);

    let proxy = pingora::proxy::http_proxy(&server.configuration, Edge::new(app.clone()));
    let mut edge = pingora::services::listening::Service::new(
        "edge".to_string(),
        FrontDoor::new(proxy, app.clone()),
    );
    edge.add_listener(
        pingora::listeners::ListenerConfig::tcp(listen.to_string()).l4_buffer(
            pingora::protocols::l4::stream::L4BufferSettings::new(
                DOWNSTREAM_READ_BUFFER,
                DOWNSTREAM_WRITE_BUFFER,
            ),
        ),
    );
    server.add_service(edge);
    server.add_service(background_service(
        "housekeeping",
        Housekeeper { app: app.clone() },
    ));
    server.add_service(background_service("events", app.events.service()));
    server.add_service(background_service(
        "broadcast",
        m3u_edge::broadcast::Sweeper { app: app.clone() },
    ));
    server.add_service(background_service(
        "state",
        SaverService { app: app.clone() },
    ));
    server.add_service(background_service(
        "lifecycle",
        Lifecycle::new(
            app.clone(),
            cli.conf.clone(),
            server.watch_execution_phase(),
        ),
    ));
    server.add_service(background_service(
        "playlists",
        m3u_edge::playlists::import::PlaylistService { app: app.clone() },
    ));
    server.add_service(background_service(
        "ssdp",
        m3u_edge::playlists::ssdp::SsdpService { app: app.clone() },
    ));
    if let Some(cluster) = &app.cluster {
        cluster.start();
        if let Some(leases) = app.leases.cluster() {
            leases.start();
        }
        let mut internal = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            Edge::internal(app.clone()),
            "cluster",
        );
        internal.add_tcp(&cluster.config().listen.to_string());
        server.add_service(internal);
        // Serve once the node has a session, or after the wait (Redis down
        // at boot: /health says why and the node joins when Redis is back).
        let joined = cluster.join_blocking(CLUSTER_JOIN_WAIT);
        if !joined {
            tracing::warn!(
                "cluster: no session after {:?} (Redis unreachable?); serving anyway, /health answers 503 until joined",
                CLUSTER_JOIN_WAIT
            );
        }
        // The shared registry's upkeep; with Redis up, serve once the shared
        // HLS signing key is read.
        let key_wait = if joined {
            CLUSTER_JOIN_WAIT
        } else {
            std::time::Duration::ZERO
        };
        m3u_edge::cluster::registry::upkeep::start(&app, cluster, key_wait);
    }
    if let Some(addr) = app.config.metrics.listen {
        server.add_service(m3u_edge::metrics::service(app.metrics.clone(), addr));
        tracing::info!(%addr, "metrics listener");
    }
    tracing::info!(%listen, "listening");
    server.run_forever();
}
