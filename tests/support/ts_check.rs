//! MPEG-TS checks for integration tests (ISO/IEC 13818-1): is a byte stream whole
//! aligned packets, and did a late joiner of the live hub start cleanly — PAT, then
//! PMT, then the video stream from a random-access point, with no stale GOP data
//! before the keyframe.
//!
//! The parsing here is a deliberately small, independent re-implementation (it does
//! not use `m3u_edge::ts`) so the checks cannot share a bug with the code under test.
//! PAT and PMT must each fit in one packet, which holds for every stream the tests
//! use.
#![allow(dead_code)]

use std::collections::BTreeMap;

pub const PACKET_LEN: usize = 188;
pub const SYNC: u8 = 0x47;
const NULL_PID: u16 = 0x1FFF;

/// What [`check_clean_join`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinReport {
    /// Whole packets received.
    pub packets: usize,
    /// Index of the first (parsed) PAT packet.
    pub pat_index: usize,
    pub pmt_pid: u16,
    /// Index of the first (parsed) PMT packet.
    pub pmt_index: usize,
    pub video_pid: Option<u16>,
    pub video_stream_type: Option<u8>,
    pub audio_pid: Option<u16>,
    /// Index of the first video packet (first audio packet for audio-only
    /// programs), which is a random-access point.
    pub first_rap_index: usize,
    /// The random-access point carries random_access_indicator = 1.
    pub rap_by_indicator: bool,
    /// NAL unit types (H.264/H.265) or start code values (MPEG-2) found at the
    /// start of the random-access PES payload.
    pub rap_start_codes: Vec<u8>,
}

/// Checks that `bytes` is non-empty and consists of whole packets, each starting
/// with the sync byte (§2.4.3.3). The error names the first misaligned offset.
pub fn is_valid_ts(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() {
        return Err("empty stream".into());
    }
    if let Some(offset) = (0..bytes.len())
        .step_by(PACKET_LEN)
        .find(|&i| bytes[i] != SYNC)
    {
        return Err(format!(
            "no sync byte 0x47 at offset {offset} (packet {}): found {:#04x}",
            offset / PACKET_LEN,
            bytes[offset]
        ));
    }
    let tail = bytes.len() % PACKET_LEN;
    if tail != 0 {
        return Err(format!(
            "trailing partial packet of {tail} bytes at offset {}",
            bytes.len() - tail
        ));
    }
    Ok(())
}

/// Number of whole 188-byte packets and packets per PID (a trailing partial
/// packet is not counted; sync bytes are not checked).
pub fn count_packets_and_pids(bytes: &[u8]) -> (usize, BTreeMap<u16, usize>) {
    let mut pids = BTreeMap::new();
    let mut count = 0;
    for p in bytes.chunks_exact(PACKET_LEN) {
        count += 1;
        *pids.entry(pid(p)).or_insert(0) += 1;
    }
    (count, pids)
}

