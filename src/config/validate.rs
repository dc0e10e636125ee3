//! Pass 2: values and cross references, turning [`RawConfig`] into
//! [`Config`].
//!
//! Every check reports into one list instead of returning early, so a user
//! fixing a file sees all value mistakes at once. A rejected value is
//! replaced by its default so checking can go on; the partial `Config` is
//! thrown away whenever anything was reported.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use md5::{Digest, Md5};
use serde_saphyr::Spanned;
use url::Url;

use super::raw::{
    push_key, spanned_at, Leaf, RawApi, RawBroadcast, RawConfig, RawEvents, RawHeaders, RawHls,
    RawLimits, RawLive, RawLog, RawMetrics, RawProvider, RawResolvers, RawSecurity, RawServer,
    RawStream, RawTranscode, RawUpstream, RawWebhook, Scalar,
};
use super::{
    ApiConfig, BroadcastConfig, Config, EventsConfig, HlsConfig, HwAccel, LimitsConfig, LiveConfig,
    LogConfig, MetricsConfig, Problem, ProviderConfig, ResolversConfig, SecurityConfig,
    ServerConfig, StreamConfig, TranscodeConfig, UpstreamConfig, WebhookConfig,
};
use crate::events::EventType;
use crate::transcode::profiles::Profile;

mod cluster;
mod standalone;

type Check<T> = Result<T, String>;
type At = Option<(u64, u64)>;

pub(super) fn build(raw: RawConfig, text: &str) -> Result<Config, Vec<Problem>> {
    let mut v = Validator {
        problems: Vec::new(),
        text,
    };
    let config = v.config(raw);
    if v.problems.is_empty() {
        return Ok(config);
    }
    // Cross-reference checks run after the per-key ones; file order reads
    // better. Problems without a position go last.
    v.problems
        .sort_by_key(|p| p.at.map_or((u64::MAX, u64::MAX), |at| at));
    Err(v.problems)
}

struct Validator<'t> {
    problems: Vec<Problem>,
    /// The file, to locate header names (see [`Validator::key_at`]).
    text: &'t str,
}

