//! Counting caps: how many of a thing are open in all, and per key (a client
//! address). A slot is taken when the thing opens and given back when its
//! [`Slot`] drops, so a cap can never leak on an early return or a panic.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// Why a slot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The cap on all of them.
    Total(usize),
    /// The cap for one key.
    PerKey(usize),
}

/// Caps on open things: `total` in all and `per_key` for each key; 0 = no cap.
#[derive(Debug)]
pub struct Caps<K: Hash + Eq + Clone> {
    total: usize,
    per_key: usize,
    open: AtomicUsize,
    by_key: Mutex<HashMap<K, usize>>,
}

/// One open thing; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot<K: Hash + Eq + Clone> {
    caps: Arc<Caps<K>>,
    key: Option<K>,
}

impl<K: Hash + Eq + Clone> Caps<K> {
    pub fn new(total: usize, per_key: usize) -> Arc<Self> {
        Arc::new(Caps {
            total,
            per_key,
            open: AtomicUsize::new(0),
            by_key: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a slot for `key` (None: counted in the total only), or says
    /// which cap is full.
    pub fn take(self: &Arc<Self>, key: Option<K>) -> Result<Slot<K>, Full> {
        self.take_inner(key, true)
    }

    /// Takes a slot even when a cap is full: for a thing that is already
    /// open and only changes hands (a live viewer leaving Pingora's session).
    pub fn take_anyway(self: &Arc<Self>, key: Option<K>) -> Slot<K> {
        match self.take_inner(key.clone(), false) {
            Ok(slot) => slot,
            // Unreachable (nothing is checked), but never lose the count.
            Err(_) => Slot {
                caps: self.clone(),
                key,
            },
        }
    }

    fn take_inner(self: &Arc<Self>, key: Option<K>, check: bool) -> Result<Slot<K>, Full> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if check && self.total > 0 && before >= self.total {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Total(self.total));
        }
        let key = match key {
            Some(k) if self.per_key > 0 || !check => {
                let mut map = self.by_key.lock();
                let n = map.entry(k.clone()).or_insert(0);
                if check && *n >= self.per_key {
                    drop(map);
                    self.open.fetch_sub(1, Ordering::AcqRel);
                    return Err(Full::PerKey(self.per_key));
                }
                *n += 1;
                Some(k)
            }
            _ => None,
        };
        Ok(Slot {
            caps: self.clone(),
            key,
        })
    }

    /// Open things in all.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Open things for one key.
    pub fn open_for(&self, key: &K) -> usize {
        self.by_key.lock().get(key).copied().unwrap_or(0)
    }

    /// Keys with something open (the per-key map never keeps empty entries).
    pub fn keys(&self) -> usize {
        self.by_key.lock().len()
    }
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        self.caps.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(k) = self.key.take() {
            let mut map = self.caps.by_key.lock();
            if let Some(n) = map.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_all_and_per_key_and_slots_come_back() {
        let caps: Arc<Caps<u8>> = Caps::new(3, 2);
        let a1 = caps.take(Some(1)).unwrap();
        let a2 = caps.take(Some(1)).unwrap();
        assert_eq!(caps.take(Some(1)).unwrap_err(), Full::PerKey(2));
        let b1 = caps.take(Some(2)).unwrap();
        assert_eq!(caps.take(Some(3)).unwrap_err(), Full::Total(3));
        assert_eq!(caps.open(), 3);
        drop(a1);
        let c = caps.take(Some(1)).unwrap();
        drop((a2, b1, c));
        assert_eq!(caps.open(), 0);
        assert_eq!(caps.keys(), 0);
    }

    #[test]
    fn zero_means_no_cap_and_anyway_counts_past_a_full_cap() {
        let caps: Arc<Caps<u8>> = Caps::new(0, 0);
        let many: Vec<_> = (0..100).map(|_| caps.take(Some(1)).unwrap()).collect();
        assert_eq!(caps.open(), 100);
        drop(many);
        let caps: Arc<Caps<u8>> = Caps::new(1, 1);
        let one = caps.take(Some(1)).unwrap();
        let two = caps.take_anyway(Some(1));
        assert_eq!((caps.open(), caps.open_for(&1)), (2, 2));
        drop((one, two));
        assert_eq!((caps.open(), caps.keys()), (0, 0));
    }
}
