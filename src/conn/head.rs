//! Reads one request header off a client connection before Pingora does, so
//! that a header must arrive whole, small and on time.
//!
//! Pingora 0.9 times out each read (60 s) but not the header as a whole, so a
//! client trickling a byte every 59 s holds its connection forever; and it
//! accepts up to 1 MiB of header per connection. Here the whole header has a
//! deadline, a byte cap and a line cap. The bytes read are handed back to
//! the stream unchanged (`rewind`), so Pingora parses exactly what came.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// What came of reading a request header.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// Every byte read so far; it ends a header (`\r\n\r\n` or `\n\n`) and
    /// may run on into a body or a pipelined request.
    Complete(Vec<u8>),
    /// The client closed, or went away, before sending a byte.
    Closed,
    /// Nothing came within the idle time (no byte of a new request).
    Idle,
    /// Part of a header came, but not all of it within the deadline.
    TimedOut,
    /// The client closed in the middle of a header.
    Truncated,
    /// The header is larger than the byte cap.
    TooLarge,
    /// The header has more lines than the line cap.
    TooManyLines,
}

/// Limits for one header read.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// How long to wait for the first byte (a new connection's request, or
    /// the next request on a kept-alive one).
    pub idle: Duration,
    /// How long the whole header may take from its first byte.
    pub deadline: Duration,
    pub max_bytes: usize,
    pub max_lines: usize,
}

/// First allocation for a header: most requests fit (a playlist poll is
/// ~300 bytes); larger ones grow the buffer up to `max_bytes`.
const INITIAL: usize = 2048;

/// Reads until the end of a header or a limit.
pub async fn read<R: AsyncRead + Unpin>(io: &mut R, limits: HeadLimits) -> Head {
    let mut buf: Vec<u8> = Vec::with_capacity(INITIAL.min(limits.max_bytes + 1));
    // The first byte may take up to `idle`; from then on, the rest of the
    // header has `deadline`.
    match tokio::time::timeout(limits.idle, io.read_buf(&mut buf)).await {
        Err(_) => return Head::Idle,
        Ok(Err(_)) | Ok(Ok(0)) => return Head::Closed,
        Ok(Ok(_)) => {}
    }
    let until = tokio::time::Instant::now() + limits.deadline;
    let mut scanned = 0;
    loop {
        match scan(&buf, scanned, limits) {
            Scan::End => return Head::Complete(buf),
            Scan::Over(why) => return why,
            Scan::More(next) => scanned = next,
        }
        if buf.len() > limits.max_bytes {
            return Head::TooLarge;
        }
        // Never read past the cap: a client cannot make us buffer more.
        let room = limits.max_bytes + 1 - buf.len();
        buf.reserve(room.min(INITIAL));
        let mut limited = (&mut *io).take(room as u64);
        match tokio::time::timeout_at(until, limited.read_buf(&mut buf)).await {
            Err(_) => return Head::TimedOut,
            Ok(Err(_)) | Ok(Ok(0)) => return Head::Truncated,
            Ok(Ok(_)) => {}
        }
    }
}

/// Where the first request of `bytes` (a complete header, maybe more) ends,
/// when it has no body and more bytes follow it: pipelined requests. None
/// when the bytes after the header may be its body (Pingora reads those).
pub fn pipelined_split(bytes: &[u8]) -> Option<usize> {
    let end = header_end(bytes)?;
    if end >= bytes.len() {
        return None;
    }
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let has_body = head.lines().skip(1).any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        let name = name.trim();
        name.eq_ignore_ascii_case("transfer-encoding")
            || (name.eq_ignore_ascii_case("content-length") && value.trim() != "0")
    });
    (!has_body).then_some(end)
}

/// The length of the header block, blank line included.
fn header_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

enum Scan {
    End,
    Over(Head),
    /// Not done; scanning may resume from this offset.
    More(usize),
}

