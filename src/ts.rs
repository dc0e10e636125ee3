//! MPEG transport stream primitives for the live hub (ISO/IEC 13818-1), pure code.
//!
//! This module owns everything the hub needs to know about the bytes it fans out:
//!
//! * [`Packet`] — a borrowed view of one 188-byte packet (§2.4.3.2 header,
//!   §2.4.3.4 adaptation field). Accessors never panic on malformed lengths.
//! * [`Aligner`] — turns network reads of any size into whole, sync-aligned packets,
//!   resynchronising (and counting dropped bytes) when the sync byte is lost.
//! * [`Scanner`] — learns PAT → PMT → elementary streams (§2.4.4), keeps copies of
//!   the latest PAT/PMT packets so they can be re-sent to a joining viewer, and
//!   reports the random-access points (keyframes) in each chunk.
//! * [`set_discontinuity`], [`discontinuity_packet`] and [`DiscontinuityMarker`] —
//!   flag a source switch so players reset their clocks and continuity checks.
//!
//! # Clean joins
//!
//! A late joiner must receive PAT, then PMT, then data starting at a random-access
//! point of the video PID: a decoder cannot find PIDs without the PSI (§2.4.4.3,
//! §2.4.4.8) and cannot decode anything before an IDR/IRAP picture. The hub sends
//! [`Scanner::pat`] + [`Scanner::pmt`] and then the live chunk from one of the
//! packet indices in [`ScanResult::random_access`].
//!
//! The cached PSI packets keep their original continuity counters, so a joiner
//! may see one continuity gap on the PAT/PMT PIDs when the live copies follow;
//! demuxers tolerate that for PSI (a section is only used once its CRC checks).
//!
//! # Source switches
//!
//! After a failover to another provider, timestamps, PCR and continuity counters
//! jump. What players need (§2.4.3.5, discontinuity_indicator): the hub sends the
//! new source's PAT and PMT, then the new data starting at a random-access point,
//! with the discontinuity_indicator set on the first packet of every elementary
//! PID (and of the PCR PID, which tells the decoder a new system time base
//! follows). [`DiscontinuityMarker`] does the per-PID marking.
//!
//! Nothing here does I/O or async work; the functions are cheap enough to call on
//! every chunk read from a provider.

use bytes::{Buf, Bytes, BytesMut};

/// Transport stream packet length (§2.4.3.2).
pub const PACKET_LEN: usize = 188;
/// sync_byte, the first byte of every packet (§2.4.3.3).
pub const SYNC: u8 = 0x47;
/// PID of the Program Association Table (§2.4.4.3, Table 2-3).
pub const PAT_PID: u16 = 0x0000;
/// PID of null packets (Table 2-3); their continuity counter is undefined.
pub const NULL_PID: u16 = 0x1FFF;

/// table_id of a program_association_section (Table 2-31).
const TABLE_PAT: u8 = 0x00;
/// table_id of a TS_program_map_section (Table 2-31).
const TABLE_PMT: u8 = 0x02;
/// 3-byte section header + section_length, which "shall not exceed 1021" for
/// PAT (§2.4.4.5) and PMT (§2.4.4.9).
const MAX_SECTION_LEN: usize = 3 + 1021;
/// A 1024-byte section spans at most 6 packets (183 or 184 payload bytes each);
/// one spare for a pointer_field tail.
const MAX_SECTION_PACKETS: usize = 7;
/// Confirmations needed to (re)acquire sync: 0x47 at p, p+188 and p+376.
const SYNC_CONFIRMATIONS: usize = 3;

// ---------------------------------------------------------------------------
// Packet
// ---------------------------------------------------------------------------

/// A borrowed view of one transport stream packet (§2.4.3.2).
///
/// Construct with [`Packet::new`], which checks the length and sync byte; every
/// accessor is then total (no panics, malformed lengths give `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet<'a>(&'a [u8; PACKET_LEN]);

impl<'a> Packet<'a> {
    /// Views the first 188 bytes of `bytes` as a packet; `None` if shorter than a
    /// packet or if byte 0 is not the sync byte.
    pub fn new(bytes: &'a [u8]) -> Option<Self> {
        let arr: &[u8; PACKET_LEN] = bytes.get(..PACKET_LEN)?.try_into().ok()?;
        (arr[0] == SYNC).then_some(Packet(arr))
    }

    /// The whole 188 bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    /// transport_error_indicator: the packet is known to be corrupt.
    pub fn transport_error(&self) -> bool {
        self.0[1] & 0x80 != 0
    }

    /// payload_unit_start_indicator: a PES packet or a PSI section (after the
    /// pointer_field) starts in this packet.
    pub fn payload_unit_start(&self) -> bool {
        self.0[1] & 0x40 != 0
    }

    /// 13-bit PID.
    pub fn pid(&self) -> u16 {
        (u16::from(self.0[1] & 0x1F) << 8) | u16::from(self.0[2])
    }

    /// transport_scrambling_control (0 = not scrambled).
    pub fn scrambling_control(&self) -> u8 {
        self.0[3] >> 6
    }

    /// adaptation_field_control: 0b01 payload only, 0b10 adaptation field only,
    /// 0b11 both, 0b00 reserved (decoders discard such packets).
    pub fn adaptation_field_control(&self) -> u8 {
        (self.0[3] >> 4) & 0x03
    }

    /// An adaptation field is present.
    pub fn has_adaptation(&self) -> bool {
        self.adaptation_field_control() & 0b10 != 0
    }

    /// A payload is present.
    pub fn has_payload(&self) -> bool {
        self.adaptation_field_control() & 0b01 != 0
    }

    /// 4-bit continuity_counter; it increments only on packets with a payload
    /// (§2.4.3.3).
    pub fn continuity_counter(&self) -> u8 {
        self.0[3] & 0x0F
    }

    /// The adaptation field after its length byte (flags first), or `None` when
    /// absent or when adaptation_field_length overruns the packet.
    pub fn adaptation_field(&self) -> Option<&'a [u8]> {
        if !self.has_adaptation() {
            return None;
        }
        let len = usize::from(self.0[4]);
        self.0.get(5..5 + len)
    }

    /// The adaptation field flags byte (§2.4.3.4); `None` if there is no adaptation
    /// field or its length is 0 (a single stuffing byte, no flags).
    pub fn adaptation_flags(&self) -> Option<u8> {
        self.adaptation_field()?.first().copied()
    }

    /// random_access_indicator: the next PES packet of this PID starts an
    /// elementary stream access point (§2.4.3.5).
    pub fn random_access_indicator(&self) -> bool {
        self.adaptation_flags().is_some_and(|f| f & 0x40 != 0)
    }

    /// discontinuity_indicator (§2.4.3.5).
    pub fn discontinuity_indicator(&self) -> bool {
        self.adaptation_flags().is_some_and(|f| f & 0x80 != 0)
    }

    /// The PCR in 27 MHz units (base * 300 + extension, §2.4.3.5), if present.
    pub fn pcr(&self) -> Option<u64> {
        let af = self.adaptation_field()?;
        if af.first()? & 0x10 == 0 {
            return None;
        }
        let b = af.get(1..7)?;
        let base = (u64::from(b[0]) << 25)
            | (u64::from(b[1]) << 17)
            | (u64::from(b[2]) << 9)
            | (u64::from(b[3]) << 1)
            | (u64::from(b[4]) >> 7);
        let ext = (u64::from(b[4] & 0x01) << 8) | u64::from(b[5]);
        Some(base * 300 + ext)
    }

    /// The payload after the adaptation field. `None` when there is no payload or
    /// the adaptation_field_length is invalid (it is at most 182 when a payload
    /// follows, §2.4.3.5).
    pub fn payload(&self) -> Option<&'a [u8]> {
        if !self.has_payload() {
            return None;
        }
        let start = if self.has_adaptation() {
            let len = usize::from(self.0[4]);
            if len > 182 {
                return None;
            }
            5 + len
        } else {
            4
        };
        self.0.get(start..)
    }
}

// ---------------------------------------------------------------------------
// Aligner
// ---------------------------------------------------------------------------

