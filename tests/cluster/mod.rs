//! Several nodes on one Redis (issue #17, ../shared/CLUSTER.md "Tests"): three real
//! `m3u-edge` processes on loopback, a real `redis-server` started by the harness
//! (tests/support/redis.rs, tests/support/cluster.rs). Each test skips with a
//! message when redis-server is not installed.

mod events;
mod hls;
mod leases;
mod membership;
mod ownership;
mod registry;
mod relay;