/// Looks for the end of the header and counts lines, from `from` on (a
/// line end straddling two reads is found because we back up three bytes).
fn scan(buf: &[u8], from: usize, limits: HeadLimits) -> Scan {
    let start = from.saturating_sub(3);
    let mut lines = buf[..start].iter().filter(|&&b| b == b'\n').count();
    for i in start..buf.len() {
        if buf[i] != b'\n' {
            continue;
        }
        lines += 1;
        let blank = (i >= 1 && buf[i - 1] == b'\n') || (i >= 3 && &buf[i - 3..i] == b"\r\n\r");
        if blank {
            if i + 1 > limits.max_bytes {
                return Scan::Over(Head::TooLarge);
            }
            return Scan::End;
        }
        // The request line plus the header lines; the blank line is not one.
        if lines > limits.max_lines + 1 {
            return Scan::Over(Head::TooManyLines);
        }
    }
    Scan::More(buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn limits() -> HeadLimits {
        HeadLimits {
            idle: Duration::from_millis(200),
            deadline: Duration::from_millis(300),
            max_bytes: 256,
            max_lines: 4,
        }
    }

    async fn feed(parts: &[&[u8]], pause: Duration) -> Head {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let parts: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for p in parts {
                client.write_all(&p).await.ok();
                tokio::time::sleep(pause).await;
            }
            // Keep the pipe open past the deadline unless the test ends it.
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let head = read(&mut server, limits()).await;
        writer.abort();
        head
    }

    #[tokio::test]
    async fn a_whole_header_in_pieces_is_complete_and_kept_byte_for_byte() {
        let req = b"GET /health HTTP/1.1\r\nHost: a\r\n\r\nBODY";
        let head = feed(
            &[&req[..5], &req[5..23], &req[23..]],
            Duration::from_millis(5),
        )
        .await;
        assert_eq!(head, Head::Complete(req.to_vec()));
        let lf = b"GET / HTTP/1.0\nHost: a\n\n";
        assert_eq!(
            feed(&[lf], Duration::ZERO).await,
            Head::Complete(lf.to_vec())
        );
    }

    #[test]
    fn pipelined_requests_split_after_a_bodiless_header_only() {
        let two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(pipelined_split(two), Some(28));
        assert_eq!(pipelined_split(&two[..28]), None);
        let post =
            b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\n\r\n";
        assert_eq!(pipelined_split(post), None);
        let chunked = b"POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(pipelined_split(chunked), None);
        let zero = b"POST /s HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(pipelined_split(zero), Some(39));
    }

    #[tokio::test]
    async fn a_trickle_is_cut_at_the_deadline_not_per_read() {
        let bytes: Vec<&[u8]> = b"GET / HTTP/1.1\r\nHost: a\r\n"
            .chunks(1)
            .collect::<Vec<_>>();
        assert_eq!(
            feed(&bytes, Duration::from_millis(50)).await,
            Head::TimedOut
        );
    }

    #[tokio::test]
    async fn silence_is_idle_and_a_close_is_closed() {
        assert_eq!(feed(&[], Duration::ZERO).await, Head::Idle);
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert_eq!(read(&mut server, limits()).await, Head::Closed);
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HT").await.unwrap();
        drop(client);
        assert_eq!(read(&mut server, limits()).await, Head::Truncated);
    }

    #[tokio::test]
    async fn too_large_and_too_many_lines_are_refused() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(300));
        assert_eq!(
            feed(&[big.as_bytes()], Duration::ZERO).await,
            Head::TooLarge
        );
        let never_ends = "a".repeat(1000);
        assert_eq!(
            feed(&[never_ends.as_bytes()], Duration::ZERO).await,
            Head::TooLarge
        );
        let many = "GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\n\r\n";
        assert_eq!(
            feed(&[many.as_bytes()], Duration::ZERO).await,
            Head::TooManyLines
        );
        let four = "GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\n\r\n";
        assert!(matches!(
            feed(&[four.as_bytes()], Duration::ZERO).await,
            Head::Complete(_)
        ));
    }
}
