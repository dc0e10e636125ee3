//! `App`: the shared handles every service and request uses, built once at start
//! from the validated config. Phases and API handlers receive `&App`; nothing
//! here touches a Pingora `Session`.

use std::sync::Arc;
use std::time::Instant;

use url::Url;

use crate::config::{Config, StreamConfig};
use crate::conn::caps::Caps;
use crate::conn::selfloop::SelfConns;
use crate::conn::ConnCaps;
use crate::events::{DeliverySettings, Events, Webhook};
use crate::hls::fetch::HlsFetcher;
use crate::hls::token::Signer;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::provider::{Leases, Providers};
use crate::registry::{Registry, StreamSpec};
use crate::state::{Loaded, Saver, StateData, StateError, StateFile, StateLock};
use crate::upstream::peer::Timeouts;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct App {
    pub config: Arc<Config>,
    pub registry: Registry,
    pub state: StateFile,
    /// Dirty flag and write status of `state` (writes happen in the
    /// background, never on a request).
    pub saver: Saver,
    /// The exclusive lock of the state file, held until exit (or until the
    /// state file is handed to the process taking over, `-u`).
    lock: parking_lot::Mutex<Option<StateLock>>,
    pub providers: Providers,
    pub leases: Leases,
    pub hub: Arc<Hub>,
    pub hls: HlsFetcher,
    pub events: Arc<Events>,
    pub metrics: Arc<Metrics>,
    /// Signs the references minted into HLS playlists.
    pub signer: Signer,
    /// The key `signer` uses, written to the state file.
    hls_key: Vec<u8>,
    pub started: Instant,
    /// For calls that are not relayed bytes: failover resolver, test-connection.
    pub http: reqwest::Client,
    /// Open client connections (`limits.max_connections*`).
    pub conns: Arc<ConnCaps>,
    /// Our own provider connections, to catch requests to ourselves.
    pub self_conns: Arc<SelfConns>,
    /// Running ffmpeg processes (`transcode.max_processes`).
    pub transcoders: Arc<Caps<()>>,
    /// The ffmpeg found at start.
    pub ffmpeg: crate::transcode::source::Ffmpeg,
    /// streamlink and yt-dlp: versions found at start, resolved URLs.
    pub resolvers: crate::resolvers::Resolvers,
    /// In-memory HLS of transcodes that asked for HLS.
    pub packagers: crate::transcode::packager::Packagers,
    /// For HLS playlists, segments, keys and init maps, and the live hub's
    /// sources: redirects are followed hop by hop (`hls::fetch::open`,
    /// `hub::reader::open`), each under its provider's lease, and sockets are
    /// not kept.
    pub hls_http: reqwest::Client,
    /// m3u-editor's networks (`/broadcast/...`).
    pub broadcasts: crate::broadcast::Broadcasts,
    /// Imported playlists, the guide cache, the HDHomeRun identity.
    pub playlists: crate::playlists::Playlists,
    /// `cluster:`: the shared state on Redis; `None` on a single node.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Cluster mode: the cluster-wide totals `/health` shows.
    pub cluster_totals: crate::cluster::registry::totals::TotalsCache,
}

/// The registry's view of a `streams:` entry.
fn config_spec(s: &StreamConfig) -> StreamSpec {
    StreamSpec {
        url: s.url.to_string(),
        failover_urls: s.failover_urls.iter().map(|u| u.to_string()).collect(),
        failover_resolver_url: s.failover_resolver_url.as_ref().map(|u| u.to_string()),
        user_agent: s.user_agent.clone(),
        headers: s.headers.clone(),
        metadata: s.metadata.clone(),
        live: s.live,
        sticky: s.sticky,
        strict_live_ts: false,
        provider: s.provider.clone(),
        transcode: None,
        resolver: None,
        silence: None,
    }
}

