//! One integration test binary (Pingora links once): the real `m3u-edge`
//! binary against a real loopback provider. See `support/` for the harness.

mod support;
mod support_selftest;

mod api;
mod broadcast;
mod browser;
mod cli;
mod cluster;
mod common;
mod config;
mod events;
mod hls;
mod hls_reset;
mod hls_security;
mod live;
mod live_memory;
mod openapi;
mod playlists;
mod reliability;
mod resolvers;
mod security;
mod silence;
mod transcode;
mod upgrade;
mod vod;
