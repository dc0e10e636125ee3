//! Prometheus metrics (DESIGN.md "Metrics"): every family in one struct,
//! registered in m3u-edge's own [`Registry`] (not the process-global one, so
//! tests and benches can build as many as they like), plus the standard
//! `process_*` families of this process.
//!
//! Labels are low-cardinality by construction: their values come from the
//! enums below or from provider names in the YAML config (`"none"` for
//! streams without one) — never stream ids, URLs or client addresses.
//!
//! Who calls it: `main.rs` builds one [`Metrics`] and hands it to the app;
//! the hub, proxy phases and the events service update its fields; the
//! `/metrics` route of the main listener answers with [`Metrics::render`],
//! and `metrics.listen` adds the extra listener from [`service`].

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The provider label of streams that match no configured provider.
pub const NO_PROVIDER: &str = "none";

/// Buckets of `m3u_edge_join_seconds`, 1 ms to 10 s: a hub join answers
/// from memory in about a millisecond, a cold start waits for the provider
/// (often seconds).
const JOIN_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Buckets of `m3u_edge_upstream_connect_seconds`: TCP+TLS to a provider,
/// bounded by `upstream.connect_timeout` (default 5 s).
const CONNECT_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of `m3u_edge_failover_gap_seconds`: how long viewers saw no new
/// bytes around a source switch (R4 wants it short).
const GAP_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0];

/// Declares a label enum: its variants, their label strings, and `ALL` for
/// pre-creating every series (so each shows as 0 before its first event
/// and `rate()` works from the start).
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vdoc])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }
    };
}

label_enum!(
    /// `kind` of `m3u_edge_clients_active`.
    ClientKind {
        /// A viewer of a shared live hub channel.
        Live => "live",
        /// A per-client proxied file (VOD, Range).
        File => "file",
        /// An HLS playlist/segment client.
        Hls => "hls",
    }
);

label_enum!(
    /// `reason` of `m3u_edge_failovers_total`: why the source was switched.
    FailoverReason {
        Error => "error",
        Eof => "eof",
        Stall => "stall",
        Status => "status",
        /// `POST /streams/{id}/failover`.
        Forced => "forced",
        Connect => "connect",
        /// Silence detection (`enable_silence_detection`).
        Silence => "silence",
    }
);

label_enum!(
    /// `reason` of `m3u_edge_client_drops_total`: why m3u-edge closed a
    /// viewer's connection.
    DropReason {
        /// Fell further behind than the live ring (DESIGN.md "Live hub").
        Slow => "slow",
        /// Removed through the API (`DELETE .../by-metadata` with `client_id`).
        Api => "api",
        /// Its stream was deleted.
        StreamDeleted => "stream_deleted",
        /// The stream ended: no source worked for `live.give_up_after`.
        Ended => "ended",
    }
);

label_enum!(
    /// `result` of `m3u_edge_webhook_deliveries_total`.
    WebhookResult {
        /// Delivered (status < 400).
        Ok => "ok",
        /// A try failed and another follows.
        Retry => "retry",
        /// Every try failed: given up.
        Failed => "failed",
        /// Never tried: the webhook's own queue was full.
        Dropped => "dropped",
    }
);

label_enum!(
    /// `kind` of `m3u_edge_upstream_errors_total`.
    UpstreamErrorKind {
        Connect => "connect",
        Timeout => "timeout",
        /// 4xx/5xx from the provider.
        Status => "status",
        /// The body broke off or could not be read.
        Read => "read",
        /// Too many hops, a loop, or a bad `Location`.
        Redirect => "redirect",
        Dns => "dns",
    }
);

label_enum!(
    /// `route` of `m3u_edge_requests_total`.
    RouteLabel {
        /// The management API.
        Api => "api",
        /// `/stream/{id}`.
        Stream => "stream",
        /// `/hls/{id}/...`.
        Hls => "hls",
        Metrics => "metrics",
        Other => "other",
    }
);

label_enum!(
    /// `result` of `m3u_edge_hls_cache_total`.
    CacheResult {
        Hit => "hit",
        Miss => "miss",
        /// Waited for another request's fetch of the same URI (single-flight).
        Coalesced => "coalesced",
    }
);

