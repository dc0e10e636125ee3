//! Small helpers shared by the area modules: a config with the placeholders the
//! edge harness fills in, and API shortcuts.

use http::Method;
use serde_json::Value;

use crate::support::client;
use crate::support::edge::Edge;

pub const TOKEN: &str = "test-token";

/// A config listening on the harness's port and state file, with the API token
/// set, a fast shutdown, and `extra` appended (top-level YAML).
pub fn config(extra: &str) -> String {
    config_ua("EdgeDefault/1.0", extra)
}

/// Like [`config`], with `upstream.user_agent` set to `ua`.
pub fn config_ua(ua: &str, extra: &str) -> String {
    format!(
        "server:\n  listen: \"{{listen}}\"\n  state_file: \"{{state_file}}\"\n  grace_period: \"0s\"\napi:\n  token: \"{TOKEN}\"\nupstream:\n  user_agent: \"{ua}\"\n  connect_timeout: \"2s\"\n  read_timeout: \"3s\"\n{extra}"
    )
}

pub async fn api(edge: &Edge, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let (s, v) = client::api(edge, method, path, Some(TOKEN), body.as_ref()).await;
    (s.as_u16(), v)
}

/// Registers a stream through the API and returns its id.
pub async fn register(edge: &Edge, body: Value) -> String {
    let (status, v) = api(edge, Method::POST, "/streams", Some(body)).await;
    assert_eq!(status, 200, "POST /streams: {v}");
    v["stream_id"].as_str().expect("stream_id").to_string()
}
