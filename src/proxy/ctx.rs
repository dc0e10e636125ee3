//! Per-request state handed from phase to phase, grouped by the phase that
//! writes it (phases never call each other; STYLE.md §1).

use std::time::Instant;

use url::Url;

use crate::provider::{Full, Lease};
use crate::registry::{ClientGuard, StreamSpec};
use crate::route::Route;
use std::sync::Arc;

/// Why a source was given up, for the final status and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFailure {
    /// 404/410: the provider says it does not exist.
    NotFound,
    /// Connect error, timeout, 5xx, 401/403/429, redirect trouble.
    Failed,
}

/// Which URL to fetch for this request and what happened to the earlier ones.
#[derive(Debug, Default)]
pub struct Selection {
    /// Candidate sources in the order they are tried.
    pub candidates: Vec<Url>,
    /// Index into `candidates` of the source being tried.
    pub pos: usize,
    /// URL of the current attempt: the source, or where its redirects led.
    pub target: Option<Url>,
    pub hops: usize,
    pub visited: Vec<Url>,
    pub failures: Vec<(usize, SourceFailure, String)>,
    /// Set by `upstream_response_filter` when it asks for another attempt.
    pub wants_retry: bool,
    pub resolver_calls: usize,
    /// Last upstream status seen, for the resolver request.
    pub last_status: Option<u16>,
}

impl Selection {
    pub fn new(candidates: Vec<Url>) -> Self {
        let target = candidates.first().cloned();
        Selection {
            candidates,
            target,
            ..Default::default()
        }
    }

    /// Gives up the current source and moves to the next one. Returns whether
    /// there is one.
    pub fn fail(&mut self, kind: SourceFailure, reason: impl Into<String>) -> bool {
        self.failures.push((self.pos, kind, reason.into()));
        self.pos += 1;
        self.hops = 0;
        self.visited.clear();
        self.target = self.candidates.get(self.pos).cloned();
        self.target.is_some()
    }

    /// Adds a source (from the failover resolver) and makes it current.
    pub fn push_source(&mut self, url: Url) {
        self.candidates.push(url);
        self.pos = self.candidates.len() - 1;
        self.target = self.candidates.get(self.pos).cloned();
    }

    /// Follows a redirect to `next`. `Err` says why it cannot be followed.
    pub fn redirect(&mut self, next: Url, max_hops: usize) -> Result<(), &'static str> {
        if self.hops >= max_hops {
            return Err("too many redirects");
        }
        if let Some(cur) = &self.target {
            self.visited.push(cur.clone());
        }
        if self.visited.contains(&next) {
            return Err("redirect loop");
        }
        if !matches!(next.scheme(), "http" | "https") {
            return Err("redirect to a non-http URL");
        }
        self.hops += 1;
        self.target = Some(next);
        Ok(())
    }

    /// Why the last source was given up ("" when none was).
    pub fn last_reason(&self) -> String {
        self.failures
            .last()
            .map(|f| f.2.clone())
            .unwrap_or_default()
    }

    /// Status for the client when every source failed: 404 only when every
    /// source said not found.
    pub fn final_status(&self) -> u16 {
        if !self.failures.is_empty()
            && self
                .failures
                .iter()
                .all(|(_, k, _)| *k == SourceFailure::NotFound)
        {
            404
        } else {
            502
        }
    }
}

pub struct RequestCtx {
    // request_filter
    pub started: Instant,
    pub route: Option<Route>,
    pub stream_id: Option<String>,
    pub spec: Option<Arc<StreamSpec>>,
    pub guard: Option<ClientGuard>,
    /// Status of a response m3u-edge wrote itself (API, errors).
    pub local_status: Option<u16>,
    // upstream_peer / fail_to_connect / upstream_response_filter
    pub sel: Selection,
    /// Provider lease of this request's upstream connection, and its provider.
    pub lease: Option<(Option<String>, Lease)>,
    /// Set when the provider was at its limit.
    pub full: Option<Full>,
    /// A usable upstream response header arrived: no more failover for this request.
    pub committed: bool,
    // response_body_filter
    pub bytes_out: u64,
    /// The first body byte went out (join time recorded).
    pub first_byte: bool,
    /// A live viewer now served off the session (proxy/live.rs), which logs
    /// the request itself when the viewer leaves.
    pub detached: bool,
    /// How deep this request is in a chain m3u-edge made to itself (0 = a
    /// real client); see `conn::selfloop`.
    pub self_depth: usize,
    /// The current provider connection listed as ours while it is in use.
    pub self_listed: Option<crate::conn::selfloop::Listed>,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            started: Instant::now(),
            route: None,
            stream_id: None,
            spec: None,
            guard: None,
            local_status: None,
            sel: Selection::default(),
            lease: None,
            full: None,
            committed: false,
            bytes_out: 0,
            first_byte: false,
            detached: false,
            self_depth: 0,
            self_listed: None,
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn redirect_loops_and_hops() {
        let mut s = Selection::new(vec![u("http://a/1")]);
        assert!(s.redirect(u("http://a/2"), 5).is_ok());
        assert_eq!(s.redirect(u("http://a/1"), 5), Err("redirect loop"));
        let mut s = Selection::new(vec![u("http://a/0")]);
        for i in 1..=5 {
            s.redirect(u(&format!("http://a/{i}")), 5).unwrap();
        }
        assert_eq!(s.redirect(u("http://a/9"), 5), Err("too many redirects"));
    }

    #[test]
    fn final_status_is_404_only_when_all_not_found() {
        let mut s = Selection::new(vec![u("http://a/1"), u("http://b/1")]);
        s.fail(SourceFailure::NotFound, "404");
        s.fail(SourceFailure::NotFound, "404");
        assert_eq!(s.final_status(), 404);
        let mut s = Selection::new(vec![u("http://a/1"), u("http://b/1")]);
        s.fail(SourceFailure::NotFound, "404");
        assert!(!s.fail(SourceFailure::Failed, "503"));
        assert_eq!(s.final_status(), 502);
    }
}
