//! Resolvers (streamlink, yt-dlp) and their cookies files. So far: cookies
//! files, confined to `resolvers.cookies_dir` ([`cookies`]).

pub mod cookies;