/// Turns an arbitrary byte stream into whole, sync-aligned 188-byte packets.
///
/// Once locked, only the sync byte of each packet is checked (no per-byte work).
/// When a packet boundary does not hold 0x47, the lock is dropped and the stream
/// is scanned for a position where 0x47 repeats at +188 and +376; the bytes
/// skipped are counted in [`Aligner::dropped`]. Memory is bounded: at most one
/// partial packet (locked) or 376 unconfirmed bytes (searching) are kept.
#[derive(Debug, Default)]
pub struct Aligner {
    buf: BytesMut,
    locked: bool,
    dropped: u64,
}

impl Aligner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `data` and returns every complete aligned packet now available
    /// (possibly empty). Copies `data` once; the returned `Bytes` shares that copy.
    pub fn push(&mut self, data: &[u8]) -> Bytes {
        self.buf.extend_from_slice(data);
        self.drain()
    }

    /// Like [`Aligner::push`], but without any copy when nothing is pending and
    /// `data` is already aligned (the usual case): the result is a slice of `data`.
    pub fn push_bytes(&mut self, data: Bytes) -> Bytes {
        if self.buf.is_empty() {
            let whole = data.len() - data.len() % PACKET_LEN;
            let packets = whole / PACKET_LEN;
            let confirmed = self.locked || packets >= SYNC_CONFIRMATIONS;
            if confirmed && data[..whole].iter().step_by(PACKET_LEN).all(|&b| b == SYNC) {
                self.locked = true;
                self.buf.extend_from_slice(&data[whole..]);
                return data.slice(..whole);
            }
        }
        self.push(&data)
    }

    /// Bytes discarded while searching for sync since creation.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Bytes held back (a partial packet, or unconfirmed bytes while searching).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Whether the aligner is currently locked to the packet grid.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Forgets pending bytes and the lock (e.g. after reconnecting upstream).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.locked = false;
    }

    fn drain(&mut self) -> Bytes {
        // `good`: validated packet bytes at the front of `buf`.
        let mut good = 0usize;
        loop {
            if self.locked {
                let len = self.buf.len();
                while good + PACKET_LEN <= len && self.buf[good] == SYNC {
                    good += PACKET_LEN;
                }
                if good >= len || self.buf[good] == SYNC {
                    // Nothing left, or a partial packet that still starts well.
                    break;
                }
                // Sync lost at `good` (§2.4.3.3: every packet starts with 0x47).
                self.locked = false;
            }
            match find_sync(&self.buf[good..]) {
                Ok(skip) => {
                    self.discard(good, skip);
                    self.locked = true;
                }
                Err(skip) => {
                    self.discard(good, skip);
                    break;
                }
            }
        }
        self.buf.split_to(good).freeze()
    }

    /// Removes `n` bytes at `at`, counting them as dropped.
    fn discard(&mut self, at: usize, n: usize) {
        if n == 0 {
            return;
        }
        self.dropped += n as u64;
        if at == 0 {
            self.buf.advance(n);
        } else {
            // Rare (only right after a sync loss): close the gap so the output
            // stays one contiguous buffer.
            let len = self.buf.len();
            self.buf.copy_within(at + n..len, at);
            self.buf.truncate(len - n);
        }
    }
}

/// Finds the first offset where 0x47 appears at +0, +188 and +376.
/// `Ok(offset)` when found; `Err(skip)` with the number of leading bytes that can
/// never start a confirmed packet (the rest needs more data to decide).
fn find_sync(s: &[u8]) -> Result<usize, usize> {
    let span = (SYNC_CONFIRMATIONS - 1) * PACKET_LEN;
    let mut q = 0usize;
    loop {
        // Jump to the next candidate sync byte.
        match s
            .get(q..)
            .and_then(|rest| rest.iter().position(|&b| b == SYNC))
        {
            Some(off) => q += off,
            None => return Err(s.len()),
        }
        if q + span >= s.len() {
            // Not enough data to confirm this candidate yet; keep it.
            return Err(q);
        }
        if (1..SYNC_CONFIRMATIONS).all(|k| s[q + k * PACKET_LEN] == SYNC) {
            return Ok(q);
        }
        q += 1;
    }
}

// ---------------------------------------------------------------------------
// PSI sections
// ---------------------------------------------------------------------------

/// CRC-32/MPEG-2 table (Annex A: polynomial 0x04C11DB7, initial value all ones,
/// no reflection). A section with a correct CRC_32 checks to zero.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u32) << 24;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC-32/MPEG-2 over `data` (Annex A).
pub fn crc32_mpeg2(data: &[u8]) -> u32 {
    data.iter().fold(0xFFFF_FFFF, |crc, &b| {
        (crc << 8) ^ CRC_TABLE[usize::from(((crc >> 24) as u8) ^ b)]
    })
}

/// A complete PSI section and copies of the packets that carried it.
#[derive(Debug)]
struct Section {
    bytes: Vec<u8>,
    packets: Vec<u8>,
}

enum Feed {
    Incomplete,
    /// Complete; this many bytes of the input were used.
    Complete(usize),
    Invalid,
}

/// Reassembles PSI sections of one PID across packets (§2.4.4.1, pointer_field
/// §2.4.4.2). Memory is bounded by [`MAX_SECTION_LEN`] and [`MAX_SECTION_PACKETS`].
#[derive(Debug, Default)]
struct SectionAssembler {
    data: Vec<u8>,
    packets: Vec<u8>,
    in_progress: bool,
    last_cc: Option<u8>,
}

impl SectionAssembler {
    fn reset(&mut self) {
        self.data.clear();
        self.packets.clear();
        self.in_progress = false;
    }

    fn push(&mut self, pkt: &Packet<'_>, out: &mut Vec<Section>) {
        if pkt.transport_error() {
            self.reset();
            self.last_cc = None;
            return;
        }
        if !pkt.has_payload() {
            // Adaptation-only packets do not advance the CC (§2.4.3.3).
            return;
        }
        let cc = pkt.continuity_counter();
        if let Some(last) = self.last_cc {
            if cc == last && !pkt.discontinuity_indicator() {
                // A packet may be sent twice with the same CC (§2.4.3.3).
                return;
            }
            if cc != (last + 1) & 0x0F {
                // A packet was lost: the section in progress is unusable.
                self.reset();
            }
        }
        self.last_cc = Some(cc);
        let Some(payload) = pkt.payload() else {
            self.reset();
            return;
        };
        if !pkt.payload_unit_start() {
            if self.in_progress {
                self.packets.extend_from_slice(pkt.as_bytes());
                match self.feed(payload) {
                    Feed::Incomplete => {}
                    Feed::Complete(_) => self.finish(out),
                    Feed::Invalid => self.reset(),
                }
            }
            return;
        }
        // pointer_field: the number of bytes before the first new section; those
        // bytes end the section in progress (§2.4.4.2).
        let Some((&pointer, rest)) = payload.split_first() else {
            self.reset();
            return;
        };
        let pointer = usize::from(pointer);
        let Some(tail) = rest.get(..pointer) else {
            self.reset();
            return;
        };
        if self.in_progress {
            self.packets.extend_from_slice(pkt.as_bytes());
            match self.feed(tail) {
                Feed::Complete(_) => self.finish(out),
                Feed::Incomplete | Feed::Invalid => self.reset(),
            }
        }
        self.reset();
        let mut start = pointer;
        // Several sections may follow each other; 0xFF (stuffing) ends the run.
        while let Some(&table_id) = rest.get(start) {
            if table_id == 0xFF {
                break;
            }
            self.in_progress = true;
            self.packets.extend_from_slice(pkt.as_bytes());
            match self.feed(&rest[start..]) {
                Feed::Incomplete => break,
                Feed::Complete(used) => {
                    self.finish(out);
                    start += used;
                }
                Feed::Invalid => {
                    self.reset();
                    break;
                }
            }
        }
    }

