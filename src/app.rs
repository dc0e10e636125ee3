//! `App`: the shared handles every service and request uses, built once at start
//! from the validated config. Phases and API handlers receive `&App`; nothing
//! here touches a Pingora `Session`.

use std::sync::Arc;
use std::time::Instant;

use url::Url;

use crate::config::Config;
use crate::hub::Hub;
use crate::provider::{Leases, Providers};
use crate::registry::{Registry, StreamSpec};
use crate::state::{Loaded, StateFile};
use crate::upstream::peer::Timeouts;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct App {
    pub config: Arc<Config>,
    pub registry: Registry,
    pub state: StateFile,
    pub providers: Providers,
    pub leases: Leases,
    pub hub: Arc<Hub>,
    pub started: Instant,
    /// For calls that are not relayed bytes: failover resolver, test-connection.
    pub http: reqwest::Client,
}

impl App {
    /// Builds the app: YAML streams first, then the state file's API streams.
    pub fn new(config: Config) -> anyhow::Result<Arc<App>> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(config.upstream.connect_timeout)
            .redirect(reqwest::redirect::Policy::limited(
                config.upstream.max_redirects,
            ))
            .user_agent(config.upstream.user_agent.clone())
            .build()?;
        let app = App {
            registry: Registry::new(),
            state: StateFile::new(config.server.state_file.clone()),
            providers: Providers::new(&config.providers),
            leases: Leases::new(&config.providers),
            hub: Arc::new(Hub::new()),
            started: Instant::now(),
            http,
            config: Arc::new(config),
        };
        for s in &app.config.streams {
            app.registry.add_config(
                s.id.clone(),
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
                },
            );
        }
        match app.state.load() {
            Loaded::Missing => tracing::info!(
                path = %app.state.path().display(),
                "no state file yet; starting with the YAML streams only"
            ),
            Loaded::Ok(data) => {
                let n = app.registry.restore(data.streams);
                tracing::info!(path = %app.state.path().display(), streams = n, "state restored");
            }
            Loaded::Corrupt { moved_to, error } => tracing::error!(
                path = %app.state.path().display(),
                moved_to = %moved_to.display(),
                %error,
                "state file unreadable: moved aside, starting without its streams"
            ),
        }
        Ok(Arc::new(app))
    }

    /// Removes a stream: its viewers are disconnected and its live channel
    /// (and provider connection) closed at once.
    pub fn remove_stream(&self, id: &str, reason: &str) -> bool {
        let removed = self.registry.remove(id).is_some();
        self.hub.close(id);
        if removed {
            tracing::info!(stream_id = %id, reason, "stream removed");
        }
        removed
    }

    /// Writes the persisted registry; failures are logged, the API keeps working.
    pub fn persist(&self) {
        if let Err(e) = self.state.save(self.registry.persisted()) {
            tracing::error!(error = %e, "state not saved");
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
