//! Arbitrary bytes → `playlists::parse::parse` (a provider's channel list).
//! Must never panic; every entry has a URL line that is not a directive, and
//! the accessors the import uses work on whatever came out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use m3u_edge::playlists::parse::parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = parse(data, 10_000) {
        assert!(p.entries.len() <= 10_000);
        for e in &p.entries {
            assert!(!e.url.is_empty() && !e.url.starts_with('#'));
            let _ = (e.group(), e.display_name(), e.attr("tvg-id"));
        }
        let _ = p.guide_url();
    }
});
