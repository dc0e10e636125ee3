//! `docs/openapi.json` against the running proxy: served as is at
//! `/openapi.json`, every documented method routed (and no other), and a
//! bounded schemathesis run (0 server errors, 0 schema violations) when
//! schemathesis is installed (`scripts/deps.sh --test-tools` puts it in
//! `target/schemathesis-venv`).
//!
//! Longer schemathesis runs: `M3U_EDGE_ST_MAX_EXAMPLES` (cases per operation
//! and phase, default 50), `M3U_EDGE_ST_SEED` (default fixed; `random` for a
//! new one each run), `M3U_EDGE_ST_ARGS` (more `st run` arguments, e.g.
//! `--max-time 600`), `M3U_EDGE_ST_TIMEOUT` (seconds before the run is
//! killed, default 300). See the README's API section.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{config, TOKEN};
use crate::support::client;
use crate::support::edge::Edge;
use crate::support::provider::Provider;

const SPEC_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
const SAMPLE_ID: &str = "0123456789abcdef0123456789abcdef";

fn spec() -> Value {
    let raw = std::fs::read(SPEC_FILE).expect("read docs/openapi.json");
    serde_json::from_slice(&raw).expect("docs/openapi.json is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_spec_is_the_file() {
    let e = Edge::start(&config("")).await;
    let file = std::fs::read(SPEC_FILE).expect("read docs/openapi.json");
    for path in ["/openapi.json", "/m3u-proxy/openapi.json"] {
        // No token: the description is public.
        let (status, headers, body) = client::get_body(&e.url(path)).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(
            headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default(),
            "application/json",
            "{path}"
        );
        assert_eq!(
            headers
                .get("access-control-allow-origin")
                .and_then(|v| v.to_str().ok()),
            Some("*"),
            "{path}: any page may read it"
        );
        assert!(body[..] == file[..], "{path} is not docs/openapi.json");
    }
}

/// Every documented (path, method) reaches its handler (no 404 "Not Found",
/// no 405), and GET, POST and DELETE that are not documented get 405. The
/// requests carry no body and an unknown id: nothing is created, nothing is
/// fetched from outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_methods_are_the_served_ones() {
    let e = Edge::start(&config("")).await;
    let spec = spec();
    for (template, item) in spec["paths"].as_object().expect("paths") {
        let path = template
            .replace("{stream_id}", SAMPLE_ID)
            .replace("{network_id}", SAMPLE_ID)
            .replace("{segment}", "live000001.ts");
        let documented: Vec<String> = item
            .as_object()
            .expect("path item")
            .keys()
            .filter(|k| *k != "parameters")
            .map(|k| k.to_ascii_uppercase())
            .collect();
        for method in &documented {
            let m = Method::from_bytes(method.as_bytes()).expect("method");
            let (status, v) = client::api(&e, m, &path, Some(TOKEN), None).await;
            assert_ne!(status, 405, "{method} {template}: {v}");
            assert!(
                !(status == 404 && v["detail"] == "Not Found"),
                "{method} {template} is not routed: {v}"
            );
        }
        // /metrics and /openapi.json answer any method.
        if ["/metrics", "/openapi.json"].contains(&template.as_str()) {
            continue;
        }
        for method in ["GET", "POST", "DELETE"] {
            if documented.iter().any(|d| d == method) {
                continue;
            }
            let m = Method::from_bytes(method.as_bytes()).expect("method");
            let (status, v) = client::api(&e, m, &path, Some(TOKEN), None).await;
            assert_eq!(
                status, 405,
                "{method} {template} is served but not documented: {v}"
            );
        }
    }
}

/// The schemathesis CLI: `M3U_EDGE_SCHEMATHESIS`, else the venv
/// `scripts/deps.sh --test-tools` makes, else `schemathesis` on PATH.
fn schemathesis() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("M3U_EDGE_SCHEMATHESIS") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/schemathesis-venv/bin/st");
    if venv.is_file() {
        return Some(venv);
    }
    let found = Command::new("schemathesis")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    found.then(|| PathBuf::from("schemathesis"))
}

/// A loopback HTTP sink: answers every request `200 {}` and closes. Every
/// URL schemathesis may send (streams, failover resolvers, webhooks,
/// test-connection) points here, so nothing leaves the machine and no other
/// test's port is hit.
async fn sink() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sink");
    let port = listener.local_addr().expect("sink addr").port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(1), sock.read(&mut buf)).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                    .await;
            });
        }
    });
    port
}

