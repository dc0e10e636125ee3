//! The pub/sub bus between nodes: small notices (a stream changed, a client
//! is to be dropped, a provider connection was freed...). Pub/sub drops
//! messages while a subscriber is disconnected, so after every (re)connect
//! subscribers get [`Bus::Resync`] and re-read whatever they cache; nothing
//! may depend on the bus alone for correctness.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use super::Cluster;

/// Messages queued for publishing beyond this are dropped (Redis is down;
/// the 1 s re-checks cover what they would have said).
const OUTBOX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Bus {
    StreamChanged {
        id: String,
    },
    StreamDeleted {
        id: String,
    },
    ClientDrop {
        stream: String,
        client: String,
    },
    FailoverNow {
        stream: String,
    },
    Released {
        stream: String,
    },
    ProviderFreed {
        provider: String,
    },
    Members,
    /// API webhooks changed in Redis: re-read them.
    WebhooksChanged,
    /// Local only, after the bus (re)connected: messages may have been missed.
    Resync,
}

/// A message and the node that sent it (this node's own messages come back
/// to it too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub from: String,
    #[serde(flatten)]
    pub msg: Bus,
}

pub(super) struct BusHandles {
    pub(super) outbox: mpsc::Sender<Envelope>,
    pub(super) inbox: broadcast::Sender<Envelope>,
}

pub(super) fn handles() -> (BusHandles, mpsc::Receiver<Envelope>) {
    let (outbox, rx) = mpsc::channel(OUTBOX);
    let (inbox, _) = broadcast::channel(1024);
    (BusHandles { outbox, inbox }, rx)
}

/// Publishes queued messages.
pub(super) async fn publisher(cluster: Arc<Cluster>, mut rx: mpsc::Receiver<Envelope>) {
    let channel = cluster.keys.bus();
    while let Some(env) = rx.recv().await {
        let Ok(text) = serde_json::to_string(&env) else {
            continue;
        };
        let mut conn = cluster.conn.clone();
        let r = tokio::time::timeout(
            super::COMMAND_TIMEOUT,
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(text)
                .query_async::<i64>(&mut conn),
        )
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => cluster.note_error(&e.to_string()),
            Err(_) => cluster.note_error("PUBLISH timed out"),
        }
    }
}

/// Keeps one subscription open, reconnecting after errors and after Redis
/// came back (a hung Redis never closes the socket).
pub(super) async fn subscriber(cluster: Arc<Cluster>) {
    let channel = cluster.keys.bus();
    let mut recovered = cluster.recovered.subscribe();
    loop {
        let connect = async {
            let mut ps = cluster.client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        let ps = match tokio::time::timeout(Duration::from_secs(3), connect).await {
            Ok(Ok(ps)) => ps,
            _ => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        recovered.borrow_and_update();
        let _ = cluster.bus.inbox.send(Envelope {
            from: cluster.node_id().to_owned(),
            msg: Bus::Resync,
        });
        let mut stream = ps.into_on_message();
        loop {
            tokio::select! {
                m = stream.next() => {
                    let Some(m) = m else { break };
                    let payload: Vec<u8> = m.get_payload_bytes().to_vec();
                    match serde_json::from_slice::<Envelope>(&payload) {
                        Ok(env) => {
                            let _ = cluster.bus.inbox.send(env);
                        }
                        // A newer node's message kind: not ours to act on.
                        Err(e) => tracing::debug!(error = %e, "cluster bus: message ignored"),
                    }
                }
                _ = recovered.changed() => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_unknown_kinds_fail_to_parse() {
        let e = Envelope {
            from: "n1".into(),
            msg: Bus::ClientDrop {
                stream: "s".into(),
                client: "c".into(),
            },
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            text,
            r#"{"from":"n1","kind":"client_drop","stream":"s","client":"c"}"#
        );
        assert_eq!(serde_json::from_str::<Envelope>(&text).unwrap(), e);
        assert!(serde_json::from_str::<Envelope>(r#"{"from":"n1","kind":"new"}"#).is_err());
    }
}