impl App {
    /// Builds the app: YAML streams first, then the state file's API streams.
    pub fn new(config: Config) -> anyhow::Result<Arc<App>> {
        crate::upstream::guard::configure(&config.security);
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(config.upstream.connect_timeout)
            .dns_resolver(Arc::new(crate::upstream::guard::Resolver))
            .connector_layer(crate::upstream::guard::CheckConnected)
            .redirect(crate::upstream::guard::redirect_policy(
                config.upstream.max_redirects,
            ))
            .user_agent(config.upstream.user_agent.clone())
            .build()?;
        let hls_http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(config.upstream.connect_timeout)
            .dns_resolver(Arc::new(crate::upstream::guard::Resolver))
            .connector_layer(crate::upstream::guard::CheckConnected)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .user_agent(config.upstream.user_agent.clone())
            .build()?;
        let metrics = Metrics::new();
        metrics.init_providers(
            config
                .providers
                .iter()
                .map(|p| (p.name.as_str(), p.max_connections)),
        );
        let events = Events::with_settings(
            config.events.queue_size,
            config.events.webhooks.iter().map(Webhook::from).collect(),
            metrics.clone(),
            DeliverySettings {
                flush_timeout: config.server.shutdown_timeout,
                ..DeliverySettings::default()
            },
        );
        let state = StateFile::new(config.server.state_file.clone());
        let restored = match state.load() {
            Loaded::Missing => {
                tracing::info!(
                    path = %state.path().display(),
                    "no state file yet; starting with the YAML streams only"
                );
                StateData::default()
            }
            Loaded::Ok(data) => data,
            Loaded::Corrupt { moved_to, error } => {
                tracing::error!(
                    path = %state.path().display(),
                    moved_to = %moved_to.display(),
                    %error,
                    "state file unreadable: moved aside, starting without its streams"
                );
                StateData::default()
            }
        };
        // The HLS signing key: from the config, else the one kept in the state
        // file, so references in playlists players already hold stay valid
        // across a restart; else a new one, saved right away.
        let kept_key = restored
            .hls_key
            .as_deref()
            .and_then(|k| hex::decode(k).ok())
            .filter(|b| b.len() >= 16);
        let fresh = config.hls.token_key.is_none() && kept_key.is_none();
        let hls_key = config
            .hls
            .token_key
            .clone()
            .or(kept_key)
            .unwrap_or_else(|| Signer::generate_key().to_vec());
        let limits = crate::registry::RegistryLimits {
            max_streams: config.limits.max_streams,
            per_stream: config.limits.max_viewers_per_stream,
            per_address: config.limits.max_viewers_per_address,
            hls_per_stream: config.limits.max_hls_clients_per_stream,
            hls_per_address: config.limits.max_hls_clients_per_address,
        };
        let cluster = match &config.cluster {
            Some(c) => Some(crate::cluster::Cluster::new(c, metrics.registry())?),
            None => None,
        };
        if let Some(c) = &cluster {
            events.attach_cluster(c.clone());
        }
        let app = App {
            registry: Registry::with_caps(Some(events.clone()), limits),
            broadcasts: crate::broadcast::Broadcasts::new(
                config.broadcast.clone(),
                events.clone(),
                limits,
            ),
            events,
            state,
            saver: Saver::new(config.server.state_save_delay),
            lock: parking_lot::Mutex::new(None),
            providers: Providers::new(&config.providers),
            leases: Leases::with_cluster(&config.providers, cluster.clone()),
            hub: Arc::new(Hub::new()),
            hls: HlsFetcher::new(config.hls.segment_cache_bytes, metrics.clone()),
            signer: Signer::new(&hls_key),
            hls_key,
            metrics,
            started: Instant::now(),
            http,
            conns: Caps::new(
                crate::conn::max_connections(
                    config.limits.max_connections,
                    crate::conn::raise_open_files_limit(),
                ),
                config.limits.max_connections_per_address,
            ),
            self_conns: SelfConns::new(),
            transcoders: Caps::new(config.transcode.max_processes, 0),
            ffmpeg: crate::transcode::source::probe(&config.transcode),
            packagers: Default::default(),
            resolvers: crate::resolvers::Resolvers::new(&config.resolvers),
            hls_http,
            playlists: crate::playlists::Playlists::new(&config)?,
            cluster,
            cluster_totals: Default::default(),
            config: Arc::new(config),
        };
        for s in &app.config.streams {
            app.registry.add_config(s.id.clone(), config_spec(s));
        }
        // After the YAML streams: a YAML stream wins over a persisted one.
        // In cluster mode API streams and webhooks live in Redis instead.
        let (streams, webhooks) = if app.cluster.is_some() {
            (Vec::new(), Vec::new())
        } else {
            (restored.streams, restored.webhooks)
        };
        let n = app.registry.restore(streams);
        app.events.restore(webhooks);
        if n > 0 {
            tracing::info!(path = %app.state.path().display(), streams = n, "state restored");
        }
        if fresh {
            app.persist();
        }
        Ok(Arc::new(app))
    }

