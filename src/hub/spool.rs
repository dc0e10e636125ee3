//! A live channel's bytes in an append-only in-memory file, so viewers are
//! written with sendfile(2): the kernel takes the file's pages by reference
//! instead of copying every byte from user space once per viewer. At a
//! thousand viewers that copy is the largest cost the proxy controls (the
//! fan-out bench measured 0.44–0.53 core with write() and 0.30–0.36 with
//! sendfile() on loopback).
//!
//! Pages that were written are never written again: a socket may still hold
//! them after sendfile returns. Old data is released by punching holes, after
//! a grace period longer than any viewer may take to send a span it was
//! handed (`hub::ring` keeps that schedule). Linux only; elsewhere
//! [`Spool::new`] fails and the ring hands out `Bytes`.

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
}

/// Bytes of a spool to send: `[off, off + len)`.
#[derive(Debug, Clone)]
pub struct Span {
    pub spool: Arc<Spool>,
    pub off: u64,
    pub len: usize,
}

impl Span {
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
        })
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