    /// Appends to the section in progress.
    fn feed(&mut self, input: &[u8]) -> Feed {
        if self.packets.len() > MAX_SECTION_PACKETS * PACKET_LEN {
            return Feed::Invalid;
        }
        let have = self.data.len();
        // Copy only what can belong to this section.
        let room = MAX_SECTION_LEN.saturating_sub(have);
        self.data.extend_from_slice(&input[..room.min(input.len())]);
        let Some(header) = self.data.get(..3) else {
            return Feed::Incomplete;
        };
        // section_length: 12 bits, counts the bytes after itself.
        let total = 3 + ((usize::from(header[1] & 0x0F) << 8) | usize::from(header[2]));
        if total > MAX_SECTION_LEN {
            return Feed::Invalid;
        }
        if self.data.len() < total {
            return Feed::Incomplete;
        }
        self.data.truncate(total);
        Feed::Complete(total - have)
    }

    fn finish(&mut self, out: &mut Vec<Section>) {
        out.push(Section {
            bytes: std::mem::take(&mut self.data),
            packets: std::mem::take(&mut self.packets),
        });
        self.in_progress = false;
    }
}

/// Checks the long-form section header shared by PAT and PMT and returns the
/// body between the 8-byte header and the CRC_32 (§2.4.4.3, §2.4.4.8).
fn section_body(section: &[u8], table_id: u8) -> Option<&[u8]> {
    if section.len() < 12 || section[0] != table_id {
        return None;
    }
    // section_syntax_indicator must be 1 for PAT/PMT.
    if section[1] & 0x80 == 0 {
        return None;
    }
    // current_next_indicator 0: the table is not applicable yet.
    if section[5] & 0x01 == 0 {
        return None;
    }
    if crc32_mpeg2(section) != 0 {
        return None;
    }
    section.get(8..section.len() - 4)
}

// ---------------------------------------------------------------------------
// Scanner
// ---------------------------------------------------------------------------

/// What kind of elementary stream a PMT entry carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Video,
    Audio,
    Other,
}

/// One entry of the PMT's elementary stream loop (§2.4.4.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElementaryStream {
    pub pid: u16,
    /// stream_type (Table 2-34): 0x1B H.264, 0x24 H.265, 0x02 MPEG-2 video, ...
    pub stream_type: u8,
    pub kind: StreamKind,
}

/// stream_type values (Table 2-34).
pub mod stream_type {
    pub const MPEG1_VIDEO: u8 = 0x01;
    pub const MPEG2_VIDEO: u8 = 0x02;
    pub const MPEG1_AUDIO: u8 = 0x03;
    pub const MPEG2_AUDIO: u8 = 0x04;
    pub const PES_PRIVATE: u8 = 0x06;
    pub const AAC_ADTS: u8 = 0x0F;
    pub const MPEG4_VISUAL: u8 = 0x10;
    pub const AAC_LATM: u8 = 0x11;
    pub const MPEG4_AUDIO_RAW: u8 = 0x1C;
    pub const H264: u8 = 0x1B;
    pub const H265: u8 = 0x24;
    /// ATSC A/52 AC-3 and E-AC-3 (user private range).
    pub const ATSC_AC3: u8 = 0x81;
    pub const ATSC_EAC3: u8 = 0x87;
}

fn classify(stream_type: u8, descriptors: &[u8]) -> StreamKind {
    use stream_type::*;
    match stream_type {
        MPEG1_VIDEO | MPEG2_VIDEO | MPEG4_VISUAL | H264 | H265 => StreamKind::Video,
        MPEG1_AUDIO | MPEG2_AUDIO | AAC_ADTS | AAC_LATM | MPEG4_AUDIO_RAW | ATSC_AC3
        | ATSC_EAC3 => StreamKind::Audio,
        // DVB carries AC-3/E-AC-3/DTS/AAC as private PES with a descriptor
        // (EN 300 468 tags 0x6A, 0x7A, 0x7B, 0x7C).
        PES_PRIVATE
            if descriptor_tags(descriptors).any(|t| matches!(t, 0x6A | 0x7A | 0x7B | 0x7C)) =>
        {
            StreamKind::Audio
        }
        _ => StreamKind::Other,
    }
}

fn descriptor_tags(mut d: &[u8]) -> impl Iterator<Item = u8> + '_ {
    std::iter::from_fn(move || {
        let (&tag, rest) = d.split_first()?;
        let (&len, rest) = rest.split_first()?;
        d = rest.get(usize::from(len)..)?;
        Some(tag)
    })
}

/// Whether the ES data at the start of a PES packet begins a random-access point.
///
/// `pes` is the payload of the packet with payload_unit_start set (starting at the
/// PES start code). The PES header is skipped using PES_header_data_length
/// (§2.4.3.7); the ES bytes are then scanned for start codes 00 00 01:
///
/// * H.264 (0x1B): NAL type 5 (IDR slice) or 7 (SPS, which encoders emit at the
///   head of every keyframe access unit); a non-IDR slice (type 1) first means no.
/// * H.265 (0x24): IRAP NAL types 16..=21 (BLA/IDR/CRA), or VPS/SPS (32/33) that
///   head an IRAP access unit; a non-IRAP slice (0..=9) first means no.
/// * MPEG-1/2 video (0x01/0x02): sequence_header_code 0xB3 or group_start_code
///   0xB8 (ISO/IEC 13818-2 §6.2.2), which precede an I picture.
///
/// Only the bytes given are looked at, so an access unit whose first NAL units do
/// not fit in the first packet is not recognised (the random_access_indicator
/// usually covers it).
pub fn pes_starts_random_access(stream_type: u8, pes: &[u8]) -> bool {
    let Some(es) = pes_es_data(pes) else {
        return false;
    };
    let mut i = 0usize;
    while i + 3 < es.len() {
        if es[i] != 0 || es[i + 1] != 0 || es[i + 2] != 1 {
            i += 1;
            continue;
        }
        let header = es[i + 3];
        match stream_type {
            stream_type::H264 => match header & 0x1F {
                5 | 7 => return true,
                1 => return false,
                _ => {}
            },
            stream_type::H265 => match (header >> 1) & 0x3F {
                16..=21 | 32 | 33 => return true,
                0..=9 => return false,
                _ => {}
            },
            stream_type::MPEG1_VIDEO | stream_type::MPEG2_VIDEO => match header {
                0xB3 | 0xB8 => return true,
                // picture_start_code before any sequence/GOP header.
                0x00 => return false,
                _ => {}
            },
            _ => return false,
        }
        i += 3;
    }
    false
}

/// The elementary stream bytes of a PES packet start (§2.4.3.6, §2.4.3.7).
fn pes_es_data(pes: &[u8]) -> Option<&[u8]> {
    if pes.get(..3)? != [0, 0, 1] {
        return None;
    }
    let stream_id = *pes.get(3)?;
    // Streams without the optional PES header (Table 2-22 exceptions):
    // program_stream_map, padding, private_stream_2, ECM, EMM, DSMCC,
    // ITU-T H.222.1 type E, program_stream_directory.
    if matches!(
        stream_id,
        0xBC | 0xBE | 0xBF | 0xF0 | 0xF1 | 0xF2 | 0xF8 | 0xFF
    ) {
        return pes.get(6..);
    }
    let header_len = usize::from(*pes.get(8)?);
    pes.get(9 + header_len..)
}

/// Result of scanning one chunk of aligned packets.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanResult {
    /// Packet indices (within the chunk) of random-access points, ascending.
    pub random_access: Vec<usize>,
    /// PAT or PMT content changed (or was learned) while scanning this chunk.
    pub psi_changed: bool,
}

/// Learns the program structure of a single-program stream and finds keyframes.
///
/// The first program listed in the PAT with a non-zero program_number is the one
/// followed (§2.4.4.3); its PMT gives the elementary streams. Only sections with a
/// valid CRC_32 and current_next_indicator = 1 are used, so garbage never
/// replaces good tables. Memory is bounded by the section size limits.
#[derive(Debug, Default)]
pub struct Scanner {
    pat_asm: SectionAssembler,
    pmt_asm: SectionAssembler,
    pat_section: Vec<u8>,
    pat_packets: Vec<u8>,
    program: Option<(u16, u16)>,
    pmt_section: Vec<u8>,
    pmt_packets: Vec<u8>,
    pcr_pid: Option<u16>,
    streams: Vec<ElementaryStream>,
    video: Option<ElementaryStream>,
    audio: Option<ElementaryStream>,
    sections: Vec<Section>,
}