label_enum!(
    /// `limit` of `m3u_edge_limit_cuts_total`: which limit refused or cut a
    /// client (`limits.*` in the config).
    LimitCut {
        /// No whole request header within `limits.header_timeout` (408).
        HeaderTimeout => "header_timeout",
        /// Header larger than `limits.max_header_bytes` (431).
        HeaderBytes => "header_bytes",
        /// More header lines than `limits.max_headers` (431).
        HeaderLines => "header_lines",
        /// A kept-alive connection idle for `limits.keepalive_timeout`.
        KeepaliveIdle => "keepalive_idle",
        /// `limits.max_connections` (503).
        Connections => "connections",
        /// `limits.max_connections_per_address` (503).
        ConnectionsPerAddress => "connections_per_address",
        /// `limits.max_body_bytes` (413).
        BodyBytes => "body_bytes",
        /// `limits.max_streams` (507).
        Streams => "streams",
        /// `limits.max_viewers_per_stream` (429).
        ViewersPerStream => "viewers_per_stream",
        /// `limits.max_viewers_per_address` (429).
        ViewersPerAddress => "viewers_per_address",
        /// `limits.max_hls_clients_per_stream` (429).
        HlsClientsPerStream => "hls_clients_per_stream",
        /// `limits.max_hls_clients_per_address` (429).
        HlsClientsPerAddress => "hls_clients_per_address",
        /// A request m3u-edge made to itself (508).
        SelfLoop => "self_loop",
        /// A management call refused by origin, host or address (403).
        ApiOrigin => "api_origin",
    }
);

label_enum!(
    /// `limit` of `m3u_edge_hls_limits_total`: which HLS bound cut a request.
    HlsLimit {
        /// A playlist over `hls.playlist_max_bytes`.
        PlaylistBytes => "playlist_bytes",
        /// A playlist over `hls.playlist_max_lines`.
        PlaylistLines => "playlist_lines",
        /// A rewritten playlist (shared, or one viewer's) over `hls.rendered_max_bytes`.
        RenderedBytes => "rendered_bytes",
        /// A URI too long to sign into a reference (`MAX_URI_LEN` in hls/rewrite.rs).
        UriLength => "uri_length",
        /// A shared segment over `hls.segment_max_bytes`.
        SegmentBytes => "segment_bytes",
        /// `hls.inflight_max_bytes` reached: a segment streamed through unshared.
        InflightBytes => "inflight_bytes",
        /// No provider response header within `hls.header_timeout`.
        HeaderTimeout => "header_timeout",
        /// A playlist fetch over `hls.playlist_timeout`.
        PlaylistTimeout => "playlist_timeout",
        /// A segment fetch (or a viewer's answer) over `hls.segment_timeout`.
        SegmentTimeout => "segment_timeout",
    }
);

