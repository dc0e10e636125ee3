//! SSDP (UPnP discovery) on UDP 1900, with `hdhomerun.ssdp: true`: Plex,
//! Emby and Jellyfin send `M-SEARCH` to 239.255.255.250:1900 and list the
//! devices that answer; the answer points at our `device.xml`.
//!
//! The socket is bound with SO_REUSEADDR, since other UPnP services
//! (minidlna, Plex itself) listen on 1900 too; every socket in the
//! multicast group gets each search. Only searches are answered (no
//! periodic NOTIFY): a client looking for tuners always searches.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use percent_encoding::utf8_percent_encode;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::app::App;

const SSDP_ADDR: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
const SSDP_PORT: u16 = 1900;
const MEDIA_SERVER: &str = "urn:schemas-upnp-org:device:MediaServer:1";
const ROOT_DEVICE: &str = "upnp:rootdevice";

/// The search targets a search with `ST: st` gets answers for.
pub fn targets(st: &str, device_id: &str) -> Vec<String> {
    let st = st.trim();
    if st.eq_ignore_ascii_case("ssdp:all") {
        return vec![
            ROOT_DEVICE.to_owned(),
            format!("uuid:{device_id}"),
            MEDIA_SERVER.to_owned(),
        ];
    }
    let ours = [ROOT_DEVICE, MEDIA_SERVER];
    if ours.iter().any(|o| o.eq_ignore_ascii_case(st))
        || st.eq_ignore_ascii_case(&format!("uuid:{device_id}"))
    {
        return vec![st.to_owned()];
    }
    Vec::new()
}

/// The `ST` of an `M-SEARCH` datagram, or `None` for anything else.
pub fn search_target(datagram: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(datagram).ok()?;
    let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
    let first = lines.next()?.trim();
    if !first.to_ascii_uppercase().starts_with("M-SEARCH ") {
        return None;
    }
    lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("st")
            .then(|| v.trim().to_owned())
    })
}

/// One answer datagram.
pub fn answer(location: &str, st: &str, device_id: &str) -> String {
    let usn = if st.starts_with("uuid:") {
        st.to_owned()
    } else {
        format!("uuid:{device_id}::{st}")
    };
    format!(
        "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=1800\r\nEXT:\r\nLOCATION: {location}\r\n\
         SERVER: Linux/1.0 UPnP/1.0 m3u-edge/{}\r\nST: {st}\r\nUSN: {usn}\r\n\r\n",
        crate::app::VERSION
    )
}

pub struct SsdpService {
    pub app: Arc<App>,
}

impl SsdpService {
    /// `device.xml` as the searcher at `peer` reaches it.
    fn location(&self, peer: SocketAddr) -> String {
        let config = &self.app.config;
        let base = match &config.server.public_url {
            Some(u) => format!(
                "{}{}",
                u.as_str().trim_end_matches('/'),
                config.server.root_path
            ),
            None => {
                let listen = config.server.listen;
                let ip = if listen.ip().is_unspecified() {
                    local_ip_toward(peer).unwrap_or(listen.ip())
                } else {
                    listen.ip()
                };
                format!("http://{}", SocketAddr::new(ip, listen.port()))
            }
        };
        // Only the players' token is announced: the LAN hears it.
        match &config.playlist.token {
            Some(t) => format!(
                "{base}/hdhr/{}/device.xml",
                utf8_percent_encode(t, super::PATH_SEGMENT)
            ),
            None => format!("{base}/device.xml"),
        }
    }
}

/// The address of ours the kernel would send to `peer` from.
fn local_ip_toward(peer: SocketAddr) -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    s.connect(peer).ok()?;
    Some(s.local_addr().ok()?.ip())
}

fn bind() -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, SSDP_PORT)).into())?;
    if let Err(e) = s.join_multicast_v4(&SSDP_ADDR, &Ipv4Addr::UNSPECIFIED) {
        // No multicast route (a container without a LAN): searches sent
        // straight to this host are still answered.
        tracing::warn!(error = %e, "hdhomerun.ssdp: cannot join the SSDP multicast group; answering unicast searches only");
    }
    s.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(s.into())
}

#[async_trait]
impl BackgroundService for SsdpService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let h = &self.app.config.hdhomerun;
        if !h.enabled || !h.ssdp {
            return;
        }
        if self.app.config.playlist.token.is_none() && self.app.config.api.token.is_some() {
            tracing::warn!("hdhomerun.ssdp: set playlist.token, or discovered tuners cannot read device.xml (the management token is never announced)");
        }
        let sock = match bind() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "hdhomerun.ssdp: cannot listen on UDP 1900; discovery is off (add the tuner by address)");
                return;
            }
        };
        tracing::info!(device_id = %self.app.playlists.device_id, "SSDP discovery answered on UDP 1900");
        let id = self.app.playlists.device_id.clone();
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, peer) = tokio::select! {
                r = sock.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(_) => continue,
                },
                _ = shutdown.changed() => return,
            };
            let Some(st) = search_target(&buf[..n]) else {
                continue;
            };
            let location = self.location(peer);
            for target in targets(&st, &id) {
                let msg = answer(&location, &target, &id);
                let _ = sock.send_to(msg.as_bytes(), peer).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_searches_for_us_only() {
        let search = b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\nST: urn:schemas-upnp-org:device:MediaServer:1\r\n\r\n";
        let st = search_target(search).unwrap();
        assert_eq!(targets(&st, "1234567A"), vec![MEDIA_SERVER.to_owned()]);
        assert_eq!(targets("ssdp:all", "1234567A").len(), 3);
        assert!(targets("urn:dial-multiscreen-org:service:dial:1", "1234567A").is_empty());
        assert_eq!(
            search_target(b"NOTIFY * HTTP/1.1\r\nST: ssdp:all\r\n\r\n"),
            None
        );
        assert_eq!(search_target(&[0xff, 0xfe]), None);
        let a = answer("http://10.0.0.2:8085/device.xml", MEDIA_SERVER, "1234567A");
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(a.contains("\r\nLOCATION: http://10.0.0.2:8085/device.xml\r\n"));
        assert!(a.contains(&format!("\r\nUSN: uuid:1234567A::{MEDIA_SERVER}\r\n")));
        assert!(a.ends_with("\r\n\r\n"));
    }
}
