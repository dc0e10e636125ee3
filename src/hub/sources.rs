//! Source order and health for a live channel: the primary, then
//! `failover_urls` in order, wrapping back to the primary; a source that
//! failed is retried only after a backoff (doubling per failure, capped), and
//! when every static source is backing off the failover resolver is asked.

use std::time::{Duration, Instant};

use chrono::Utc;
use url::Url;

use crate::registry::SourceHealth;

/// A failing source is retried after `backoff × 2^(failures-1)`, doubling at
/// most this many times (8× the base): a dead source is not hammered, a
/// flapping one comes back within a minute at the default 5 s.
const MAX_DOUBLINGS: u32 = 3;

#[derive(Debug)]
pub struct Picker {
    urls: Vec<Url>,
    pub health: Vec<SourceHealth>,
    pos: usize,
    backoff: Duration,
}

impl Picker {
    /// `urls`: primary first, then failovers. Starts at `start` (where the
    /// stream currently is, e.g. after a forced failover).
    pub fn new(urls: Vec<Url>, start: usize, backoff: Duration) -> Self {
        let health = (0..urls.len())
            .map(|i| SourceHealth::new(i as i64 - 1))
            .collect();
        Picker {
            pos: start.min(urls.len().saturating_sub(1)),
            urls,
            health,
            backoff,
        }
    }

    pub fn current(&self) -> Option<(usize, &Url)> {
        self.urls.get(self.pos).map(|u| (self.pos, u))
    }

    pub fn index_of(&self, pos: usize) -> i64 {
        pos as i64 - 1
    }

    pub fn len(&self) -> usize {
        self.urls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    pub fn ok(&mut self, pos: usize) {
        if let Some(h) = self.health.get_mut(pos) {
            h.state = "ok";
            h.failing_since = None;
            h.failures = 0;
            h.retry_at = None;
        }
    }

    pub fn fail(&mut self, pos: usize, reason: &str) {
        let backoff = self.backoff;
        if let Some(h) = self.health.get_mut(pos) {
            h.state = "failing";
            h.failing_since.get_or_insert_with(Utc::now);
            h.last_error = Some(reason.to_string());
            h.failures = h.failures.saturating_add(1);
            let factor = 1u32 << (h.failures - 1).min(MAX_DOUBLINGS);
            h.retry_at = Some(Instant::now() + backoff * factor);
        }
    }

    /// Moves to the next available source after the current one, wrapping to
    /// the primary. `None` when every source is backing off.
    pub fn advance(&mut self) -> Option<(usize, Url)> {
        let n = self.urls.len();
        let now = Instant::now();
        for step in 1..=n {
            let p = (self.pos + step) % n;
            if self.health[p].available(now) {
                self.pos = p;
                return Some((p, self.urls[p].clone()));
            }
        }
        None
    }

    /// The next available source after `from` (wrapping), without moving.
    pub fn peek_next(&self, from: usize) -> Option<(usize, Url)> {
        let n = self.urls.len();
        let now = Instant::now();
        (1..n)
            .map(|step| (from + step) % n)
            .find(|&p| self.health[p].available(now))
            .map(|p| (p, self.urls[p].clone()))
    }

    pub fn url(&self, pos: usize) -> Option<&Url> {
        self.urls.get(pos)
    }

    pub fn is_available(&self, pos: usize) -> bool {
        self.health
            .get(pos)
            .is_some_and(|h| h.available(Instant::now()))
    }

    /// Makes `pos` current (a forced switch named it).
    pub fn jump(&mut self, pos: usize) {
        if pos < self.urls.len() {
            self.pos = pos;
        }
    }

    /// Adds a resolver-provided source and makes it current.
    pub fn push(&mut self, url: Url) -> usize {
        if let Some(p) = self.urls.iter().position(|u| *u == url) {
            self.pos = p;
            return p;
        }
        self.urls.push(url);
        self.health
            .push(SourceHealth::new(self.urls.len() as i64 - 1));
        self.pos = self.urls.len() - 1;
        self.pos
    }

    /// Time until some source may be retried.
    pub fn next_retry_in(&self) -> Duration {
        let now = Instant::now();
        self.health
            .iter()
            .filter_map(|h| h.retry_at)
            .map(|t| t.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<Url> {
        (0..n)
            .map(|i| Url::parse(&format!("http://h/{i}")).unwrap())
            .collect()
    }

    #[test]
    fn goes_in_order_and_wraps_to_primary() {
        let mut p = Picker::new(urls(3), 0, Duration::from_millis(1));
        p.fail(0, "eof");
        assert_eq!(p.advance().unwrap().0, 1);
        p.fail(1, "eof");
        assert_eq!(p.advance().unwrap().0, 2);
        std::thread::sleep(Duration::from_millis(5));
        p.fail(2, "eof");
        assert_eq!(p.advance().unwrap().0, 0);
    }

    #[test]
    fn failing_sources_back_off() {
        let mut p = Picker::new(urls(2), 0, Duration::from_secs(60));
        p.fail(0, "x");
        assert_eq!(p.advance().unwrap().0, 1);
        p.fail(1, "x");
        assert!(p.advance().is_none());
        assert!(p.next_retry_in() > Duration::from_secs(50));
        assert_eq!(p.health[0].state, "failing");
    }
}
