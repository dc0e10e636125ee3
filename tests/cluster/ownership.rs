//! The ownership scripts against a real Redis, through the library: exactly one
//! taker wins, a dead owner's channel goes to the next taker with a higher epoch,
//! release and `still_mine` only act for the holder of the current epoch.

use std::sync::Arc;
use std::time::Duration;

use m3u_edge::cluster::ownership::{self, Take};
use m3u_edge::cluster::{Cluster, ClusterError};
use m3u_edge::config::ClusterConfig;

use crate::support::cluster::SECRET;
use crate::support::edge::free_port;
use crate::support::redis::RedisServer;

fn node(redis: &RedisServer, id: &str) -> Arc<Cluster> {
    let port = free_port();
    let config = ClusterConfig {
        name: "own-test".into(),
        redis_url: redis.url(),
        node_id: id.into(),
        listen: ([127, 0, 0, 1], port).into(),
        advertise: ([127, 0, 0, 1], port).into(),
        secret: SECRET.as_bytes().to_vec(),
        node_ttl: Duration::from_secs(3),
        heartbeat: Duration::from_millis(500),
    };
    let c = Cluster::new(&config, &prometheus::Registry::new()).expect("cluster");
    c.start();
    c
}

#[tokio::test]
async fn one_owner_fencing_epochs_and_take_over() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    assert!(a.joined(Duration::from_secs(10)).await);
    assert!(b.joined(Duration::from_secs(10)).await);

    // Racing takers: one Mine, one Theirs naming the same owner and epoch.
    let (ra, rb) = tokio::join!(
        ownership::take(&a, "ch1", "live"),
        ownership::take(&b, "ch1", "live")
    );
    let (winner, loser, owner) = match (ra.unwrap(), rb.unwrap()) {
        (Take::Mine(o), Take::Theirs(t)) => {
            assert_eq!(o, t);
            (&a, &b, o)
        }
        (Take::Theirs(t), Take::Mine(o)) => {
            assert_eq!(o, t);
            (&b, &a, o)
        }
        other => panic!("expected one winner: {other:?}"),
    };
    assert_eq!(owner.node, winner.node_id());
    assert_eq!(owner.addr, winner.advertise());
    assert_eq!(owner.kind, "live");
    // Taking again is idempotent for the owner.
    assert_eq!(
        ownership::take(winner, "ch1", "live").await.unwrap(),
        Take::Mine(owner.clone())
    );
    assert_eq!(
        ownership::current(loser, "ch1").await.unwrap(),
        Some(owner.clone())
    );
    // Only the holder of the current epoch may release or renew.
    assert!(!ownership::release(loser, "ch1", owner.epoch).await.unwrap());
    assert!(!ownership::still_mine(winner, "ch1", owner.epoch + 1)
        .await
        .unwrap());
    assert!(ownership::still_mine(winner, "ch1", owner.epoch)
        .await
        .unwrap());

    // The owner stops heart-beating: once its session expires the other node
    // takes the channel with a higher epoch.
    let winner_id = winner.node_id().to_owned();
    winner.shutdown();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let taken = loop {
        match ownership::take(loser, "ch1", "live").await {
            Ok(Take::Mine(o)) => break o,
            Ok(Take::Theirs(o)) => assert_eq!(o.node, winner_id),
            Err(e) => panic!("{e}"),
        }
        assert!(std::time::Instant::now() < deadline, "never taken over");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(taken.epoch > owner.epoch);
    assert_eq!(taken.node, loser.node_id());
    assert!(ownership::release(loser, "ch1", taken.epoch).await.unwrap());
    assert_eq!(ownership::current(loser, "ch1").await.unwrap(), None);
}

#[tokio::test]
async fn a_node_without_a_session_takes_nothing() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let a = node(&redis, "a");
    assert!(a.joined(Duration::from_secs(10)).await);
    redis.pause();
    // Fenced within node_ttl − 1 s; takes are refused from then on.
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while a.holds_session() {
        assert!(std::time::Instant::now() < deadline, "never fenced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ownership::take(&a, "ch", "live").await,
        Err(ClusterError::Fenced)
    );
    redis.resume();
    assert!(a.joined(Duration::from_secs(10)).await);
    assert!(matches!(
        ownership::take(&a, "ch", "live").await,
        Ok(Take::Mine(_))
    ));
}