impl Validator<'_> {
    fn report(&mut self, at: At, path: &str, message: &str) {
        self.problems.push(Problem::new(at, path, message));
    }

    /// Checks an optional key; absent or null gives `default`, and so does a
    /// rejected value (after reporting it).
    fn leaf<T, R>(
        &mut self,
        leaf: &Leaf<T>,
        path: &str,
        default: R,
        check: impl FnOnce(&T) -> Check<R>,
    ) -> R {
        match leaf {
            None => default,
            Some(spanned) => self.spanned(spanned, path, default, check),
        }
    }

    /// Like [`Self::leaf`] for keys whose absence means `None`.
    fn optional<T, R>(
        &mut self,
        leaf: &Leaf<T>,
        path: &str,
        check: impl FnOnce(&T) -> Check<R>,
    ) -> Option<R> {
        self.leaf(leaf, path, None, |value| check(value).map(Some))
    }

    fn spanned<T, R>(
        &mut self,
        spanned: &Spanned<T>,
        path: &str,
        fallback: R,
        check: impl FnOnce(&T) -> Check<R>,
    ) -> R {
        match check(&spanned.value) {
            Ok(value) => value,
            Err(message) => {
                self.report(spanned_at(spanned), path, &message);
                fallback
            }
        }
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let server = self.server(raw.server.unwrap_or_default());
        let api = self.api(raw.api.unwrap_or_default());
        let upstream = self.upstream(raw.upstream.unwrap_or_default());
        let providers = self.providers(raw.providers.unwrap_or_default());
        let streams = self.streams(raw.streams.unwrap_or_default(), &providers);
        let live = self.live(raw.live.unwrap_or_default());
        let log = self.log(raw.log.unwrap_or_default());
        let events = self.events(raw.events.unwrap_or_default());
        let metrics = self.metrics(raw.metrics.unwrap_or_default(), &server);
        let hls = self.hls(raw.hls.unwrap_or_default());
        let limits = self.limits(raw.limits.unwrap_or_default());
        let transcode = self.transcode(raw.transcode.unwrap_or_default());
        let resolvers = self.resolvers(raw.resolvers.unwrap_or_default());
        let security = self.security(raw.security.unwrap_or_default());
        let broadcast = self.broadcast(raw.broadcast.unwrap_or_default());
        let playlists = self.playlists(raw.playlists.unwrap_or_default(), &providers);
        let playlist = self.playlist_export(raw.playlist.unwrap_or_default());
        let epg = self.epg(raw.epg.unwrap_or_default());
        let hdhomerun = self.hdhomerun(raw.hdhomerun.unwrap_or_default());
        let cluster = raw.cluster.map(|c| self.cluster(c, &server, &metrics));
        Config {
            server,
            api,
            upstream,
            providers,
            streams,
            live,
            log,
            events,
            metrics,
            hls,
            limits,
            transcode,
            resolvers,
            security,
            playlists,
            playlist,
            epg,
            hdhomerun,
            broadcast,
            cluster,
        }
    }

    fn broadcast(&mut self, raw: RawBroadcast) -> BroadcastConfig {
        let d = BroadcastConfig::default();
        BroadcastConfig {
            work_dir: self.leaf(&raw.work_dir, "broadcast.work_dir", d.work_dir, |s| {
                let p = std::path::PathBuf::from(s.trim());
                // Its broadcast_* entries are removed at start-up: never a
                // system directory by accident.
                if s.trim().is_empty() || p.parent().is_none() || p == Path::new(".") {
                    Err("a directory of its own, e.g. /var/lib/m3u-edge/broadcast".to_owned())
                } else {
                    Ok(p)
                }
            }),
            max_networks: self.leaf(
                &raw.max_networks,
                "broadcast.max_networks",
                d.max_networks,
                |s| usize_at_least(s, 0),
            ),
            callback_timeout: self.leaf(
                &raw.callback_timeout,
                "broadcast.callback_timeout",
                d.callback_timeout,
                |s| {
                    duration(s)
                        .and_then(non_zero)
                        .and_then(|d| at_most(d, Duration::from_secs(60)))
                },
            ),
            keep_stopped: self.leaf(
                &raw.keep_stopped,
                "broadcast.keep_stopped",
                d.keep_stopped,
                |s| duration(s).and_then(|d| at_most(d, Duration::from_secs(7 * 24 * 3600))),
            ),
        }
    }

    fn resolvers(&mut self, raw: RawResolvers) -> ResolversConfig {
        let d = ResolversConfig::default();
        let program = |s: &String| {
            if s.trim().is_empty() {
                Err("empty; remove the key to look it up on PATH".to_owned())
            } else {
                Ok(std::path::PathBuf::from(s))
            }
        };
        ResolversConfig {
            streamlink: self.leaf(
                &raw.streamlink,
                "resolvers.streamlink",
                d.streamlink,
                program,
            ),
            yt_dlp: self.leaf(&raw.yt_dlp, "resolvers.yt_dlp", d.yt_dlp, program),
            cookies_dir: self.optional(&raw.cookies_dir, "resolvers.cookies_dir", |s| {
                let p = std::path::PathBuf::from(s);
                if p.is_absolute() {
                    Ok(p)
                } else {
                    Err("use an absolute path".to_owned())
                }
            }),
            // Signed CDN URLs live minutes to hours; a day is past any.
            url_ttl: self.leaf(&raw.url_ttl, "resolvers.url_ttl", d.url_ttl, |s| {
                duration(s).and_then(|d| at_most(d, Duration::from_secs(24 * 3600)))
            }),
        }
    }

    fn security(&mut self, raw: RawSecurity) -> SecurityConfig {
        let mut allow = Vec::new();
        for (i, entry) in raw
            .private_allowlist
            .iter()
            .flat_map(|l| l.value.iter())
            .enumerate()
        {
            let path = format!("security.private_allowlist[{i}]");
            if let Some(net) = self.spanned(entry, &path, None, |s| {
                crate::upstream::guard::Net::parse(s).map(Some)
            }) {
                allow.push(net);
            }
        }
        SecurityConfig {
            deny_private_upstreams: self.leaf(
                &raw.deny_private_upstreams,
                "security.deny_private_upstreams",
                false,
                boolean,
            ),
            private_allowlist: allow,
        }
    }

    fn transcode(&mut self, raw: RawTranscode) -> TranscodeConfig {
        let d = TranscodeConfig::default();
        let mut profiles: Vec<Profile> = Vec::new();
        for (i, p) in raw.profiles.iter().flatten().enumerate() {
            let base = format!("transcode.profiles[{i}]");
            let name = p.name.value.trim();
            let name_ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                self.report(
                    spanned_at(&p.name),
                    &format!("{base}.name"),
                    "use letters, digits, - and _ only",
                );
                continue;
            }
            if profiles.iter().any(|q| q.name == name) {
                self.report(
                    spanned_at(&p.name),
                    &format!("{base}.name"),
                    &format!("profile {name:?} is defined twice"),
                );
                continue;
            }
            let mut defaults = std::collections::BTreeMap::new();
            for (k, v) in p.defaults.iter().flat_map(|h| h.0.iter()) {
                match crate::transcode::template::check_variable(k, &v.value) {
                    Ok(()) => {
                        defaults.insert(k.clone(), v.value.clone());
                    }
                    Err(e) => self.report(
                        spanned_at(v),
                        &format!("{base}.defaults.{k}"),
                        &e.to_string(),
                    ),
                }
            }
            let template = p.template.value.clone();
            if let Err(e) = crate::transcode::template::render(
                &template,
                &std::collections::BTreeMap::new(),
                &defaults,
            ) {
                self.report(
                    spanned_at(&p.template),
                    &format!("{base}.template"),
                    &e.to_string(),
                );
                continue;
            }
            profiles.push(Profile {
                name: name.to_string(),
                description: p
                    .description
                    .as_ref()
                    .map(|s| s.value.clone())
                    .unwrap_or_default(),
                template,
                defaults,
            });
        }
        TranscodeConfig {
            ffmpeg: self.leaf(&raw.ffmpeg, "transcode.ffmpeg", d.ffmpeg, |s| {
                if s.trim().is_empty() {
                    Err("empty; remove the key to use ffmpeg from PATH".to_owned())
                } else {
                    Ok(std::path::PathBuf::from(s))
                }
            }),
            hwaccel: self.leaf(&raw.hwaccel, "transcode.hwaccel", d.hwaccel, |s| {
                match s.to_ascii_lowercase().as_str() {
                    "none" => Ok(HwAccel::None),
                    "vaapi" => Ok(HwAccel::Vaapi),
                    "qsv" => Ok(HwAccel::Qsv),
                    "nvenc" | "cuda" => Ok(HwAccel::Nvenc),
                    _ => Err(format!("{s:?}: use none, vaapi, qsv or nvenc")),
                }
            }),
            device: self.optional(&raw.device, "transcode.device", |s| {
                if s.starts_with("/dev/") {
                    Ok(s.clone())
                } else {
                    Err("a device path under /dev, e.g. /dev/dri/renderD128".to_owned())
                }
            }),
            max_processes: self.leaf(
                &raw.max_processes,
                "transcode.max_processes",
                d.max_processes,
                |s| usize_at_least(s, 0),
            ),
            profiles,
        }
    }

    fn api(&mut self, raw: RawApi) -> ApiConfig {
        let mut token = self.optional(&raw.token, "api.token", |s| api_token(s));
        if let Some(file) = &raw.token_file {
            if raw.token.is_some() {
                self.report(
                    spanned_at(file),
                    "api.token_file",
                    "set api.token or api.token_file, not both",
                );
            }
            token = self.spanned(file, "api.token_file", None, |path| {
                token_from_file(Path::new(path)).map(Some)
            });
        }
        let mut cors_origins = Vec::new();
        if let Some(list) = &raw.cors_origins {
            for (i, o) in list.value.iter().enumerate() {
                let path = format!("api.cors_origins[{i}]");
                if let Some(o) = self.spanned(o, &path, None, |s| cors_origin(s).map(Some)) {
                    cors_origins.push(o);
                }
            }
        }
        ApiConfig {
            token,
            cors_origins,
            allow_open: self.leaf(&raw.allow_open, "api.allow_open", false, boolean),
        }
    }

    fn limits(&mut self, raw: RawLimits) -> LimitsConfig {
        let d = LimitsConfig::default();
        let count = |s: &Scalar| usize_at_least(s, 0);
        let positive = |s: &Scalar| usize_at_least(s, 1);
        LimitsConfig {
            header_timeout: self.leaf(
                &raw.header_timeout,
                "limits.header_timeout",
                d.header_timeout,
                |s| non_zero(duration(s)?),
            ),
            keepalive_timeout: self.leaf(
                &raw.keepalive_timeout,
                "limits.keepalive_timeout",
                d.keepalive_timeout,
                |s| non_zero(duration(s)?),
            ),
            max_header_bytes: self.leaf(
                &raw.max_header_bytes,
                "limits.max_header_bytes",
                d.max_header_bytes,
                size_of_1kib_or_more,
            ),
            max_headers: self.leaf(&raw.max_headers, "limits.max_headers", d.max_headers, |s| {
                usize_at_least(s, 8)
            }),
            max_body_bytes: self.leaf(
                &raw.max_body_bytes,
                "limits.max_body_bytes",
                d.max_body_bytes,
                byte_size,
            ),
            max_connections: self.leaf(
                &raw.max_connections,
                "limits.max_connections",
                d.max_connections,
                count,
            ),
            max_connections_per_address: self.leaf(
                &raw.max_connections_per_address,
                "limits.max_connections_per_address",
                d.max_connections_per_address,
                count,
            ),
            max_streams: self.leaf(
                &raw.max_streams,
                "limits.max_streams",
                d.max_streams,
                positive,
            ),
            max_viewers_per_stream: self.leaf(
                &raw.max_viewers_per_stream,
                "limits.max_viewers_per_stream",
                d.max_viewers_per_stream,
                count,
            ),
            max_viewers_per_address: self.leaf(
                &raw.max_viewers_per_address,
                "limits.max_viewers_per_address",
                d.max_viewers_per_address,
                count,
            ),
            max_hls_clients_per_stream: self.leaf(
                &raw.max_hls_clients_per_stream,
                "limits.max_hls_clients_per_stream",
                d.max_hls_clients_per_stream,
                count,
            ),
            max_hls_clients_per_address: self.leaf(
                &raw.max_hls_clients_per_address,
                "limits.max_hls_clients_per_address",
                d.max_hls_clients_per_address,
                count,
            ),
            max_self_hops: self.leaf(
                &raw.max_self_hops,
                "limits.max_self_hops",
                d.max_self_hops,
                |s| {
                    usize_at_least(s, 0).and_then(|n| {
                        if n > 8 {
                            Err(format!("must be at most 8, got {n}"))
                        } else {
                            Ok(n)
                        }
                    })
                },
            ),
        }
    }

    fn server(&mut self, raw: RawServer) -> ServerConfig {
        let d = ServerConfig::default();
        ServerConfig {
            listen: self.leaf(&raw.listen, "server.listen", d.listen, |s| socket_addr(s)),
            threads: self.leaf(&raw.threads, "server.threads", d.threads, |s| {
                usize_at_least(s, 1)
            }),
            root_path: self.leaf(&raw.root_path, "server.root_path", d.root_path, |s| {
                root_path(s)
            }),
            public_url: self.optional(&raw.public_url, "server.public_url", |s| public_url(s)),
            state_file: self.leaf(&raw.state_file, "server.state_file", d.state_file, |s| {
                if s.is_empty() {
                    Err("must not be empty".to_owned())
                } else {
                    Ok(s.into())
                }
            }),
            stream_idle_ttl: self.leaf(
                &raw.stream_idle_ttl,
                "server.stream_idle_ttl",
                d.stream_idle_ttl,
                duration,
            ),
            grace_period: self.leaf(
                &raw.grace_period,
                "server.grace_period",
                d.grace_period,
                duration,
            ),
            shutdown_timeout: self.leaf(
                &raw.shutdown_timeout,
                "server.shutdown_timeout",
                d.shutdown_timeout,
                |s| at_most(non_zero(duration(s)?)?, Duration::from_secs(300)),
            ),
            state_save_delay: self.leaf(
                &raw.state_save_delay,
                "server.state_save_delay",
                d.state_save_delay,
                |s| at_most(duration(s)?, Duration::from_secs(60)),
            ),
        }
    }

    fn upstream(&mut self, raw: RawUpstream) -> UpstreamConfig {
        let d = UpstreamConfig::default();
        UpstreamConfig {
            user_agent: self.leaf(&raw.user_agent, "upstream.user_agent", d.user_agent, |s| {
                user_agent(s)
            }),
            connect_timeout: self.leaf(
                &raw.connect_timeout,
                "upstream.connect_timeout",
                d.connect_timeout,
                |s| non_zero(duration(s)?),
            ),
            read_timeout: self.leaf(
                &raw.read_timeout,
                "upstream.read_timeout",
                d.read_timeout,
                |s| non_zero(duration(s)?),
            ),
            max_redirects: self.leaf(
                &raw.max_redirects,
                "upstream.max_redirects",
                d.max_redirects,
                |s| usize_at_least(s, 0),
            ),
        }
    }

    fn providers(&mut self, raw: Vec<RawProvider>) -> Vec<ProviderConfig> {
        let mut names: HashMap<String, (usize, At)> = HashMap::new();
        let mut hosts: HashMap<String, (usize, usize)> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, p) in raw.iter().enumerate() {
            let base = format!("providers[{i}]");
            let name_path = format!("{base}.name");
            let name = self.spanned(&p.name, &name_path, String::new(), |s| {
                if s.is_empty() {
                    Err("must not be empty".to_owned())
                } else {
                    Ok(s.clone())
                }
            });
            if !name.is_empty() {
                let at = spanned_at(&p.name);
                if let Some((first, first_at)) = names.get(&name) {
                    let msg = format!(
                        "duplicate provider name {name:?}; providers[{first}]{} already uses it",
                        line_note(*first_at)
                    );
                    self.report(at, &name_path, &msg);
                } else {
                    names.insert(name.clone(), (i, at));
                }
            }

            let hosts_path = format!("{base}.hosts");
            if p.hosts.value.is_empty() {
                self.report(
                    spanned_at(&p.hosts),
                    &hosts_path,
                    "list at least one host name, e.g. [\"example.com\", \"*.example.com\"]",
                );
            }
            let mut list = Vec::with_capacity(p.hosts.value.len());
            for (j, host) in p.hosts.value.iter().enumerate() {
                let path = format!("{hosts_path}[{j}]");
                let Some(pattern) = self.spanned(host, &path, None, |s| host_pattern(s).map(Some))
                else {
                    continue;
                };
                if let Some(&(pi, pj)) = hosts.get(&pattern) {
                    let msg = format!(
                        "host {pattern:?} is already listed at providers[{pi}].hosts[{pj}]; \
                         each host may belong to one provider only"
                    );
                    self.report(spanned_at(host), &path, &msg);
                } else {
                    hosts.insert(pattern.clone(), (i, j));
                }
                list.push(pattern);
            }

            out.push(ProviderConfig {
                name,
                hosts: list,
                max_connections: self.optional(
                    &p.max_connections,
                    &format!("{base}.max_connections"),
                    max_connections,
                ),
                user_agent: self.optional(&p.user_agent, &format!("{base}.user_agent"), |s| {
                    user_agent(s)
                }),
                headers: self.headers(p.headers.as_ref(), &format!("{base}.headers")),
            });
        }
        out
    }

    fn streams(&mut self, raw: Vec<RawStream>, providers: &[ProviderConfig]) -> Vec<StreamConfig> {
        let mut ids: HashMap<String, (usize, At)> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, s) in raw.iter().enumerate() {
            let base = format!("streams[{i}]");
            let url = self.spanned(&s.url, &format!("{base}.url"), None, |u| {
                http_url(u).map(Some)
            });

            let (id, id_at, id_path, explicit) = match &s.id {
                Some(id) => {
                    let path = format!("{base}.id");
                    let value = self.spanned(id, &path, String::new(), |s| stream_id(s));
                    (value, spanned_at(id), path, true)
                }
                None => (
                    default_stream_id(&s.url.value),
                    spanned_at(&s.url),
                    format!("{base}.url"),
                    false,
                ),
            };
            if !id.is_empty() {
                if let Some((first, first_at)) = ids.get(&id) {
                    let msg = if explicit {
                        format!(
                            "duplicate stream id {id:?}; streams[{first}]{} already uses it",
                            line_note(*first_at)
                        )
                    } else {
                        format!(
                            "this stream's default id {id:?} (the md5 of its URL) is already used \
                             by streams[{first}]{}; give one of them an explicit `id`",
                            line_note(*first_at)
                        )
                    };
                    self.report(id_at, &id_path, &msg);
                } else {
                    ids.insert(id.clone(), (i, id_at));
                }
            }

            let failover_urls = s
                .failover_urls
                .iter()
                .flatten()
                .enumerate()
                .filter_map(|(j, u)| {
                    let path = format!("{base}.failover_urls[{j}]");
                    self.spanned(u, &path, None, |u| http_url(u).map(Some))
                })
                .collect();

            let provider = self.optional(&s.provider, &format!("{base}.provider"), |name| {
                if providers.iter().any(|p| &p.name == name) {
                    Ok(name.clone())
                } else if providers.is_empty() {
                    Err(format!(
                        "unknown provider {name:?}: no providers are defined under `providers`"
                    ))
                } else {
                    let known: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
                    Err(format!(
                        "unknown provider {name:?}; defined providers: {}",
                        known.join(", ")
                    ))
                }
            });

            out.push(StreamConfig {
                id,
                url: url.unwrap_or_else(placeholder_url),
                failover_urls,
                failover_resolver_url: self.optional(
                    &s.failover_resolver_url,
                    &format!("{base}.failover_resolver_url"),
                    |u| http_url(u),
                ),
                provider,
                user_agent: self.optional(&s.user_agent, &format!("{base}.user_agent"), |s| {
                    user_agent(s)
                }),
                headers: self.headers(s.headers.as_ref(), &format!("{base}.headers")),
                metadata: s.metadata.clone().unwrap_or_default(),
                live: self.leaf(&s.live, &format!("{base}.live"), None, live_mode),
                sticky: self.leaf(&s.sticky, &format!("{base}.sticky"), false, boolean),
            });
        }
        out
    }

    fn live(&mut self, raw: RawLive) -> LiveConfig {
        let d = LiveConfig::default();
        LiveConfig {
            ring_seconds: self.leaf(
                &raw.ring_seconds,
                "live.ring_seconds",
                d.ring_seconds,
                seconds,
            ),
            ring_bytes: self.leaf(&raw.ring_bytes, "live.ring_bytes", d.ring_bytes, byte_size),
            stall_timeout: self.leaf(
                &raw.stall_timeout,
                "live.stall_timeout",
                d.stall_timeout,
                |s| non_zero(duration(s)?),
            ),
            linger: self.leaf(&raw.linger, "live.linger", d.linger, duration),
            give_up_after: self.leaf(
                &raw.give_up_after,
                "live.give_up_after",
                d.give_up_after,
                duration,
            ),
            retry_backoff: self.leaf(
                &raw.retry_backoff,
                "live.retry_backoff",
                d.retry_backoff,
                duration,
            ),
            primary_cooldown: self.leaf(
                &raw.primary_cooldown,
                "live.primary_cooldown",
                d.primary_cooldown,
                duration,
            ),
            standby: self.leaf(&raw.standby, "live.standby", d.standby, boolean),
        }
    }

    fn log(&mut self, raw: RawLog) -> LogConfig {
        let d = LogConfig::default();
        LogConfig {
            level: self.leaf(&raw.level, "log.level", d.level, |s| log_level(s)),
        }
    }

    fn events(&mut self, raw: RawEvents) -> EventsConfig {
        let d = EventsConfig::default();
        let queue_size = self.leaf(&raw.queue_size, "events.queue_size", d.queue_size, |s| {
            let n = whole_number(s, 1, MAX_EVENT_QUEUE as i128)?;
            usize::try_from(n).map_err(|_| format!("must be at most {MAX_EVENT_QUEUE}, got {n}"))
        });
        let mut urls: HashMap<String, (usize, At)> = HashMap::new();
        let mut webhooks = Vec::new();
        for (i, w) in raw.webhooks.iter().flatten().enumerate() {
            let base = format!("events.webhooks[{i}]");
            let url_path = format!("{base}.url");
            let url = self.spanned(&w.url, &url_path, None, |u| webhook_url(u).map(Some));
            if let Some(url) = &url {
                let at = spanned_at(&w.url);
                if let Some((first, first_at)) = urls.get(url.as_str()) {
                    let msg = format!(
                        "webhook {:?} is already listed at events.webhooks[{first}]{}",
                        url.as_str(),
                        line_note(*first_at)
                    );
                    self.report(at, &url_path, &msg);
                } else {
                    urls.insert(url.to_string(), (i, at));
                }
            }
            let hook = self.webhook(w, &base);
            if let Some(url) = url {
                webhooks.push(WebhookConfig { url, ..hook });
            }
        }
        EventsConfig {
            queue_size,
            webhooks,
        }
    }

    /// Every field of one webhook but its URL (a placeholder here).
    fn webhook(&mut self, w: &RawWebhook, base: &str) -> WebhookConfig {
        let events = match &w.events {
            None => EventType::ALL.to_vec(),
            Some(list) => {
                let path = format!("{base}.events");
                if list.value.is_empty() {
                    self.report(
                        spanned_at(list),
                        &path,
                        "list at least one event, or remove the key to send all of them",
                    );
                }
                let mut out: Vec<EventType> = Vec::new();
                for (j, name) in list.value.iter().enumerate() {
                    let item = format!("{path}[{j}]");
                    let Some(t) = self.spanned(name, &item, None, |s| event_type(s).map(Some))
                    else {
                        continue;
                    };
                    if out.contains(&t) {
                        let msg = format!("event {:?} is listed twice", t.as_str());
                        self.report(spanned_at(name), &item, &msg);
                    } else {
                        out.push(t);
                    }
                }
                out
            }
        };
        WebhookConfig {
            url: placeholder_url(),
            events,
            headers: self.headers(w.headers.as_ref(), &format!("{base}.headers")),
            timeout: self.leaf(
                &w.timeout,
                &format!("{base}.timeout"),
                Duration::from_secs(10),
                |s| {
                    let d = duration(s)?;
                    if d < Duration::from_secs(1) {
                        Err(format!(
                            "must be at least 1s, got {}",
                            humantime::format_duration(d)
                        ))
                    } else {
                        Ok(d)
                    }
                },
            ),
            retry_attempts: self.leaf(
                &w.retry_attempts,
                &format!("{base}.retry_attempts"),
                crate::events::DEFAULT_RETRY_ATTEMPTS,
                |s| {
                    let n = whole_number(s, 0, MAX_RETRY_ATTEMPTS.into())?;
                    u32::try_from(n).map_err(|_| format!("must be at most {MAX_RETRY_ATTEMPTS}"))
                },
            ),
            secret: self.optional(&w.secret, &format!("{base}.secret"), |s| {
                if s.is_empty() {
                    Err("empty secret; remove the key to send unsigned webhooks".to_owned())
                } else {
                    Ok(s.clone())
                }
            }),
        }
    }

    fn hls(&mut self, raw: RawHls) -> HlsConfig {
        let d = HlsConfig::default();
        HlsConfig {
            segment_cache_bytes: self.leaf(
                &raw.segment_cache_bytes,
                "hls.segment_cache_bytes",
                d.segment_cache_bytes,
                byte_size,
            ),
            playlist_max_bytes: self.leaf(
                &raw.playlist_max_bytes,
                "hls.playlist_max_bytes",
                d.playlist_max_bytes,
                size_of_1kib_or_more,
            ),
            playlist_max_lines: self.leaf(
                &raw.playlist_max_lines,
                "hls.playlist_max_lines",
                d.playlist_max_lines,
                |s| usize_at_least(s, 10),
            ),
            rendered_max_bytes: self.leaf(
                &raw.rendered_max_bytes,
                "hls.rendered_max_bytes",
                d.rendered_max_bytes,
                |s| at_least_kib(byte_size(s)?),
            ),
            segment_max_bytes: self.leaf(
                &raw.segment_max_bytes,
                "hls.segment_max_bytes",
                d.segment_max_bytes,
                |s| at_least_kib(byte_size(s)?),
            ),
            inflight_max_bytes: self.leaf(
                &raw.inflight_max_bytes,
                "hls.inflight_max_bytes",
                d.inflight_max_bytes,
                byte_size,
            ),
            header_timeout: self.leaf(
                &raw.header_timeout,
                "hls.header_timeout",
                d.header_timeout,
                |s| non_zero(duration(s)?),
            ),
            playlist_timeout: self.leaf(
                &raw.playlist_timeout,
                "hls.playlist_timeout",
                d.playlist_timeout,
                |s| non_zero(duration(s)?),
            ),
            segment_timeout: self.leaf(
                &raw.segment_timeout,
                "hls.segment_timeout",
                d.segment_timeout,
                |s| non_zero(duration(s)?),
            ),
            token_key: self.optional(&raw.token_key, "hls.token_key", |s| {
                match hex::decode(s.trim()) {
                    Ok(k) if k.len() >= 16 => Ok(k),
                    Ok(_) => Err("too short: use at least 32 hex digits (16 bytes)".to_owned()),
                    Err(_) => Err("not hex: e.g. the output of `openssl rand -hex 32`".to_owned()),
                }
            }),
        }
    }

    fn metrics(&mut self, raw: RawMetrics, server: &ServerConfig) -> MetricsConfig {
        MetricsConfig {
            listen: self.optional(&raw.listen, "metrics.listen", |s| {
                let addr = socket_addr(s)?;
                if addr == server.listen {
                    Err(format!(
                        "{addr} is already server.listen, which serves /metrics too; \
                         use another port or remove the key"
                    ))
                } else {
                    Ok(addr)
                }
            }),
        }
    }

    fn headers(&mut self, raw: Option<&RawHeaders>, path: &str) -> Vec<(String, String)> {
        let Some(raw) = raw else {
            return Vec::new();
        };
        let mut seen: HashMap<String, &str> = HashMap::new();
        let mut out = Vec::with_capacity(raw.0.len());
        for (name, value) in &raw.0 {
            let mut key_path = path.to_owned();
            push_key(&mut key_path, name);
            let key_at = self.key_at(value, name);
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                let msg = format!(
                    "invalid header name {name:?}: use letters, digits and \
                     !#$%&'*+-.^_`|~ only, no spaces or colons"
                );
                self.report(key_at, &key_path, &msg);
                continue;
            }
            if crate::upstream::headers::is_reserved(name) {
                let msg = format!(
                    "header {name:?} is a hop-by-hop or framing header, which m3u-edge sets itself"
                );
                self.report(key_at, &key_path, &msg);
                continue;
            }
            let lower = name.to_ascii_lowercase();
            if let Some(first) = seen.get(&lower) {
                let msg = format!(
                    "header {name:?} is already set as {first:?} (header names ignore case)"
                );
                self.report(key_at, &key_path, &msg);
                continue;
            }
            seen.insert(lower, name);
            let checked = self.spanned(value, &key_path, None, |v| {
                header_value(v, "remove the header instead").map(Some)
            });
            if let Some(v) = checked {
                out.push((name.clone(), v));
            }
        }
        out
    }

    /// Position of a mapping key, which serde-saphyr only gives for values:
    /// the key is searched for on the value's line, left of the value.
    /// Falls back to the value's position (flow or multi-line layouts).
    fn key_at(&self, value: &Spanned<String>, key: &str) -> At {
        let at = spanned_at(value)?;
        Some(key_column(self.text, at, key).unwrap_or(at))
    }
}