    /// Removes a stream: its viewers are disconnected and its live channel
    /// (and provider connection) closed at once.
    pub fn remove_stream(&self, id: &str, reason: &str) -> bool {
        let viewers = self.registry.get(id).map_or(0, |s| s.client_count());
        let removed = self.registry.remove(id, reason).is_some();
        for _ in 0..viewers {
            self.metrics
                .client_drop(crate::metrics::DropReason::StreamDeleted);
        }
        self.hub.close(id);
        self.hls.forget(id);
        if removed {
            tracing::info!(stream_id = %id, reason, "stream removed");
        }
        removed
    }

    /// Drops this node's copy of an API stream deleted on another node (or
    /// found gone from the cluster store): its viewers here are cut, its
    /// live channel closed. See [`Registry::evict`].
    pub fn evict_stream(&self, id: &str, reason: &str) -> bool {
        let viewers = self.registry.get(id).map_or(0, |s| s.client_count());
        let evicted = self.registry.evict(id, reason).is_some();
        if evicted {
            for _ in 0..viewers {
                self.metrics
                    .client_drop(crate::metrics::DropReason::StreamDeleted);
            }
            self.hub.close(id);
            self.hls.forget(id);
        }
        evicted
    }

    /// Sets the gauges that are a view of current state, just before a scrape.
    pub fn refresh_gauges(&self) {
        use crate::metrics::ClientKind;
        let m = &self.metrics;
        let streams = self.registry.list();
        m.streams_registered.set(streams.len() as i64);
        let (mut live, mut file, mut hls, mut active) = (0i64, 0i64, 0i64, 0i64);
        for s in &streams {
            let clients = s.clients();
            if !clients.is_empty() {
                active += 1;
            }
            let on_hub = self.hub.channel(&s.id).is_some();
            for c in clients {
                match (c.idle_timeout.is_some(), on_hub) {
                    (true, _) => hls += 1,
                    (false, true) => live += 1,
                    (false, false) => file += 1,
                }
            }
        }
        m.streams_active.set(active);
        m.client_connections.set(self.conns.open() as i64);
        m.clients(ClientKind::Live).set(live);
        m.clients(ClientKind::File).set(file);
        m.clients(ClientKind::Hls)
            .set(hls + self.broadcasts.viewer_count() as i64);
        let channels = self.hub.channels();
        m.live_channels.set(channels.len() as i64);
        for (name, in_use, _) in self.leases.usage() {
            m.upstream(Some(&name)).set(in_use as i64);
        }
        let unmanaged = channels
            .iter()
            .filter(|c| c.provider_name().is_none())
            // A channel relayed from its owner node holds no provider connection.
            .filter(|c| {
                self.cluster
                    .as_ref()
                    .is_none_or(|cl| cl.table().is_sourced_here(&c.stream.id))
            })
            .count();
        m.upstream(None).set(unmanaged as i64);
        m.webhooks_registered
            .set(self.events.webhooks().len() as i64);
    }

    /// The persisted registry changed: it is written in the background
    /// within `server.state_save_delay` (see `state::SaverService`), so a
    /// request never waits for the disk.
    pub fn persist(&self) {
        self.saver.mark();
    }

    /// Writes the persisted state now (blocking: call it from a blocking
    /// thread or the shutdown path) and records the outcome.
    pub fn save_state(&self) -> Result<(), StateError> {
        // In cluster mode the registry holds only a cache of Redis.
        let local = self.cluster.is_none();
        let data = StateData {
            version: 0,
            streams: if local {
                self.registry.persisted()
            } else {
                Vec::new()
            },
            hls_key: Some(hex::encode(&self.hls_key)),
            webhooks: if local {
                self.events.api_webhooks()
            } else {
                Vec::new()
            },
        };
        let result = self.state.save(data);
        self.saver.record(&result, &self.metrics);
        result
    }

    /// The last write before the state file is closed (shutdown, or the
    /// hand-over of `-u`): written whether dirty or not, since byte counters
    /// moved anyway. No write happens after this.
    pub fn final_save(&self) {
        self.saver.take_dirty();
        match self.save_state() {
            Ok(()) => tracing::info!(path = %self.state.path().display(), "state saved"),
            Err(e) => tracing::error!(error = %e, "last state save failed"),
        }
        self.state.close();
    }

    /// Keeps the state file's lock for the life of the process.
    pub fn hold_lock(&self, lock: StateLock) {
        *self.lock.lock() = Some(lock);
    }

