//! HLS fetched once cluster-wide (issue #17 item 3): players of one HLS stream
//! on n1, n2 and n3 cost the provider what players on one node would (the
//! stream's HLS owner fetches, the others ask it), every player gets the
//! provider's media; when the owner is killed, players on the other nodes go
//! on, and a node without Redis fetches for itself.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::support::client::get_body;
use crate::support::cluster::ClusterNodes;
use crate::support::fixture;
use crate::support::provider::Provider;
use crate::support::redis::RedisServer;

const STREAM: &str = "hlsc";
/// The same reference-signing key on every node (what the shared registry
/// would put in Redis): a reference minted by one node verifies on all.
const TOKEN_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const PLAYLIST: &str = "/hls-live/hls_ts/v0/index.m3u8";

/// Nodes' YAML: the stream configured on each (by id), 1 s segments; the
/// fixture's target duration (2 s) keeps a live playlist 1 s.
fn body(p: &Provider, path: &str) -> String {
    format!(
        "server:\n  listen: \"{{listen}}\"\n  state_file: \"{{state_file}}\"\nhls:\n  token_key: \"{TOKEN_KEY}\"\nstreams:\n  - id: {STREAM}\n    url: \"{}\"\n",
        p.url(path)
    )
}

/// URI lines of a playlist.
fn uris(body: &str) -> Vec<String> {
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

fn media_sequence(body: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:"))
        .and_then(|v| v.trim().parse().ok())
}

/// GET without panicking when the node is gone: (status, body); 0 when
/// the request failed.
async fn fetch(url: &str) -> (u16, bytes::Bytes) {
    let req = crate::support::client::client().get(url).send();
    match tokio::time::timeout(Duration::from_secs(10), req).await {
        Ok(Ok(r)) => {
            let status = r.status().as_u16();
            let body = tokio::time::timeout(Duration::from_secs(10), r.bytes()).await;
            match body {
                Ok(Ok(b)) => (status, b),
                _ => (0, bytes::Bytes::new()),
            }
        }
        _ => (0, bytes::Bytes::new()),
    }
}

/// What one player saw, with the time of each event.
#[derive(Default)]
struct Seen {
    /// (when, status) of every playlist poll.
    polls: Vec<(Instant, u16)>,
    /// (when, media sequence) of good polls.
    sequences: Vec<(Instant, u64)>,
    /// (when, segment was the provider's bytes).
    segments: Vec<(Instant, bool)>,
}

/// A player: polls the playlist every 500 ms and fetches each new segment
/// once, like hls.js; records everything in `seen`.
async fn player(base: String, client: String, until: Instant, seen: Arc<Mutex<Seen>>) {
    let originals: Vec<Vec<u8>> = (0..6)
        .map(|k| fixture(&format!("hls_ts/v0/seg{k:03}.ts")))
        .collect();
    let mut fetched = HashSet::new();
    while Instant::now() < until {
        let url = format!("{base}/hls/{STREAM}/playlist.m3u8?client_id={client}");
        let (s, b) = fetch(&url).await;
        let now = Instant::now();
        seen.lock().polls.push((now, s));
        if s == 200 {
            let text = String::from_utf8_lossy(&b).into_owned();
            if let Some(seq) = media_sequence(&text) {
                seen.lock().sequences.push((now, seq));
            }
            for u in uris(&text) {
                if !fetched.insert(u.clone()) {
                    continue;
                }
                let (s, seg) = fetch(&format!("{base}{u}")).await;
                let good = s == 200 && originals.iter().any(|o| o[..] == seg[..]);
                seen.lock().segments.push((Instant::now(), good));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Provider requests for live segments, path with query, in order.
fn segment_requests(p: &Provider) -> Vec<String> {
    p.requests()
        .into_iter()
        .filter(|r| r.path_only().ends_with(".ts"))
        .map(|r| r.path)
        .collect()
}

fn duplicates(paths: &[String]) -> Vec<String> {
    let mut count: HashMap<&String, usize> = HashMap::new();
    for p in paths {
        *count.entry(p).or_default() += 1;
    }
    count
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(p, _)| p.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_on_three_nodes_cost_the_provider_one_nodes_fetches() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let mut c = ClusterNodes::start(&redis, 3, &body(&p, &format!("{PLAYLIST}?seg_ms=1000"))).await;
    let bases: Vec<String> = (0..3).map(|i| c.node(i).base()).collect();
    let started = Instant::now();
    let until = started + Duration::from_secs(9);
    let mut tasks = Vec::new();
    let mut seen = Vec::new();
    // Two players per node.
    for (i, base) in bases.iter().enumerate() {
        for k in 0..2 {
            let s = Arc::new(Mutex::new(Seen::default()));
            seen.push((format!("n{}/p{k}", i + 1), s.clone()));
            let client = format!("n{}p{k}", i + 1);
            tasks.push(tokio::spawn(player(base.clone(), client, until, s)));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    for (who, s) in &seen {
        let s = s.lock();
        let ok = s.polls.iter().filter(|(_, st)| *st == 200).count();
        assert!(ok >= 10, "{who}: {ok} good polls of {:?}", s.polls);
        assert_eq!(ok, s.polls.len(), "{who}: failed polls {:?}", s.polls);
        assert!(
            s.segments.len() >= 5,
            "{who}: {} segments",
            s.segments.len()
        );
        assert!(
            s.segments.iter().all(|(_, good)| *good),
            "{who}: a segment was not the provider's bytes"
        );
        let seqs: Vec<u64> = s.sequences.iter().map(|(_, q)| *q).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "{who}: the playlist went backwards: {seqs:?}"
        );
    }
    // Each segment fetched once cluster-wide, however many nodes' players asked.
    let segs = segment_requests(&p);
    assert!(segs.len() >= 5, "{segs:?}");
    assert!(
        duplicates(&segs).is_empty(),
        "segments fetched more than once: {:?}",
        duplicates(&segs)
    );
    // Playlist polls: one per half target duration (1 s) for the cluster, as
    // for one node (three nodes each on their own would poll about 3 times that).
    let polls = p.hits(PLAYLIST);
    assert!(
        polls as f64 <= elapsed + 3.0,
        "{polls} playlist fetches in {elapsed:.1} s from three nodes"
    );
    // One node owns the stream, the others fetched through it.
    let mut owned = 0;
    for i in 0..3 {
        let v: serde_json::Value = crate::support::client::get(&c.node(i).url("/stats"))
            .await
            .json()
            .await
            .unwrap();
        owned += v["cluster"]["hls"]["owned"].as_u64().unwrap_or(0);
    }
    assert_eq!(owned, 1, "HLS owners among the nodes");
    // The metrics say the same: what the others got through the owner, the
    // owner served to them.
    let (mut via_owner, mut served) = (0, 0);
    for i in 0..3 {
        let m = crate::support::client::get(&c.node(i).url("/metrics"))
            .await
            .text()
            .await
            .unwrap_or_default();
        via_owner += metric(&m, "m3u_edge_cluster_hls_via_owner_total");
        served += metric(&m, "m3u_edge_cluster_hls_served_total");
        assert_eq!(
            metric(&m, "m3u_edge_cluster_hls_owner_unreachable_total"),
            0,
            "n{}",
            i + 1
        );
    }
    assert!(via_owner >= 10, "{via_owner} HLS fetches through the owner");
    assert_eq!(
        via_owner, served,
        "fetched through the owner vs served by it"
    );
}

/// The value of an unlabelled metric in a /metrics text (0 when absent).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_elsewhere_continue_when_the_hls_owner_is_killed() {
    owner_goes_players_elsewhere_continue(false).await;
}

/// A rolling restart: SIGTERM of the HLS owner hands the stream over (it
/// releases at once instead of after its session runs out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_elsewhere_continue_when_the_hls_owner_stops() {
    owner_goes_players_elsewhere_continue(true).await;
}

/// Players on n1 (the HLS owner), n2, n3; after 3 s n1 is killed (`-9`) or
/// stopped (SIGTERM, `stop`): the players on n2 and n3 go on with the
/// provider's segments, fetched once again by the new owner.
async fn owner_goes_players_elsewhere_continue(sigterm: bool) {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let mut c = ClusterNodes::start(&redis, 3, &body(&p, &format!("{PLAYLIST}?seg_ms=1000"))).await;
    let bases: Vec<String> = (0..3).map(|i| c.node(i).base()).collect();
    // n1 fetches first: it becomes the owner.
    let (s, _, _) = get_body(&format!("{}/hls/{STREAM}/playlist.m3u8", bases[0])).await;
    assert_eq!(s, 200);
    let until = Instant::now() + Duration::from_secs(17);
    let mut tasks = Vec::new();
    let mut seen = Vec::new();
    for (i, base) in bases.iter().enumerate() {
        let s = Arc::new(Mutex::new(Seen::default()));
        seen.push((i, s.clone()));
        let client = format!("k{i}");
        tasks.push(tokio::spawn(player(base.clone(), client, until, s)));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = Instant::now();
    if sigterm {
        c.node(0).stop().await;
    } else {
        c.node(0).kill();
    }
    for t in tasks {
        t.await.unwrap();
    }
    for (i, s) in seen.iter().skip(1) {
        let s = s.lock();
        // Going on: the live edge kept moving for this player after the kill.
        let before = s
            .sequences
            .iter()
            .filter(|(t, _)| *t < killed)
            .map(|(_, q)| *q)
            .max()
            .unwrap_or(0);
        let after = s
            .sequences
            .iter()
            .filter(|(t, _)| *t > killed)
            .map(|(_, q)| *q)
            .max()
            .unwrap_or(0);
        assert!(
            after >= before + 8,
            "n{}: media sequence {before} → {after} after the owner died",
            i + 1
        );
        let good_after = s
            .segments
            .iter()
            .filter(|(t, good)| *t > killed && *good)
            .count();
        assert!(
            good_after >= 8,
            "n{}: {good_after} segments after the kill",
            i + 1
        );
        assert!(
            s.segments.iter().all(|(_, good)| *good),
            "n{}: a segment was not the provider's bytes",
            i + 1
        );
    }
    // A node took the stream over: once its session ran out (5 s) segments
    // are fetched once again. Players ask for each new segment ~1 s apart,
    // so compare what the provider saw in the last 4 s.
    let segs = segment_requests(&p);
    let tail: Vec<String> = segs[segs.len().saturating_sub(6)..].to_vec();
    assert!(
        duplicates(&tail).is_empty(),
        "after the take-over segments were fetched twice: {tail:?} (all: {segs:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_node_fetches_for_itself() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let mut c = ClusterNodes::start(&redis, 2, &body(&p, &format!("{PLAYLIST}?seg_ms=1000"))).await;
    let bases: Vec<String> = (0..2).map(|i| c.node(i).base()).collect();
    redis.pause();
    // Past the fence margin (node_ttl 5 s − 1 s): no session on either node.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let until = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    let mut seen = Vec::new();
    for (i, base) in bases.iter().enumerate() {
        let s = Arc::new(Mutex::new(Seen::default()));
        seen.push(s.clone());
        tasks.push(tokio::spawn(player(
            base.clone(),
            format!("r{i}"),
            until,
            s,
        )));
    }
    for t in tasks {
        t.await.unwrap();
    }
    redis.resume();
    for s in &seen {
        let s = s.lock();
        assert!(s.polls.iter().all(|(_, st)| *st == 200), "{:?}", s.polls);
        assert!(!s.segments.is_empty() && s.segments.iter().all(|(_, g)| *g));
    }
    for i in 0..2 {
        assert!(
            c.node(i)
                .wait_for_log(
                    "fetches HLS streams from their providers itself",
                    Duration::from_secs(2)
                )
                .await,
            "n{}: no log line about fetching directly:\n{}",
            i + 1,
            c.node(i).log()
        );
    }
}

/// (next segment number, parts of it made, CAN-BLOCK-RELOAD) of an LL-HLS playlist.
fn ll_state(body: &str) -> (u64, u64, bool) {
    let (mut segments, mut trailing) = (0, 0);
    for l in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !l.starts_with('#') {
            segments += 1;
            trailing = 0;
        } else if l.starts_with("#EXT-X-PART:") {
            trailing += 1;
        }
    }
    (
        media_sequence(body).unwrap_or(0) + segments,
        trailing,
        body.contains("CAN-BLOCK-RELOAD=YES"),
    )
}

/// LL-HLS blocking reloads from players on three nodes are held at the
/// owner: the provider sees one held request per part, not one per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llhls_blocking_reloads_on_three_nodes_are_one_provider_request() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let p = Provider::start().await;
    let ll = "/hls-ll/hls_ts/v0/index.m3u8?seg_ms=1000&parts=4";
    let mut c = ClusterNodes::start(&redis, 3, &body(&p, ll)).await;
    let bases: Vec<String> = (0..3).map(|i| c.node(i).base()).collect();
    let (s, b) = fetch(&format!("{}/hls/{STREAM}/playlist.m3u8", bases[0])).await;
    assert_eq!(s, 200);
    let (next, _, can_block) = ll_state(&String::from_utf8_lossy(&b));
    assert!(can_block);
    // The last part of the segment after the next one: ~1.5 s away.
    let (msn, part) = (next + 1, 3);
    let mut tasks = Vec::new();
    for (i, base) in bases.iter().enumerate() {
        for k in 0..2 {
            let u = format!(
                "{base}/hls/{STREAM}/playlist.m3u8?client_id=ll{i}{k}&_HLS_msn={msn}&_HLS_part={part}"
            );
            tasks.push(tokio::spawn(async move { fetch(&u).await }));
        }
    }
    for t in tasks {
        let (s, b) = t.await.unwrap();
        let text = String::from_utf8_lossy(&b).into_owned();
        assert_eq!(s, 200, "{text}");
        let (n, trailing, _) = ll_state(&text);
        assert!(
            n > msn || (n == msn && trailing > part),
            "part {part} of segment {msn} missing:\n{text}"
        );
    }
    let held: Vec<String> = p
        .requests()
        .into_iter()
        .map(|r| r.path)
        .filter(|path| path.contains(&format!("_HLS_msn={msn}&_HLS_part={part}")))
        .collect();
    assert_eq!(
        held.len(),
        1,
        "one held provider request for six players on three nodes: {held:?}"
    );
}