/// The schemathesis settings beyond the command line: the checks (no 5xx;
/// status code, content type and body as documented).
/// `POST /streams/{id}/failover` answers 500 by design when no source is
/// left, as m3u-proxy does, and `POST /transcode` 503 when ffmpeg is not
/// installed, and `POST /broadcast/{id}/start` 500 (as m3u-proxy) when
/// ffmpeg cannot read the input: their responses are checked against the
/// spec, not for 5xx.
/// [`positive_only`] adds the operations that send to URLs.
const ST_CONFIG: &str = r#"
[checks]
enabled = false
not_a_server_error = { enabled = true }
response_schema_conformance = { enabled = true }
status_code_conformance = { enabled = true }
content_type_conformance = { enabled = true }

[[operations]]
include-path = "/streams/{stream_id}/failover"
checks = { not_a_server_error = { enabled = false } }

[[operations]]
include-path = "/transcode"
checks = { not_a_server_error = { enabled = false } }

[[operations]]
include-path = "/broadcast/{network_id}/start"
checks = { not_a_server_error = { enabled = false } }
"#;

const HTTP_URL: &str = "#/components/schemas/HttpUrl";

/// `v` with every `$ref` replaced by what it points to, except references
/// to `HttpUrl`, kept as the mark of a pinned URL.
fn inline(spec: &Value, v: &Value, depth: usize) -> Value {
    assert!(depth < 16, "$ref cycle in the spec");
    match v {
        Value::Object(m) => match m.get("$ref").and_then(Value::as_str) {
            Some(r) if r != HTTP_URL => {
                let target = r
                    .strip_prefix('#')
                    .and_then(|p| spec.pointer(p))
                    .unwrap_or_else(|| panic!("dangling $ref {r}"));
                inline(spec, target, depth + 1)
            }
            _ => Value::Object(
                m.iter()
                    .map(|(k, x)| (k.clone(), inline(spec, x, depth)))
                    .collect(),
            ),
        },
        Value::Array(a) => Value::Array(a.iter().map(|x| inline(spec, x, depth)).collect()),
        other => other.clone(),
    }
}

/// The JSON body schema of an operation, inlined, and the name of the
/// component it is (if it is one).
fn body_schema(spec: &Value, op: &Value) -> Option<(Value, Option<String>)> {
    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
    if schema.is_null() {
        return None;
    }
    let name = schema["$ref"]
        .as_str()
        .and_then(|r| r.rsplit('/').next())
        .map(str::to_string);
    Some((inline(spec, schema, 0), name))
}

/// Every `properties` entry, at any depth, whose name contains "url".
fn url_fields<'a>(v: &'a Value, out: &mut Vec<(&'a str, &'a Value)>) {
    match v {
        Value::Object(m) => {
            for (name, prop) in m
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                if name.contains("url") {
                    out.push((name, prop));
                }
            }
            m.values().for_each(|x| url_fields(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| url_fields(x, out)),
        _ => {}
    }
}

/// Every request field that names a URL the proxy will send to is an
/// `HttpUrl` (the test pins those to the sink). The only other URL-named
/// inputs are `webhook_url` and `WebhookTarget`, which only look up a
/// registered webhook.
fn assert_urls_are_pinned(spec: &Value) {
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let params = op["parameters"].as_array().into_iter().flatten();
            let shared = item["parameters"].as_array().into_iter().flatten();
            for p in params.chain(shared) {
                let name = p["name"].as_str().unwrap_or_default();
                assert!(
                    !name.contains("url") || name == "webhook_url",
                    "{method} {path}: parameter {name} must be pinned to loopback for schemathesis"
                );
            }
            let Some((schema, component)) = body_schema(spec, op) else {
                continue;
            };
            if component.as_deref() == Some("WebhookTarget") {
                continue;
            }
            let mut fields = Vec::new();
            url_fields(&schema, &mut fields);
            for (name, prop) in fields {
                assert!(
                    prop.to_string().contains(HTTP_URL),
                    "{method} {path}: body field {name} is a URL but not an HttpUrl"
                );
            }
        }
    }
}

/// No example, default, const or enum holds a URL: schemathesis sends those
/// values as they are, and they are not pinned to loopback.
fn assert_no_literal_urls(v: &Value, at: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let literal =
                    ["example", "examples", "default", "const", "enum"].contains(&k.as_str());
                assert!(
                    !(literal && x.to_string().contains("://")),
                    "{at}/{k} holds a URL, which schemathesis would send off this machine: {x}"
                );
                assert_no_literal_urls(x, &format!("{at}/{k}"));
            }
        }
        Value::Array(a) => a.iter().for_each(|x| assert_no_literal_urls(x, at)),
        _ => {}
    }
}