fn key_column(text: &str, (line, column): (u64, u64), key: &str) -> At {
    let row = usize::try_from(line).ok()?.checked_sub(1)?;
    let text = text.lines().nth(row)?;
    // Columns do not count a byte-order mark.
    let text = if row == 0 {
        text.trim_start_matches('\u{feff}')
    } else {
        text
    };
    let before: String = text
        .chars()
        .take(usize::try_from(column).ok()?.saturating_sub(1))
        .collect();
    let byte = before.rfind(key)?;
    let prefix = &before[..byte];
    let mut col = prefix.chars().count() as u64 + 1;
    if prefix.ends_with(['"', '\'']) {
        col -= 1;
    }
    Some((line, col))
}

/// ` (line 7)` when known, for messages pointing at an earlier entry.
fn line_note(at: At) -> String {
    at.map(|(line, _)| format!(" (line {line})"))
        .unwrap_or_default()
}

/// Stands in for a rejected stream URL; never reaches a returned `Config`.
fn placeholder_url() -> Url {
    Url::parse("http://invalid.invalid/").expect("constant URL parses")
}

pub(super) fn default_stream_id(url_as_written: &str) -> String {
    hex::encode(Md5::digest(url_as_written.as_bytes()))
}

fn socket_addr(s: &str) -> Check<SocketAddr> {
    s.parse().map_err(|_| {
        format!(
            "invalid listen address {s:?}: expected IP:PORT such as \"127.0.0.1:8085\", \
             \"0.0.0.0:8085\" or \"[::]:8085\" (host names are not accepted)"
        )
    })
}

