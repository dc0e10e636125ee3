//! Everything about talking to providers that both the proxy phases and the live
//! hub share: which URL to try (`sources`), which headers to send (`headers`,
//! R7), and how a URL becomes a Pingora peer without blocking DNS (`peer`).

pub mod headers;
pub mod peer;
pub mod sources;
