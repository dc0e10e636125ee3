//! Cluster-wide totals for `/health` (m3u-editor reads `stats.total_clients`
//! and `active_streams` there). `/health` never waits on Redis: it shows
//! the latest snapshot, which the upkeep refreshes every second while
//! `/health` is being asked for (a poll every few seconds costs nothing
//! when nobody asks).

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use super::{invoke, items, lua, text};
use crate::app::App;
use crate::cluster::Cluster;

/// Refreshed while `/health` was asked for within this.
const WANTED_FOR: Duration = Duration::from_secs(60);
/// A snapshot older than this is not shown (node-local numbers instead).
const FRESH_FOR: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Totals {
    streams: u64,
    active_streams: u64,
    clients: u64,
}

#[derive(Default)]
pub struct TotalsCache {
    snapshot: Mutex<Option<(Instant, Totals)>>,
    wanted: Mutex<Option<Instant>>,
}

impl TotalsCache {
    /// Puts the cluster's totals into a `/health` body (when fresh) and
    /// asks for the next refresh.
    pub fn patch_health(&self, body: &mut Value) {
        *self.wanted.lock() = Some(Instant::now());
        let Some((at, t)) = *self.snapshot.lock() else {
            return;
        };
        if at.elapsed() > FRESH_FOR {
            return;
        }
        body["active_streams"] = json!(t.active_streams);
        body["active_clients"] = json!(t.clients);
        let stats = &mut body["stats"];
        stats["total_streams"] = json!(t.streams);
        stats["active_streams"] = json!(t.active_streams);
        stats["total_clients"] = json!(t.clients);
        stats["active_clients"] = json!(t.clients);
    }

    fn wanted(&self) -> bool {
        self.wanted.lock().is_some_and(|t| t.elapsed() < WANTED_FOR)
    }
}

/// Reads the totals from Redis if `/health` wants them.
pub async fn refresh(app: &App, c: &Cluster) {
    if !app.cluster_totals.wanted() {
        return;
    }
    let readonly = app
        .registry
        .list()
        .iter()
        .filter(|s| s.origin.read_only())
        .count();
    let Ok(v) = invoke(c, &lua::TOTALS_SCRIPT, &[]).await else {
        return;
    };
    let r: Vec<u64> = items(v)
        .iter()
        .map(|x| text(x).parse().unwrap_or(0))
        .collect();
    let (Some(api), Some(active), Some(clients)) = (r.first(), r.get(1), r.get(2)) else {
        return;
    };
    let broadcast_viewers = app.broadcasts.viewers.all_clients().len() as u64;
    *app.cluster_totals.snapshot.lock() = Some((
        Instant::now(),
        Totals {
            streams: api + readonly as u64,
            active_streams: *active,
            clients: clients + broadcast_viewers,
        },
    ));
}
