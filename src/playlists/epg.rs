//! `/epg.xml`: the XMLTV guide, fetched once for every player and kept for
//! `epg.refresh`. Guides are large (tens of MiB) and providers count their
//! downloads, so concurrent players wait for the one fetch in flight
//! (single-flight) instead of each starting their own. The bytes are kept
//! as the provider sent them: a gzip guide stays gzip (with its
//! `Content-Encoding` or `.gz` content type), never decoded here.

use std::time::Instant;

use bytes::Bytes;

use super::import::fetch_url;
use crate::app::App;

/// Largest guide kept in memory.
pub const MAX_GUIDE_BYTES: usize = 512 << 20;

/// After a failed fetch with no older copy, players get the failure for
/// this long without a new fetch (a down provider is not asked once per
/// player).
const FAILURE_HOLD: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Guide {
    pub body: Bytes,
    pub content_type: String,
    pub content_encoding: Option<String>,
    fetched: Instant,
}

#[derive(Debug, Default)]
struct Slot {
    guide: Option<Guide>,
    failed: Option<(Instant, String)>,
}

#[derive(Debug, Default)]
pub struct EpgCache {
    slot: tokio::sync::Mutex<Slot>,
    /// Downloads made (for `/stats`).
    pub fetches: std::sync::atomic::AtomicU64,
}

/// Why there is no guide to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoGuide {
    /// Neither `epg.url`, `epg_url` nor an imported `url-tvg`.
    NotConfigured,
    /// The fetch failed and nothing older is kept.
    Failed(String),
}

impl EpgCache {
    /// The guide, fetched now if none is kept or it is older than
    /// `epg.refresh`. A failed fetch serves the older copy if there is one.
    pub async fn get(&self, app: &App) -> Result<Guide, NoGuide> {
        let mut slot = self.slot.lock().await;
        if let Some(g) = slot.guide.as_ref() {
            if g.fetched.elapsed() < app.config.epg.refresh {
                return Ok(g.clone());
            }
        }
        if let Some((at, e)) = &slot.failed {
            if at.elapsed() < FAILURE_HOLD {
                return Err(NoGuide::Failed(e.clone()));
            }
        }
        let Some(url) = app.playlists.guide_url(&app.config) else {
            return Err(NoGuide::NotConfigured);
        };
        let provider = app.playlists.provider_for_guide(&url);
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match fetch_url(app, &url, provider.as_deref(), MAX_GUIDE_BYTES, true).await {
            Ok(f) => {
                let g = Guide {
                    body: f.body,
                    content_type: f
                        .content_type
                        .unwrap_or_else(|| "application/xml".to_owned()),
                    content_encoding: f.content_encoding,
                    fetched: Instant::now(),
                };
                tracing::info!(bytes = g.body.len(), "EPG guide fetched");
                slot.guide = Some(g.clone());
                slot.failed = None;
                Ok(g)
            }
            Err(e) => match slot.guide.as_mut() {
                Some(old) => {
                    tracing::warn!(error = %e, "EPG guide fetch failed; serving the previous copy");
                    // Retry at the next refresh, not at every request.
                    old.fetched = Instant::now();
                    Ok(old.clone())
                }
                None => {
                    tracing::warn!(error = %e, "EPG guide fetch failed");
                    slot.failed = Some((Instant::now(), e.clone()));
                    Err(NoGuide::Failed(e))
                }
            },
        }
    }
}