/// Status classes of `m3u_edge_requests_total`.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// `"2xx"` for 200..=299 and so on; anything outside 100..=599 is `"5xx"`
/// (it can only come from a broken upstream).
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Every metric family of m3u-edge.
pub struct Metrics {
    registry: Registry,
    /// `m3u_edge_streams_active`: streams with at least one viewer.
    pub streams_active: IntGauge,
    /// `m3u_edge_streams_registered`: streams known to the registry (YAML
    /// and API), watched or not.
    pub streams_registered: IntGauge,
    /// `m3u_edge_clients_active{kind}`.
    pub clients_active: IntGaugeVec,
    /// `m3u_edge_live_channels`: live hub channels running (one provider
    /// connection each).
    pub live_channels: IntGauge,
    /// `m3u_edge_upstream_connections{provider}`: open provider connections.
    pub upstream_connections: IntGaugeVec,
    /// `m3u_edge_provider_max_connections{provider}`: the configured limit
    /// (absent for unlimited providers), to plot usage against it.
    pub provider_max_connections: IntGaugeVec,
    /// `m3u_edge_provider_rejections_total{provider}`: requests answered 503
    /// because the provider was at its limit.
    pub provider_rejections: IntCounterVec,
    /// `m3u_edge_bytes_in_total`: bytes read from providers.
    pub bytes_in: IntCounter,
    /// `m3u_edge_bytes_out_total`: bytes written to clients.
    pub bytes_out: IntCounter,
    /// `m3u_edge_failovers_total{reason}`.
    pub failovers: IntCounterVec,
    /// `m3u_edge_failover_gap_seconds`: no-new-bytes time around a switch.
    pub failover_gap_seconds: Histogram,
    /// `m3u_edge_client_drops_total{reason}`.
    pub client_drops: IntCounterVec,
    /// `m3u_edge_join_seconds`: client request → first body byte sent.
    pub join_seconds: Histogram,
    /// `m3u_edge_upstream_connect_seconds`: time to open a provider
    /// connection (until response headers).
    pub upstream_connect_seconds: Histogram,
    /// `m3u_edge_upstream_errors_total{kind}`.
    pub upstream_errors: IntCounterVec,
    /// `m3u_edge_requests_total{route,status}` (status class `2xx`...).
    pub requests: IntCounterVec,
    /// `m3u_edge_hls_cache_total{result}`: playlist/segment lookups.
    pub hls_cache: IntCounterVec,
    /// `m3u_edge_hls_limits_total{limit}`: HLS requests cut by a limit.
    pub hls_limits: IntCounterVec,
    /// `m3u_edge_hls_lag_refusals_total`: live playlists refused because
    /// their media sequence went back over segments already seen (lagging
    /// backends).
    pub hls_lag_refusals: IntCounter,
    /// `m3u_edge_hls_sequence_resets_total`: confirmed provider resets (a
    /// lower media sequence of segments never seen, served as a new epoch).
    pub hls_sequence_resets: IntCounter,
    /// `m3u_edge_webhook_deliveries_total{result}`.
    pub webhook_deliveries: IntCounterVec,
    /// `m3u_edge_webhooks_registered`.
    pub webhooks_registered: IntGauge,
    /// `m3u_edge_events_dropped_total`: events lost because the event queue
    /// was full.
    pub events_dropped: IntCounter,
    /// `m3u_edge_state_saves_total{result}`: state file writes, `ok` or
    /// `failed`.
    pub state_saves: IntCounterVec,
    /// `m3u_edge_state_save_failing`: 1 while the latest state file write
    /// failed (changes since then would be lost by a crash), else 0.
    pub state_save_failing: IntGauge,
    /// `m3u_edge_limit_cuts_total{limit}`: requests refused or connections
    /// cut by a limit.
    pub limit_cuts: IntCounterVec,
    /// `m3u_edge_client_connections`: open client connections.
    pub client_connections: IntGauge,
    /// `m3u_edge_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
    /// `m3u_edge_playlist_refreshes_total{result}`: playlist imports, `ok`
    /// or `failed` (the previous list stays).
    pub playlist_refreshes: IntCounterVec,
    /// `m3u_edge_playlist_refresh_failing`: playlists whose latest refresh
    /// failed.
    pub playlist_refresh_failing: IntGauge,
}

impl Metrics {
    /// Builds and registers every family, with every enum-labelled series
    /// created at 0, and the `process_*` collector.
    pub fn new() -> Arc<Metrics> {
        match Self::build() {
            Ok(m) => Arc::new(m),
            // Only a duplicate or malformed name gets here: a bug caught by
            // the unit tests, not something a user can cause.
            Err(e) => panic!("metrics registration: {e}"),
        }
    }

