//! Arbitrary bytes → `hls::rewrite::rewrite` with a fixed base URL. Must never
//! panic; when it succeeds, `unrewrite` with the mint table must give back the
//! input exactly (nothing but URIs changed), and `inspect` must agree on the info
//! (whose blocking-reload helpers must not overflow).
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use m3u_edge::hls::rewrite::{inspect, rewrite, unrewrite};
use url::Url;

fuzz_target!(|data: &[u8]| {
    let base = Url::parse("https://origin.example.com/live/chan/index.m3u8?token=t").unwrap();
    let mut table: HashMap<String, String> = HashMap::new();
    let result = rewrite(data, &base, &mut |url, kind, original| {
        assert!(matches!(url.scheme(), "http" | "https"), "minted a {url}");
        let minted = format!("https://edge.test/{}/{}", kind.as_str(), table.len());
        table.insert(minted.clone(), original.to_owned());
        minted
    });
    let info = inspect(data);
    if let Ok(i) = &info {
        // Blocking-reload arithmetic must not overflow on any counts.
        let next = i.next_msn();
        let _ = i.has(next, Some(u64::MAX));
        let _ = i.has(u64::MAX, None);
    }
    match result {
        Ok(out) => {
            assert_eq!(info.as_ref().ok(), Some(&out.info));
            let back = unrewrite(&out.body, &mut |m| table.get(m).cloned())
                .expect("rewritten output must parse");
            assert_eq!(back, data, "not lossless");
        }
        // BadUri and BadMint come from resolution only: inspect still parses.
        Err(e) => assert!(info.is_ok() || info.as_ref().err() == Some(&e)),
    }
});
