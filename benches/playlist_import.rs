//! Playlist import (issue #18): how long the real import of a provider list
//! takes, from the file to streams in the registry (read, parse, filter,
//! ids, registry), against a floor measured in the same run: the least any
//! importer must do (read the file, split lines, md5 each URL into a
//! `HashMap`). Run: `cargo bench --bench playlist_import`. Prints a table;
//! asserts nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use m3u_edge::app::App;
use m3u_edge::config::{Config, PlaylistConfig, PlaylistFilter, PlaylistSource};
use md5::{Digest, Md5};

fn list(n: usize) -> String {
    let mut out = String::from("#EXTM3U url-tvg=\"http://p.example/xmltv.php\"\n");
    for i in 0..n {
        out.push_str(&format!(
            "#EXTINF:-1 tvg-id=\"ch{i}.example\" tvg-name=\"Channel {i}\" tvg-logo=\"http://logos.example/{i}.png\" group-title=\"Group {}\",Channel {i}\nhttp://line.p.example:8080/live/user/pass/{i}.ts\n",
            i % 60
        ));
    }
    out
}

fn floor(path: &std::path::Path) -> usize {
    let text = std::fs::read_to_string(path).expect("read");
    let mut ids = HashMap::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        ids.insert(hex::encode(Md5::digest(l.as_bytes())), l.to_owned());
    }
    ids.len()
}

fn best<F: FnMut() -> usize>(runs: usize, mut f: F) -> (Duration, usize) {
    let mut best = Duration::MAX;
    let mut n = 0;
    for _ in 0..runs {
        let t = Instant::now();
        n = f();
        best = best.min(t.elapsed());
    }
    (best, n)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    println!(
        "| entries | floor (read+split+md5) | first import | unchanged re-import | first / floor |"
    );
    println!("|---|---|---|---|---|");
    for n in [10_000usize, 100_000] {
        let path = dir.path().join(format!("list{n}.m3u"));
        std::fs::write(&path, list(n)).expect("write list");
        let (floor_t, got) = best(5, || floor(&path));
        assert_eq!(got, n);
        let mut first = Duration::MAX;
        let mut again = Duration::MAX;
        for _ in 0..3 {
            let mut config = Config::default();
            config.server.state_file = dir.path().join(format!("state{n}.json"));
            config.limits.max_streams = 0;
            config.playlists.push(PlaylistConfig {
                name: "bench".into(),
                source: PlaylistSource::File(path.clone()),
                provider: None,
                refresh: Duration::from_secs(3600),
                include: PlaylistFilter::default(),
                exclude: PlaylistFilter::default(),
                live: None,
                epg_url: None,
            });
            let app = App::new(config).expect("app");
            let t = Instant::now();
            let s = rt
                .block_on(m3u_edge::playlists::import::refresh(&app, 0))
                .expect("import");
            first = first.min(t.elapsed());
            assert_eq!(s.added, n);
            let t = Instant::now();
            rt.block_on(m3u_edge::playlists::import::refresh(&app, 0))
                .expect("re-import");
            again = again.min(t.elapsed());
            assert_eq!(app.registry.len(), n);
        }
        println!(
            "| {n} | {:.1} ms | {:.1} ms | {:.1} ms | {:.2}x |",
            floor_t.as_secs_f64() * 1e3,
            first.as_secs_f64() * 1e3,
            again.as_secs_f64() * 1e3,
            first.as_secs_f64() / floor_t.as_secs_f64()
        );
    }
}