    fn build() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let r = &registry;
        let m = Metrics {
            // A handle: `Registry` is an `Arc` inside.
            registry: registry.clone(),
            streams_active: gauge(r, "streams_active", "Streams with at least one viewer.")?,
            streams_registered: gauge(
                r,
                "streams_registered",
                "Streams known to m3u-edge (config and API), watched or not.",
            )?,
            clients_active: gauge_vec(r, "clients_active", "Connected clients by kind.", "kind")?,
            live_channels: gauge(
                r,
                "live_channels",
                "Live hub channels running, one provider connection each.",
            )?,
            upstream_connections: gauge_vec(
                r,
                "upstream_connections",
                "Open provider connections by provider (\"none\": no provider matched).",
                "provider",
            )?,
            provider_max_connections: gauge_vec(
                r,
                "provider_max_connections",
                "Configured connection limit of each limited provider.",
                "provider",
            )?,
            provider_rejections: counter_vec(
                r,
                "provider_rejections_total",
                "Requests refused with 503 because their provider was at max_connections.",
                "provider",
            )?,
            bytes_in: counter(r, "bytes_in_total", "Bytes read from providers.")?,
            bytes_out: counter(r, "bytes_out_total", "Bytes written to clients.")?,
            failovers: counter_vec(r, "failovers_total", "Source switches by reason.", "reason")?,
            failover_gap_seconds: histogram(
                r,
                "failover_gap_seconds",
                "Time viewers received no new bytes around a source switch.",
                &GAP_BUCKETS,
            )?,
            client_drops: counter_vec(
                r,
                "client_drops_total",
                "Client connections closed by m3u-edge, by reason.",
                "reason",
            )?,
            join_seconds: histogram(
                r,
                "join_seconds",
                "Time from a client's request to the first body byte sent to it.",
                &JOIN_BUCKETS,
            )?,
            upstream_connect_seconds: histogram(
                r,
                "upstream_connect_seconds",
                "Time to open a provider connection, until its response headers.",
                &CONNECT_BUCKETS,
            )?,
            upstream_errors: counter_vec(
                r,
                "upstream_errors_total",
                "Provider request failures by kind.",
                "kind",
            )?,
            requests: {
                let c = IntCounterVec::new(
                    opts(
                        "requests_total",
                        "Client requests by route and status class.",
                    ),
                    &["route", "status"],
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            hls_cache: counter_vec(
                r,
                "hls_cache_total",
                "HLS playlist and segment lookups by cache result.",
                "result",
            )?,
            hls_limits: counter_vec(
                r,
                "hls_limits_total",
                "HLS playlist and segment requests cut by a size or time limit.",
                "limit",
            )?,
            hls_lag_refusals: counter(
                r,
                "hls_lag_refusals_total",
                "Live HLS playlists refused because their media sequence went back \
                 over segments already served (a lagging backend).",
            )?,
            hls_sequence_resets: counter(
                r,
                "hls_sequence_resets_total",
                "Provider HLS playlists whose media sequence restarted with new segments, \
                 served as a new epoch after confirmation.",
            )?,
            webhook_deliveries: counter_vec(
                r,
                "webhook_deliveries_total",
                "Webhook delivery outcomes: ok, retry (a failed try followed by another), \
                 failed (gave up), dropped (webhook queue full).",
                "result",
            )?,
            webhooks_registered: gauge(r, "webhooks_registered", "Registered webhooks.")?,
            events_dropped: counter(
                r,
                "events_dropped_total",
                "Events lost because the event queue was full.",
            )?,
            state_saves: counter_vec(
                r,
                "state_saves_total",
                "State file writes by result: ok or failed (retried with backoff).",
                "result",
            )?,
            state_save_failing: gauge(
                r,
                "state_save_failing",
                "1 while the latest state file write failed, else 0.",
            )?,
            limit_cuts: counter_vec(
                r,
                "limit_cuts_total",
                "Requests refused or connections cut by a limit (limits.* in the config).",
                "limit",
            )?,
            client_connections: gauge(
                r,
                "client_connections",
                "Open client connections (live viewers included).",
            )?,
            playlist_refreshes: counter_vec(
                r,
                "playlist_refreshes_total",
                "Playlist imports (playlists: in the config) by result: ok, or failed (the previous list stays).",
                "result",
            )?,
            playlist_refresh_failing: gauge(
                r,
                "playlist_refresh_failing",
                "Playlists whose latest refresh failed.",
            )?,
            build_info: gauge_vec(
                r,
                "build_info",
                "Always 1; labelled with the version.",
                "version",
            )?,
        };
        for k in ClientKind::ALL {
            m.clients_active.with_label_values(&[k.as_str()]);
        }
        for reason in FailoverReason::ALL {
            m.failovers.with_label_values(&[reason.as_str()]);
        }
        for reason in DropReason::ALL {
            m.client_drops.with_label_values(&[reason.as_str()]);
        }
        for result in WebhookResult::ALL {
            m.webhook_deliveries.with_label_values(&[result.as_str()]);
        }
        for kind in UpstreamErrorKind::ALL {
            m.upstream_errors.with_label_values(&[kind.as_str()]);
        }
        for route in RouteLabel::ALL {
            for class in &STATUS_CLASSES[1..] {
                m.requests.with_label_values(&[route.as_str(), class]);
            }
        }
        for result in CacheResult::ALL {
            m.hls_cache.with_label_values(&[result.as_str()]);
        }
        for result in ["ok", "failed"] {
            m.state_saves.with_label_values(&[result]);
        }
        for cut in LimitCut::ALL {
            m.limit_cuts.with_label_values(&[cut.as_str()]);
        }
        for limit in HlsLimit::ALL {
            m.hls_limits.with_label_values(&[limit.as_str()]);
        }
        m.upstream_connections.with_label_values(&[NO_PROVIDER]);
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(m)
    }

    /// Creates the per-provider series at 0 (and the limit gauge for
    /// limited ones), so dashboards list every provider from the start.
    /// `providers` are `(name, max_connections)` from the YAML.
    pub fn init_providers<'a>(&self, providers: impl IntoIterator<Item = (&'a str, Option<u32>)>) {
        for (name, max) in providers {
            self.upstream_connections.with_label_values(&[name]);
            self.provider_rejections.with_label_values(&[name]);
            if let Some(max) = max {
                self.provider_max_connections
                    .with_label_values(&[name])
                    .set(i64::from(max));
            }
        }
    }

    /// The registry, e.g. to add families of another component.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition of every family: `(content type, body)`.
    pub fn render(&self) -> (String, Vec<u8>) {
        let encoder = TextEncoder::new();
        let mut body = Vec::with_capacity(16 * 1024);
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut body) {
            // Only a metric with an invalid name fails here; a partial page
            // would be misread by Prometheus, so serve none.
            tracing::error!(error = %e, "metrics not rendered");
            body.clear();
        }
        (encoder.format_type().to_owned(), body)
    }

    // Shorthands so call sites name an enum instead of a label string.

    pub fn cut(&self, limit: LimitCut) {
        self.limit_cuts.with_label_values(&[limit.as_str()]).inc();
    }

    pub fn clients(&self, kind: ClientKind) -> IntGauge {
        self.clients_active.with_label_values(&[kind.as_str()])
    }

    /// The gauge of a provider's connections; `None` → `"none"`.
    pub fn upstream(&self, provider: Option<&str>) -> IntGauge {
        self.upstream_connections
            .with_label_values(&[provider.unwrap_or(NO_PROVIDER)])
    }

    pub fn failover(&self, reason: FailoverReason) {
        self.failovers.with_label_values(&[reason.as_str()]).inc();
    }

    pub fn client_drop(&self, reason: DropReason) {
        self.client_drops
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors
            .with_label_values(&[kind.as_str()])
            .inc();
    }

    pub fn webhook_delivery(&self, result: WebhookResult) {
        self.webhook_deliveries
            .with_label_values(&[result.as_str()])
            .inc();
    }

    pub fn request(&self, route: RouteLabel, status: u16) {
        self.requests
            .with_label_values(&[route.as_str(), status_class(status)])
            .inc();
    }

    pub fn hls_limit(&self, limit: HlsLimit) {
        self.hls_limits.with_label_values(&[limit.as_str()]).inc();
    }

    pub fn hls_cache_result(&self, result: CacheResult) {
        self.hls_cache.with_label_values(&[result.as_str()]).inc();
    }
}

