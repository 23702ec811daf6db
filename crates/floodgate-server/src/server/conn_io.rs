//! A connection's socket, as hyper sees it, with two jobs hyper does not do:
//!
//! - **Timeouts before any handler runs.** A request head must arrive within `header_timeout`
//!   (counted from the accept, or from the first byte of a later request on a kept-alive
//!   connection), and a kept-alive connection with no request in flight is closed after
//!   `idle_timeout`. A slow or silent client therefore holds a connection for a bounded time.
//!   (hyper's own header timeout also runs while a connection is idle, which would make the two
//!   the same setting.) Bodies have their own timeout, in the body extractor.
//! - **JSON error bodies for hyper's own answers.** When hyper cannot parse a request (bad
//!   request line, URI too long, header section too large, bad `Content-Length`), it answers
//!   400/414/431 with an empty body before any handler runs. Every handler error has a JSON
//!   body, so an error head with `content-length: 0` can only be one of those; it is rewritten
//!   to the API's `{error, message}` shape.
//!
//! Where a request head ends is found by looking for the blank line (`\r\n\r\n`) after the
//! connection went quiet; hyper still does all the parsing.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The per-connection timeouts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// Longest time to receive a complete request head.
    pub(crate) header: Duration,
    /// Longest time a kept-alive connection may wait for its next request.
    pub(crate) idle: Duration,
}

/// Where the connection is, as far as timeouts go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head (the header timeout runs).
    Head,
    /// A request is being handled: its body, the handler (a long poll may take minutes, bounded
    /// by the limiter's `max_wait`) and the answer. No timeout here.
    Busy,
    /// An answer was written and no byte of a next request has come (the idle timeout runs).
    Idle,
}

/// The socket wrapper; see the module documentation.
pub(crate) struct Guarded<IO> {
    /// The socket.
    io: IO,
    /// The limits of this server.
    timeouts: Timeouts,
    /// Which timeout, if any, runs.
    phase: Phase,
    /// How much of `\r\n\r\n` the bytes read so far in this head end with.
    matched: u8,
    /// When the running timeout fires (`None` while busy).
    deadline: Option<Pin<Box<Sleep>>>,
    /// A rewritten error answer still being written, and how far.
    pending: Option<(Vec<u8>, usize)>,
}

impl<IO> Guarded<IO> {
    pub(crate) fn new(io: IO, timeouts: Timeouts) -> Self {
        Guarded {
            io,
            timeouts,
            phase: Phase::Head,
            matched: 0,
            deadline: Some(Box::pin(tokio::time::sleep(timeouts.header))),
            pending: None,
        }
    }

    fn arm(&mut self, after: Duration) {
        let at = Instant::now() + after;
        match &mut self.deadline {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Follows the bytes a read returned.
    fn saw_read(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.phase == Phase::Idle {
            self.phase = Phase::Head;
            self.matched = 0;
            self.arm(self.timeouts.header);
        }
        if self.phase != Phase::Head {
            return;
        }
        for &b in bytes {
            let want = if self.matched % 2 == 0 { b'\r' } else { b'\n' };
            self.matched = if b == want {
                self.matched + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            if self.matched == 4 {
                self.phase = Phase::Busy;
                self.deadline = None;
                return;
            }
        }
    }

    /// Follows a write of `n` bytes: an answer (or part of one) went out.
    fn saw_write(&mut self, n: usize) {
        if n > 0 {
            self.phase = Phase::Idle;
            self.matched = 0;
            self.arm(self.timeouts.idle);
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = &mut this.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                let what = if this.phase == Phase::Idle {
                    "keep-alive idle timeout"
                } else {
                    "request header timeout"
                };
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
            }
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.saw_read(buf.filled().get(before..).unwrap_or_default());
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            if let Some(json) = rewrite_bare_error(buf) {
                this.pending = Some((json, 0));
            }
        }
        if let Some((bytes, done)) = &mut this.pending {
            // Write the rewritten answer in place of `buf`, then say `buf` was written.
            while *done < bytes.len() {
                let rest = bytes.get(*done..).unwrap_or_default();
                match Pin::new(&mut this.io).poll_write(cx, rest) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => *done += n,
                    other => return other,
                }
            }
            this.pending = None;
            this.saw_write(buf.len());
            return Poll::Ready(Ok(buf.len()));
        }
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.saw_write(n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// If `head` is one of hyper's bodiless error answers, the same answer with a JSON body.
fn rewrite_bare_error(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let (status_line, rest) = text.split_once("\r\n")?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?;
    let code: u16 = parts.next()?.parse().ok()?;
    let reason = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") || !(400..600).contains(&code) {
        return None;
    }
    let (headers, body) = rest.split_once("\r\n\r\n").or_else(|| {
        // The status line was the whole head: `rest` starts with the blank line.
        rest.strip_prefix("\r\n").map(|b| ("", b))
    })?;
    if !body.is_empty() {
        return None;
    }
    let mut bare = false;
    let mut kept = Vec::new();
    for line in headers.split("\r\n").filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("content-length") {
            if value.trim() != "0" {
                return None;
            }
            bare = true;
        } else if !name.eq_ignore_ascii_case("content-type") {
            kept.push(line);
        }
    }
    if !bare {
        return None;
    }
    let (error, message) = match code {
        414 => ("uri_too_long", "the request URI is longer than the server accepts"),
        431 => (
            "headers_too_large",
            "the request's header section is larger than the server accepts",
        ),
        400 => (
            "bad_request",
            "the request could not be parsed as HTTP/1.1 (request line, a header, Content-Length or Transfer-Encoding)",
        ),
        _ => ("bad_request", "the request could not be served"),
    };
    let json = format!(r#"{{"error":"{error}","message":"{message}"}}"#);
    let mut out = format!("{version} {code} {reason}\r\n");
    for line in kept {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("content-type: application/json\r\n");
    out.push_str(&format!("content-length: {}\r\n\r\n{json}", json.len()));
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::rewrite_bare_error;

    #[test]
    fn bare_errors_get_json_bodies() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(rewrite_bare_error(head).expect("rewritten")).expect("utf8");
        let (head, body) = out.split_once("\r\n\r\n").expect("blank line");
        assert!(head.starts_with("HTTP/1.1 431 "), "{out}");
        assert!(head.contains("connection: close"), "{out}");
        assert!(head.contains("content-type: application/json"), "{out}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{out}"
        );
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"], "headers_too_large");
    }

    #[test]
    fn other_answers_are_left_alone() {
        for head in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}",
            b"{\"json\": 1}",
        ] {
            assert!(rewrite_bare_error(head).is_none());
        }
    }
}