impl Scanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans aligned packet data (N × 188 bytes). A trailing partial packet is
    /// ignored, as are packets without the sync byte or with transport_error set.
    pub fn scan(&mut self, chunk: &[u8]) -> ScanResult {
        let mut result = ScanResult::default();
        for (index, bytes) in chunk.chunks_exact(PACKET_LEN).enumerate() {
            let Some(pkt) = Packet::new(bytes) else {
                continue;
            };
            if pkt.transport_error() {
                continue;
            }
            let pid = pkt.pid();
            if pid == PAT_PID {
                result.psi_changed |= self.on_pat_packet(&pkt);
            } else if self.program.is_some_and(|(_, pmt_pid)| pmt_pid == pid) {
                result.psi_changed |= self.on_pmt_packet(&pkt);
            }
            if self.is_random_access(&pkt) {
                result.random_access.push(index);
            }
        }
        result
    }

    /// Whether `pkt` is a random-access point given what is known so far: a packet
    /// of the video PID with payload_unit_start set and either the
    /// random_access_indicator (§2.4.3.5) or a keyframe at the start of its PES
    /// payload ([`pes_starts_random_access`]). Without a video stream, every
    /// PES start of the first audio PID counts.
    pub fn is_random_access(&self, pkt: &Packet<'_>) -> bool {
        if !pkt.payload_unit_start() || pkt.transport_error() {
            return false;
        }
        if let Some(video) = self.video {
            if pkt.pid() != video.pid {
                return false;
            }
            if pkt.random_access_indicator() {
                return true;
            }
            // Scrambled payloads cannot be inspected (§2.4.3.3).
            pkt.scrambling_control() == 0
                && pkt
                    .payload()
                    .is_some_and(|p| pes_starts_random_access(video.stream_type, p))
        } else {
            self.audio.is_some_and(|a| a.pid == pkt.pid())
        }
    }

    /// Copies of the packets carrying the latest valid PAT.
    pub fn pat(&self) -> Option<&[u8]> {
        (!self.pat_packets.is_empty()).then_some(self.pat_packets.as_slice())
    }

    /// Copies of the packets carrying the latest valid PMT of the followed program
    /// (several packets concatenated if the section spans packets).
    pub fn pmt(&self) -> Option<&[u8]> {
        (!self.pmt_packets.is_empty()).then_some(self.pmt_packets.as_slice())
    }

    /// PAT packets followed by PMT packets: what a joiner must receive first.
    pub fn psi_prefix(&self) -> Option<Vec<u8>> {
        let (pat, pmt) = (self.pat()?, self.pmt()?);
        let mut out = Vec::with_capacity(pat.len() + pmt.len());
        out.extend_from_slice(pat);
        out.extend_from_slice(pmt);
        Some(out)
    }

    /// PAT and PMT both known.
    pub fn is_ready(&self) -> bool {
        self.pat().is_some() && self.pmt().is_some()
    }

    /// program_number of the followed program.
    pub fn program_number(&self) -> Option<u16> {
        self.program.map(|(number, _)| number)
    }

    /// PID of the followed program's PMT.
    pub fn pmt_pid(&self) -> Option<u16> {
        self.program.map(|(_, pid)| pid)
    }

    /// PCR_PID from the PMT (`None` if absent or 0x1FFF, i.e. no PCR).
    pub fn pcr_pid(&self) -> Option<u16> {
        self.pcr_pid
    }

    /// Elementary streams of the followed program, in PMT order.
    pub fn streams(&self) -> &[ElementaryStream] {
        &self.streams
    }

    /// The first video stream's PID.
    pub fn video_pid(&self) -> Option<u16> {
        self.video.map(|v| v.pid)
    }

    /// The first video stream's stream_type.
    pub fn video_stream_type(&self) -> Option<u8> {
        self.video.map(|v| v.stream_type)
    }

    /// The first audio stream's PID.
    pub fn audio_pid(&self) -> Option<u16> {
        self.audio.map(|a| a.pid)
    }

    fn on_pat_packet(&mut self, pkt: &Packet<'_>) -> bool {
        let mut sections = std::mem::take(&mut self.sections);
        self.pat_asm.push(pkt, &mut sections);
        let mut changed = false;
        for section in sections.drain(..) {
            changed |= self.on_pat_section(section);
        }
        self.sections = sections;
        changed
    }

    fn on_pat_section(&mut self, section: Section) -> bool {
        let Some(body) = section_body(&section.bytes, TABLE_PAT) else {
            return false;
        };
        // Multi-section PATs are rare; section 0 lists the first programs.
        if section.bytes[6] != 0 {
            return false;
        }
        // Entries: program_number(16), reserved(3), PID(13); number 0 is the
        // network PID (§2.4.4.3).
        let program = body.chunks_exact(4).find_map(|e| {
            let number = u16::from_be_bytes([e[0], e[1]]);
            let pid = (u16::from(e[2] & 0x1F) << 8) | u16::from(e[3]);
            (number != 0).then_some((number, pid))
        });
        let changed = section.bytes != self.pat_section;
        self.pat_packets = section.packets;
        if !changed {
            return false;
        }
        self.pat_section = section.bytes;
        if program != self.program {
            self.program = program;
            self.pmt_asm = SectionAssembler::default();
            self.pmt_section.clear();
            self.pmt_packets.clear();
            self.pcr_pid = None;
            self.streams.clear();
            self.video = None;
            self.audio = None;
        }
        true
    }

    fn on_pmt_packet(&mut self, pkt: &Packet<'_>) -> bool {
        let mut sections = std::mem::take(&mut self.sections);
        self.pmt_asm.push(pkt, &mut sections);
        let mut changed = false;
        for section in sections.drain(..) {
            changed |= self.on_pmt_section(section);
        }
        self.sections = sections;
        changed
    }

    fn on_pmt_section(&mut self, section: Section) -> bool {
        let Some(body) = section_body(&section.bytes, TABLE_PMT) else {
            return false;
        };
        // A PMT PID may carry other programs' maps; keep ours (table_id_extension
        // is program_number, §2.4.4.8).
        let number = u16::from_be_bytes([section.bytes[3], section.bytes[4]]);
        if Some(number) != self.program_number() {
            return false;
        }
        let Some(parsed) = parse_pmt_body(body) else {
            return false;
        };
        let changed = section.bytes != self.pmt_section;
        self.pmt_packets = section.packets;
        if !changed {
            return false;
        }
        self.pmt_section = section.bytes;
        let (pcr_pid, streams) = parsed;
        self.pcr_pid = (pcr_pid != NULL_PID).then_some(pcr_pid);
        self.video = streams
            .iter()
            .copied()
            .find(|s| s.kind == StreamKind::Video);
        self.audio = streams
            .iter()
            .copied()
            .find(|s| s.kind == StreamKind::Audio);
        self.streams = streams;
        true
    }
}

/// PMT body after the 8-byte section header, without CRC (§2.4.4.8):
/// PCR_PID, program_info_length + descriptors, then the ES loop.
fn parse_pmt_body(body: &[u8]) -> Option<(u16, Vec<ElementaryStream>)> {
    let head = body.get(..4)?;
    let pcr_pid = (u16::from(head[0] & 0x1F) << 8) | u16::from(head[1]);
    let info_len = (usize::from(head[2] & 0x0F) << 8) | usize::from(head[3]);
    let mut es = body.get(4 + info_len..)?;
    let mut streams = Vec::new();
    while !es.is_empty() {
        // stream_type(8), reserved(3) elementary_PID(13), reserved(4)
        // ES_info_length(12), descriptors.
        let entry = es.get(..5)?;
        let info_len = (usize::from(entry[3] & 0x0F) << 8) | usize::from(entry[4]);
        let descriptors = es.get(5..5 + info_len)?;
        let stream_type = entry[0];
        streams.push(ElementaryStream {
            pid: (u16::from(entry[1] & 0x1F) << 8) | u16::from(entry[2]),
            stream_type,
            kind: classify(stream_type, descriptors),
        });
        es = &es[5 + info_len..];
    }
    Some((pcr_pid, streams))
}

