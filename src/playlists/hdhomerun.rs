//! HDHomeRun emulation: the documents Plex, Emby and Jellyfin read from a
//! network tuner (SiliconDust's HTTP API: `discover.json`, `lineup.json`,
//! `lineup_status.json`, and the UPnP `device.xml` SSDP points at).
//!
//! Field names are SiliconDust's, as a real HDHomeRun answers them:
//! `FriendlyName, ModelNumber, FirmwareName, FirmwareVersion, DeviceID,
//! DeviceAuth, BaseURL, LineupURL, TunerCount`; lineup entries
//! `GuideNumber, GuideName, URL`. The model is an HDTC-2US, the one other
//! emulators (Threadfin, xTeVe, tvhProxy) report, which Plex accepts as a
//! "transcoding" tuner that can take any stream.

use md5::{Digest, Md5};
use serde_json::{json, Value};

use super::export::Channel;
use crate::app::App;
use crate::config::Config;

const MODEL: &str = "HDTC-2US";
const FIRMWARE_NAME: &str = "hdhomeruntc_atsc";
const FIRMWARE_VERSION: &str = "20200101";
/// Tuners reported when no provider has `max_connections`.
const DEFAULT_TUNERS: u32 = 4;

/// SiliconDust's device id checksum (libhdhomerun
/// `hdhomerun_discover_validate_device_id`): clients may refuse ids whose
/// nibbles do not XOR to zero through this table.
const CHECKSUM_TABLE: [u32; 16] = [
    0xA, 0x5, 0xF, 0x6, 0x7, 0xC, 0x1, 0xB, 0x9, 0x2, 0x8, 0xD, 0x4, 0x3, 0xE, 0x0,
];

fn checksum(id: u32) -> u32 {
    let n = |shift: u32| (id >> shift) & 0xF;
    CHECKSUM_TABLE[n(28) as usize]
        ^ n(24)
        ^ CHECKSUM_TABLE[n(20) as usize]
        ^ n(16)
        ^ CHECKSUM_TABLE[n(12) as usize]
        ^ n(8)
        ^ CHECKSUM_TABLE[n(4) as usize]
        ^ n(0)
}

/// A device id that stays the same across restarts of this node (derived
/// from its listen address and state file) and passes the checksum.
pub fn derive_device_id(config: &Config) -> String {
    let seed = format!(
        "{}|{}",
        config.server.listen,
        config.server.state_file.display()
    );
    let h = Md5::digest(seed.as_bytes());
    // The last nibble is chosen so the checksum comes out zero.
    let high = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) & 0xFFFF_FFF0;
    let id = high | checksum(high);
    format!("{id:08X}")
}

/// Tuners: `hdhomerun.tuner_count`, else the providers' `max_connections`
/// summed, else 4.
pub fn tuner_count(app: &App) -> u32 {
    if let Some(n) = app.config.hdhomerun.tuner_count {
        return n;
    }
    let sum: u32 = app
        .config
        .providers
        .iter()
        .filter_map(|p| p.max_connections)
        .sum();
    if sum == 0 {
        DEFAULT_TUNERS
    } else {
        sum
    }
}

/// `discover.json`. `base` is where the other documents are (with the
/// path token, if any); `streams` is the proxy's base for stream URLs.
pub fn discover(app: &App, base: &str) -> Value {
    let h = &app.config.hdhomerun;
    json!({
        "FriendlyName": h.friendly_name,
        "Manufacturer": "Silicondust",
        "ManufacturerURL": "https://www.silicondust.com/",
        "ModelNumber": MODEL,
        "FirmwareName": FIRMWARE_NAME,
        "FirmwareVersion": FIRMWARE_VERSION,
        "DeviceID": app.playlists.device_id,
        "DeviceAuth": "m3u-edge",
        "BaseURL": base,
        "LineupURL": format!("{base}/lineup.json"),
        "TunerCount": tuner_count(app),
    })
}

/// `lineup.json`: GuideNumber is the channel's `tvg-chno` when it has one
/// nobody else uses, else its position (1-based) in the list.
pub fn lineup(channels: &[Channel], streams_base: &str) -> Value {
    let mut used = std::collections::HashSet::new();
    let numbers: Vec<String> = channels
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let n = c.chno.trim();
            if !n.is_empty() && used.insert(n.to_owned()) {
                n.to_owned()
            } else {
                (i + 1).to_string()
            }
        })
        .collect();
    Value::Array(
        channels
            .iter()
            .zip(numbers)
            .map(|(c, n)| {
                json!({
                    "GuideNumber": n,
                    "GuideName": c.name,
                    "URL": c.url(streams_base),
                })
            })
            .collect(),
    )
}

pub fn lineup_status() -> Value {
    json!({
        "ScanInProgress": 0,
        "ScanPossible": 1,
        "Source": "Cable",
        "SourceList": ["Cable"],
    })
}

/// `device.xml`: the UPnP device description SSDP answers point at.
pub fn device_xml(app: &App, base: &str) -> String {
    let h = &app.config.hdhomerun;
    let id = &app.playlists.device_id;
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
  <specVersion><major>1</major><minor>0</minor></specVersion>
  <URLBase>{base}</URLBase>
  <device>
    <deviceType>urn:schemas-upnp-org:device:MediaServer:1</deviceType>
    <friendlyName>{name}</friendlyName>
    <manufacturer>Silicondust</manufacturer>
    <modelName>{MODEL}</modelName>
    <modelNumber>{MODEL}</modelNumber>
    <serialNumber>{id}</serialNumber>
    <UDN>uuid:{id}</UDN>
  </device>
</root>
"#,
        base = xml_escape(base),
        name = xml_escape(&h.friendly_name),
    )
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_pass_the_checksum_and_are_stable() {
        // One nibble off fails (what the checksum is for).
        assert_ne!(checksum(0x1040_76F1 ^ 0x10), checksum(0x1040_76F1));
        let c = Config::default();
        let a = derive_device_id(&c);
        assert_eq!(a, derive_device_id(&c));
        let id = u32::from_str_radix(&a, 16).unwrap();
        assert_eq!(checksum(id), 0, "{a}");
        let mut other = Config::default();
        other.server.state_file = "/var/lib/other.json".into();
        assert_ne!(a, derive_device_id(&other));
    }

    #[test]
    fn guide_numbers_from_chno_else_position() {
        let ch = |id: &str, chno: &str| Channel {
            id: id.into(),
            name: id.to_uppercase(),
            group: String::new(),
            tvg_id: String::new(),
            tvg_name: String::new(),
            tvg_logo: String::new(),
            chno: chno.into(),
            hls: false,
        };
        let v = lineup(&[ch("a", "101"), ch("b", ""), ch("c", "101")], "http://h");
        assert_eq!(v[0]["GuideNumber"], "101");
        assert_eq!(v[1]["GuideNumber"], "2");
        assert_eq!(v[2]["GuideNumber"], "3");
        assert_eq!(v[0]["GuideName"], "A");
        assert_eq!(v[1]["URL"], "http://h/stream/b");
    }
}