fn root_path(s: &str) -> Check<String> {
    if s.is_empty() || s == "/" {
        return Ok(String::new());
    }
    if !s.starts_with('/') {
        return Err(format!("must start with \"/\", e.g. \"/{s}\""));
    }
    if s.ends_with('/') {
        return Err(format!(
            "must not end with \"/\"; write {:?}",
            s.trim_end_matches('/')
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '?' | '#' | '%' | '\\'))
    {
        return Err(format!(
            "{c:?} is not allowed; use a plain path such as \"/m3u-proxy\" \
             (no spaces, query, fragment or percent-encoding)"
        ));
    }
    if s[1..]
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err("must not contain empty, \".\" or \"..\" segments".to_owned());
    }
    Ok(s.to_owned())
}

fn http_url(s: &str) -> Check<Url> {
    let url = Url::parse(s).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "URL {s:?} must use http or https, not {}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("URL {s:?} has no host"));
    }
    Ok(url)
}

/// Largest `events.queue_size`: an event is a few hundred bytes, so this
/// bounds the queue to some hundreds of MiB even when full.
const MAX_EVENT_QUEUE: usize = 1 << 20;

/// Largest `retry_attempts`: with the 30 s backoff cap, 20 retries already
/// keep one event alive for about 10 minutes.
const MAX_RETRY_ATTEMPTS: u32 = 20;