// ---------------------------------------------------------------------------
// Discontinuity marking
// ---------------------------------------------------------------------------

/// Sets the discontinuity_indicator (§2.4.3.5) in `packet`'s adaptation field.
/// Returns `false` (and leaves the packet unchanged) when the packet is not a
/// valid packet or has no adaptation field flags byte to set it in.
pub fn set_discontinuity(packet: &mut [u8]) -> bool {
    let has_flags = Packet::new(packet).is_some_and(|p| p.adaptation_flags().is_some());
    if has_flags {
        packet[5] |= 0x80;
    }
    has_flags
}

/// An adaptation-field-only packet (adaptation_field_control 0b10,
/// adaptation_field_length 183, only discontinuity_indicator set, stuffing 0xFF).
///
/// Such a packet carries no payload, so it does not advance the continuity
/// counter: `cc` should be the CC of the previous packet of the PID, i.e. one less
/// than the next packet with payload (§2.4.3.3).
pub fn discontinuity_packet(pid: u16, cc: u8) -> [u8; PACKET_LEN] {
    let mut p = [0xFFu8; PACKET_LEN];
    p[0] = SYNC;
    p[1] = ((pid >> 8) as u8) & 0x1F;
    p[2] = pid as u8;
    p[3] = 0x20 | (cc & 0x0F);
    p[4] = 183;
    p[5] = 0x80;
    p
}

#[derive(Clone)]
struct PidSet([u64; 128]);

impl PidSet {
    fn new() -> Self {
        PidSet([0; 128])
    }
    fn insert(&mut self, pid: u16) -> bool {
        let (word, bit) = (usize::from(pid >> 6) & 127, pid & 63);
        let fresh = self.0[word] & (1 << bit) == 0;
        self.0[word] |= 1 << bit;
        fresh
    }
    fn contains(&self, pid: u16) -> bool {
        self.0[usize::from(pid >> 6) & 127] & (1 << (pid & 63)) != 0
    }
}

impl std::fmt::Debug for PidSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pids: Vec<u16> = (0..=NULL_PID).filter(|&p| self.contains(p)).collect();
        f.debug_set().entries(pids).finish()
    }
}

/// Marks the first packet of each PID after a source switch.
///
/// For each target PID, the first packet seen gets the discontinuity_indicator if
/// it has an adaptation field with a flags byte; otherwise an adaptation-only
/// [`discontinuity_packet`] is inserted before it, carrying the CC of that packet
/// minus one so the following packet is a normal increment (§2.4.3.3). On the
/// PCR PID the spec asks that, once set, the indicator stay set up to the packet
/// carrying the first PCR of the new time base (§2.4.3.5); the marker keeps
/// setting it on that PID's packets that have an adaptation field until a PCR
/// appears (packets without one cannot carry it without re-packetising, which is
/// not attempted).
///
/// Packets with adaptation_field_control 0b00 (reserved, discarded by decoders)
/// pass unchanged.
#[derive(Debug, Clone)]
pub struct DiscontinuityMarker {
    /// `None`: every PID in 0x0020..=0x1FFE.
    targets: Option<PidSet>,
    remaining: usize,
    marked: PidSet,
    pcr_pid: Option<u16>,
    pcr_hold: bool,
}

impl DiscontinuityMarker {
    /// Marks `pids` (and `pcr_pid`). With no PIDs at all, marks every PID in
    /// 0x0020..=0x1FFE (everything but the reserved/SI range and null packets).
    pub fn new(pids: &[u16], pcr_pid: Option<u16>) -> Self {
        let all: Vec<u16> = pids.iter().copied().chain(pcr_pid).collect();
        let targets = (!all.is_empty()).then(|| {
            let mut set = PidSet::new();
            for &pid in &all {
                set.insert(pid & NULL_PID);
            }
            set
        });
        let remaining = targets
            .as_ref()
            .map_or(0, |set| (0..=NULL_PID).filter(|&p| set.contains(p)).count());
        DiscontinuityMarker {
            targets,
            remaining,
            marked: PidSet::new(),
            pcr_pid,
            pcr_hold: false,
        }
    }

    /// Marks the elementary streams and PCR PID of the scanner's PMT (every
    /// non-reserved PID if the PMT is not known yet).
    pub fn from_scanner(scanner: &Scanner) -> Self {
        let pids: Vec<u16> = scanner.streams().iter().map(|s| s.pid).collect();
        Self::new(&pids, scanner.pcr_pid())
    }

    /// All target PIDs have been marked (never true when marking every PID); the
    /// caller can stop routing data through the marker.
    pub fn is_done(&self) -> bool {
        self.targets.is_some() && self.remaining == 0 && !self.pcr_hold
    }

    /// Copies aligned packets, marking/inserting as needed. The output is aligned
    /// whenever the input is; bytes that are not whole packets are copied as is.
    pub fn process(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(chunk.len() + 2 * PACKET_LEN);
        let mut packets = chunk.chunks_exact(PACKET_LEN);
        for bytes in &mut packets {
            let mut pkt = [0u8; PACKET_LEN];
            pkt.copy_from_slice(bytes);
            if let Some(insert) = self.mark(&mut pkt) {
                out.extend_from_slice(&insert);
            }
            out.extend_from_slice(&pkt);
        }
        out.extend_from_slice(packets.remainder());
        out.freeze()
    }

    /// Marks one packet in place; returns a packet to insert before it, if any.
    fn mark(&mut self, pkt: &mut [u8; PACKET_LEN]) -> Option<[u8; PACKET_LEN]> {
        let (pid, afc, cc, has_pcr) = {
            let p = Packet::new(&pkt[..])?;
            (
                p.pid(),
                p.adaptation_field_control(),
                p.continuity_counter(),
                p.pcr().is_some(),
            )
        };
        if afc == 0 {
            return None;
        }
        let is_pcr_pid = self.pcr_pid == Some(pid);
        let target = match &self.targets {
            Some(set) => set.contains(pid),
            None => (0x0020..NULL_PID).contains(&pid),
        };
        if !target || self.marked.contains(pid) {
            if is_pcr_pid && self.pcr_hold {
                set_discontinuity(pkt);
                self.pcr_hold = !has_pcr;
            }
            return None;
        }
        self.marked.insert(pid);
        if self.targets.is_some() {
            self.remaining = self.remaining.saturating_sub(1);
        }
        if is_pcr_pid {
            self.pcr_hold = !has_pcr;
        }
        if set_discontinuity(pkt) {
            return None;
        }
        // No flags byte to set: afc is 0b01 (payload only) or an empty adaptation
        // field; insert an adaptation-only packet with CC one below this one.
        Some(discontinuity_packet(pid, cc.wrapping_add(15) & 0x0F))
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/sample.ts");

    fn fixture() -> Vec<u8> {
        std::fs::read(FIXTURE).expect("read sample.ts fixture")
    }

    fn packets(data: &[u8]) -> impl Iterator<Item = Packet<'_>> {
        data.chunks_exact(PACKET_LEN)
            .map(|b| Packet::new(b).expect("aligned packet"))
    }

    /// NAL unit types after start codes in the ES part of a PES start.
    fn h264_nal_types(pes: &[u8]) -> Vec<u8> {
        let es = pes_es_data(pes).unwrap_or(&[]);
        let mut types = Vec::new();
        let mut i = 0;
        while i + 3 < es.len() {
            if es[i..i + 3] == [0, 0, 1] {
                types.push(es[i + 3] & 0x1F);
                i += 3;
            } else {
                i += 1;
            }
        }
        types
    }

