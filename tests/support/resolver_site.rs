//! Provider routes for the resolver tests, served by the loopback
//! [`Provider`](super::provider::Provider):
//!
//! | path | answer |
//! |---|---|
//! | `/page?src=PATH` | an HTML page whose `<video>` plays `PATH` (what yt-dlp's generic extractor finds) |
//! | `/page?src=PATH&ttl_ms=N` | the same, the media URL signed to expire: `/expiring/{now+N}/PATH` |
//! | `/expiring/{unix_ms}/{rest}` | `/{rest}` until that time (a body in flight is cut then), 403 after: a signed CDN URL |
//!
//! And `/live/{name}.ts?src=NAME` loops the file registered with
//! [`Provider::add_file`](super::provider::Provider::add_file) instead of `sample.ts`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The `/page` HTML for `query`, or None when `src` is missing.
pub fn page(query: Option<&str>) -> Option<String> {
    let mut src = None;
    let mut ttl_ms = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "src" => src = Some(v.into_owned()),
            "ttl_ms" => ttl_ms = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    let src = src.filter(|s| s.starts_with('/'))?;
    let media = match ttl_ms {
        Some(ttl) => format!("/expiring/{}{src}", now_ms() + ttl),
        None => src,
    };
    let media = media.replace('&', "&amp;").replace('"', "&quot;");
    Some(format!(
        "<!DOCTYPE html>\n<html><head><title>Test channel</title></head><body>\n\
         <video controls autoplay><source src=\"{media}\" type=\"video/mp2t\"></video>\n\
         </body></html>\n"
    ))
}

/// `/expiring/{unix_ms}/{rest}`: `Ok(Some((deadline, "/rest")))` while valid,
/// `Err(())` once expired, `Ok(None)` for other paths.
pub fn expiring(path: &str) -> Result<Option<(u64, String)>, ()> {
    let Some(tail) = path.strip_prefix("/expiring/") else {
        return Ok(None);
    };
    let (ms, rest) = tail.split_once('/').ok_or(())?;
    let deadline = ms.parse::<u64>().map_err(|_| ())?;
    if now_ms() >= deadline {
        return Err(());
    }
    Ok(Some((deadline, format!("/{rest}"))))
}

/// A body that ends with an error at `deadline` (unix ms): the URL expired
/// under a client still reading it.
pub struct Until<B> {
    inner: B,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl<B> Until<B> {
    pub fn new(inner: B, deadline_ms: u64) -> Self {
        let left = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
        Until {
            inner,
            sleep: Box::pin(tokio::time::sleep(left)),
        }
    }
}

impl<B> Body for Until<B>
where
    B: Body<Data = Bytes, Error = std::io::Error> + Unpin,
{
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(std::io::Error::other("signed URL expired"))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