/// A webhook URL in the form the API stores it (`normalize_url`), so a
/// YAML webhook and an API registration of the same URL are one webhook.
fn webhook_url(s: &str) -> Check<Url> {
    http_url(s)?;
    let normalized = crate::events::normalize_url(s)?;
    Url::parse(&normalized).map_err(|e| format!("invalid URL {s:?}: {e}"))
}

fn event_type(s: &str) -> Check<EventType> {
    EventType::parse(s).ok_or_else(|| {
        let names: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        format!("unknown event {s:?}; use one of: {}", names.join(", "))
    })
}

fn public_url(s: &str) -> Check<Url> {
    let url = http_url(s)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "URL {s:?} must not have a query (?) or fragment (#)"
        ));
    }
    Ok(url)
}

fn stream_id(s: &str) -> Check<String> {
    let ok = (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "invalid stream id {s:?}: use 1 to 64 letters, digits, `_` or `-`"
        ))
    }
}

fn host_pattern(s: &str) -> Check<String> {
    if s.contains("://") || s.contains('/') {
        return Err(format!(
            "invalid host {s:?}: write only the host name, without scheme or path, \
             e.g. \"example.com\""
        ));
    }
    let (wildcard, rest) = match s.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    if rest.contains('*') {
        return Err(format!(
            "invalid host {s:?}: `*` may only stand for the first label, as in \"*.example.com\""
        ));
    }
    if !rest.starts_with('[') && rest.contains(':') {
        return Err(format!(
            "invalid host {s:?}: write the host without a port; a provider covers every port"
        ));
    }
    match url::Host::parse(rest) {
        Ok(url::Host::Domain(domain)) if wildcard => Ok(format!("*.{domain}")),
        Ok(url::Host::Domain(domain)) => Ok(domain),
        Ok(_) if wildcard => Err(format!(
            "invalid host {s:?}: `*.` must be followed by a domain name, not an IP address"
        )),
        Ok(ip) => Ok(ip.to_string()),
        Err(e) => Err(format!("invalid host {s:?}: {e}")),
    }
}