    /// PTS in 90 kHz units (§2.4.3.7).
    fn pts(pes: &[u8]) -> Option<u64> {
        if pes.get(7)? & 0x80 == 0 {
            return None;
        }
        let b = pes.get(9..14)?;
        Some(
            (u64::from(b[0] >> 1) & 0x07) << 30
                | u64::from(b[1]) << 22
                | (u64::from(b[2]) >> 1) << 15
                | u64::from(b[3]) << 7
                | u64::from(b[4]) >> 1,
        )
    }

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// Wraps a section into one PUSI packet (pointer_field 0, stuffing 0xFF).
    fn psi_packet(pid: u16, cc: u8, section: &[u8]) -> [u8; PACKET_LEN] {
        let mut p = [0xFFu8; PACKET_LEN];
        p[0] = SYNC;
        p[1] = 0x40 | ((pid >> 8) as u8 & 0x1F);
        p[2] = pid as u8;
        p[3] = 0x10 | (cc & 0x0F);
        p[4] = 0;
        p[5..5 + section.len()].copy_from_slice(section);
        p
    }

    /// Builds a long-form section with a correct CRC.
    fn section(table_id: u8, id_ext: u16, version: u8, body: &[u8]) -> Vec<u8> {
        let len = 5 + body.len() + 4;
        let mut s = vec![
            table_id,
            0xB0 | ((len >> 8) as u8 & 0x0F),
            len as u8,
            (id_ext >> 8) as u8,
            id_ext as u8,
            0xC1 | ((version & 0x1F) << 1),
            0,
            0,
        ];
        s.extend_from_slice(body);
        let crc = crc32_mpeg2(&s);
        s.extend_from_slice(&crc.to_be_bytes());
        s
    }

    fn pat_section(program: u16, pmt_pid: u16) -> Vec<u8> {
        let body = [
            (program >> 8) as u8,
            program as u8,
            0xE0 | (pmt_pid >> 8) as u8,
            pmt_pid as u8,
        ];
        section(TABLE_PAT, 1, 0, &body)
    }

    fn pmt_section(program: u16, pcr_pid: u16, streams: &[(u8, u16)]) -> Vec<u8> {
        let mut body = vec![0xE0 | (pcr_pid >> 8) as u8, pcr_pid as u8, 0xF0, 0];
        for &(st, pid) in streams {
            body.extend_from_slice(&[st, 0xE0 | (pid >> 8) as u8, pid as u8, 0xF0, 0]);
        }
        section(TABLE_PMT, program, 0, &body)
    }

    #[test]
    fn crc_matches_known_value() {
        // CRC-32/MPEG-2 check value for "123456789".
        assert_eq!(crc32_mpeg2(b"123456789"), 0x0376_E6E7);
    }

    #[test]
    fn fixture_is_aligned_packets() {
        let data = fixture();
        assert_eq!(data.len() % PACKET_LEN, 0);
        assert!(data
            .chunks_exact(PACKET_LEN)
            .all(|p| Packet::new(p).is_some()));
    }

    #[test]
    fn scanner_learns_pat_pmt_and_h264() {
        let data = fixture();
        let mut scanner = Scanner::new();
        let first = scanner.scan(&data);
        assert!(first.psi_changed);
        assert!(scanner.is_ready());
        let pat = scanner.pat().expect("PAT");
        let pmt = scanner.pmt().expect("PMT");
        assert_eq!(pat.len() % PACKET_LEN, 0);
        assert_eq!(pmt.len() % PACKET_LEN, 0);
        assert_eq!(Packet::new(pat).map(|p| p.pid()), Some(PAT_PID));
        assert_eq!(Packet::new(pmt).map(|p| p.pid()), scanner.pmt_pid());
        assert_eq!(scanner.video_stream_type(), Some(stream_type::H264));
        let video = scanner.video_pid().expect("video pid");
        assert!(scanner.audio_pid().is_some_and(|a| a != video));
        assert!(scanner.pcr_pid().is_some());
        assert_eq!(scanner.streams().len(), 2);
        let prefix = scanner.psi_prefix().expect("prefix");
        assert_eq!(prefix.len(), pat.len() + pmt.len());
        // Same stream again: tables are unchanged.
        assert!(!scanner.scan(&data).psi_changed);
    }

    #[test]
    fn random_access_points_every_two_seconds_with_idr_or_sps() {
        let data = fixture();
        let mut scanner = Scanner::new();
        let raps = scanner.scan(&data).random_access;
        assert!((4..=6).contains(&raps.len()), "RAPs: {raps:?}");
        let video = scanner.video_pid().expect("video pid");
        let mut times = Vec::new();
        for &i in &raps {
            let pkt = Packet::new(&data[i * PACKET_LEN..]).expect("packet");
            assert_eq!(pkt.pid(), video);
            assert!(pkt.payload_unit_start());
            let payload = pkt.payload().expect("payload");
            let nals = h264_nal_types(payload);
            assert!(
                nals.contains(&5) || nals.contains(&7),
                "packet {i}: NAL types {nals:?}"
            );
            times.push(pts(payload).expect("PTS"));
        }
        for pair in times.windows(2) {
            let delta = pair[1].wrapping_sub(pair[0]);
            // 2 s at 90 kHz, give or take a frame.
            assert!(delta.abs_diff(180_000) <= 3_600, "RAP spacing {delta}");
        }
    }

    #[test]
    fn chunked_scan_finds_same_points() {
        let data = fixture();
        let mut whole = Scanner::new();
        let expected = whole.scan(&data).random_access;
        let mut scanner = Scanner::new();
        let mut found = Vec::new();
        for (n, chunk) in data.chunks(7 * PACKET_LEN).enumerate() {
            found.extend(scanner.scan(chunk).random_access.iter().map(|i| n * 7 + i));
        }
        assert_eq!(found, expected);
    }

    #[test]
    fn audio_only_uses_audio_pes_starts() {
        let mut scanner = Scanner::new();
        let mut data = Vec::new();
        data.extend_from_slice(&psi_packet(0, 0, &pat_section(1, 0x100)));
        data.extend_from_slice(&psi_packet(
            0x100,
            0,
            &pmt_section(1, 0x101, &[(0x0F, 0x101)]),
        ));
        let mut audio = [0xFFu8; PACKET_LEN];
        audio[..4].copy_from_slice(&[SYNC, 0x41, 0x01, 0x10]);
        data.extend_from_slice(&audio);
        audio[1] = 0x01; // continuation, no PUSI
        audio[3] = 0x11;
        data.extend_from_slice(&audio);
        let result = scanner.scan(&data);
        assert!(result.psi_changed);
        assert_eq!(scanner.video_pid(), None);
        assert_eq!(scanner.audio_pid(), Some(0x101));
        assert_eq!(result.random_access, vec![2]);
    }

    #[test]
    fn pmt_spanning_two_packets_is_reassembled() {
        // 60 streams × 5 bytes: a 321-byte section, two packets.
        let streams: Vec<(u8, u16)> = (0..60u16)
            .map(|i| (if i == 0 { 0x24 } else { 0x0F }, 0x200 + i))
            .collect();
        let pmt = pmt_section(7, 0x200, &streams);
        assert!(pmt.len() > 184);
        let mut first = [0u8; PACKET_LEN];
        first[..5].copy_from_slice(&[SYNC, 0x50, 0x00, 0x10, 0]);
        first[5..].copy_from_slice(&pmt[..183]);
        let mut second = [0xFFu8; PACKET_LEN];
        second[..4].copy_from_slice(&[SYNC, 0x10, 0x00, 0x11]);
        second[4..4 + pmt.len() - 183].copy_from_slice(&pmt[183..]);

        let mut scanner = Scanner::new();
        scanner.scan(&psi_packet(0, 0, &pat_section(7, 0x1000)));
        assert!(!scanner.scan(&first).psi_changed);
        assert!(scanner.pmt().is_none());
        assert!(scanner.scan(&second).psi_changed);
        assert_eq!(scanner.streams().len(), 60);
        assert_eq!(scanner.video_pid(), Some(0x200));
        assert_eq!(scanner.video_stream_type(), Some(stream_type::H265));
        let stored = scanner.pmt().expect("PMT");
        assert_eq!(stored.len(), 2 * PACKET_LEN);
        assert_eq!(&stored[..PACKET_LEN], &first[..]);
        assert_eq!(&stored[PACKET_LEN..], &second[..]);

        // A lost continuation packet (CC jump) must not yield a section.
        let mut lost = Scanner::new();
        lost.scan(&psi_packet(0, 0, &pat_section(7, 0x1000)));
        lost.scan(&first);
        second[3] = 0x13;
        lost.scan(&second);
        assert!(lost.pmt().is_none());
    }

