//! Criterion benchmark of the HLS rewriter with the real cost of minting: every
//! URI gets an HMAC-signed token ([`Signer::mint`]) and a client-facing URI, as
//! the proxy will do for each live playlist refresh.
//!
//! Run: `cargo bench --bench rewrite -- --warm-up-time 1 --measurement-time 3`.
//! Throughput is reported in bytes of input playlist (MB/s); the per-iteration
//! time gives playlists per second.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use m3u_edge::hls::rewrite::{rewrite, Kind};
use m3u_edge::hls::token::{Claims, Signer};
use url::Url;

/// A live media playlist of exactly `lines` lines: a 4-line header, then
/// `#EXTINF` + absolute segment URL with a provider token query.
fn media_playlist(lines: usize) -> String {
    let mut body = String::from(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:6\n#EXT-X-MEDIA-SEQUENCE:184467\n",
    );
    for i in 0..(lines.saturating_sub(4) / 2) {
        body.push_str(&format!(
            "#EXTINF:6.006,\nhttps://cdn7.provider.example.net/live/u8k2/p9x4/21458/seg_{}.ts?token=5f2b9c7e1a0d4e6b8c3f&expires=1767225600\n",
            184_467 + i
        ));
    }
    body
}

fn bench(c: &mut Criterion) {
    let signer = Signer::new(&Signer::generate_key());
    let base =
        Url::parse("https://cdn7.provider.example.net/live/u8k2/p9x4/21458/index.m3u8?token=5f2b")
            .unwrap();
    let stream_id = "9f3c1e2a7b";
    let mut group = c.benchmark_group("rewrite");
    for lines in [50, 5_000] {
        let body = media_playlist(lines);
        assert_eq!(body.lines().count(), lines);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("media_{lines}_lines"), |b| {
            b.iter(|| {
                let mut mint = |url: &Url, kind: Kind, _original: &str| {
                    let token = signer.mint(&Claims {
                        stream_id: stream_id.to_owned(),
                        url: url.as_str().to_owned(),
                        kind,
                        client_id: Some("client_3f9a0c1d2e4b5a6c".to_owned()),
                        username: Some("viewer".to_owned()),
                    });
                    format!("/m3u-proxy/hls/{stream_id}/{}?t={token}", kind.file_name())
                };
                let out = rewrite(black_box(body.as_bytes()), &base, &mut mint).unwrap();
                black_box(out.body.len())
            })
        });
    }
    // The same 5 000-line rewrite with a constant mint: parse + resolve only, to
    // show how much of the time is the signing.
    let body = media_playlist(5_000);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("media_5000_lines_unsigned", |b| {
        b.iter(|| {
            let mut mint =
                |_: &Url, _: Kind, _: &str| String::from("/m3u-proxy/hls/x/segment.ts?t=x");
            let out = rewrite(black_box(body.as_bytes()), &base, &mut mint).unwrap();
            black_box(out.body.len())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