fn header_value(s: &str, if_empty: &str) -> Check<String> {
    if s.trim().is_empty() {
        return Err(format!("must not be empty; {if_empty}"));
    }
    http::HeaderValue::from_str(s).map_err(|_| {
        format!(
            "invalid header value {s:?}: only visible ASCII characters, spaces and tabs \
             are allowed"
        )
    })?;
    Ok(s.to_owned())
}

fn user_agent(s: &str) -> Check<String> {
    header_value(s, "remove the key to use the default")
}

pub(super) fn api_token(s: &str) -> Check<String> {
    if s.is_empty() {
        return Err(
            "empty token; use null or remove the key to leave the API without a token".to_owned(),
        );
    }
    if s.trim() != s {
        return Err("the token must not start or end with spaces".to_owned());
    }
    if s.chars().any(|c| !c.is_ascii_graphic()) {
        return Err("the token may only contain visible ASCII characters (no spaces)".to_owned());
    }
    Ok(s.to_owned())
}

/// The token kept in a file (e.g. a systemd credential): its first line,
/// trimmed, checked like `api.token`.
pub(super) fn token_from_file(path: &Path) -> Check<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let first = text.lines().next().unwrap_or("").trim();
    api_token(first).map_err(|e| format!("{}: {e}", path.display()))
}