/// Verifies what a late joiner received:
///
/// * whole aligned packets from byte 0 ([`is_valid_ts`]);
/// * a PAT before any packet other than SI (PIDs 0x01..=0x1F) or null packets;
/// * the PMT it points to before any elementary stream packet;
/// * the first video packet has payload_unit_start set and is a random-access
///   point (random_access_indicator, or an H.264 IDR/SPS, H.265 IRAP/VPS/SPS or
///   MPEG-2 sequence/GOP header at the start of its PES payload), so no video of a
///   stale GOP precedes the keyframe. Audio-only programs need their first audio
///   packet to start a PES packet.
pub fn check_clean_join(bytes: &[u8]) -> Result<JoinReport, String> {
    is_valid_ts(bytes)?;
    let mut pat: Option<(usize, u16)> = None;
    let mut pmt: Option<(usize, Pmt)> = None;
    let mut rap: Option<(usize, bool, Vec<u8>)> = None;
    for (i, p) in bytes.chunks_exact(PACKET_LEN).enumerate() {
        let pid = pid(p);
        if pid == NULL_PID {
            continue;
        }
        let Some((_, pmt_pid)) = pat else {
            if pid == 0 {
                let pmt_pid = parse_pat(p).map_err(|e| format!("packet {i}: PAT unusable: {e}"))?;
                pat = Some((i, pmt_pid));
            } else if pid >= 0x20 {
                return Err(format!("packet {i} (PID {pid:#x}) arrives before the PAT"));
            }
            continue;
        };
        let Some((_, program)) = &pmt else {
            if pid == pmt_pid {
                let parsed = parse_pmt(p).map_err(|e| format!("packet {i}: PMT unusable: {e}"))?;
                pmt = Some((i, parsed));
            } else if pid >= 0x20 {
                return Err(format!(
                    "packet {i} (PID {pid:#x}) arrives before the PMT (PID {pmt_pid:#x})"
                ));
            }
            continue;
        };
        if rap.is_some() {
            continue;
        }
        let (target, stream_type) = match (program.video, program.audio) {
            (Some(v), _) => v,
            (None, Some(a)) => a,
            (None, None) => return Err("the PMT lists neither video nor audio".into()),
        };
        if pid != target {
            continue;
        }
        if !pusi(p) {
            return Err(format!(
                "packet {i}: first packet of stream PID {pid:#x} continues a PES packet \
                 (stale data before the random-access point)"
            ));
        }
        let by_indicator = random_access_indicator(p);
        let codes = payload(p)
            .map(|pl| start_codes(pl, stream_type))
            .unwrap_or_default();
        let keyframe = match stream_type {
            0x1B => codes.iter().any(|&t| t == 5 || t == 7),
            0x24 => codes
                .iter()
                .any(|&t| (16..=21).contains(&t) || t == 32 || t == 33),
            0x01 | 0x02 => codes.iter().any(|&t| t == 0xB3 || t == 0xB8),
            _ => false,
        };
        let is_video = program.video.is_some();
        if is_video && !by_indicator && !keyframe {
            return Err(format!(
                "packet {i}: first video packet (PID {pid:#x}, stream_type {stream_type:#04x}) \
                 is not a random-access point: no random_access_indicator, start codes {codes:?}"
            ));
        }
        rap = Some((i, by_indicator, codes));
    }
    let (pat_index, pmt_pid) = pat.ok_or("no PAT received")?;
    let (pmt_index, program) = pmt.ok_or(format!("no PMT (PID {pmt_pid:#x}) received"))?;
    let (first_rap_index, rap_by_indicator, rap_start_codes) =
        rap.ok_or("no random-access point of the video/audio stream received")?;
    Ok(JoinReport {
        packets: bytes.len() / PACKET_LEN,
        pat_index,
        pmt_pid,
        pmt_index,
        video_pid: program.video.map(|v| v.0),
        video_stream_type: program.video.map(|v| v.1),
        audio_pid: program.audio.map(|a| a.0),
        first_rap_index,
        rap_by_indicator,
        rap_start_codes,
    })
}

// --- minimal packet / PSI parsing (§2.4.3.2, §2.4.3.4, §2.4.4) ---

fn pid(p: &[u8]) -> u16 {
    (u16::from(p[1] & 0x1F) << 8) | u16::from(p[2])
}

fn pusi(p: &[u8]) -> bool {
    p[1] & 0x40 != 0
}

fn adaptation_flags(p: &[u8]) -> Option<u8> {
    if p[3] & 0x20 == 0 || p[4] == 0 {
        return None;
    }
    Some(p[5])
}

fn random_access_indicator(p: &[u8]) -> bool {
    adaptation_flags(p).is_some_and(|f| f & 0x40 != 0)
}

fn payload(p: &[u8]) -> Option<&[u8]> {
    if p[3] & 0x10 == 0 {
        return None;
    }
    let start = if p[3] & 0x20 != 0 {
        5 + usize::from(p[4])
    } else {
        4
    };
    p.get(start..)
}

/// The one complete section starting in this packet (pointer_field honoured).
fn single_section(p: &[u8], table_id: u8) -> Result<&[u8], String> {
    if !pusi(p) {
        return Err("no section starts here (payload_unit_start not set)".into());
    }
    let pl = payload(p).ok_or("no payload")?;
    let pointer = usize::from(*pl.first().ok_or("empty payload")?);
    let s = pl
        .get(1 + pointer..)
        .ok_or("pointer_field overruns the packet")?;
    if s.len() < 3 {
        return Err("section header truncated".into());
    }
    if s[0] != table_id {
        return Err(format!("table_id {:#04x}, expected {table_id:#04x}", s[0]));
    }
    let len = 3 + ((usize::from(s[1] & 0x0F) << 8) | usize::from(s[2]));
    let s = s
        .get(..len)
        .ok_or("section spans packets (not supported by this checker)")?;
    if len < 12 {
        return Err(format!("section too short ({len} bytes)"));
    }
    if crc32_mpeg2(s) != 0 {
        return Err("CRC_32 mismatch".into());
    }
    Ok(s)
}