/// `[[operations]]` entries for the operations whose body holds an
/// `HttpUrl`: positive data only, since negative data for a URL is any
/// string, including URLs off this machine.
fn positive_only(spec: &Value) -> String {
    let mut out = String::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let Some((schema, _)) = body_schema(spec, op) else {
                continue;
            };
            if schema.to_string().contains(HTTP_URL) {
                out.push_str(&format!(
                    "\n[[operations]]\ninclude-path = \"{path}\"\ninclude-method = \"{}\"\ngeneration = {{ mode = \"positive\" }}\n",
                    method.to_ascii_uppercase()
                ));
            }
        }
    }
    assert!(
        out.matches("[[operations]]").count() >= 4,
        "POST /streams, /transcode, /webhooks and /test-connection carry URLs: {out}"
    );
    out
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let Some(st) = schemathesis() else {
        println!("SKIPPED: schemathesis not installed (scripts/deps.sh --test-tools)");
        return;
    };
    let sink_port = sink().await;
    let sink = format!("http://127.0.0.1:{sink_port}");
    // Config streams (read-only: DELETE answers 409) and a provider, so the
    // lists and /stats have something in them.
    let provider = Provider::start().await;
    let live = provider.url("live/fuzz.ts?kbps=500");
    let e = Edge::start(&config(&format!(
        "providers:\n  - name: loopback\n    hosts: [\"127.0.0.1\"]\n    max_connections: 4\nstreams:\n  - id: yaml-news\n    url: \"{sink}/live/news.ts\"\n    failover_urls: [\"{sink}/live/news-b.ts\"]\n  - id: yaml-live\n    url: \"{live}\"\n    metadata: {{id: \"7\", provider_profile_id: \"1\"}}\n"
    )))
    .await;
    // A live viewer of a config stream (which the API cannot delete), so
    // clients, live channels and provider connections are in the replies
    // too. It comes back whenever the fuzzing drops it.
    let play = e.url("/stream/yaml-live?client_id=viewer&username=alice");
    let drain = tokio::spawn(async move {
        loop {
            if let Ok(mut viewer) = client::client().get(&play).send().await {
                while let Ok(Some(_)) = viewer.chunk().await {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // The spec as served, with every URL the proxy would send to pinned to
    // the sink: a fixed scheme, host and port, then path characters only.
    let (status, mut spec) = client::api(&e, Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert_urls_are_pinned(&spec);
    assert_no_literal_urls(&spec["paths"], "#/paths");
    assert_no_literal_urls(&spec["components"], "#/components");
    let st_config = format!("{ST_CONFIG}{}", positive_only(&spec));
    assert!(spec["components"]["schemas"]["HttpUrl"].is_object());
    spec["components"]["schemas"]["HttpUrl"] = json!({
        "type": "string",
        "pattern": format!("^http://127\\.0\\.0\\.1:{sink_port}/[A-Za-z0-9._~/-]{{0,40}}$"),
    });
    let dir = e.dir().to_path_buf();
    let spec_path = dir.join("openapi-loopback.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).expect("spec")).expect("write");
    let config_path = dir.join("schemathesis.toml");
    std::fs::write(&config_path, st_config).expect("write schemathesis.toml");

    let max_examples = env_or("M3U_EDGE_ST_MAX_EXAMPLES", "50");
    let seed = env_or("M3U_EDGE_ST_SEED", "20261130");
    let timeout = Duration::from_secs(
        env_or("M3U_EDGE_ST_TIMEOUT", "300")
            .parse()
            .expect("M3U_EDGE_ST_TIMEOUT in seconds"),
    );
    let mut cmd = Command::new(&st);
    cmd.arg("--config-file")
        .arg(&config_path)
        .arg("run")
        .arg(&spec_path)
        .args(["--url", &e.base()])
        .args(["--header", &format!("X-API-Token: {TOKEN}")])
        // The client routes relay a provider's bytes (and answer 502-504 when
        // it fails by design): documented, not fuzzed.
        .args(["--exclude-path-regex", "^/(stream|hls)/"])
        // No examples phase: examples are not pinned to loopback.
        .args(["--phases", "coverage,fuzzing,stateful"])
        .args(["--max-examples", &max_examples])
        .args(["--generation-with-security-parameters", "false"])
        .args(["--generation-database", "none"])
        .args(["--request-timeout", "15"])
        .args(["--workers", "1"])
        .arg("--no-color");
    if seed != "random" {
        cmd.args(["--seed", &seed]);
    }
    if let Ok(extra) = std::env::var("M3U_EDGE_ST_ARGS") {
        cmd.args(extra.split_whitespace());
    }
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    let out_path = dir.join("schemathesis.out");
    let out = std::fs::File::create(&out_path).expect("output file");
    cmd.current_dir(&dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone"))
        .stderr(out);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|err| panic!("spawn {st:?}: {err}"));
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    drain.abort();
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    println!("schemathesis ({:.0?}):\n{output}", started.elapsed());
    let status = status.unwrap_or_else(|| panic!("schemathesis still running after {timeout:?}"));
    assert!(
        status.success(),
        "schemathesis failed ({status}); output above"
    );
    assert!(
        e.log().lines().all(|l| !l.contains("panicked")),
        "the proxy panicked during the run"
    );
}