/// A browser origin: `scheme://host[:port]`, nothing after it, or `*`.
fn cors_origin(s: &str) -> Check<String> {
    if s == "*" {
        return Ok(s.to_owned());
    }
    let u = Url::parse(s).map_err(|e| format!("invalid origin {s:?}: {e}"))?;
    let plain = matches!(u.scheme(), "http" | "https")
        && u.host_str().is_some()
        && u.path() == "/"
        && u.query().is_none()
        && u.fragment().is_none()
        && !s.ends_with('/');
    if !plain {
        return Err(format!(
            "invalid origin {s:?}: write scheme://host[:port] with nothing after it, \
             e.g. \"https://editor.example.com\""
        ));
    }
    Ok(u.origin().ascii_serialization())
}

fn log_level(s: &str) -> Check<String> {
    let lower = s.to_ascii_lowercase();
    if ["trace", "debug", "info", "warn", "error", "off"].contains(&lower.as_str()) {
        return Ok(lower);
    }
    if s.contains('=') {
        return tracing_subscriber::EnvFilter::builder()
            .parse(s)
            .map(|_| s.to_owned())
            .map_err(|e| format!("invalid log filter {s:?}: {e}"));
    }
    Err(format!(
        "invalid log level {s:?}: use trace, debug, info, warn, error or off, \
         or a filter such as \"info,pingora=warn\""
    ))
}

/// An integer in `min..=max`.
fn whole_number(s: &Scalar, min: i128, max: i128) -> Check<i128> {
    let expected = "expected a whole number";
    let n = match s {
        Scalar::Int(n) => *n,
        Scalar::Str(text) if text.trim().parse::<i128>().is_ok() => {
            return Err(format!(
                "invalid type: {}, {expected} (remove the quotes)",
                s.describe()
            ))
        }
        other => return Err(format!("invalid type: {}, {expected}", other.describe())),
    };
    if n < min {
        return Err(format!("must be at least {min}, got {n}"));
    }
    if n > max {
        return Err(format!("must be at most {max}, got {n}"));
    }
    Ok(n)
}