fn parse_pat(p: &[u8]) -> Result<u16, String> {
    let s = single_section(p, 0x00)?;
    s[8..s.len() - 4]
        .chunks_exact(4)
        .find(|e| e[0] != 0 || e[1] != 0)
        .map(|e| (u16::from(e[2] & 0x1F) << 8) | u16::from(e[3]))
        .ok_or_else(|| "PAT lists no program".into())
}

#[derive(Debug, Clone, Copy)]
struct Pmt {
    video: Option<(u16, u8)>,
    audio: Option<(u16, u8)>,
}

fn parse_pmt(p: &[u8]) -> Result<Pmt, String> {
    let s = single_section(p, 0x02)?;
    let body = &s[8..s.len() - 4];
    if body.len() < 4 {
        return Err("PMT body truncated".into());
    }
    let info_len = (usize::from(body[2] & 0x0F) << 8) | usize::from(body[3]);
    let mut es = body
        .get(4 + info_len..)
        .ok_or("program_info_length overruns")?;
    let mut pmt = Pmt {
        video: None,
        audio: None,
    };
    while !es.is_empty() {
        if es.len() < 5 {
            return Err("ES loop truncated".into());
        }
        let st = es[0];
        let pid = (u16::from(es[1] & 0x1F) << 8) | u16::from(es[2]);
        let len = (usize::from(es[3] & 0x0F) << 8) | usize::from(es[4]);
        let descriptors = es.get(5..5 + len).ok_or("ES_info_length overruns")?;
        let video = matches!(st, 0x01 | 0x02 | 0x10 | 0x1B | 0x24);
        let audio = matches!(st, 0x03 | 0x04 | 0x0F | 0x11 | 0x1C | 0x81 | 0x87)
            || (st == 0x06 && has_audio_descriptor(descriptors));
        if video && pmt.video.is_none() {
            pmt.video = Some((pid, st));
        }
        if audio && pmt.audio.is_none() {
            pmt.audio = Some((pid, st));
        }
        es = &es[5 + len..];
    }
    Ok(pmt)
}

/// DVB AC-3 / E-AC-3 / DTS / AAC descriptors (EN 300 468).
fn has_audio_descriptor(mut d: &[u8]) -> bool {
    while d.len() >= 2 {
        if matches!(d[0], 0x6A | 0x7A | 0x7B | 0x7C) {
            return true;
        }
        d = d.get(2 + usize::from(d[1])..).unwrap_or(&[]);
    }
    false
}

/// Start code values after 00 00 01 in the ES part of a PES packet start:
/// NAL unit types for H.264 (low 5 bits) and H.265 (bits 1..=6), raw start code
/// values otherwise.
fn start_codes(pes: &[u8], stream_type: u8) -> Vec<u8> {
    if pes.len() < 9 || pes[..3] != [0, 0, 1] {
        return Vec::new();
    }
    let Some(es) = pes.get(9 + usize::from(pes[8])..) else {
        return Vec::new();
    };
    let mut codes = Vec::new();
    let mut i = 0;
    while i + 3 < es.len() {
        if es[i..i + 3] == [0, 0, 1] {
            let b = es[i + 3];
            codes.push(match stream_type {
                0x1B => b & 0x1F,
                0x24 => (b >> 1) & 0x3F,
                _ => b,
            });
            i += 3;
        } else {
            i += 1;
        }
    }
    codes
}

