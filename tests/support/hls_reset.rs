//! `/hls-reset/` of the test provider: a live HLS origin whose encoder
//! restarts when the test says so ([`super::provider::Provider::reset_hls`]),
//! the way IPTV origins do after a crash or a nightly restart: its media
//! sequence starts again from 0 and every segment has a URI never served
//! before (`e{epoch}/` in the path).
//!
//! | path | answer |
//! |---|---|
//! | `/hls-reset/{name}/{dir}/index.m3u8` | the live window of `/hls-live/` over fixture `{dir}` for origin `{name}`, counted from the origin's last restart; knobs `seg_ms`, `window` (as `/hls-live/`), `start` (the first media sequence before any restart, default 0: `start=5000` is an origin that has been up for a while); `ll=1` makes it an LL-HLS playlist like `/hls-ll/` (knob `parts`), whose held `_HLS_msn` requests are answered with the new playlist when the origin restarts |
//! | `/hls-reset/{name}/{dir}/e{n}/{file}` | the fixture `{dir}/{file}` |
//!
//! Origins are independent by name: a primary and a backup are two names. The
//! fixture's loop points carry no discontinuity here (an encoder that runs
//! on has none): the only one is the restart's, added by the proxy.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use super::provider::{live_playlist, ll_playlist, DEFAULT_HLS_SEG_MS, DEFAULT_HLS_WINDOW};

/// What a `/hls-reset/` path asks for.
pub enum Route<'a> {
    Playlist {
        name: &'a str,
        dir: &'a str,
    },
    /// A fixture file name (`{dir}/{file}`).
    File(String),
}

/// `{name}/{dir}/index.m3u8` or `{name}/{dir}/e{n}/{file}` (after `/hls-reset/`).
pub fn route(tail: &str) -> Option<Route<'_>> {
    let (name, rest) = tail.split_once('/')?;
    if let Some(dir) = rest.strip_suffix("/index.m3u8") {
        return Some(Route::Playlist { name, dir });
    }
    let (before, file) = rest.rsplit_once('/')?;
    let (dir, epoch) = before.rsplit_once('/')?;
    epoch.strip_prefix('e')?.parse::<u64>().ok()?;
    Some(Route::File(format!("{dir}/{file}")))
}

#[derive(Clone, Copy)]
struct Origin {
    epoch: u64,
    since: Instant,
}

/// Every origin's restarts.
pub struct Resets {
    origins: Mutex<HashMap<String, Origin>>,
    /// Bumped at every restart: held requests wake up.
    restarted: watch::Sender<u64>,
    started: Instant,
}

impl Default for Resets {
    fn default() -> Self {
        Resets {
            origins: Mutex::new(HashMap::new()),
            restarted: watch::channel(0).0,
            started: Instant::now(),
        }
    }
}

struct Knobs {
    seg_ms: u64,
    window: u64,
    start: u64,
    ll: bool,
    parts: u64,
    msn: Option<u64>,
    part: Option<u64>,
}

impl Knobs {
    fn parse(query: Option<&str>) -> Knobs {
        let mut k = Knobs {
            seg_ms: DEFAULT_HLS_SEG_MS,
            window: DEFAULT_HLS_WINDOW,
            start: 0,
            ll: false,
            parts: 4,
            msn: None,
            part: None,
        };
        for (key, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let Ok(n) = v.parse::<u64>() else { continue };
            match &*key {
                "seg_ms" => k.seg_ms = n.max(1),
                "window" => k.window = n.max(1),
                "start" => k.start = n,
                "ll" => k.ll = n != 0,
                "parts" => k.parts = n.max(1),
                "_HLS_msn" => k.msn = Some(n),
                "_HLS_part" => k.part = Some(n),
                _ => {}
            }
        }
        k
    }
}

impl Resets {
    /// Restarts origin `name`: sequence 0 again, all-new segment URIs.
    pub fn reset(&self, name: &str) {
        let mut all = self.origins.lock();
        let now = Instant::now();
        let o = all.entry(name.to_string()).or_insert(Origin {
            epoch: 0,
            since: self.started,
        });
        o.epoch += 1;
        o.since = now;
        drop(all);
        self.restarted.send_modify(|n| *n += 1);
    }

    /// How many times `name` restarted.
    pub fn epoch(&self, name: &str) -> u64 {
        self.origins.lock().get(name).map_or(0, |o| o.epoch)
    }

    fn origin(&self, name: &str) -> Origin {
        *self
            .origins
            .lock()
            .entry(name.to_string())
            .or_insert(Origin {
                epoch: 0,
                since: self.started,
            })
    }

    /// The playlist of origin `name` over the VOD playlist `vod`, or the
    /// status to answer (400: `_HLS_msn` too far ahead; 503: too long to hold).
    pub async fn playlist(
        &self,
        name: &str,
        vod: &str,
        query: Option<&str>,
    ) -> Result<String, u16> {
        let k = Knobs::parse(query);
        let mut woken = self.restarted.subscribe();
        let o = self.origin(name);
        let base = if o.epoch == 0 { k.start } else { 0 };
        if !k.ll {
            let seq = base + o.since.elapsed().as_millis() as u64 / k.seg_ms;
            return Ok(in_epoch(&live_playlist(vod, seq, k.window), o.epoch));
        }
        let part_ms = (k.seg_ms / k.parts).max(1);
        // Parts made in this epoch; the window is full from the start.
        let made = |now: Instant| {
            (base + k.window) * k.parts + now.duration_since(o.since).as_millis() as u64 / part_ms
        };
        if let Some(m) = k.msn {
            let complete = made(Instant::now()) / k.parts;
            if m > complete + 1 {
                return Err(400);
            }
            let needed = match k.part {
                Some(p) => m * k.parts + p + 1,
                None => (m + 1) * k.parts,
            };
            let missing = needed.saturating_sub(made(Instant::now()));
            let wait = Duration::from_millis(missing * part_ms);
            if wait > Duration::from_millis(3 * k.seg_ms) {
                return Err(503);
            }
            // Held until the part exists, or the origin restarts: then the
            // answer is the new epoch's playlist.
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = woken.changed() => {}
            }
        }
        let o = self.origin(name);
        let base = if o.epoch == 0 { k.start } else { 0 };
        let total = (base + k.window) * k.parts
            + Instant::now().duration_since(o.since).as_millis() as u64 / part_ms;
        let body = ll_playlist(
            vod,
            total / k.parts,
            total % k.parts,
            k.window,
            part_ms as f64 / 1000.0,
        );
        Ok(in_epoch(&body, o.epoch))
    }
}

/// Puts every segment and part URI of `body` under `e{epoch}/`, and drops
/// the fixture's loop discontinuities: an origin's encoder runs without any,
/// so the only one a player sees is the restart's.
fn in_epoch(body: &str, epoch: u64) -> String {
    let mut out = String::with_capacity(body.len() + 256);
    for line in body.lines() {
        if line == "#EXT-X-DISCONTINUITY" {
            continue;
        } else if line.starts_with("#EXT-X-DISCONTINUITY-SEQUENCE:") {
            out.push_str("#EXT-X-DISCONTINUITY-SEQUENCE:0");
        } else if !line.starts_with('#') && !line.is_empty() {
            out.push_str(&format!("e{epoch}/{line}"));
        } else if line.starts_with("#EXT-X-PART:") || line.starts_with("#EXT-X-PRELOAD-HINT:") {
            out.push_str(&line.replace("URI=\"", &format!("URI=\"e{epoch}/")));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}
