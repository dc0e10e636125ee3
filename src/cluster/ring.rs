//! Take-over order: pingora-ketama's consistent hash over the live nodes'
//! advertised addresses. Only orders who tries first after an owner dies
//! (placement itself is local-first, see CLUSTER.md), so removing a node
//! changes the order only for the keys it held.

use std::net::SocketAddr;

use pingora_ketama::{Bucket, Continuum};

/// Distinct addresses of `nodes` in ring order for `key`.
pub fn order(key: &str, nodes: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = nodes.to_vec();
    // The continuum depends on bucket order for equal hashes: sort so every
    // node computes the same ring from the same membership.
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Vec::new();
    }
    let buckets: Vec<Bucket> = addrs.iter().map(|a| Bucket::new(*a, 1)).collect();
    let ring = Continuum::new(&buckets);
    let mut out: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
    // node_iter cycles forever and repeats nodes: stop after every distinct
    // address was seen (bounded in case of a degenerate ring).
    for a in ring.node_iter(key.as_bytes()).take(addrs.len() * 160 * 4) {
        if !out.contains(a) {
            out.push(*a);
            if out.len() == addrs.len() {
                break;
            }
        }
    }
    for a in addrs {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// Position of `me` in [`order`] (`None` when it is not among `nodes`).
pub fn rank(key: &str, nodes: &[SocketAddr], me: SocketAddr) -> Option<usize> {
    order(key, nodes).iter().position(|a| *a == me)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, 1 + i as u8], 9090)))
            .collect()
    }

    /// CLUSTER.md test 11.
    #[test]
    fn same_owners_whatever_the_bucket_order_and_removal_moves_only_its_keys() {
        let nodes = addrs(4);
        let mut reversed = nodes.clone();
        reversed.reverse();
        let keys: Vec<String> = (0..10_000).map(|i| format!("stream-{i}")).collect();
        let first: Vec<SocketAddr> = keys.iter().map(|k| order(k, &nodes)[0]).collect();
        for (k, f) in keys.iter().zip(&first) {
            assert_eq!(order(k, &reversed)[0], *f, "{k}");
        }
        let gone = nodes[2];
        let rest: Vec<SocketAddr> = nodes.iter().copied().filter(|a| *a != gone).collect();
        let mut moved = 0;
        for (k, f) in keys.iter().zip(&first) {
            let now = order(k, &rest)[0];
            if *f == gone {
                moved += 1;
                // The new first is the old second: take-over goes down the list.
                assert_eq!(now, order(k, &nodes)[1], "{k}");
            } else {
                assert_eq!(now, *f, "{k} moved though its node stayed");
            }
        }
        // Every node holds a fair share (each of 4 has ~2500).
        assert!((1500..3500).contains(&moved), "{moved}");
    }

    #[test]
    fn order_lists_every_node_once() {
        let nodes = addrs(3);
        let o = order("x", &nodes);
        assert_eq!(o.len(), 3);
        let mut sorted = o.clone();
        sorted.sort();
        assert_eq!(sorted, nodes);
        assert_eq!(rank("x", &nodes, o[1]), Some(1));
        assert_eq!(rank("x", &nodes, addrs(5)[4]), None);
        assert!(order("x", &[]).is_empty());
    }
}