    /// Rewrites the pid in the lock file (after a daemon fork).
    pub fn refresh_lock_pid(&self) {
        if let Some(l) = self.lock.lock().as_mut() {
            if let Err(e) = l.write_pid() {
                tracing::warn!(error = %e, "could not write the pid into the state lock file");
            }
        }
    }

    /// Lets go of the state file's lock (`-u`: the new process takes over).
    pub fn release_lock(&self) {
        if self.lock.lock().take().is_some() {
            tracing::info!(path = %self.state.path().display(), "state file released");
        }
    }

    /// The shutdown path: every client is dropped (its requests end, the
    /// live channels close and free their provider connections), each with
    /// `client_disconnected`, and each stream with a session with
    /// `stream_stopped`, both with `reason`. Returns how many clients.
    pub fn cut_viewers(&self, reason: &str) -> usize {
        let mut n = 0;
        for s in self.registry.list() {
            n += s.disconnect_all(reason);
        }
        for ch in self.hub.channels() {
            self.hub.close(&ch.stream.id);
        }
        n
    }

    /// SIGHUP: applies what can change without a restart from the freshly
    /// loaded and validated `new` config: `log.level`, `events.webhooks`
    /// and `streams` (a stream whose definition changed is replaced, its
    /// viewers disconnected; one no longer listed is removed). Everything
    /// else is logged as needing a restart.
    pub fn reload(&self, new: &Config) {
        match crate::logging::reload_level(&new.log.level) {
            Ok(crate::logging::Reload::EnvWins) => {
                tracing::info!("reload: RUST_LOG is set and keeps precedence over log.level")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reload: log.level not applied"),
        }
        let (hooks_added, hooks_removed) = self
            .events
            .replace_config_webhooks(new.events.webhooks.iter().map(Webhook::from).collect());
        let (mut added, mut changed, mut removed) = (0, 0, 0);
        for s in &new.streams {
            let spec = config_spec(s);
            match self.registry.get(&s.id) {
                Some(old)
                    if old.origin == crate::registry::Origin::Config && *old.spec() == spec => {}
                Some(_) => {
                    self.remove_stream(&s.id, "config_reload");
                    self.registry.add_config(s.id.clone(), spec);
                    changed += 1;
                }
                None => {
                    self.registry.add_config(s.id.clone(), spec);
                    added += 1;
                }
            }
        }
        for old in self.registry.list() {
            if old.origin == crate::registry::Origin::Config
                && !new.streams.iter().any(|s| s.id == old.id)
            {
                self.remove_stream(&old.id, "config_reload");
                removed += 1;
            }
        }
        if changed > 0 {
            // An API stream may have been replaced by a YAML one.
            self.persist();
        }
        let mut rest = new.clone();
        rest.log = self.config.log.clone();
        rest.events.webhooks = self.config.events.webhooks.clone();
        rest.streams = self.config.streams.clone();
        let restart_needed = rest != *self.config;
        tracing::info!(
            log_level = %new.log.level,
            webhooks_added = hooks_added,
            webhooks_removed = hooks_removed,
            streams_added = added,
            streams_changed = changed,
            streams_removed = removed,
            "config reloaded (log.level, events.webhooks, streams)"
        );
        if restart_needed {
            tracing::warn!(
                "reload: other settings changed in the config file; they take effect at the next restart"
            );
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: self.config.upstream.connect_timeout,
            read: self.config.upstream.read_timeout,
        }
    }

    /// The user agent the provider sees: the stream's, else its provider's,
    /// else `upstream.user_agent`.
    pub fn user_agent_for(&self, spec: &StreamSpec, url: &Url) -> String {
        spec.user_agent
            .clone()
            .or_else(|| {
                self.providers
                    .for_stream(spec, url)
                    .and_then(|p| p.user_agent.clone())
            })
            .unwrap_or_else(|| self.config.upstream.user_agent.clone())
    }

    /// Extra request headers: the provider's, overridden by the stream's.
    pub fn headers_for(&self, spec: &StreamSpec, url: &Url) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .providers
            .for_stream(spec, url)
            .map(|p| p.headers.clone())
            .unwrap_or_default();
        for (k, v) in &spec.headers {
            out.retain(|(ok, _)| !ok.eq_ignore_ascii_case(k));
            out.push((k.clone(), v.clone()));
        }
        out
    }
}
