//! Webhooks registered through the API, cluster-wide: the `webhooks` HASH
//! (normalized URL → `{"hook": …, "at": ms}`) is the truth; every node
//! mirrors it into its local [`Events`](crate::events::Events) (which
//! delivers) on a change message, after a bus reconnect and every 5 s.
//! YAML webhooks stay node-local config.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::unavailable;
use crate::api::{webhooks as local, ApiReply, ApiRequest};
use crate::app::App;
use crate::cluster::{Bus, Cluster, ClusterError};
use crate::events::Webhook;

#[derive(Serialize, Deserialize)]
struct Stored {
    hook: Webhook,
    /// Registration time (ms): the listing order.
    at: i64,
}

/// The API webhooks in Redis, oldest first.
async fn load(c: &Cluster) -> Result<Vec<Webhook>, ClusterError> {
    let mut conn = c.redis().await?;
    let key = c.keys().webhooks();
    let all: Vec<(String, String)> = c
        .run(async move { redis::cmd("HGETALL").arg(key).query_async(&mut conn).await })
        .await?;
    let mut hooks: Vec<Stored> = all
        .into_iter()
        .filter_map(|(url, v)| match serde_json::from_str::<Stored>(&v) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, url = %url, "cluster: stored webhook unreadable, skipped");
                None
            }
        })
        .collect();
    hooks.sort_by(|a, b| a.at.cmp(&b.at).then(a.hook.url.cmp(&b.hook.url)));
    Ok(hooks.into_iter().map(|s| s.hook).collect())
}

/// Stores this node's API webhooks in Redis again (after Redis lost them);
/// returns how many.
pub async fn store_all(app: &App, c: &Cluster) -> usize {
    let mut n = 0;
    for hook in app.events.api_webhooks() {
        let Ok(value) = serde_json::to_string(&Stored {
            hook: hook.clone(),
            at: chrono::Utc::now().timestamp_millis(),
        }) else {
            continue;
        };
        let Ok(mut conn) = c.redis().await else {
            return n;
        };
        let key = c.keys().webhooks();
        let stored: Result<i64, ClusterError> = c
            .run(async move {
                redis::cmd("HSETNX")
                    .arg(key)
                    .arg(hook.url)
                    .arg(value)
                    .query_async(&mut conn)
                    .await
            })
            .await;
        if stored.is_ok() {
            n += 1;
        }
    }
    n
}

/// Makes this node's API webhooks those of Redis (YAML ones untouched).
pub async fn sync(app: &App, c: &Cluster) {
    let Ok(wanted) = load(c).await else {
        return;
    };
    let have = app.events.api_webhooks();
    for h in &have {
        if !wanted.iter().any(|w| w.url == h.url) {
            app.events.remove_webhook(&h.url);
        }
    }
    let config: Vec<String> = {
        let api: Vec<String> = have.iter().map(|h| h.url.clone()).collect();
        app.events
            .webhooks()
            .into_iter()
            .map(|h| h.url)
            .filter(|u| !api.contains(u))
            .collect()
    };
    for w in wanted {
        // A YAML webhook with the same URL wins on this node.
        if config.contains(&w.url) || have.contains(&w) {
            continue;
        }
        if let Err(e) = app.events.add_webhook(w) {
            tracing::warn!(error = %e, "cluster: stored webhook refused");
        }
    }
}

/// `GET /webhooks`: this node's YAML webhooks, then the cluster's.
pub async fn list(app: &App, c: &Cluster) -> ApiReply {
    let stored = match load(c).await {
        Ok(v) => v,
        Err(e) => return unavailable(&e),
    };
    let api: Vec<String> = app
        .events
        .api_webhooks()
        .into_iter()
        .map(|h| h.url)
        .collect();
    let mut hooks: Vec<Value> = app
        .events
        .webhooks()
        .iter()
        .filter(|h| !api.contains(&h.url))
        .map(Webhook::public_json)
        .collect();
    let yaml: Vec<String> = hooks
        .iter()
        .filter_map(|h| h["url"].as_str().map(str::to_owned))
        .collect();
    hooks.extend(
        stored
            .iter()
            .filter(|h| !yaml.contains(&h.url))
            .map(Webhook::public_json),
    );
    ApiReply::ok(json!({ "webhooks": hooks }))
}

/// `POST /webhooks`: stored in Redis, applied here at once, the other
/// nodes told.
pub async fn add(app: &App, c: &Cluster, req: &ApiRequest) -> ApiReply {
    let hook = match local::parse(req) {
        Ok(h) => h,
        Err(e) => return e,
    };
    let value = match serde_json::to_string(&Stored {
        hook: hook.clone(),
        at: chrono::Utc::now().timestamp_millis(),
    }) {
        Ok(v) => v,
        Err(e) => return ApiReply::detail(500, format!("webhook: {e}")),
    };
    let mut conn = match c.redis().await {
        Ok(conn) => conn,
        Err(e) => return unavailable(&e),
    };
    let key = c.keys().webhooks();
    let url = hook.url.clone();
    let created: Result<i64, ClusterError> = c
        .run(async move {
            redis::cmd("HSET")
                .arg(key)
                .arg(url)
                .arg(value)
                .query_async(&mut conn)
                .await
        })
        .await;
    let created = match created {
        Ok(n) => n == 1,
        Err(e) => return unavailable(&e),
    };
    if let Err(e) = app.events.add_webhook(hook.clone()) {
        return ApiReply::invalid(&["body"], e, Value::Null);
    }
    c.publish(Bus::WebhooksChanged);
    local::added_reply(&hook, created)
}

/// `DELETE /webhooks`: removed from Redis (or, a YAML one, from this node
/// until its next start, as on one node).
pub async fn remove(app: &App, c: &Cluster, req: &ApiRequest) -> ApiReply {
    let url = match local::target(req) {
        Ok(u) => u,
        Err(e) => return e,
    };
    let norm = crate::events::normalize_url(&url).unwrap_or_else(|_| url.clone());
    let mut conn = match c.redis().await {
        Ok(conn) => conn,
        Err(e) => return unavailable(&e),
    };
    let key = c.keys().webhooks();
    let field = norm.clone();
    let removed: Result<i64, ClusterError> = c
        .run(async move {
            redis::cmd("HDEL")
                .arg(key)
                .arg(field)
                .query_async(&mut conn)
                .await
        })
        .await;
    let in_redis = match removed {
        Ok(n) => n == 1,
        Err(e) => return unavailable(&e),
    };
    let here = app.events.remove_webhook(&url);
    if !in_redis && !here {
        return ApiReply::detail(404, "Webhook not found");
    }
    if in_redis {
        c.publish(Bus::WebhooksChanged);
    }
    local::removed_reply(&url)
}
