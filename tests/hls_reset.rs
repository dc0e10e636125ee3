//! HLS providers that restart their media sequence (issue #19): a lagging
//! backend is still refused, a real restart is accepted once confirmed and
//! players (a model player here, real ffmpeg too) keep one monotonic
//! timeline with one discontinuity; a failover between sources with
//! unrelated sequence numbers is the same; held LL-HLS requests complete
//! across a restart; metrics count resets and lag refusals apart.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use crate::common::{config, register};
use crate::support::client::get_body;
use crate::support::edge::Edge;
use crate::support::eventually::eventually;
use crate::support::provider::Provider;

async fn text(url: &str) -> (u16, String) {
    let (s, _, b) = get_body(url).await;
    (s.as_u16(), String::from_utf8_lossy(&b).into_owned())
}

fn tag_value(body: &str, tag: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(tag))
        .and_then(|v| v.trim().parse().ok())
}

/// The provider URL a signed segment reference stands for: the token's
/// payload is readable (hls/token.rs), only its signature is secret.
fn provider_url(reference: &str) -> String {
    let t = reference
        .split("t=")
        .nth(1)
        .and_then(|t| t.split(['&', '.']).next())
        .unwrap_or("");
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t)
        .unwrap_or_default();
    String::from_utf8_lossy(&payload).into_owned()
}

/// What a player makes of successive playlists: each media sequence number
/// names one segment for good, with one discontinuity sequence number
/// (RFC 8216 §6.3.1, §4.3.3.3).
#[derive(Default)]
struct Player {
    /// MSN → (reference without the viewer's suffix, discontinuity number).
    segments: BTreeMap<u64, (String, u64)>,
    last_sequence: u64,
    polls: usize,
}

impl Player {
    fn observe(&mut self, body: &str) {
        let seq = tag_value(body, "#EXT-X-MEDIA-SEQUENCE:").unwrap_or(0);
        assert!(
            seq >= self.last_sequence,
            "media sequence went from {} to {seq}:\n{body}",
            self.last_sequence
        );
        self.last_sequence = seq;
        self.polls += 1;
        let mut dnum = tag_value(body, "#EXT-X-DISCONTINUITY-SEQUENCE:").unwrap_or(0);
        let mut msn = seq;
        for line in body.lines().map(str::trim) {
            if line == "#EXT-X-DISCONTINUITY" {
                dnum += 1;
            } else if !line.is_empty() && !line.starts_with('#') {
                let reference = line.split("&client_id").next().unwrap_or(line).to_string();
                let entry = (reference, dnum);
                if let Some(known) = self.segments.get(&msn) {
                    assert_eq!(known, &entry, "segment {msn} changed:\n{body}");
                }
                self.segments.insert(msn, entry);
                msn += 1;
            }
        }
    }

    /// MSNs whose discontinuity number is above the one before.
    fn discontinuities(&self) -> Vec<u64> {
        let mut out = Vec::new();
        let mut prev: Option<(u64, u64)> = None;
        for (&msn, (_, d)) in &self.segments {
            if let Some((m, pd)) = prev {
                assert_eq!(m + 1, msn, "a gap in the timeline before {msn}");
                assert!(*d >= pd, "discontinuity number went back at {msn}");
                if *d > pd {
                    out.push(msn);
                }
            }
            prev = Some((msn, *d));
        }
        out
    }

    /// The first MSN whose segment comes from a provider URL containing `marker`.
    fn first_from(&self, marker: &str) -> Option<u64> {
        self.segments
            .iter()
            .find(|(_, (r, _))| provider_url(r).contains(marker))
            .map(|(m, _)| *m)
    }
}

async fn metric(e: &Edge, name: &str) -> u64 {
    let (_, _, b) = get_body(&e.url("/metrics")).await;
    let body = String::from_utf8_lossy(&b).into_owned();
    body.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{body}")) as u64
}

