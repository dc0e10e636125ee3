//! Programme callbacks to m3u-editor (API-COMPAT-FFMPEG.md §6): a POST of
//! `{network_id, event, timestamp, dvr_mode, hls_dir, data}` to the
//! start request's `callback_url`, one try bounded by
//! `broadcast.callback_timeout`, with m3u-proxy's user agent. Fetched like a
//! webhook: no environment proxy, no redirects, names resolved through
//! `security.deny_private_upstreams`. m3u-editor starts the next programme
//! from inside its callback handler, so callbacks never run under a lock a
//! start would need.

use std::time::Duration;

use serde_json::{json, Value};
use url::Url;

/// m3u-proxy's broadcast user agent; receivers may check it.
pub const USER_AGENT: &str = "M3U-Proxy-Broadcast/1.0";

#[derive(Debug, Clone)]
pub struct Callbacks {
    client: reqwest::Client,
}

impl Callbacks {
    pub fn new(timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .dns_resolver(std::sync::Arc::new(crate::upstream::guard::Resolver))
            .connector_layer(crate::upstream::guard::CheckConnected)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .build()
            .unwrap_or_default();
        Callbacks { client }
    }

    /// Sends one callback; failures are logged, never retried (m3u-editor
    /// polls the status too).
    pub async fn send(
        &self,
        url: &Url,
        network_id: &str,
        event: &str,
        dvr_mode: bool,
        data: Value,
    ) {
        let body = json!({
            "network_id": network_id,
            "event": event,
            "timestamp": crate::api::json::iso(chrono::Utc::now()),
            "dvr_mode": dvr_mode,
            // m3u-edge never hands out a path.
            "hls_dir": null,
            "data": data,
        });
        let target = crate::events::redact_url(url.as_str());
        match self.client.post(url.clone()).json(&body).send().await {
            Ok(r) if r.status().as_u16() < 400 => {
                tracing::info!(
                    network_id,
                    event,
                    status = r.status().as_u16(),
                    "broadcast callback sent"
                )
            }
            Ok(r) => {
                tracing::warn!(network_id, event, url = %target, status = r.status().as_u16(), "broadcast callback refused")
            }
            Err(e) => {
                tracing::warn!(network_id, event, url = %target, error = %e, "broadcast callback failed")
            }
        }
    }
}
