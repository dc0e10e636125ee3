//! A live channel's bytes in an append-only in-memory file, so viewers are
//! written with sendfile(2): the kernel takes the file's pages by reference
//! instead of copying every byte from user space once per viewer. At a
//! thousand viewers that copy is the largest cost the proxy controls (the
//! fan-out bench measured 0.44–0.53 core with write() and 0.30–0.36 with
//! sendfile() on loopback).
//!
//! The spool is the channel's ring (`hub::ring`): the only copy of its bytes.
//! Pages that were written are never written again: a socket may still hold
//! them after sendfile returns. Data that left the ring is released by
//! punching holes, once no viewer holds a [`Span`] of it: a span pins its
//! start while it lives (a viewer is sending it), so a viewer that was handed
//! a span just before an eviction still sends the right bytes. Linux only;
//! elsewhere [`Spool::new`] fails and the ring keeps `Bytes`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::Interest;
use tokio::net::TcpStream;

const PAGE: u64 = 4096;

/// A channel's spool file.
#[derive(Debug)]
pub struct Spool {
    file: File,
    /// Everything below this (page-aligned) offset is released.
    released: AtomicU64,
    /// Start offsets of live spans (how many each): not released.
    pins: parking_lot::Mutex<BTreeMap<u64, usize>>,
}

/// Bytes of a spool to send: `[off, off + len)`. Kept readable while it lives.
#[derive(Debug)]
pub struct Span {
    spool: Arc<Spool>,
    off: u64,
    len: usize,
}

impl Clone for Span {
    fn clone(&self) -> Self {
        self.spool.span(self.off, self.len)
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        self.spool.unpin(self.off);
    }
}

impl Span {
    pub fn off(&self) -> u64 {
        self.off
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The span's bytes, copied out (for a reader that is not a socket).
    pub fn bytes(&self) -> io::Result<bytes::Bytes> {
        let mut buf = vec![0u8; self.len];
        self.spool.read_at(&mut buf, self.off)?;
        Ok(bytes::Bytes::from(buf))
    }

    /// sendfile() of the whole span to `sock`, waiting while it is full.
    pub async fn send(&self, sock: &TcpStream) -> io::Result<()> {
        let mut done = 0;
        while done < self.len {
            sock.writable().await?;
            let sent = sock.try_io(Interest::WRITABLE, || {
                self.spool
                    .send_to(sock, self.off + done as u64, self.len - done)
            });
            match sent {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Spool {
    #[cfg(target_os = "linux")]
    pub fn new() -> io::Result<Spool> {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(c"m3u-edge-live", MFdFlags::MFD_CLOEXEC)?;
        Ok(Spool {
            file: File::from(fd),
            released: AtomicU64::new(0),
            pins: parking_lot::Mutex::new(BTreeMap::new()),
        })
    }

    /// A span of `[off, off + len)`, kept readable until it is dropped.
    pub fn span(self: &Arc<Self>, off: u64, len: usize) -> Span {
        *self.pins.lock().entry(off).or_insert(0) += 1;
        Span {
            spool: self.clone(),
            off,
            len,
        }
    }

    fn unpin(&self, off: u64) {
        let mut pins = self.pins.lock();
        if let Some(n) = pins.get_mut(&off) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&off);
            }
        }
    }

    /// `to`, or the start of the oldest live span below it: how far data
    /// may be released.
    pub fn unpinned_below(&self, to: u64) -> u64 {
        self.pins
            .lock()
            .keys()
            .next()
            .map_or(to, |&oldest| oldest.min(to))
    }

    #[cfg(not(target_os = "linux"))]
    pub fn new() -> io::Result<Spool> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Writes `data` at `off` (the ring's running byte count).
    pub fn write_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, off)
    }

    /// Frees the pages wholly below `to`; the file keeps its size.
    pub fn release_before(&self, to: u64) -> io::Result<()> {
        let start = self.released.load(Ordering::Relaxed);
        let end = to / PAGE * PAGE;
        if end <= start {
            return Ok(());
        }
        self.punch(start, end)?;
        self.released.store(end, Ordering::Relaxed);
        Ok(())
    }

    #[cfg(target_os = "linux")]
    fn punch(&self, start: u64, end: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let too_big = |_| io::Error::from(io::ErrorKind::InvalidInput);
        fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            i64::try_from(start).map_err(too_big)?,
            i64::try_from(end - start).map_err(too_big)?,
        )?;
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn punch(&self, _start: u64, _end: u64) -> io::Result<()> {
        Ok(())
    }

    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, off)
    }

    /// Bytes of the file still held in memory (for tests and stats).
    #[cfg(target_os = "linux")]
    pub fn resident_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    #[cfg(target_os = "linux")]
    fn send_to(&self, sock: impl AsFd, off: u64, len: usize) -> io::Result<usize> {
        let mut off =
            i64::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(nix::sys::sendfile::sendfile(
            sock,
            &self.file,
            Some(&mut off),
            len,
        )?)
    }

    #[cfg(not(target_os = "linux"))]
    fn send_to(&self, _sock: impl AsFd, _off: u64, _len: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}