/// Polls `url` as a player would (several times per target duration)
/// for `d`.
async fn play(player: &mut Player, url: &str, d: Duration) {
    let until = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < until {
        let (s, body) = text(url).await;
        assert_eq!(s, 200, "{body}");
        player.observe(&body);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_still_refused_and_counted_apart_from_resets() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    // A balancer alternating with a backend 4 segments (of 400 ms) behind;
    // the window gets ahead of the lag first.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let id = register(
        &e,
        json!({"url": p.url("hls-lagging/hls_ts/v0/index.m3u8?seg_ms=400&lag_by=4")}),
    )
    .await;
    let url = e.url(&format!("/hls/{id}/playlist.m3u8"));
    let mut player = Player::default();
    play(&mut player, &url, Duration::from_secs(6)).await;
    assert!(p.hits("/hls-lagging/") >= 4);
    assert!(metric(&e, "m3u_edge_hls_lag_refusals_total").await >= 1);
    // Lag never confirms as a reset, however long it goes on.
    assert_eq!(metric(&e, "m3u_edge_hls_sequence_resets_total").await, 0);
    let (_, stats) = crate::common::api(&e, http::Method::GET, "/stats", None).await;
    assert_eq!(stats["proxy_stats"]["hls_sequence_resets"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_continues_the_timeline_with_one_discontinuity() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let id = register(
        &e,
        json!({"url": p.url("hls-reset/r/hls_ts/v0/index.m3u8?start=100")}),
    )
    .await;
    let url = e.url(&format!("/hls/{id}/playlist.m3u8"));
    let mut player = Player::default();
    play(&mut player, &url, Duration::from_secs(3)).await;
    let before = player.last_sequence;
    assert!(before >= 100, "{before}");
    let old_segment = player.segments.values().next().map(|(r, _)| r.clone());
    // The origin restarts at 0 with all-new segments.
    p.reset_hls("r");
    let mut after = Duration::ZERO;
    while player.first_from("/e1/").is_none() {
        assert!(
            after < Duration::from_secs(15),
            "the reset was never served"
        );
        play(&mut player, &url, Duration::from_secs(1)).await;
        after += Duration::from_secs(1);
    }
    // Some more of the new epoch, sliding its first segment out of the window.
    play(&mut player, &url, Duration::from_secs(5)).await;
    let first_new = player.first_from("/e1/").unwrap_or(0);
    assert!(first_new > before, "{first_new} after {before}");
    for (msn, (r, _)) in &player.segments {
        let new = provider_url(r).contains("/e1/");
        assert_eq!(
            new,
            *msn >= first_new,
            "segment {msn} is {}",
            provider_url(r)
        );
    }
    // One discontinuity, exactly before the first new segment; the same
    // numbers on every poll (checked by the player) also after it slid out.
    assert_eq!(player.discontinuities(), vec![first_new]);
    assert!(
        player.last_sequence > first_new,
        "the first new segment never slid out"
    );
    // References minted before and after the remap both still play.
    let new_segment = player.segments.values().last().map(|(r, _)| r.clone());
    for r in [old_segment, new_segment].into_iter().flatten() {
        let (s, _, b) = get_body(&e.url(&r)).await;
        assert_eq!(s, 200, "{}", provider_url(&r));
        assert!(b.len() > 1000);
    }
    assert_eq!(metric(&e, "m3u_edge_hls_sequence_resets_total").await, 1);
    assert_eq!(metric(&e, "m3u_edge_hls_lag_refusals_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_from_a_primary_at_5000_to_a_backup_at_0_stays_monotonic() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let id = register(
        &e,
        json!({
            "url": p.url("hls-reset/primary/hls_ts/v0/index.m3u8?start=5000"),
            "failover_urls": [p.url("hls-reset/backup/hls_ts/v0/index.m3u8")],
        }),
    )
    .await;
    let url = e.url(&format!("/hls/{id}/playlist.m3u8"));
    let mut player = Player::default();
    play(&mut player, &url, Duration::from_secs(3)).await;
    assert!(player.last_sequence >= 5000);
    p.set_status("/hls-reset/primary/hls_ts/v0/index.m3u8", 503);
    let mut waited = Duration::ZERO;
    while player.first_from("/backup/").is_none() {
        assert!(waited < Duration::from_secs(10), "never failed over");
        play(&mut player, &url, Duration::from_secs(1)).await;
        waited += Duration::from_secs(1);
    }
    play(&mut player, &url, Duration::from_secs(5)).await;
    let first_backup = player.first_from("/backup/").unwrap_or(0);
    assert!(first_backup > 5000, "{first_backup}");
    assert_eq!(player.discontinuities(), vec![first_backup]);
    // A failover is not a reset of the primary.
    assert_eq!(metric(&e, "m3u_edge_hls_sequence_resets_total").await, 0);
}

/// LL-HLS facts of a playlist: (MSN of the segment being made, its parts so far).
fn ll_state(body: &str) -> (u64, u64) {
    let mut segments = 0;
    let mut trailing = 0;
    for l in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !l.starts_with('#') {
            segments += 1;
            trailing = 0;
        } else if l.starts_with("#EXT-X-PART:") {
            trailing += 1;
        }
    }
    let seq = tag_value(body, "#EXT-X-MEDIA-SEQUENCE:").unwrap_or(0);
    (seq + segments, trailing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_llhls_requests_complete_across_a_reset() {
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let id = register(
        &e,
        json!({"url": p.url("hls-reset/ll/hls_ts/v0/index.m3u8?ll=1&seg_ms=1000&parts=4&start=50")}),
    )
    .await;
    let url = e.url(&format!("/hls/{id}/playlist.m3u8"));
    let (s, body) = text(&url).await;
    assert_eq!(s, 200, "{body}");
    let first_sequence = tag_value(&body, "#EXT-X-MEDIA-SEQUENCE:").unwrap_or(0);
    assert!(first_sequence >= 50, "{body}");
    let (next, _) = ll_state(&body);
    // Four players wait for the first part of the segment after next (over
    // a second away): one held provider request.
    let mut held = Vec::new();
    for v in 0..4 {
        let u = format!("{url}?client_id=ll{v}&_HLS_msn={}&_HLS_part=0", next + 1);
        held.push(tokio::spawn(async move { text(&u).await }));
    }
    let asked = format!("_HLS_msn={}", next + 1);
    assert!(
        p.wait_until(Duration::from_secs(5), |p| {
            p.requests().iter().any(|r| r.path.contains(&asked))
        })
        .await,
        "the blocking reload never reached the provider"
    );
    p.reset_hls("ll");
    for h in held {
        let (s, b) = tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("a held request never completed")
            .expect("task");
        assert_eq!(s, 200, "{b}");
        // The new epoch's playlist, after what the players had.
        let seq = tag_value(&b, "#EXT-X-MEDIA-SEQUENCE:").unwrap_or(0);
        assert!(seq >= first_sequence, "{seq} < {first_sequence}:\n{b}");
        assert!(
            b.contains("#EXT-X-DISCONTINUITY\n"),
            "not the new playlist:\n{b}"
        );
    }
    // Blocking reloads go on in the players' numbering, translated to the
    // origin's new one (which restarted from 0).
    let (_, b) = text(&url).await;
    let (next, made) = ll_state(&b);
    let (s, b2) = text(&format!("{url}?_HLS_msn={next}&_HLS_part={made}")).await;
    assert_eq!(s, 200, "{b2}");
    let (n2, t2) = ll_state(&b2);
    assert!(n2 > next || (n2 == next && t2 > made), "{b2}");
    assert!(
        p.requests()
            .iter()
            .filter_map(|r| r.path.split("_HLS_msn=").nth(1).map(str::to_string))
            .filter_map(|v| v.split('&').next().and_then(|n| n.parse::<u64>().ok()))
            .any(|m| m < 20),
        "no blocking reload in the origin's new numbering"
    );
    assert_eq!(metric(&e, "m3u_edge_hls_sequence_resets_total").await, 1);
}

fn have_ffmpeg() -> bool {
    let ok = std::process::Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: ffmpeg not installed (scripts/deps.sh installs it)");
    }
    ok
}

/// Real ffmpeg reading the live playlist across a restart of the origin:
/// it fetches and decodes the new epoch's segments and keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_decodes_both_sides_of_a_reset() {
    if !have_ffmpeg() {
        return;
    }
    let p = Provider::start().await;
    let e = Edge::start(&config("")).await;
    let id = register(
        &e,
        json!({"url": p.url("hls-reset/ff/hls_ts/v0/index.m3u8?start=40")}),
    )
    .await;
    let url = e.url(&format!("/hls/{id}/playlist.m3u8"));
    let mut child = tokio::process::Command::new("ffmpeg")
        .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-i", &url])
        .args(["-map", "0:v", "-f", "null", "-progress", "pipe:1", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ffmpeg");
    let frames = Arc::new(AtomicU64::new(0));
    let out = child.stdout.take().expect("stdout");
    let counter = frames.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(out).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if let Some(n) = l.strip_prefix("frame=").and_then(|v| v.trim().parse().ok()) {
                counter.store(n, Ordering::Relaxed);
            }
        }
    });
    let segments = |epoch: &str| {
        p.requests()
            .iter()
            .filter(|r| {
                r.path
                    .starts_with(&format!("/hls-reset/ff/hls_ts/v0/{epoch}/"))
            })
            .count()
    };
    // Decoding the first epoch...
    assert!(
        eventually(Duration::from_secs(20), || segments("e0") >= 4
            && frames.load(Ordering::Relaxed) >= 100)
        .await,
        "ffmpeg did not play the first epoch ({} segments, {} frames)",
        segments("e0"),
        frames.load(Ordering::Relaxed)
    );
    p.reset_hls("ff");
    assert!(
        eventually(Duration::from_secs(20), || segments("e1") >= 1).await,
        "ffmpeg never asked for a segment of the new epoch"
    );
    let at_reset = frames.load(Ordering::Relaxed);
    // ... and the new one: two more segments' worth (2 s at 25 fps each).
    assert!(
        eventually(Duration::from_secs(25), || frames.load(Ordering::Relaxed)
            >= at_reset + 100)
        .await,
        "ffmpeg stalled after the reset at {at_reset} frames ({} now, {} new segments)",
        frames.load(Ordering::Relaxed),
        segments("e1")
    );
    assert!(segments("e1") >= 2);
    assert!(child.try_wait().ok().flatten().is_none(), "ffmpeg exited");
    let _ = child.kill().await;
}
