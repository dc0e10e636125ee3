//! Arbitrary bytes → `ts::Aligner::push` in fuzzer-chosen chunk sizes, then
//! `Scanner::scan` and `DiscontinuityMarker::process` on what comes out. Must never
//! panic; the aligner must only emit whole packets starting with 0x47, and the
//! marker must keep aligned input aligned.
#![no_main]

use libfuzzer_sys::fuzz_target;
use m3u_edge::ts::{Aligner, DiscontinuityMarker, Scanner, PACKET_LEN, SYNC};

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    // First byte picks the read size (1..=256 × 7 bytes), like network reads.
    let chunk = usize::from(split) * 7 + 1;
    let mut aligner = Aligner::new();
    let mut scanner = Scanner::new();
    let mut marker: Option<DiscontinuityMarker> = None;
    for piece in data.chunks(chunk) {
        let out = aligner.push(piece);
        assert_eq!(out.len() % PACKET_LEN, 0);
        assert!(out.iter().step_by(PACKET_LEN).all(|&b| b == SYNC));
        let _ = scanner.scan(&out);
        if marker.is_none() && scanner.is_ready() {
            marker = Some(DiscontinuityMarker::from_scanner(&scanner));
        }
        if let Some(m) = marker.as_mut() {
            let marked = m.process(&out);
            // Aligned in, aligned out (packets may be inserted, never dropped).
            assert!(marked.len() >= out.len() && marked.len() % PACKET_LEN == 0);
            assert!(marked.iter().step_by(PACKET_LEN).all(|&b| b == SYNC));
        }
    }
    // A marker over explicit PIDs too, on the whole (aligned) input.
    let mut m = DiscontinuityMarker::new(&[0x100, 0x101, 0x1FFF], Some(0x100));
    let whole = Aligner::new().push(data);
    let _ = m.process(&whole);
});
