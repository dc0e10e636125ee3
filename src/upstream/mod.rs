//! Everything about talking to providers that both the proxy phases and the live
//! hub share: which URL to try (`sources`), which headers to send (`headers`,
//! R7), how a URL becomes a Pingora peer without blocking DNS (`peer`), and
//! which addresses may be connected to at all (`guard`,
//! `security.deny_private_upstreams`).

pub mod guard;
pub mod headers;
pub mod peer;
pub mod sources;