/// Decrements a gauge when dropped: pair every `inc` of an "active" gauge
/// with a guard, so early returns and cancelled tasks cannot leak counts.
#[must_use = "the gauge is decremented when the guard is dropped"]
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    /// Increments `gauge` now and decrements it on drop.
    pub fn new(gauge: IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("m3u_edge")
}

pub(crate) fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::with_opts(opts(name, help))?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

pub(crate) fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(opts(name, help), &[label])?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

pub(crate) fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::with_opts(opts(name, help))?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

pub(crate) fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(opts(name, help), &[label])?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

pub(crate) fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(
        HistogramOpts::new(name, help)
            .namespace("m3u_edge")
            .buckets(buckets.to_vec()),
    )?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

/// The `/metrics` page as a Pingora HTTP app, for the `metrics.listen`
/// listener. GET and HEAD of `/metrics` only; no token, so bind it to a
/// private address.
pub struct MetricsApp {
    metrics: Arc<Metrics>,
}

impl MetricsApp {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let head = req.method == Method::HEAD;
        let (status, content_type, body) = if req.uri.path() != "/metrics" {
            (
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8".to_owned(),
                b"not found: try /metrics\n".to_vec(),
            )
        } else if req.method != Method::GET && !head {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8".to_owned(),
                b"method not allowed\n".to_vec(),
            )
        } else {
            let (content_type, body) = self.metrics.render();
            (StatusCode::OK, content_type, body)
        };
        let len = body.len();
        let body = if head { Vec::new() } else { body };
        let mut builder = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, len)
            .header(http::header::CACHE_CONTROL, "no-store");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            builder = builder.header(http::header::ALLOW, "GET, HEAD");
        }
        // Every part above is a valid constant or number.
        builder.body(body).unwrap_or_default()
    }
}