/// CRC-32/MPEG-2 (Annex A); a section including its CRC_32 checks to 0.
fn crc32_mpeg2(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/sample.ts");

    fn fixture() -> Vec<u8> {
        std::fs::read(FIXTURE).expect("read sample.ts fixture")
    }

    fn packet(data: &[u8], index: usize) -> &[u8] {
        &data[index * PACKET_LEN..(index + 1) * PACKET_LEN]
    }

    /// Packet indices of video PES starts flagged random-access in the fixture.
    fn rap_indices(data: &[u8], video_pid: u16) -> Vec<usize> {
        data.chunks_exact(PACKET_LEN)
            .enumerate()
            .filter(|(_, p)| pid(p) == video_pid && pusi(p) && random_access_indicator(p))
            .map(|(i, _)| i)
            .collect()
    }

    /// What the hub sends a joiner: PAT, PMT, then the stream from `from`.
    fn join_at(data: &[u8], report: &JoinReport, from: usize) -> Vec<u8> {
        let mut out = packet(data, report.pat_index).to_vec();
        out.extend_from_slice(packet(data, report.pmt_index));
        out.extend_from_slice(&data[from * PACKET_LEN..]);
        out
    }

    #[test]
    fn raw_fixture_from_its_first_rap_passes() {
        let data = fixture();
        let report = check_clean_join(&data).expect("fixture joins cleanly");
        assert_eq!(report.packets, data.len() / PACKET_LEN);
        assert!(report.pat_index < report.pmt_index);
        assert!(report.pmt_index < report.first_rap_index);
        assert_eq!(report.video_stream_type, Some(0x1B));
        assert!(report.audio_pid.is_some());
        assert!(report.rap_by_indicator);
        assert!(
            report.rap_start_codes.contains(&7),
            "{:?}",
            report.rap_start_codes
        );
    }

    #[test]
    fn psi_then_later_rap_passes() {
        let data = fixture();
        let base = check_clean_join(&data).expect("fixture");
        let raps = rap_indices(&data, base.video_pid.expect("video"));
        assert!(raps.len() >= 4, "{raps:?}");
        for &rap in &raps[1..] {
            let joined = join_at(&data, &base, rap);
            let report = check_clean_join(&joined).expect("join at RAP");
            assert_eq!(report.pat_index, 0);
            assert_eq!(report.pmt_index, 1);
            assert_eq!(report.first_rap_index, 2);
        }
    }

    #[test]
    fn mid_gop_join_fails() {
        let data = fixture();
        let base = check_clean_join(&data).expect("fixture");
        let video = base.video_pid.expect("video");
        let raps = rap_indices(&data, video);
        // A video PES start (a non-key frame) in the middle of the second GOP.
        let mid = (raps[1] + 200..raps[2])
            .find(|&i| {
                let p = packet(&data, i);
                pid(p) == video && pusi(p)
            })
            .expect("a mid-GOP frame");
        let err = check_clean_join(&join_at(&data, &base, mid)).expect_err("mid-GOP frame");
        assert!(err.contains("not a random-access point"), "{err}");
        // Not even at a PES start: stale continuation data.
        let err = check_clean_join(&join_at(&data, &base, mid + 1)).expect_err("continuation");
        assert!(err.contains("PID"), "{err}");
        // Raw bytes from a mid-GOP offset: no PAT first.
        let err = check_clean_join(&data[mid * PACKET_LEN..]).expect_err("raw mid-GOP");
        assert!(err.contains("before the PAT"), "{err}");
    }

    #[test]
    fn missing_pmt_fails() {
        let data = fixture();
        let base = check_clean_join(&data).expect("fixture");
        let mut joined = packet(&data, base.pat_index).to_vec();
        joined.extend_from_slice(&data[base.first_rap_index * PACKET_LEN..]);
        let err = check_clean_join(&joined).expect_err("no PMT");
        assert!(err.contains("before the PMT"), "{err}");
    }

    #[test]
    fn misalignment_is_reported_with_offset() {
        let data = fixture();
        let err = is_valid_ts(&data[1..]).expect_err("shifted");
        assert!(err.contains("offset 0"), "{err}");
        let mut shifted = data[..10 * PACKET_LEN].to_vec();
        shifted.insert(5 * PACKET_LEN + 3, 0);
        shifted.truncate(10 * PACKET_LEN);
        let err = is_valid_ts(&shifted).expect_err("byte inserted");
        assert!(err.contains(&format!("offset {}", 6 * PACKET_LEN)), "{err}");
        let err = is_valid_ts(&data[..PACKET_LEN + 5]).expect_err("partial");
        assert!(err.contains("partial"), "{err}");
        assert!(is_valid_ts(&[]).is_err());
        assert!(check_clean_join(&data[1..]).is_err());
        assert!(is_valid_ts(&data).is_ok());
    }

    #[test]
    fn counts_packets_per_pid() {
        let data = fixture();
        let (count, pids) = count_packets_and_pids(&data);
        assert_eq!(count, data.len() / PACKET_LEN);
        assert_eq!(pids.values().sum::<usize>(), count);
        let base = check_clean_join(&data).expect("fixture");
        assert!(pids[&0] > 1, "PAT repeated");
        assert!(pids[&base.pmt_pid] > 1, "PMT repeated");
        assert!(pids[&base.video_pid.expect("video")] > pids[&base.audio_pid.expect("audio")]);
    }
}
