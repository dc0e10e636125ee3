use std::path::Path;
use std::time::Duration;

use super::*;

const FILE: &str = "conf/test.yaml";

fn ok(yaml: &str) -> Config {
    parse(yaml, Path::new(FILE)).unwrap_or_else(|e| panic!("rejected:\n{e}\n---\n{yaml}"))
}

fn errors(yaml: &str) -> Vec<String> {
    match parse(yaml, Path::new(FILE)) {
        Ok(config) => panic!("accepted: {config:?}\n---\n{yaml}"),
        Err(e) => {
            assert_eq!(e.to_string(), e.messages().join("\n"));
            e.messages()
        }
    }
}

/// The only error for `yaml`.
fn error(yaml: &str) -> String {
    let mut all = errors(yaml);
    assert_eq!(all.len(), 1, "expected one error, got {all:#?}");
    all.remove(0)
}

fn url(s: &str) -> url::Url {
    url::Url::parse(s).unwrap()
}

#[test]
fn empty_and_comment_only_files_give_defaults() {
    for yaml in [
        "",
        "\n",
        "# nothing\n",
        "---\n",
        "~\n",
        "server:\napi:\nproviders:\nstreams:\n",
    ] {
        assert_eq!(ok(yaml), Config::default(), "{yaml:?}");
    }
}

#[test]
fn default_values() {
    let c = Config::default();
    assert_eq!(c.server.listen, "127.0.0.1:8085".parse().unwrap());
    assert_eq!(c.server.threads, 2);
    assert_eq!(c.server.root_path, "/m3u-proxy");
    assert_eq!(c.server.public_url, None);
    assert_eq!(c.server.state_file, Path::new("m3u-edge-state.json"));
    assert_eq!(c.server.stream_idle_ttl, Duration::from_secs(900));
    assert_eq!(c.server.grace_period, Duration::from_secs(5));
    assert_eq!(c.api.token, None);
    assert!(c
        .upstream
        .user_agent
        .starts_with("Mozilla/5.0 (Windows NT 10.0; Win64; x64)"));
    assert!(c
        .upstream
        .user_agent
        .ends_with("Chrome/115.0.0.0 Safari/537.36"));
    assert!(!c.upstream.user_agent.contains("  "));
    assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.upstream.read_timeout, Duration::from_secs(10));
    assert_eq!(c.upstream.max_redirects, 5);
    assert!(c.providers.is_empty() && c.streams.is_empty());
    assert_eq!(c.live.ring_seconds, Duration::from_secs(4));
    assert_eq!(c.live.ring_bytes, 16 << 20);
    assert_eq!(c.live.stall_timeout, Duration::from_secs(3));
    assert_eq!(c.live.linger, Duration::ZERO);
    assert_eq!(c.live.give_up_after, Duration::from_secs(30));
    assert_eq!(c.live.retry_backoff, Duration::from_secs(5));
    assert_eq!(c.live.primary_cooldown, Duration::from_secs(60));
    assert!(!c.live.standby);
    assert_eq!(c.log.level, "info");
}

#[test]
fn example_config_is_the_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/m3u-edge.yaml");
    let config = load(&path).unwrap_or_else(|e| panic!("{e}"));
    // Everything in the example is spelled out at its default value.
    assert_eq!(config, Config::default());
}

#[test]
fn example_config_documents_every_key() {
    let text = include_str!("../../conf/m3u-edge.yaml");
    let keys = [
        "listen:",
        "threads:",
        "root_path:",
        "public_url:",
        "state_file:",
        "stream_idle_ttl:",
        "grace_period:",
        "shutdown_timeout:",
        "state_save_delay:",
        "token:",
        "user_agent:",
        "connect_timeout:",
        "read_timeout:",
        "max_redirects:",
        "name:",
        "hosts:",
        "max_connections:",
        "headers:",
        "url:",
        "id:",
        "failover_urls:",
        "failover_resolver_url:",
        "provider:",
        "metadata:",
        "live:",
        "sticky:",
        "ring_seconds:",
        "ring_bytes:",
        "stall_timeout:",
        "linger:",
        "give_up_after:",
        "retry_backoff:",
        "primary_cooldown:",
        "standby:",
        "level:",
        "events:",
        "queue_size:",
        "webhooks:",
        "timeout:",
        "retry_attempts:",
        "secret:",
        "metrics:",
        "playlist_max_lines:",
        "rendered_max_bytes:",
        "segment_max_bytes:",
        "inflight_max_bytes:",
        "header_timeout:",
        "playlist_timeout:",
        "segment_timeout:",
        "deny_private_upstreams:",
        "private_allowlist:",
        "work_dir:",
        "max_networks:",
        "callback_timeout:",
        "keep_stopped:",
        "playlists:",
        "refresh:",
        "include:",
        "exclude:",
        "epg_url:",
        "friendly_name:",
        "device_id:",
        "tuner_count:",
        "ssdp:",
        "open:",
    ];
    for key in keys {
        assert!(text.contains(key), "{key} is not documented");
    }
}

#[test]
fn commented_examples_in_the_example_config_parse() {
    // Uncommenting the provider and stream examples must give a valid file.
    let text = include_str!("../../conf/m3u-edge.yaml");
    let uncommented: String = text
        .lines()
        .map(|line| match line.strip_prefix("  # ") {
            Some(rest) if rest.starts_with("- ") || rest.starts_with("  ") => {
                let code = rest.split("  #").next().unwrap_or(rest);
                format!("  {}\n", code.trim_end())
            }
            _ => format!("{line}\n"),
        })
        .collect();
    let c = ok(&uncommented);
    assert_eq!(c.providers.len(), 1, "{uncommented}");
    assert_eq!(c.streams.len(), 1);
    let p = &c.providers[0];
    assert_eq!(p.hosts, ["line.example-iptv.com", "*.cdn.example-iptv.com"]);
    assert_eq!(p.max_connections, Some(2));
    let s = &c.streams[0];
    assert_eq!(s.id, "news-hd");
    assert_eq!(s.provider.as_deref(), Some("my-iptv"));
    assert_eq!(s.metadata["channel_number"], "101");
    assert_eq!(s.live, None);
    assert_eq!(c.transcode.profiles.len(), 1);
    assert_eq!(c.transcode.profiles[0].defaults["video_bitrate"], "1200k");
    assert_eq!(c.playlists.len(), 1);
    let pl = &c.playlists[0];
    assert_eq!(pl.name, "my-iptv");
    assert_eq!(pl.refresh, Duration::from_secs(6 * 3600));
    assert_eq!(pl.include.group.as_deref(), Some("^(News|Sports)"));
    assert_eq!(pl.exclude.name.as_deref(), Some("(?i)\\b(backup|test)\\b"));
    assert!(pl.epg_url.is_some());
}