/// The extra metrics listener of `metrics.listen`:
/// `server.add_service(metrics::service(metrics.clone(), addr))`.
pub fn service(metrics: Arc<Metrics>, listen: SocketAddr) -> Service<MetricsApp> {
    let mut service = Service::new("metrics".to_owned(), MetricsApp::new(metrics));
    service.add_tcp(&listen.to_string());
    service
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Touches every family so each appears with samples.
    fn touched() -> Arc<Metrics> {
        let m = Metrics::new();
        m.init_providers([("acme", Some(2)), ("free", None)]);
        m.streams_active.set(3);
        m.streams_registered.set(5);
        m.clients(ClientKind::Live).inc();
        m.clients(ClientKind::Hls).inc();
        m.live_channels.set(1);
        m.upstream(Some("acme")).inc();
        m.upstream(None).inc();
        m.provider_rejections.with_label_values(&["acme"]).inc();
        m.bytes_in.inc_by(1 << 20);
        m.bytes_out.inc_by(3 << 20);
        m.failover(FailoverReason::Stall);
        m.failover_gap_seconds.observe(0.3);
        m.client_drop(DropReason::Slow);
        m.join_seconds.observe(0.002);
        m.join_seconds.observe(1.5);
        m.upstream_connect_seconds.observe(0.04);
        m.upstream_error(UpstreamErrorKind::Dns);
        m.request(RouteLabel::Stream, 206);
        m.request(RouteLabel::Api, 404);
        m.hls_cache_result(CacheResult::Coalesced);
        m.hls_limit(HlsLimit::RenderedBytes);
        m.webhook_delivery(WebhookResult::Retry);
        m.webhooks_registered.set(2);
        m.events_dropped.inc();
        m
    }

    fn text(m: &Metrics) -> String {
        let (content_type, body) = m.render();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        String::from_utf8(body).expect("exposition is UTF-8")
    }

    #[test]
    fn every_family_is_rendered() {
        let t = text(&touched());
        for family in [
            "m3u_edge_streams_active 3",
            "m3u_edge_streams_registered 5",
            "m3u_edge_clients_active{kind=\"live\"} 1",
            "m3u_edge_clients_active{kind=\"file\"} 0",
            "m3u_edge_clients_active{kind=\"hls\"} 1",
            "m3u_edge_live_channels 1",
            "m3u_edge_upstream_connections{provider=\"acme\"} 1",
            "m3u_edge_upstream_connections{provider=\"free\"} 0",
            "m3u_edge_upstream_connections{provider=\"none\"} 1",
            "m3u_edge_provider_max_connections{provider=\"acme\"} 2",
            "m3u_edge_provider_rejections_total{provider=\"acme\"} 1",
            "m3u_edge_bytes_in_total 1048576",
            "m3u_edge_bytes_out_total 3145728",
            "m3u_edge_failovers_total{reason=\"stall\"} 1",
            "m3u_edge_failovers_total{reason=\"forced\"} 0",
            "m3u_edge_failover_gap_seconds_count 1",
            "m3u_edge_client_drops_total{reason=\"slow\"} 1",
            "m3u_edge_client_drops_total{reason=\"stream_deleted\"} 0",
            "m3u_edge_join_seconds_bucket{le=\"0.001\"} 0",
            "m3u_edge_join_seconds_bucket{le=\"0.0025\"} 1",
            "m3u_edge_join_seconds_bucket{le=\"10\"} 2",
            "m3u_edge_join_seconds_count 2",
            "m3u_edge_upstream_connect_seconds_count 1",
            "m3u_edge_upstream_errors_total{kind=\"dns\"} 1",
            "m3u_edge_upstream_errors_total{kind=\"redirect\"} 0",
            "m3u_edge_requests_total{route=\"stream\",status=\"2xx\"} 1",
            "m3u_edge_requests_total{route=\"api\",status=\"4xx\"} 1",
            "m3u_edge_requests_total{route=\"metrics\",status=\"5xx\"} 0",
            "m3u_edge_hls_cache_total{result=\"coalesced\"} 1",
            "m3u_edge_hls_limits_total{limit=\"rendered_bytes\"} 1",
            "m3u_edge_hls_limits_total{limit=\"header_timeout\"} 0",
            "m3u_edge_webhook_deliveries_total{result=\"retry\"} 1",
            "m3u_edge_webhook_deliveries_total{result=\"dropped\"} 0",
            "m3u_edge_webhooks_registered 2",
            "m3u_edge_events_dropped_total 1",
            &format!(
                "m3u_edge_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(
                t.lines().any(|l| l == family),
                "missing `{family}` in:\n{t}"
            );
        }
        #[cfg(target_os = "linux")]
        assert!(t.contains("\nprocess_resident_memory_bytes "), "{t}");
    }

    #[test]
    fn guard_decrements_on_drop() {
        let m = Metrics::new();
        let g = GaugeGuard::new(m.clients(ClientKind::File));
        assert_eq!(m.clients(ClientKind::File).get(), 1);
        drop(g);
        assert_eq!(m.clients(ClientKind::File).get(), 0);
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(200), "2xx");
        assert_eq!(status_class(302), "3xx");
        assert_eq!(status_class(499), "4xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(0), "5xx");
        assert_eq!(status_class(999), "5xx");
    }

    #[test]
    fn instances_are_independent() {
        // Own registries: two apps (tests, benches) never collide.
        let a = Metrics::new();
        let b = Metrics::new();
        a.bytes_out.inc();
        assert_eq!(b.bytes_out.get(), 0);
    }

    #[test]
    fn no_high_cardinality_labels() {
        let t = text(&touched());
        let allowed = [
            "kind", "provider", "reason", "result", "route", "status", "le", "version", "limit",
        ];
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let Some(labels) = line.split_once('{').map(|(_, rest)| rest) else {
                continue;
            };
            let labels = labels.split('}').next().unwrap_or("");
            for pair in labels.split(',') {
                let name = pair.split('=').next().unwrap_or("");
                assert!(
                    allowed.contains(&name),
                    "unexpected label {name:?} in {line}"
                );
            }
        }
    }

    /// Every metric the shipped Grafana dashboard queries exists.
    #[test]
    fn dashboard_uses_existing_metrics() {
        let dashboard = include_str!("../conf/grafana-dashboard.json");
        let _: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard is JSON");
        let t = text(&touched());
        let mut checked = 0;
        for (i, _) in dashboard.match_indices("m3u_edge_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                t.lines()
                    .any(|l| l.starts_with(&format!("{name} "))
                        || l.starts_with(&format!("{name}{{"))),
                "the dashboard queries {name}, which /metrics does not have"
            );
            checked += 1;
        }
        assert!(checked >= 10, "{checked}");
    }

    /// `promtool check metrics` (Debian package `prometheus`) lints the
    /// exposition: names, HELP/TYPE, units, histogram shape.
    #[test]
    fn promtool_accepts_the_exposition() {
        let (_, body) = touched().render();
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("SKIPPED: promtool not installed (apt-get install prometheus)");
                return;
            }
            Err(e) => panic!("promtool: {e}"),
        };
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("piped stdin");
            stdin.write_all(&body).expect("write to promtool");
        }
        let out = child.wait_with_output().expect("promtool ran");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{report}"
        );
        // promtool exits 0 on lint warnings too; we want none.
        assert!(
            report.trim().is_empty(),
            "promtool lint findings:\n{report}"
        );
    }

    /// The `metrics.listen` service answers over real HTTP.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listener_serves_metrics() {
        use pingora::services::Service as _;

        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let m = touched();
        let mut svc = service(m.clone(), addr);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            svc.start_service(None, shutdown, 1).await;
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let url = format!("http://{addr}/metrics");
        let mut resp = None;
        for _ in 0..200 {
            match client.get(&url).send().await {
                Ok(r) => {
                    resp = Some(r);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        let resp = resp.expect("metrics listener did not come up");
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        let body = resp.text().await.expect("body");
        assert!(body.contains("m3u_edge_bytes_out_total 3145728"), "{body}");

        let other = client
            .get(format!("http://{addr}/other"))
            .send()
            .await
            .expect("404 answer");
        assert_eq!(other.status(), 404);
        let post = client.post(&url).send().await.expect("405 answer");
        assert_eq!(post.status(), 405);

        let _ = stop.send(true);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("listener stops on shutdown")
            .expect("no panic");
    }
}
