//! The Redis key schema of ../shared/CLUSTER.md. Every key carries one hash
//! tag, `{<cluster name>}`, so Lua scripts may touch any of them even on a
//! Redis Cluster, and one Redis can hold several m3u-edge clusters.

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            prefix: format!("m3e:{{{cluster}}}:"),
        }
    }

    /// `m3e:{<name>}:`, for scripts that build keys of nodes they read.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(':');
            }
            k.push_str(p);
        }
        k
    }

    /// `node:{n}`: the node's session token, PX node_ttl.
    pub fn node(&self, n: &str) -> String {
        self.key(&["node", n])
    }
    /// `nodeinfo:{n}`: addr, version, started, session.
    pub fn nodeinfo(&self, n: &str) -> String {
        self.key(&["nodeinfo", n])
    }
    /// `nodes`: ZSET node → session expiry (ms, Redis clock).
    pub fn nodes(&self) -> String {
        self.key(&["nodes"])
    }
    /// `up`: HASH `beat` (ms of the latest renewal of any node), `since`
    /// (ms since when renewals have come without a stall), `ttl`
    /// (`session::SETTLED_LUA`).
    pub fn up(&self) -> String {
        self.key(&["up"])
    }
    /// `epoch`: the fencing-token counter.
    pub fn epoch(&self) -> String {
        self.key(&["epoch"])
    }
    /// `own:{s}`: HASH node, session, epoch, addr, kind.
    pub fn own(&self, s: &str) -> String {
        self.key(&["own", s])
    }
    /// `stream:{s}`: HASH spec JSON, created, last_access, detected, ...
    pub fn stream(&self, s: &str) -> String {
        self.key(&["stream", s])
    }
    /// `streams`: ZSET stream → created ms.
    pub fn streams(&self) -> String {
        self.key(&["streams"])
    }
    /// `meta:{field}:{value}`: SET of stream ids.
    pub fn meta(&self, field: &str, value: &str) -> String {
        self.key(&["meta", field, value])
    }
    /// `clients:{s}`: ZSET client → expiry ms (+inf while a socket is open).
    pub fn clients(&self, s: &str) -> String {
        self.key(&["clients", s])
    }
    /// `client:{s}:{c}`: HASH of one client.
    pub fn client(&self, s: &str, c: &str) -> String {
        self.key(&["client", s, c])
    }
    /// `nclients:{n}`: SET of `stream\nclient` held by node n.
    pub fn nclients(&self, n: &str) -> String {
        self.key(&["nclients", n])
    }
    /// `sess:{s}`: HASH started, stop_sent, ... of a stream's session.
    pub fn sess(&self, s: &str) -> String {
        self.key(&["sess", s])
    }
    /// `plc:{p}`: HASH node → open provider connections.
    pub fn plc(&self, p: &str) -> String {
        self.key(&["plc", p])
    }
    /// `webhooks`: HASH of registered webhooks.
    pub fn webhooks(&self) -> String {
        self.key(&["webhooks"])
    }
    /// `hls_key`: the HLS signing key, set once (`SET NX`).
    pub fn hls_key(&self) -> String {
        self.key(&["hls_key"])
    }
    /// `events`: the event STREAM (group `delivery`).
    pub fn events(&self) -> String {
        self.key(&["events"])
    }
    /// `leader:{what}`: the elected node for `what`, PX 5 s.
    pub fn leader(&self, what: &str) -> String {
        self.key(&["leader", what])
    }
    /// `once:{op}`: the stored reply of a script run `op`, PX 60 s
    /// (`super::once`).
    pub fn once(&self, op: &str) -> String {
        self.key(&["once", op])
    }
    /// `bus`: the pub/sub channel.
    pub fn bus(&self) -> String {
        self.key(&["bus"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_shares_one_hash_tag() {
        let k = Keys::new("prod");
        for key in [
            k.node("n1"),
            k.own("abc"),
            k.meta("channel", "5"),
            k.client("s", "c"),
            k.bus(),
        ] {
            assert!(key.starts_with("m3e:{prod}:"), "{key}");
        }
        assert_eq!(k.meta("channel", "5"), "m3e:{prod}:meta:channel:5");
    }
}
