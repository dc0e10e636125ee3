//! Requests m3u-edge makes to itself. A provider (or a stream URL) can point
//! back at m3u-edge's own `/stream/{id}`: each hop is then a new request that
//! makes the next one, without end (3 747 nested requests in 2.4 s were
//! seen). The local address of every open provider connection of the proxy
//! path is kept here, with the nesting depth of the request that opened it;
//! a client connection coming *from* one of those addresses is m3u-edge
//! itself, one level deeper. No marker header is sent to providers (R7),
//! and a provider or DNS name that hides the loop cannot fool an address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;

#[derive(Debug, Default)]
pub struct SelfConns {
    by_local: Mutex<HashMap<SocketAddr, usize>>,
}

/// Keeps one provider connection listed until dropped.
#[derive(Debug)]
pub struct Listed {
    conns: Arc<SelfConns>,
    local: SocketAddr,
}

impl SelfConns {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Lists a provider connection from `local`, opened by a request at
    /// nesting `depth` (0 = a real client's request).
    pub fn list(self: &Arc<Self>, local: SocketAddr, depth: usize) -> Listed {
        self.by_local.lock().insert(local, depth);
        Listed {
            conns: self.clone(),
            local,
        }
    }

    /// The depth of a client connection from `peer`: `Some(n + 1)` when it is
    /// one of our own provider connections opened at depth `n`.
    pub fn depth_of(&self, peer: SocketAddr) -> Option<usize> {
        let map = self.by_local.lock();
        if map.is_empty() {
            return None;
        }
        map.get(&peer).map(|d| d + 1)
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.conns.by_local.lock().remove(&self.local);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_connection_is_ourselves_one_level_deeper_until_dropped() {
        let conns = SelfConns::new();
        let a: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        assert_eq!(conns.depth_of(a), None);
        let listed = conns.list(a, 0);
        assert_eq!(conns.depth_of(a), Some(1));
        assert_eq!(conns.depth_of(b), None);
        let deeper = conns.list(b, 3);
        assert_eq!(conns.depth_of(b), Some(4));
        drop((listed, deeper));
        assert_eq!(conns.depth_of(a), None);
    }
}
