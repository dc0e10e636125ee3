//! Tells a deleted stream from a lost Redis. A node drops its copy of a
//! stream Redis no longer has; but if Redis itself lost its data (restarted
//! without persistence, a failover to an empty replica), every stream would
//! look deleted and every viewer would be cut. The `registry` key holds a
//! random token written once; a node that sees it vanish or change first
//! stores again what it holds (its cached API streams and API webhooks;
//! its clients re-join on their own, `clients.rs`) instead of evicting.

use parking_lot::Mutex;

use super::{invoke, lua};
use crate::app::App;
use crate::cluster::{Cluster, ClusterError};
use crate::registry::Origin;

#[derive(Default)]
pub struct Continuity {
    known: Mutex<Option<String>>,
}

impl Continuity {
    /// `Ok(true)`: Redis still holds the registry this node knows, so a
    /// stream missing there was deleted. `Ok(false)`: Redis had lost it;
    /// what this node holds was stored again.
    pub async fn check(&self, app: &App, c: &Cluster) -> Result<bool, ClusterError> {
        let key = format!("{}registry", c.keys().prefix());
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        let mut conn = c.redis().await?;
        let token: String = c
            .run(async move {
                let _: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&fresh)
                    .arg("NX")
                    .query_async(&mut conn)
                    .await?;
                redis::cmd("GET").arg(&key).query_async(&mut conn).await
            })
            .await?;
        let before = self.known.lock().replace(token.clone());
        match before {
            None => Ok(true),
            Some(k) if k == token => Ok(true),
            Some(_) => {
                restore(app, c).await;
                Ok(false)
            }
        }
    }
}

/// Stores again the API streams and webhooks this node holds.
async fn restore(app: &App, c: &Cluster) {
    let mut streams = 0;
    for s in app.registry.list() {
        if s.origin != Origin::Api {
            continue;
        }
        let Ok(json) = serde_json::to_string(&*s.spec()) else {
            continue;
        };
        if invoke(c, &lua::REGISTER_SCRIPT, &[&s.id, &json, "0"])
            .await
            .is_ok()
        {
            streams += 1;
        }
    }
    let hooks = super::webhooks::store_all(app, c).await;
    tracing::warn!(
        streams,
        webhooks = hooks,
        "cluster: Redis lost the shared registry (restarted without persistence?); stored again what this node holds"
    );
}