#[test]
fn playlists_sections() {
    let c = ok(r#"
providers:
  - name: p
    hosts: [p.example]
    max_connections: 3
playlists:
  - name: a
    url: http://p.example/list.m3u
    provider: p
    refresh: 30m
    include: { group: "^News$" }
    exclude: { name: "HD$" }
    live: true
  - name: b
    url: /srv/lists/b.m3u
playlist:
  token: player-secret-1
epg:
  url: https://p.example/epg.xml.gz
  refresh: 2h
hdhomerun:
  friendly_name: Living room
  device_id: 1054a3f2
  tuner_count: 2
  ssdp: true
  open: true
"#);
    assert_eq!(c.playlists.len(), 2);
    assert_eq!(
        c.playlists[1].source,
        crate::config::PlaylistSource::File("/srv/lists/b.m3u".into())
    );
    assert_eq!(c.playlists[0].live, Some(true));
    assert_eq!(c.playlists[0].refresh, Duration::from_secs(1800));
    assert_eq!(c.playlist.token.as_deref(), Some("player-secret-1"));
    assert_eq!(c.epg.refresh, Duration::from_secs(7200));
    assert_eq!(c.hdhomerun.device_id.as_deref(), Some("1054A3F2"));
    assert_eq!(c.hdhomerun.tuner_count, Some(2));
    assert!(c.hdhomerun.ssdp);
    assert!(c.hdhomerun.open);

    let e = errors(
        "playlists:\n  - name: a\n    url: ftp://x/\n    refresh: 1s\n    include: { group: \"(\" }\n    provider: nope\n  - name: a\n    url: relative/path.m3u\nhdhomerun:\n  device_id: xyz\n",
    )
    .join("\n");
    for want in [
        "playlists[0].url",
        "playlists[0].refresh",
        "playlists[0].include.group",
        "playlists[0].provider",
        "playlists[1].name",
        "playlists[1].url",
        "hdhomerun.device_id",
    ] {
        assert!(e.contains(want), "{want} not reported in:\n{e}");
    }
}

#[test]
fn every_key_parses() {
    let c = ok(r#"
server:
  listen: "[::]:9000"
  threads: 8
  root_path: /edge/tv
  public_url: https://tv.example.com/base
  state_file: /var/lib/m3u-edge/state.json
  stream_idle_ttl: 1h 30m
  grace_period: 250ms
api:
  token: s3cret-Token
upstream:
  user_agent: VLC/3.0
  connect_timeout: 2s
  read_timeout: 1m
  max_redirects: 0
providers:
  - name: acme
    hosts: [Line.ACME.tv, "*.cdn.acme.tv", 192.0.2.1, "[2001:db8::1]"]
    max_connections: 3
    user_agent: Acme/1
    headers:
      Referer: http://acme.tv/
      X-Num: 5
streams:
  - id: news_HD-1
    url: http://line.acme.tv/live/u/p/1.ts
    failover_urls:
      - https://backup.example.com/1.ts
      - http://backup2.example.com:8080/1.m3u8?token=a
    failover_resolver_url: http://resolver.example.com/next
    provider: acme
    user_agent: Other/2
    headers:
      Cookie: a=b
    metadata:
      name: News
      number: 101
    live: true
    sticky: true
live:
  ring_seconds: 6
  ring_bytes: 512KiB
  stall_timeout: 1500ms
  linger: 2s
  give_up_after: 2m
  retry_backoff: 10s
  primary_cooldown: 5m
  standby: true
log:
  level: info,pingora=warn
"#);
    assert_eq!(c.server.listen, "[::]:9000".parse().unwrap());
    assert_eq!(c.server.threads, 8);
    assert_eq!(c.server.root_path, "/edge/tv");
    assert_eq!(
        c.server.public_url,
        Some(url("https://tv.example.com/base"))
    );
    assert_eq!(
        c.server.state_file,
        Path::new("/var/lib/m3u-edge/state.json")
    );
    assert_eq!(c.server.stream_idle_ttl, Duration::from_secs(5400));
    assert_eq!(c.server.grace_period, Duration::from_millis(250));
    assert_eq!(c.api.token.as_deref(), Some("s3cret-Token"));
    assert_eq!(c.upstream.user_agent, "VLC/3.0");
    assert_eq!(c.upstream.connect_timeout, Duration::from_secs(2));
    assert_eq!(c.upstream.read_timeout, Duration::from_secs(60));
    assert_eq!(c.upstream.max_redirects, 0);
    assert_eq!(
        c.providers,
        [ProviderConfig {
            name: "acme".into(),
            hosts: vec![
                "line.acme.tv".into(),
                "*.cdn.acme.tv".into(),
                "192.0.2.1".into(),
                "[2001:db8::1]".into()
            ],
            max_connections: Some(3),
            user_agent: Some("Acme/1".into()),
            headers: vec![
                ("Referer".into(), "http://acme.tv/".into()),
                ("X-Num".into(), "5".into())
            ],
        }]
    );
    assert_eq!(
        c.streams,
        [StreamConfig {
            id: "news_HD-1".into(),
            url: url("http://line.acme.tv/live/u/p/1.ts"),
            failover_urls: vec![
                url("https://backup.example.com/1.ts"),
                url("http://backup2.example.com:8080/1.m3u8?token=a")
            ],
            failover_resolver_url: Some(url("http://resolver.example.com/next")),
            provider: Some("acme".into()),
            user_agent: Some("Other/2".into()),
            headers: vec![("Cookie".into(), "a=b".into())],
            metadata: [("name", "News"), ("number", "101")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            live: Some(true),
            sticky: true,
        }]
    );
    assert_eq!(
        c.live,
        LiveConfig {
            ring_seconds: Duration::from_secs(6),
            ring_bytes: 512 * 1024,
            stall_timeout: Duration::from_millis(1500),
            linger: Duration::from_secs(2),
            give_up_after: Duration::from_secs(120),
            retry_backoff: Duration::from_secs(10),
            primary_cooldown: Duration::from_secs(300),
            standby: true,
        }
    );
    assert_eq!(c.log.level, "info,pingora=warn");
}

#[test]
fn null_means_default() {
    let c = ok("server:\n  threads: ~\n  listen:\napi:\n  token: null\nlive:\n  ring_bytes: ~\n");
    assert_eq!(c, Config::default());
}

#[test]
fn unknown_key_at_top_level() {
    assert_eq!(
        error("servr:\n  listen: 127.0.0.1:1\n"),
        "conf/test.yaml:1:1: servr: unknown field `servr`, expected one of: \
         server, api, upstream, providers, streams, live, log, events, metrics, hls, limits, transcode, resolvers, security, broadcast, \
         playlists, playlist, epg, hdhomerun, cluster \
         (did you mean `server`?)"
    );
}

#[test]
fn unknown_key_nested() {
    assert_eq!(
        error("server:\n  threads: 2\n  listn: 127.0.0.1:1\n"),
        "conf/test.yaml:3:3: server.listn: unknown field `listn`, expected one of: \
         listen, threads, root_path, public_url, state_file, stream_idle_ttl, grace_period, \
         shutdown_timeout, state_save_delay \
         (did you mean `listen`?)"
    );
}

#[test]
fn unknown_key_in_a_list_element() {
    let yaml = "streams:\n  - url: http://a.example/1\n  - url: http://a.example/2\n    failover_url: http://b.example/\n";
    let e = error(yaml);
    assert!(
        e.starts_with(
            "conf/test.yaml:4:5: streams[1].failover_url: unknown field `failover_url`, expected one of: id, url, failover_urls,"
        ),
        "{e}"
    );
    assert!(e.ends_with("(did you mean `failover_urls`?)"), "{e}");
}

#[test]
fn unknown_key_named_value_is_still_named() {
    // `value` is also Spanned's inner field name, which paths otherwise hide.
    let e = error("log:\n  value: 1\n");
    assert!(
        e.starts_with("conf/test.yaml:2:3: log.value: unknown field `value`"),
        "{e}"
    );
}

#[test]
fn missing_required_key() {
    assert_eq!(
        error("streams:\n  - id: x\n"),
        "conf/test.yaml:2:5: streams[0]: missing required key `url`"
    );
    let e = error("providers:\n  - name: a\n");
    assert!(
        e.contains("providers[0]: missing required key `hosts`"),
        "{e}"
    );
}

#[test]
fn wrong_types() {
    assert_eq!(
        error("providers:\n  - name: a\n    hosts: [a.example]\n    max_connections: \"x\"\n"),
        "conf/test.yaml:4:22: providers[0].max_connections: invalid type: string \"x\", expected a whole number"
    );
    assert_eq!(
        error("server:\n  threads: \"4\"\n"),
        "conf/test.yaml:2:12: server.threads: invalid type: string \"4\", expected a whole number (remove the quotes)"
    );
    assert_eq!(
        error("server:\n  threads: 1.5\n"),
        "conf/test.yaml:2:12: server.threads: invalid type: floating point `1.5`, expected a whole number"
    );
    assert_eq!(
        error("server:\n  threads: [1, 2]\n"),
        "conf/test.yaml:2:12: server.threads: invalid type: list, expected a whole number"
    );
    assert_eq!(
        error("server:\n  listen: [1, 2]\n"),
        "conf/test.yaml:2:11: server.listen: expected a single value, not a list or mapping"
    );
    assert_eq!(
        error("live:\n  linger: {a: 1}\n"),
        "conf/test.yaml:2:11: live.linger: invalid type: mapping, expected a duration, \
         e.g. \"250ms\", \"5s\", \"15m\" or \"1h 30m\""
    );
    assert_eq!(
        error("server: 5\n"),
        "conf/test.yaml:1:9: server: expected a mapping (`key: value` lines)"
    );
    assert_eq!(
        error("streams:\n  url: http://a.example/\n"),
        "conf/test.yaml:2:3: streams: expected a list"
    );
    assert_eq!(
        error("live:\n  standby: yes please\n"),
        "conf/test.yaml:2:12: live.standby: invalid type: string \"yes please\", expected true or false"
    );
    assert_eq!(
        error("server:\n  threads: 0\n"),
        "conf/test.yaml:2:12: server.threads: must be at least 1, got 0"
    );
    assert_eq!(
        error("providers:\n  - name: a\n    hosts: [a.example]\n    max_connections: 4294967296\n"),
        "conf/test.yaml:4:22: providers[0].max_connections: must be at most 4294967295, got 4294967296"
    );
}

#[test]
fn top_level_must_be_a_mapping() {
    let expected = "conf/test.yaml:1:1: the file must be a mapping of sections \
                    (server, api, upstream, providers, streams, live, log, events, metrics, hls, limits, transcode, resolvers, security, broadcast, playlists, playlist, epg, hdhomerun, cluster)";
    assert_eq!(error("- server\n"), expected);
    assert_eq!(error("hello\n"), expected);
}

#[test]
fn yaml_syntax_errors_have_positions() {
    let e = error("server:\n  listen: \"127.0.0.1:1\n");
    assert!(e.starts_with("conf/test.yaml:2:"), "{e}");
    let e = error("server:\n  listen: 127.0.0.1:1\n  listen: 127.0.0.1:2\n");
    assert_eq!(
        e,
        "conf/test.yaml:3:3: server.listen: key `listen` appears twice in the same mapping"
    );
    let e = error("log:\n  level: info\n---\nlog:\n  level: warn\n");
    assert!(e.contains("single YAML document"), "{e}");
}

#[test]
fn bad_urls() {
    let stream = |u: &str| format!("streams:\n  - url: {u}\n");
    assert_eq!(
        error(&stream("ftp://example.com/a.ts")),
        "conf/test.yaml:2:10: streams[0].url: URL \"ftp://example.com/a.ts\" must use http or https, not ftp"
    );
    assert_eq!(
        error(&stream("not a url")),
        "conf/test.yaml:2:10: streams[0].url: invalid URL \"not a url\": relative URL without a base"
    );
    let e = error(&stream("\"http://\""));
    assert!(
        e.starts_with("conf/test.yaml:2:10: streams[0].url: invalid URL \"http://\""),
        "{e}"
    );
    assert_eq!(
        error("streams:\n  - url: http://a.example/\n    failover_urls:\n      - http://b.example/\n      - file:///etc/passwd\n"),
        "conf/test.yaml:5:9: streams[0].failover_urls[1]: URL \"file:///etc/passwd\" must use http or https, not file"
    );
    let e = error("streams:\n  - url: http://a.example/\n    failover_resolver_url: mailto:x@y\n");
    assert!(
        e.starts_with("conf/test.yaml:3:28: streams[0].failover_resolver_url: URL"),
        "{e}"
    );
    let e = error("server:\n  public_url: https://tv.example.com/?a=b\n");
    assert!(
        e.contains("server.public_url: URL \"https://tv.example.com/?a=b\" must not have a query"),
        "{e}"
    );
    let e = error("server:\n  public_url: ws://tv.example.com\n");
    assert!(e.contains("must use http or https, not ws"), "{e}");
}

#[test]
fn durations() {
    let c = ok("live:\n  ring_seconds: 1.5\n  linger: 0\n  give_up_after: 0s\n  retry_backoff: 1h 30m\n  primary_cooldown: 2min\n");
    assert_eq!(c.live.ring_seconds, Duration::from_millis(1500));
    assert_eq!(c.live.linger, Duration::ZERO);
    assert_eq!(c.live.give_up_after, Duration::ZERO);
    assert_eq!(c.live.retry_backoff, Duration::from_secs(5400));
    assert_eq!(c.live.primary_cooldown, Duration::from_secs(120));
    assert_eq!(
        ok("live:\n  ring_seconds: 10s\n").live.ring_seconds,
        Duration::from_secs(10)
    );
    assert_eq!(
        ok("live:\n  ring_seconds: 0\n").live.ring_seconds,
        Duration::ZERO
    );

    assert_eq!(
        error("live:\n  stall_timeout: 3\n"),
        "conf/test.yaml:2:18: live.stall_timeout: a bare number is ambiguous here; add a unit, e.g. \"3s\" or \"3ms\""
    );
    let e = error("server:\n  grace_period: 5 parsecs\n");
    assert!(
        e.starts_with("conf/test.yaml:2:17: server.grace_period: invalid duration \"5 parsecs\" ("),
        "{e}"
    );
    assert!(
        e.ends_with("write e.g. \"250ms\", \"5s\", \"15m\" or \"1h 30m\""),
        "{e}"
    );
    assert_eq!(
        error("live:\n  stall_timeout: 0s\n"),
        "conf/test.yaml:2:18: live.stall_timeout: must be greater than zero"
    );
    assert_eq!(
        error("live:\n  ring_seconds: -1\n"),
        "conf/test.yaml:2:17: live.ring_seconds: must not be negative, got -1"
    );
    let e = error("upstream:\n  read_timeout: true\n");
    assert!(
        e.contains("upstream.read_timeout: invalid type: boolean `true`, expected a duration"),
        "{e}"
    );
}

#[test]
fn byte_sizes() {
    let size = |s: &str| ok(&format!("live:\n  ring_bytes: {s}\n")).live.ring_bytes;
    assert_eq!(size("1000"), 1000);
    assert_eq!(size("16MiB"), 16 << 20);
    assert_eq!(size("512KiB"), 512 << 10);
    assert_eq!(size("8MB"), 8_000_000);
    assert_eq!(size("\"2 gib\""), 2 << 30);
    assert_eq!(size("1.5MiB"), 1_572_864);
    assert_eq!(size("100b"), 100);
    let e = error("live:\n  ring_bytes: 16M\n");
    assert!(
        e.starts_with("conf/test.yaml:2:15: live.ring_bytes: invalid size \"16M\": unknown unit"),
        "{e}"
    );
    assert!(error("live:\n  ring_bytes: 0\n").contains("must be at least 1 byte"));
    assert!(error("live:\n  ring_bytes: -5\n").contains("must be at least 1 byte"));
    assert!(error("live:\n  ring_bytes: lots\n").contains("invalid size \"lots\""));
}

#[test]
fn bad_listen_address() {
    assert_eq!(
        error("server:\n  listen: localhost:8085\n"),
        "conf/test.yaml:2:11: server.listen: invalid listen address \"localhost:8085\": expected IP:PORT \
         such as \"127.0.0.1:8085\", \"0.0.0.0:8085\" or \"[::]:8085\" (host names are not accepted)"
    );
    assert!(error("server:\n  listen: 8085\n").contains("invalid listen address \"8085\""));
    assert!(error("server:\n  listen: 127.0.0.1:99999\n").contains("invalid listen address"));
}

#[test]
fn root_path_forms() {
    let root = |s: &str| ok(&format!("server:\n  root_path: {s}\n")).server.root_path;
    assert_eq!(root("\"/\""), "");
    assert_eq!(root("\"\""), "");
    assert_eq!(root("/a/b-c_d.e"), "/a/b-c_d.e");
    for (bad, says) in [
        ("m3u", "must start with \"/\", e.g. \"/m3u\""),
        ("/m3u/", "must not end with \"/\"; write \"/m3u\""),
        ("\"/a b\"", "' ' is not allowed"),
        ("/a?b=c", "'?' is not allowed"),
        ("/a//b", "must not contain empty"),
        ("/a/../b", "must not contain empty"),
    ] {
        let e = error(&format!("server:\n  root_path: {bad}\n"));
        assert!(
            e.contains(&format!("server.root_path: {says}")),
            "{bad}: {e}"
        );
    }
}

#[test]
fn provider_references() {
    assert_eq!(
        error("streams:\n  - url: http://a.example/\n    provider: acme\n"),
        "conf/test.yaml:3:15: streams[0].provider: unknown provider \"acme\": no providers are defined under `providers`"
    );
    let yaml = "providers:\n  - name: one\n    hosts: [one.example]\n  - name: two\n    hosts: [two.example]\nstreams:\n  - url: http://a.example/\n    provider: three\n";
    assert_eq!(
        error(yaml),
        "conf/test.yaml:8:15: streams[0].provider: unknown provider \"three\"; defined providers: one, two"
    );
}

#[test]
fn duplicates() {
    let yaml = "\
providers:
  - name: acme
    hosts: [a.example]
  - name: acme
    hosts: [A.Example]
streams:
  - id: one
    url: http://a.example/1
  - id: one
    url: http://a.example/2
  - url: http://example.com/a.ts
  - url: http://example.com/a.ts
";
    assert_eq!(
        errors(yaml),
        [
            "conf/test.yaml:4:11: providers[1].name: duplicate provider name \"acme\"; providers[0] (line 2) already uses it",
            "conf/test.yaml:5:13: providers[1].hosts[0]: host \"a.example\" is already listed at providers[0].hosts[0]; each host may belong to one provider only",
            "conf/test.yaml:9:9: streams[1].id: duplicate stream id \"one\"; streams[0] (line 7) already uses it",
            "conf/test.yaml:12:10: streams[3].url: this stream's default id \"384682f2a6713be4b863fa98e0bbd0a1\" (the md5 of its URL) is already used by streams[2] (line 11); give one of them an explicit `id`",
        ]
    );
}

#[test]
fn default_id_is_md5_of_the_url_as_written() {
    // printf %s 'http://example.com/a.ts' | md5sum
    let c = ok("streams:\n  - url: http://example.com/a.ts\n  - url: HTTP://EXAMPLE.COM/a.ts\n");
    assert_eq!(c.streams[0].id, "384682f2a6713be4b863fa98e0bbd0a1");
    // The text is hashed before any URL normalisation.
    assert_ne!(c.streams[1].id, c.streams[0].id);
    assert_eq!(c.streams[1].url, c.streams[0].url);
    assert_eq!(
        validate::default_stream_id("http://example.com/a.ts"),
        "384682f2a6713be4b863fa98e0bbd0a1"
    );
}

#[test]
fn stream_id_syntax() {
    let e = error("streams:\n  - id: \"a b\"\n    url: http://a.example/\n");
    assert_eq!(
        e,
        "conf/test.yaml:2:9: streams[0].id: invalid stream id \"a b\": use 1 to 64 letters, digits, `_` or `-`"
    );
    assert!(error(&format!(
        "streams:\n  - id: {}\n    url: http://a.example/\n",
        "x".repeat(65)
    ))
    .contains("invalid stream id"));
    assert_eq!(
        ok(&format!(
            "streams:\n  - id: {}\n    url: http://a.example/\n",
            "x".repeat(64)
        ))
        .streams[0]
            .id
            .len(),
        64
    );
    // Digits stay as written, leading zeros included.
    assert_eq!(
        ok("streams:\n  - id: 0123\n    url: http://a.example/\n").streams[0].id,
        "0123"
    );
}

#[test]
fn metadata_values_are_kept_as_written() {
    let c = ok("\
streams:
  - url: http://a.example/
    metadata:
      int: 5
      float: 1.50
      bool: true
      yes: yes
      hex: 0x1F
      text: hello world
      quoted: \"007\"
      empty: \"\"
      123: numeric key
");
    let m = &c.streams[0].metadata;
    let want = [
        ("int", "5"),
        ("float", "1.50"),
        ("bool", "true"),
        ("yes", "yes"),
        ("hex", "0x1F"),
        ("text", "hello world"),
        ("quoted", "007"),
        ("empty", ""),
        ("123", "numeric key"),
    ];
    for (k, v) in want {
        assert_eq!(m.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert_eq!(m.len(), want.len());

    assert_eq!(
        error("streams:\n  - url: http://a.example/\n    metadata:\n      id: ~\n"),
        "conf/test.yaml:4:11: streams[0].metadata.id: a value is required here, not null (write \"\" for empty text)"
    );
    let e = error("streams:\n  - url: http://a.example/\n    metadata:\n      value: [1]\n");
    assert!(
        e.starts_with("conf/test.yaml:4:14: streams[0].metadata.value: expected a single value"),
        "{e}"
    );
    let e =
        error("streams:\n  - url: http://a.example/\n    metadata:\n      \"tvg id\": {a: 1}\n");
    assert!(e.contains("streams[0].metadata[\"tvg id\"]: "), "{e}");
}

#[test]
fn header_validation() {
    let yaml = "\
providers:
  - name: p
    hosts: [p.example]
    headers:
      X Bad: 1
      Good: fine
      good: again
      Empty: \"\"
      Multi: \"a\\nb\"
      value: [1]
";
    // The list value is a pass-1 error; the value errors come with it.
    let all = errors(yaml);
    assert_eq!(
        all.last().map(String::as_str),
        Some("conf/test.yaml:10:14: providers[0].headers.value: expected a single value, not a list or mapping")
    );
    assert_eq!(all.len(), 5, "{all:#?}");
    let yaml = yaml.replace("value: [1]", "value: ok");
    assert_eq!(
        errors(&yaml),
        [
            "conf/test.yaml:5:7: providers[0].headers[\"X Bad\"]: invalid header name \"X Bad\": use letters, digits and !#$%&'*+-.^_`|~ only, no spaces or colons",
            "conf/test.yaml:7:7: providers[0].headers.good: header \"good\" is already set as \"Good\" (header names ignore case)",
            "conf/test.yaml:8:14: providers[0].headers.Empty: must not be empty; remove the header instead",
            "conf/test.yaml:9:14: providers[0].headers.Multi: invalid header value \"a\\nb\": only visible ASCII characters, spaces and tabs are allowed",
        ]
    );
    let c = ok("streams:\n  - url: http://a.example/\n    headers: {X-A: 1, \"X-B\": two}\n");
    assert_eq!(
        c.streams[0].headers,
        [
            ("X-A".to_owned(), "1".to_owned()),
            ("X-B".to_owned(), "two".to_owned())
        ]
    );
    assert!(
        error("upstream:\n  user_agent: \"\"\n").contains("upstream.user_agent: must not be empty")
    );
    assert!(error("upstream:\n  user_agent: \"UA\\u0001\"\n")
        .contains("invalid header value \"UA\\u{1}\""));
}

#[test]
fn hosts() {
    let hosts = |list: &str| {
        ok(&format!("providers:\n  - name: p\n    hosts: {list}\n")).providers[0]
            .hosts
            .clone()
    };
    assert_eq!(
        hosts("[Line.EXAMPLE.com, \"*.CDN.example.com\"]"),
        ["line.example.com", "*.cdn.example.com"]
    );
    assert_eq!(hosts("[bücher.example]"), ["xn--bcher-kva.example"]);
    for (bad, says) in [
        ("[]", "list at least one host name"),
        ("[\"http://a.example/\"]", "without scheme or path"),
        ("[\"a.example:8080\"]", "without a port"),
        ("[\"a.*.example\"]", "may only stand for the first label"),
        ("[\"*.10.0.0.1\"]", "not an IP address"),
        ("[\"a b.example\"]", "invalid host \"a b.example\""),
        ("[\"\"]", "invalid host \"\""),
    ] {
        let e = error(&format!("providers:\n  - name: p\n    hosts: {bad}\n"));
        assert!(e.starts_with("conf/test.yaml:3:"), "{bad}: {e}");
        assert!(e.contains(says), "{bad}: {e}");
    }
    let e = error("providers:\n  - name: p\n    hosts: a.example\n");
    assert_eq!(
        e,
        "conf/test.yaml:3:12: providers[0].hosts: expected a list"
    );
}

#[test]
fn provider_fields() {
    assert_eq!(
        error("providers:\n  - name: p\n    hosts: [p.example]\n    max_connections: 0\n"),
        "conf/test.yaml:4:22: providers[0].max_connections: 0 would block every stream of this \
         provider; remove the key (or use null) for unlimited connections"
    );
    assert_eq!(
        ok("providers:\n  - name: p\n    hosts: [p.example]\n    max_connections: null\n")
            .providers[0]
            .max_connections,
        None
    );
    assert_eq!(
        error("providers:\n  - name: \"\"\n    hosts: [p.example]\n"),
        "conf/test.yaml:2:11: providers[0].name: must not be empty"
    );
    assert_eq!(
        error("providers:\n  - name:\n    hosts: [p.example]\n"),
        "conf/test.yaml:2:9: providers[0].name: a value is required here, not null (write \"\" for empty text)"
    );
}

#[test]
fn api_token() {
    assert_eq!(
        error("api:\n  token: \"\"\n"),
        "conf/test.yaml:2:10: api.token: empty token; use null or remove the key to leave the API without a token"
    );
    assert!(error("api:\n  token: \" x\"\n").contains("must not start or end with spaces"));
    assert_eq!(
        ok("api:\n  token: 12345\n").api.token.as_deref(),
        Some("12345")
    );
}

#[test]
fn live_and_sticky() {
    let live = |v: &str| {
        ok(&format!(
            "streams:\n  - url: http://a.example/\n    live: {v}\n"
        ))
        .streams[0]
            .live
    };
    assert_eq!(live("true"), Some(true));
    assert_eq!(live("false"), Some(false));
    assert_eq!(live("auto"), None);
    assert_eq!(live("~"), None);
    assert!(
        error("streams:\n  - url: http://a.example/\n    live: sometimes\n").contains(
            "streams[0].live: invalid type: string \"sometimes\", expected true, false or auto"
        )
    );
    assert!(
        error("streams:\n  - url: http://a.example/\n    sticky: 1\n")
            .contains("streams[0].sticky: invalid type: integer `1`, expected true or false")
    );
}

#[test]
fn log_level() {
    assert_eq!(ok("log:\n  level: WARN\n").log.level, "warn");
    assert_eq!(
        ok("log:\n  level: m3u_edge=debug\n").log.level,
        "m3u_edge=debug"
    );
    assert!(error("log:\n  level: loud\n").contains("log.level: invalid log level \"loud\""));
    assert!(error("log:\n  level: a=loud\n").contains("log.level: invalid log filter \"a=loud\""));
}

#[test]
fn value_errors_are_all_collected_in_file_order() {
    let yaml = "\
log:
  level: loud
server:
  listen: nowhere
  threads: 0
streams:
  - url: ftp://x/
live:
  linger: soon
";
    let all = errors(yaml);
    let keys: Vec<&str> = all.iter().map(|e| e.split(": ").nth(1).unwrap()).collect();
    assert_eq!(
        keys,
        [
            "log.level",
            "server.listen",
            "server.threads",
            "streams[0].url",
            "live.linger"
        ]
    );
    assert!(all[0].starts_with("conf/test.yaml:2:10: "));
    assert!(all[4].starts_with("conf/test.yaml:9:11: "));
}

#[test]
fn aliases_resolve_and_errors_point_at_the_use() {
    let c = ok("streams:\n  - url: &u http://a.example/x\n    id: a\n  - url: *u\n    id: b\n");
    assert_eq!(c.streams[1].url, url("http://a.example/x"));
    // Pass 1 (shape) and pass 2 (value) errors both point at the alias.
    assert_eq!(
        errors("live:\n  linger: &a [1]\nserver:\n  listen: *a\n"),
        [
            "conf/test.yaml:2:14: live.linger: invalid type: list, expected a duration, e.g. \"250ms\", \"5s\", \"15m\" or \"1h 30m\"",
            "conf/test.yaml:4:11: server.listen: expected a single value, not a list or mapping"
        ]
    );
    assert_eq!(
        errors("streams:\n  - url: &u ftp://a/x\n    id: a\n  - url: *u\n    id: b\n"),
        [
            "conf/test.yaml:2:13: streams[0].url: URL \"ftp://a/x\" must use http or https, not ftp",
            "conf/test.yaml:4:10: streams[1].url: URL \"ftp://a/x\" must use http or https, not ftp",
        ]
    );
    let e = error("x: &bad ftp://a/\nstreams:\n  - url: *bad\n");
    assert!(e.starts_with("conf/test.yaml:1:1: x: unknown field"), "{e}");
}

#[test]
fn io_errors() {
    let e = load(Path::new("/nonexistent/m3u-edge.yaml")).unwrap_err();
    let line = e.to_string();
    assert!(
        line.starts_with("/nonexistent/m3u-edge.yaml: cannot read: "),
        "{line}"
    );
    assert_eq!(e.messages(), [line]);
    assert!(e.problems().is_empty());
}

#[test]
fn load_reads_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, "server:\n  threads: 3\n  bogus: 1\n").unwrap();
    let e = load(&path).unwrap_err();
    assert_eq!(
        e.messages()[0],
        format!(
            "{}:3:3: server.bogus: unknown field `bogus`, expected one of: listen, threads, \
             root_path, public_url, state_file, stream_idle_ttl, grace_period, shutdown_timeout, \
             state_save_delay",
            path.display()
        )
    );
    std::fs::write(&path, "server:\n  threads: 3\n").unwrap();
    assert_eq!(load(&path).unwrap().server.threads, 3);
}

#[test]
fn hostile_input_never_panics() {
    let deep_seq = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_map = format!("server: {}1{}", "{a: ".repeat(5_000), "}".repeat(5_000));
    let inputs = [
        "{",
        "[",
        ":",
        "*a",
        "&a",
        "? ",
        "!!binary x",
        "\t",
        "\0",
        "server:\n  threads: 999999999999999999999999999999999999999\n",
        "server:\n  threads: -99999999999999999999999999999999999999999\n",
        "live:\n  ring_bytes: 1e400\n",
        "live:\n  ring_bytes: \"99999999999999999999999999GiB\"\n",
        "live:\n  ring_seconds: 1e300\n",
        "live:\n  ring_seconds: 99999999999999999999999\n",
        "live:\n  linger: 99999999999999999999999h\n",
        "server:\n  listen: !!binary aGVsbG8=\n",
        "a: &a [*a]\n",
        "\u{feff}server:\n  threads: x\n",
        "streams:\n  - url: http://a/\n    headers:\n      \u{00e9}: v\n",
        "streams: [{url: \"http://[::1\"}]\n",
        &deep_seq,
        &deep_map,
        &format!("server:\n  threads: {deep_seq}\n"),
    ];
    for input in inputs {
        if let Err(e) = parse(input, Path::new(FILE)) {
            for line in e.messages() {
                assert!(line.starts_with(FILE) && !line.contains('\n'), "{line:?}");
            }
        }
    }
}

#[test]
fn messages_are_single_lines() {
    let e = error("streams:\n  - url: \"http://a.example/\\nx\"\n    id: \"a\\nb\"\n");
    assert!(!e.contains('\n'));
    let e = error("streams:\n  - url: http://a.example/\n    metadata: {\"a\\nb\": [1]}\n");
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn events_and_metrics_defaults() {
    let c = Config::default();
    assert_eq!(c.events.queue_size, 4096);
    assert!(c.events.webhooks.is_empty());
    assert_eq!(c.metrics.listen, None);
    assert_eq!(
        ok("events:\n  webhooks:\nmetrics:\n  listen: null\n"),
        Config::default()
    );
}

#[test]
fn webhooks_parse_with_defaults_and_normalized_urls() {
    use crate::events::EventType;
    let c = ok(r#"
events:
  queue_size: 16
  webhooks:
    - url: "HTTP://Receiver.EXAMPLE:80"
    - url: https://hooks.example/in?token=a#frag
      events: [stream_stopped, client_connected]
      headers: {Authorization: "Bearer x", X-Num: 5}
      timeout: 2500ms
      retry_attempts: 0
      secret: s3cret
metrics:
  listen: "127.0.0.1:9100"
"#);
    assert_eq!(c.events.queue_size, 16);
    let [a, b] = &c.events.webhooks[..] else {
        panic!("{:?}", c.events.webhooks)
    };
    assert_eq!(a.url, url("http://receiver.example/"));
    assert_eq!(a.events, EventType::ALL);
    assert!(a.headers.is_empty());
    assert_eq!(a.timeout, Duration::from_secs(10));
    assert_eq!(a.retry_attempts, 3);
    assert_eq!(a.secret, None);
    assert_eq!(b.url.as_str(), "https://hooks.example/in?token=a");
    assert_eq!(
        b.events,
        [EventType::StreamStopped, EventType::ClientConnected]
    );
    assert_eq!(
        b.headers,
        [
            ("Authorization".to_owned(), "Bearer x".to_owned()),
            ("X-Num".to_owned(), "5".to_owned())
        ]
    );
    assert_eq!(b.timeout, Duration::from_millis(2500));
    assert_eq!(b.retry_attempts, 0);
    assert_eq!(b.secret.as_deref(), Some("s3cret"));
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9100".parse().unwrap()));
}

#[test]
fn webhook_value_errors() {
    let hook =
        |fields: &str| format!("events:\n  webhooks:\n    - url: http://r.example/\n{fields}");
    assert_eq!(
        error(&hook("      events: [stream_started, stream_exploded]\n")),
        "conf/test.yaml:4:32: events.webhooks[0].events[1]: unknown event \"stream_exploded\"; \
         use one of: stream_started, stream_stopped, stream_failed, client_connected, \
         client_disconnected, failover_triggered"
    );
    assert!(error(&hook("      events: []\n"))
        .contains("events.webhooks[0].events: list at least one event"));
    assert!(
        error(&hook("      events: [stream_stopped, stream_stopped]\n"))
            .contains("events.webhooks[0].events[1]: event \"stream_stopped\" is listed twice")
    );
    assert_eq!(
        error(&hook("      timeout: 500ms\n")),
        "conf/test.yaml:4:16: events.webhooks[0].timeout: must be at least 1s, got 500ms"
    );
    assert!(error(&hook("      timeout: 5\n")).contains("a bare number is ambiguous"));
    assert!(error(&hook("      retry_attempts: -1\n")).contains("must be at least 0, got -1"));
    assert!(error(&hook("      retry_attempts: 21\n")).contains("must be at most 20, got 21"));
    assert!(
        error(&hook("      secret: \"\"\n")).contains("events.webhooks[0].secret: empty secret")
    );
    assert!(error(&hook("      headers: {\"Bad Name\": x}\n")).contains("invalid header name"));
    assert!(error(&hook("      header: {A: b}\n")).contains("unknown field `header`"));

    assert_eq!(
        error("events:\n  webhooks:\n    - url: ftp://r.example/\n"),
        "conf/test.yaml:3:12: events.webhooks[0].url: URL \"ftp://r.example/\" must use http or https, not ftp"
    );
    assert!(
        error("events:\n  webhooks:\n    - events: [stream_started]\n")
            .contains("events.webhooks[0]: missing required key `url`")
    );
    // Duplicates are found after normalization, as the API dedupes.
    assert_eq!(
        error(
            "events:\n  webhooks:\n    - url: http://r.example/\n    - url: HTTP://R.example:80\n"
        ),
        "conf/test.yaml:4:12: events.webhooks[1].url: webhook \"http://r.example/\" is already \
         listed at events.webhooks[0] (line 3)"
    );
    assert!(error("events:\n  queue_size: 0\n")
        .contains("events.queue_size: must be at least 1, got 0"));
    assert!(error("events:\n  queue_size: 2000000\n").contains("must be at most 1048576"));
    assert!(error("events:\n  queue: 5\n").contains("unknown field `queue`"));
}

#[test]
fn metrics_listen_errors() {
    assert!(error("metrics:\n  listen: localhost:9100\n")
        .contains("metrics.listen: invalid listen address"));
    assert!(
        error("server:\n  listen: 127.0.0.1:9000\nmetrics:\n  listen: 127.0.0.1:9000\n")
            .contains("metrics.listen: 127.0.0.1:9000 is already server.listen")
    );
    assert!(error("metrics:\n  path: /m\n").contains("metrics.path: unknown field `path`"));
}

#[test]
fn commented_webhook_example_parses() {
    // The `events.webhooks` example, uncommented, must be a valid file.
    let text = include_str!("../../conf/m3u-edge.yaml");
    let uncommented: String = text
        .lines()
        .map(|line| match line.strip_prefix("    # ") {
            Some(rest) if rest.starts_with("- ") || rest.starts_with("  ") => {
                let code = rest.split("  #").next().unwrap_or(rest);
                format!("    {}\n", code.trim_end())
            }
            _ => format!("{line}\n"),
        })
        .collect();
    let c = ok(&uncommented);
    assert_eq!(c.events.webhooks.len(), 1, "{uncommented}");
    let w = &c.events.webhooks[0];
    assert_eq!(
        w.url.as_str(),
        "http://editor.example.com/api/m3u-proxy/webhooks"
    );
    assert_eq!(w.events.len(), 4);
    assert_eq!(w.timeout, Duration::from_secs(5));
    assert_eq!(w.retry_attempts, 2);
    assert!(w.secret.is_some());
}

#[test]
fn hls_section_parses_and_checks_the_key() {
    let c = parse(
        "hls:\n  segment_cache_bytes: 8MiB\n  playlist_max_bytes: 2MiB\n  token_key: \"00112233445566778899aabbccddeeff\"\n",
        Path::new("conf/test.yaml"),
    )
    .unwrap();
    assert_eq!(c.hls.segment_cache_bytes, 8 * 1024 * 1024);
    assert_eq!(c.hls.playlist_max_bytes, 2 * 1024 * 1024);
    assert_eq!(c.hls.token_key.as_deref().map(<[u8]>::len), Some(16));
    let e = parse("hls:\n  token_key: \"abc\"\n", Path::new("conf/test.yaml")).unwrap_err();
    let m = e.messages().join("\n");
    assert!(
        m.contains("conf/test.yaml:2:") && m.contains("hls.token_key"),
        "{m}"
    );
}

#[test]
fn shutdown_timeout_and_state_save_delay() {
    let c = parse(
        "server:\n  shutdown_timeout: 2s\n  state_save_delay: 0\n",
        Path::new("conf/test.yaml"),
    )
    .unwrap();
    assert_eq!(c.server.shutdown_timeout, Duration::from_secs(2));
    assert_eq!(c.server.state_save_delay, Duration::ZERO);
    let d = Config::default();
    assert_eq!(d.server.shutdown_timeout, Duration::from_secs(5));
    assert_eq!(d.server.state_save_delay, Duration::from_millis(500));
    let e = errors("server:\n  shutdown_timeout: 0\n  state_save_delay: 2m\n").join("\n");
    assert!(
        e.contains("server.shutdown_timeout: must be greater than zero"),
        "{e}"
    );
    assert!(
        e.contains("server.state_save_delay: must be at most 1m, got 2m"),
        "{e}"
    );
}

#[test]
fn every_mistake_is_reported_not_only_the_first() {
    let yaml = "\
server:
  listn: 1
  threads: 0
upstream:
  connect_timeout: 3 parsecs
providers:
  - name: p
    max_connections: 2
streams:
  - url: http://a.example/x
    bogus: 1
  - url: ftp://b.example/
log:
  level: [1]
  colour: red
";
    let all = errors(yaml);
    let expect = [
        "conf/test.yaml:2:3: server.listn: unknown field `listn`",
        "conf/test.yaml:3:12: server.threads:",
        "conf/test.yaml:5:20: upstream.connect_timeout: invalid duration",
        "conf/test.yaml:7:5: providers[0]: missing required key `hosts`",
        "conf/test.yaml:11:5: streams[0].bogus: unknown field `bogus`",
        "conf/test.yaml:12:10: streams[1].url:",
        "log.level:",
        "conf/test.yaml:15:3: log.colour: unknown field `colour`",
    ];
    for e in expect {
        assert!(
            all.iter().any(|m| m.starts_with(e) || m.contains(e)),
            "missing {e:?} in {all:#?}"
        );
    }
    // In file order.
    let lines: Vec<u64> = all
        .iter()
        .filter_map(|m| m.split(':').nth(1).and_then(|l| l.parse().ok()))
        .collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted, "{all:#?}");
    // A syntax error still stops at once.
    assert_eq!(errors("server: [\n").len(), 1);
}

#[test]
fn transcode_section_and_profiles() {
    let c = ok("transcode:\n  ffmpeg: /usr/bin/ffmpeg\n  hwaccel: vaapi\n  device: /dev/dri/renderD128\n  max_processes: 2\n  profiles:\n    - name: small\n      description: tiny\n      template: \"-i {input_url} -c:v libx264 -vf scale={w}:-2 -f mpegts {output_args}\"\n      defaults:\n        w: \"320\"\n");
    assert_eq!(c.transcode.max_processes, 2);
    assert_eq!(c.transcode.hwaccel, crate::config::HwAccel::Vaapi);
    assert_eq!(c.transcode.profiles[0].name, "small");
    assert_eq!(c.transcode.profiles[0].defaults["w"], "320");
    let e = errors("transcode:\n  hwaccel: gpu\n  profiles:\n    - name: bad\n      template: \"-i {input_url} -c copy -y /tmp/x.ts\"\n    - name: \"a b\"\n      template: \"-i {input_url}\"\n");
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(e[0].contains("transcode.hwaccel"), "{e:#?}");
    assert!(
        e[1].contains("transcode.profiles[0].template") && e[1].contains("/tmp/x.ts"),
        "{e:#?}"
    );
    assert!(e[2].contains("transcode.profiles[1].name"), "{e:#?}");
}

#[test]
fn limits_and_api_keys() {
    let c = ok("api:\n  cors_origins: [\"https://editor.example\"]\n  allow_open: true\nlimits:\n  header_timeout: 5s\n  max_header_bytes: 32KiB\n  max_connections_per_address: 0\n");
    assert_eq!(c.api.cors_origins, ["https://editor.example"]);
    assert!(c.api.allow_open);
    assert_eq!(c.limits.max_header_bytes, 32 * 1024);
    assert_eq!(c.limits.max_connections_per_address, 0);
    let e = errors("api:\n  cors_origins: [\"https://editor.example/path\"]\nlimits:\n  header_timeout: 0s\n  max_headers: 2\n");
    assert_eq!(e.len(), 3, "{e:#?}");
}

#[test]
fn hls_limits_and_security_section() {
    let c = ok("hls:\n  playlist_max_lines: 5000\n  rendered_max_bytes: 1MiB\n  segment_max_bytes: 8MiB\n  inflight_max_bytes: 1\n  header_timeout: 2s\n  playlist_timeout: 5s\n  segment_timeout: 30s\nsecurity:\n  deny_private_upstreams: true\n  private_allowlist: [\"192.168.1.20\", \"10.0.0.0/8\"]\n");
    assert_eq!(c.hls.playlist_max_lines, 5000);
    assert_eq!(c.hls.rendered_max_bytes, 1024 * 1024);
    assert_eq!(c.hls.segment_max_bytes, 8 * 1024 * 1024);
    assert_eq!(c.hls.inflight_max_bytes, 1);
    assert_eq!(c.hls.header_timeout, Duration::from_secs(2));
    assert_eq!(c.hls.playlist_timeout, Duration::from_secs(5));
    assert_eq!(c.hls.segment_timeout, Duration::from_secs(30));
    assert!(c.security.deny_private_upstreams);
    assert_eq!(c.security.private_allowlist.len(), 2);
    assert!(!Config::default().security.deny_private_upstreams);
    assert_eq!(
        error("security:\n  private_allowlist: [\"10.0.0.0/8\", \"lan.example\"]\n"),
        "conf/test.yaml:2:37: security.private_allowlist[1]: \"lan.example\" is not an IP address or a network such as 10.0.0.0/8"
    );
    let m = error("hls:\n  header_timeout: 0s\n");
    assert!(m.contains("hls.header_timeout"), "{m}");
    let m = error("security:\n  deny_private_upstream: true\n");
    assert!(m.contains("deny_private_upstreams"), "{m}");
}

#[test]
fn broadcast_section() {
    let c = ok("broadcast:\n  work_dir: /dev/shm/m3u-edge\n  max_networks: 0\n  callback_timeout: \"3s\"\n  keep_stopped: \"1m\"\n");
    assert_eq!(
        c.broadcast.work_dir,
        std::path::PathBuf::from("/dev/shm/m3u-edge")
    );
    assert_eq!(c.broadcast.max_networks, 0);
    assert_eq!(c.broadcast.callback_timeout, Duration::from_secs(3));
    assert_eq!(c.broadcast.keep_stopped, Duration::from_secs(60));
    let e = parse(
        "broadcast:\n  work_dir: /\n  max_networks: -1\n  callback_timeout: 0\n",
        Path::new("x.yaml"),
    )
    .unwrap_err();
    let text = e.messages().join("\n");
    assert!(text.contains("x.yaml:2:13: broadcast.work_dir"), "{text}");
    assert!(text.contains("broadcast.max_networks"), "{text}");
    assert!(text.contains("broadcast.callback_timeout"), "{text}");
}

fn cluster_yaml(body: &str) -> String {
    format!(
        "server:\n  listen: 127.0.0.1:8085\ncluster:\n  redis_url: redis://127.0.0.1:6379\n  \
         listen: 127.0.0.1:9090\n  secret: 0123456789abcdef0123456789abcdef\n{body}"
    )
}

#[test]
fn commented_cluster_example_parses() {
    let text = include_str!("../../conf/m3u-edge.yaml");
    let start = text.find("# cluster:").expect("cluster example");
    let block: String = text[start..]
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| {
            let l = l.strip_prefix('#').unwrap_or(l);
            let l = l.strip_prefix(' ').unwrap_or(l);
            if l.trim_start().starts_with('#') {
                String::new()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let c = ok(&block).cluster.expect("cluster section");
    assert_eq!(c.node_id, "edge-1");
    assert_eq!(c.listen.to_string(), "10.0.0.11:9090");
    assert_eq!(c.node_ttl, Duration::from_secs(5));
    assert_eq!(c.heartbeat, Duration::from_secs(1));
    assert_eq!(c.name, "m3u-edge");
    // The password never reaches a log line.
    assert!(!format!("{c:?}").contains("change-me"));
}

#[test]
fn cluster_defaults_and_checks() {
    assert!(ok("server:\n  listen: 127.0.0.1:8085\n").cluster.is_none());
    let c = ok(&cluster_yaml("")).cluster.unwrap();
    assert_eq!(c.advertise, c.listen);
    assert!(!c.node_id.is_empty());
    assert_eq!(c.node_ttl, Duration::from_secs(5));
    for (body, needle) in [
        ("  node_id: 'a b'\n", "cluster.node_id"),
        ("  node_ttl: 1s\n", "cluster.node_ttl"),
        ("  heartbeat: 3s\n", "cluster.heartbeat"),
        ("  advertise: 0.0.0.0:9090\n", "cluster.advertise"),
    ] {
        let e = error(&cluster_yaml(body));
        assert!(e.contains(needle), "{body}: {e}");
    }
    let short = "server:\n  listen: 127.0.0.1:8085\ncluster:\n  redis_url: redis://h:1\n  \
                 listen: 127.0.0.1:9090\n  secret: short\n";
    assert!(error(short).contains("cluster.secret"));
    let wild = "server:\n  listen: 127.0.0.1:8085\ncluster:\n  redis_url: redis://h:1\n  \
                listen: 0.0.0.0:9090\n  secret: 0123456789abcdef0123456789abcdef\n";
    assert!(error(wild).contains("cluster.advertise"));
    let clash = "server:\n  listen: 127.0.0.1:8085\ncluster:\n  redis_url: redis://h:1\n  \
                 listen: 127.0.0.1:8085\n  secret: 0123456789abcdef0123456789abcdef\n";
    assert!(error(clash).contains("cluster.listen"));
    let scheme = "server:\n  listen: 127.0.0.1:8085\ncluster:\n  redis_url: http://h:1\n  \
                  listen: 127.0.0.1:9090\n  secret: 0123456789abcdef0123456789abcdef\n";
    assert!(error(scheme).contains("cluster.redis_url"));
    let missing = "cluster:\n  redis_url: redis://h:1\n  listen: 127.0.0.1:9090\n";
    assert!(errors(missing).iter().any(|e| e.contains("secret")));
}