fn usize_at_least(s: &Scalar, min: i128) -> Check<usize> {
    let max = i128::try_from(usize::MAX).unwrap_or(i128::MAX);
    let n = whole_number(s, min, max)?;
    usize::try_from(n).map_err(|_| format!("must be at most {max}, got {n}"))
}

fn max_connections(s: &Scalar) -> Check<u32> {
    if *s == Scalar::Int(0) {
        return Err(
            "0 would block every stream of this provider; remove the key (or use null) \
             for unlimited connections"
                .to_owned(),
        );
    }
    let n = whole_number(s, 1, u32::MAX.into())?;
    u32::try_from(n).map_err(|_| format!("must be at most {}, got {n}", u32::MAX))
}

const DURATION_EXAMPLES: &str = "e.g. \"250ms\", \"5s\", \"15m\" or \"1h 30m\"";

/// A humantime duration string; a bare `0` is unambiguous, other bare
/// numbers are not (seconds? milliseconds?) and are refused.
fn duration(s: &Scalar) -> Check<Duration> {
    match s {
        Scalar::Str(text) => humantime::parse_duration(text)
            .map_err(|e| format!("invalid duration {text:?} ({e}); write {DURATION_EXAMPLES}")),
        Scalar::Int(0) => Ok(Duration::ZERO),
        Scalar::Int(n) => Err(format!(
            "a bare number is ambiguous here; add a unit, e.g. \"{n}s\" or \"{n}ms\""
        )),
        Scalar::Float(f) => Err(format!(
            "a bare number is ambiguous here; add a unit, e.g. \"{f:?}s\""
        )),
        other => Err(format!(
            "invalid type: {}, expected a duration, {DURATION_EXAMPLES}",
            other.describe()
        )),
    }
}

/// A duration where a bare number means seconds (the key is named so).
fn seconds(s: &Scalar) -> Check<Duration> {
    match s {
        Scalar::Int(n) if *n < 0 => Err(format!("must not be negative, got {n}")),
        Scalar::Int(n) => u64::try_from(*n)
            .map(Duration::from_secs)
            .map_err(|_| format!("{n} seconds is too long")),
        Scalar::Float(f) if *f < 0.0 => Err(format!("must not be negative, got {f:?}")),
        Scalar::Float(f) => {
            Duration::try_from_secs_f64(*f).map_err(|_| format!("{f:?} seconds is too long"))
        }
        other => duration(other),
    }
}

fn at_most(d: Duration, max: Duration) -> Check<Duration> {
    if d > max {
        Err(format!(
            "must be at most {}, got {}",
            humantime::format_duration(max),
            humantime::format_duration(d)
        ))
    } else {
        Ok(d)
    }
}

fn non_zero(d: Duration) -> Check<Duration> {
    if d.is_zero() {
        Err("must be greater than zero".to_owned())
    } else {
        Ok(d)
    }
}

const SIZE_UNITS: [(&str, f64); 7] = [
    ("b", 1.0),
    ("kb", 1e3),
    ("mb", 1e6),
    ("gb", 1e9),
    ("kib", 1024.0),
    ("mib", 1_048_576.0),
    ("gib", 1_073_741_824.0),
];

/// Bytes: an integer, or a number with a unit (`512KiB`, `16 MiB`, `8MB`).
fn byte_size(s: &Scalar) -> Check<usize> {
    let hint = "write a byte count or a size such as \"512KiB\", \"16MiB\" or \"8MB\"";
    let bytes = match s {
        Scalar::Int(n) => *n as f64,
        Scalar::Str(text) => {
            let t = text.trim();
            let split = t
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(t.len());
            let (number, unit) = t.split_at(split);
            let number: f64 = number
                .parse()
                .map_err(|_| format!("invalid size {text:?}; {hint}"))?;
            let unit = unit.trim().to_ascii_lowercase();
            let multiplier = if unit.is_empty() {
                1.0
            } else {
                SIZE_UNITS
                    .iter()
                    .find(|(name, _)| *name == unit)
                    .map(|(_, m)| *m)
                    .ok_or_else(|| {
                        format!(
                            "invalid size {text:?}: unknown unit; use B, KB, MB, GB \
                             (powers of 1000) or KiB, MiB, GiB (powers of 1024)"
                        )
                    })?
            };
            number * multiplier
        }
        other => return Err(format!("invalid type: {}, {hint}", other.describe())),
    };
    if bytes.is_nan() || bytes < 1.0 {
        return Err(format!("must be at least 1 byte; {hint}"));
    }
    if bytes > usize::MAX as f64 {
        return Err("too large".to_owned());
    }
    // Truncation is intended: a fractional byte cannot be buffered.
    Ok(bytes as usize)
}

fn at_least_kib(n: usize) -> Check<usize> {
    if n < 1024 {
        Err("must be at least 1KiB".to_owned())
    } else {
        Ok(n)
    }
}

/// A byte size of at least 1 KiB (smaller would refuse every request).
fn size_of_1kib_or_more(s: &Scalar) -> Check<usize> {
    let n = byte_size(s)?;
    if n < 1024 {
        Err("must be at least 1KiB".to_owned())
    } else {
        Ok(n)
    }
}

fn boolean(s: &Scalar) -> Check<bool> {
    match s {
        Scalar::Bool(b) => Ok(*b),
        other => Err(format!(
            "invalid type: {}, expected true or false",
            other.describe()
        )),
    }
}

fn live_mode(s: &Scalar) -> Check<Option<bool>> {
    match s {
        Scalar::Bool(b) => Ok(Some(*b)),
        Scalar::Null => Ok(None),
        Scalar::Str(text) if text == "auto" => Ok(None),
        other => Err(format!(
            "invalid type: {}, expected true, false or auto",
            other.describe()
        )),
    }
}