    #[test]
    fn bad_crc_and_pat_change() {
        let mut scanner = Scanner::new();
        let mut pat = pat_section(1, 0x100);
        let last = pat.len() - 1;
        pat[last] ^= 1;
        assert!(!scanner.scan(&psi_packet(0, 0, &pat)).psi_changed);
        assert!(scanner.pat().is_none());

        assert!(
            scanner
                .scan(&psi_packet(0, 1, &pat_section(1, 0x100)))
                .psi_changed
        );
        let pmt = psi_packet(0x100, 0, &pmt_section(1, 0x101, &[(0x1B, 0x101)]));
        assert!(scanner.scan(&pmt).psi_changed);
        assert_eq!(scanner.video_pid(), Some(0x101));
        // A new PMT PID drops the old program's streams.
        assert!(
            scanner
                .scan(&psi_packet(0, 2, &pat_section(2, 0x300)))
                .psi_changed
        );
        assert_eq!(scanner.pmt_pid(), Some(0x300));
        assert!(scanner.pmt().is_none());
        assert_eq!(scanner.video_pid(), None);
    }

    #[test]
    fn h265_and_mpeg2_random_access() {
        let pes = |es: &[u8]| {
            let mut v = vec![0, 0, 1, 0xE0, 0, 0, 0x80, 0x80, 5, 0x21, 0, 1, 0, 1];
            v.extend_from_slice(es);
            v
        };
        // H.265: AUD (35), then IDR_W_RADL (19).
        assert!(pes_starts_random_access(
            0x24,
            &pes(&[0, 0, 1, 35 << 1, 1, 0x50, 0, 0, 1, 19 << 1, 1])
        ));
        // H.265: TRAIL_R (1) only.
        assert!(!pes_starts_random_access(
            0x24,
            &pes(&[0, 0, 1, 35 << 1, 1, 0x50, 0, 0, 1, 1 << 1, 1])
        ));
        // H.264: AUD then non-IDR slice.
        assert!(!pes_starts_random_access(
            0x1B,
            &pes(&[0, 0, 0, 1, 9, 0xF0, 0, 0, 1, 0x41, 0x9A])
        ));
        assert!(pes_starts_random_access(
            0x1B,
            &pes(&[0, 0, 0, 1, 9, 0xF0, 0, 0, 1, 0x65, 0x88])
        ));
        // MPEG-2: sequence header.
        assert!(pes_starts_random_access(0x02, &pes(&[0, 0, 1, 0xB3, 0x28])));
        assert!(!pes_starts_random_access(
            0x02,
            &pes(&[0, 0, 1, 0x00, 0x28])
        ));
        assert!(!pes_starts_random_access(
            0x1B,
            &[0, 0, 1, 0xE0, 0, 0, 0x80, 0x80, 200]
        ));
    }

    #[test]
    fn packet_accessors_on_malformed_lengths() {
        let mut p = [0u8; PACKET_LEN];
        p[..6].copy_from_slice(&[SYNC, 0x41, 0x00, 0x35, 200, 0xC0]);
        let pkt = Packet::new(&p).expect("packet");
        assert!(pkt.has_adaptation() && pkt.has_payload());
        assert_eq!(pkt.adaptation_field(), None);
        assert_eq!(pkt.payload(), None);
        assert!(!pkt.random_access_indicator());
        assert_eq!(pkt.continuity_counter(), 5);
        assert_eq!(pkt.pid(), 0x100);
        p[4] = 183; // legal only without a payload
        assert_eq!(Packet::new(&p).and_then(|p| p.payload()), None);
        p[3] = 0x25;
        let pkt = Packet::new(&p).expect("packet");
        assert!(pkt.random_access_indicator() && pkt.discontinuity_indicator());
        assert_eq!(pkt.payload(), None);
        assert!(Packet::new(&p[..187]).is_none());
        p[0] = 0;
        assert!(Packet::new(&p).is_none());
    }

    #[test]
    fn pcr_is_decoded() {
        let mut p = [0xFFu8; PACKET_LEN];
        // base = 0x1_0000_0001, ext = 0x101
        p[..12].copy_from_slice(&[
            SYNC, 0x01, 0x00, 0x20, 183, 0x10, 0x80, 0, 0, 0x00, 0x81, 0x01,
        ]);
        let pkt = Packet::new(&p).expect("packet");
        assert_eq!(pkt.pcr(), Some(0x1_0000_0001 * 300 + 0x101));
    }

    fn push_in_pieces(aligner: &mut Aligner, data: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pos = 0;
        let mut k = 0;
        while pos < data.len() {
            let n = sizes[k % sizes.len()].min(data.len() - pos);
            let got = aligner.push(&data[pos..pos + n]);
            assert_eq!(got.len() % PACKET_LEN, 0);
            out.extend_from_slice(&got);
            pos += n;
            k += 1;
        }
        out
    }

    #[test]
    fn aligner_odd_pieces_reproduce_file() {
        let data = fixture();
        let mut aligner = Aligner::new();
        let out = push_in_pieces(
            &mut aligner,
            &data,
            &[1, 7, 1000, 187, 189, 188, 376, 5000, 3, 65536],
        );
        assert_eq!(out.len(), data.len());
        assert!(out == data);
        assert_eq!(aligner.dropped(), 0);
        assert_eq!(aligner.pending(), 0);
    }

    #[test]
    fn aligner_push_bytes_is_zero_copy_when_aligned() {
        let data = Bytes::from(fixture());
        let mut aligner = Aligner::new();
        let first = aligner.push_bytes(data.slice(..PACKET_LEN * 10 + 50));
        assert_eq!(first.len(), PACKET_LEN * 10);
        assert_eq!(first.as_ptr(), data.as_ptr(), "no copy for aligned input");
        let mut out = first.to_vec();
        let mut pos = PACKET_LEN * 10 + 50;
        for n in [7usize, 138, 4000, 188 * 20, 1].iter().cycle() {
            if pos >= data.len() {
                break;
            }
            let end = (pos + n).min(data.len());
            out.extend_from_slice(&aligner.push_bytes(data.slice(pos..end)));
            pos = end;
        }
        assert!(out == data);
        assert_eq!(aligner.dropped(), 0);
    }

    #[test]
    fn aligner_resyncs_after_garbage() {
        let data = fixture();
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let garbage: Vec<u8> = rng
            .bytes(333)
            .into_iter()
            .map(|b| if b == SYNC { 0 } else { b })
            .collect();

        // Garbage at the start (with a false sync byte) and at a packet boundary.
        let cut = 1000 * PACKET_LEN;
        let mut noisy = vec![SYNC, 1, 2, 3];
        noisy.extend_from_slice(&garbage[..50]);
        noisy.extend_from_slice(&data[..cut]);
        noisy.extend_from_slice(&garbage);
        noisy.extend_from_slice(&data[cut..]);
        let mut aligner = Aligner::new();
        let out = push_in_pieces(&mut aligner, &noisy, &[4096, 1, 777]);
        assert!(out == data, "clean packets are kept, garbage removed");
        assert_eq!(aligner.dropped(), (4 + 50 + garbage.len()) as u64);

        // Garbage inside a packet: that packet is lost/corrupt, the rest recovers.
        let cut = 2000 * PACKET_LEN + 60;
        let mut noisy = data[..cut].to_vec();
        noisy.extend_from_slice(&garbage[..100]);
        noisy.extend_from_slice(&data[cut..]);
        let mut aligner = Aligner::new();
        let out = push_in_pieces(&mut aligner, &noisy, &[1316]);
        assert_eq!(out.len() % PACKET_LEN, 0);
        assert!(out.chunks_exact(PACKET_LEN).all(|p| p[0] == SYNC));
        assert!(aligner.dropped() > 0);
        let tail = &data[2001 * PACKET_LEN..];
        assert!(out.ends_with(tail));
        assert!(out.len() >= data.len() - 2 * PACKET_LEN);
    }

