//! Transcoding (m3u-editor's stream profiles): templates checked against an
//! allowlist and rendered to ffmpeg argv ([`template`]), the built-in and
//! YAML profiles ([`profiles`]), and ffmpeg as a supervised child
//! ([`process`]).

pub mod packager;
pub mod process;
pub mod profiles;
pub mod source;
pub mod template;