    #[test]
    fn aligner_bounds_memory_on_noise() {
        let mut rng = XorShift(42);
        let mut aligner = Aligner::new();
        for _ in 0..64 {
            let noise: Vec<u8> = rng.bytes(16 * 1024).into_iter().map(|b| b & 0x3F).collect();
            assert!(aligner.push(&noise).is_empty());
            assert!(aligner.pending() <= 2 * PACKET_LEN);
        }
        assert_eq!(aligner.dropped(), 64 * 16 * 1024 - aligner.pending() as u64);
    }

    #[test]
    fn scanner_survives_random_bytes() {
        let mut rng = XorShift(0xDEAD_BEEF_CAFE_F00D);
        let mut data = rng.bytes(1 << 20);
        let mut scanner = Scanner::new();
        let mut aligner = Aligner::new();
        let mut marker = DiscontinuityMarker::new(&[], None);
        // Raw noise, odd chunk sizes.
        for chunk in data.chunks(1000) {
            scanner.scan(chunk);
            let aligned = aligner.push(chunk);
            scanner.scan(&aligned);
            marker.process(&aligned);
        }
        // Noise with valid sync bytes and mostly PSI/low PIDs, to reach the parsers.
        data.truncate(data.len() / PACKET_LEN * PACKET_LEN);
        for (i, p) in data.chunks_exact_mut(PACKET_LEN).enumerate() {
            p[0] = SYNC;
            if i % 2 == 0 {
                p[1] &= 0x40;
                p[2] = if i % 4 == 0 { 0 } else { 0x10 };
            }
            if i % 8 == 0 {
                p[5] = 0; // pointer_field 0 when payload-only
            }
        }
        let mut scanner = Scanner::new();
        for chunk in data.chunks(PACKET_LEN * 13) {
            let r = scanner.scan(chunk);
            assert!(r
                .random_access
                .iter()
                .all(|&i| i < chunk.len() / PACKET_LEN));
            for p in packets(chunk) {
                let _ = (
                    p.payload(),
                    p.pcr(),
                    p.adaptation_flags(),
                    p.random_access_indicator(),
                );
            }
            let out = marker.process(chunk);
            assert_eq!(out.len() % PACKET_LEN, 0);
        }
    }

    #[test]
    fn scanner_survives_mutated_fixture() {
        let data = fixture();
        let mut rng = XorShift(7);
        for _ in 0..20 {
            let mut copy = data[..400 * PACKET_LEN].to_vec();
            for _ in 0..2000 {
                let at = (rng.next() as usize) % copy.len();
                copy[at] = rng.next() as u8;
            }
            let mut scanner = Scanner::new();
            scanner.scan(&copy);
            let mut marker = DiscontinuityMarker::from_scanner(&scanner);
            let _ = marker.process(&copy);
        }
    }

    #[test]
    fn discontinuity_marker_flags_first_packet_of_each_pid() {
        let data = fixture();
        let mut scanner = Scanner::new();
        let raps = scanner.scan(&data).random_access;
        let from = raps[1] * PACKET_LEN;
        let mut marker = DiscontinuityMarker::from_scanner(&scanner);
        assert!(!marker.is_done());
        let mut out = Vec::new();
        for chunk in data[from..].chunks(PACKET_LEN * 50) {
            out.extend_from_slice(&marker.process(chunk));
        }
        assert!(marker.is_done());
        assert_eq!(out.len() % PACKET_LEN, 0);
        let inserted = (out.len() - (data.len() - from)) / PACKET_LEN;
        assert!(inserted <= scanner.streams().len());

        let targets: Vec<u16> = scanner.streams().iter().map(|s| s.pid).collect();
        let mut seen: Vec<u16> = Vec::new();
        let mut last_cc: Vec<(u16, u8)> = Vec::new();
        let mut inserted_seen = 0;
        for pkt in packets(&out) {
            let pid = pkt.pid();
            if targets.contains(&pid) && !seen.contains(&pid) {
                seen.push(pid);
                assert!(
                    pkt.discontinuity_indicator(),
                    "first packet of PID {pid:#x}"
                );
                if !pkt.has_payload() {
                    inserted_seen += 1;
                    assert_eq!(pkt.adaptation_field().map(<[u8]>::len), Some(183));
                    assert_eq!(pkt.payload(), None);
                }
            }
            // CC: adaptation-only packets repeat the CC, payload packets increment.
            if let Some(entry) = last_cc.iter_mut().find(|(p, _)| *p == pid) {
                let expected = if pkt.has_payload() {
                    (entry.1 + 1) & 0x0F
                } else {
                    entry.1
                };
                if targets.contains(&pid) {
                    assert_eq!(pkt.continuity_counter(), expected, "PID {pid:#x}");
                }
                entry.1 = pkt.continuity_counter();
            } else {
                last_cc.push((pid, pkt.continuity_counter()));
            }
        }
        assert_eq!(seen.len(), targets.len());
        assert_eq!(inserted_seen, inserted);
        // Output still scans: same tables, RAP still found.
        let mut rescan = Scanner::new();
        rescan.scan(&data[..PACKET_LEN * 3]);
        assert!(!rescan.scan(&out).random_access.is_empty());
    }

    #[test]
    fn discontinuity_marker_inserts_and_holds_on_pcr_pid() {
        // PCR PID 0x100: first packet payload-only → inserted packet; second has an
        // adaptation field without PCR → flagged (hold); third has a PCR → flagged,
        // hold ends; fourth untouched.
        let mut p1 = [0xAAu8; PACKET_LEN];
        p1[..4].copy_from_slice(&[SYNC, 0x41, 0x00, 0x13]);
        let mut p2 = [0xAAu8; PACKET_LEN];
        p2[..6].copy_from_slice(&[SYNC, 0x01, 0x00, 0x34, 1, 0x00]);
        let mut p3 = [0xAAu8; PACKET_LEN];
        p3[..12].copy_from_slice(&[SYNC, 0x01, 0x00, 0x35, 7, 0x10, 0, 0, 0, 0, 0, 0]);
        let mut p4 = p2;
        p4[3] = 0x36;
        let chunk = [p1, p2, p3, p4].concat();
        let mut marker = DiscontinuityMarker::new(&[0x100], Some(0x100));
        let out = marker.process(&chunk);
        assert_eq!(out.len(), 5 * PACKET_LEN);
        let pk: Vec<Packet<'_>> = packets(&out).collect();
        assert_eq!(&out[..PACKET_LEN], &discontinuity_packet(0x100, 2)[..]);
        assert_eq!(pk[0].continuity_counter(), 2);
        assert!(pk[0].discontinuity_indicator() && !pk[0].has_payload());
        assert_eq!(pk[1].as_bytes(), &p1[..]);
        assert!(pk[2].discontinuity_indicator());
        assert!(pk[3].discontinuity_indicator());
        assert!(!pk[4].discontinuity_indicator());
        assert!(marker.is_done());

        // Non-target PIDs and CC wrap.
        let mut marker = DiscontinuityMarker::new(&[0x101], None);
        let mut other = p1;
        other[3] = 0x10; // CC 0 → inserted CC 15
        let out = marker.process(&[p1, other].concat());
        assert_eq!(out.len(), 2 * PACKET_LEN);
        let mut marker = DiscontinuityMarker::new(&[0x100], None);
        let out = marker.process(&other);
        assert_eq!(Packet::new(&out).map(|p| p.continuity_counter()), Some(15));
    }

    #[test]
    fn set_discontinuity_only_with_flags_byte() {
        let mut p = [0u8; PACKET_LEN];
        p[..5].copy_from_slice(&[SYNC, 0x01, 0x00, 0x10, 0]);
        assert!(!set_discontinuity(&mut p));
        p[3] = 0x30; // adaptation field of length 0: no flags byte
        assert!(!set_discontinuity(&mut p));
        p[4] = 1;
        assert!(set_discontinuity(&mut p));
        assert_eq!(p[5], 0x80);
        assert!(!set_discontinuity(&mut p[..100]));
    }
}
