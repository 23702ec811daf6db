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
//! - **An exact cap on every request head, and an answer to an HTTP/2 preface.** hyper's own
//!   cap (its read buffer) is approximate: a head of up to about twice `max_buf_size` could get
//!   through when it arrived in large reads, so a head above [`MAX_HEAD`] is answered 431
//!   `headers_too_large` (414 `uri_too_long` while still in the request line) here, before hyper
//!   sees the rest. Every head counts, pipelined ones too ([`HeadCap`] follows the bodies
//!   between them). When earlier requests on the connection are still unanswered, their answers
//!   must go first: hyper is then handed the over-long head's first [`MAX_HEAD`] bytes only, a
//!   full read buffer without a complete head, which hyper itself refuses 431 after answering
//!   the others (rewritten to JSON below, and to 414 for a request line). A client that opens with HTTP/2's preface (prior knowledge) got no answer at
//!   all from hyper (it leaves that to an HTTP/2 fallback this server does not have); it is
//!   answered with HTTP/2's GOAWAY `HTTP_1_1_REQUIRED`, which such a client can read. Both answers
//!   are followed by a bounded lingering close (the client's unread bytes would otherwise reset
//!   the connection before it read the answer).
//!
//! Where a request head ends is found by looking for the blank line (`\r\n\r\n`) after the
//! connection went quiet; hyper still does all the parsing. While a request is with the
//! handlers ([`InFlight`], counted by [`Counted`]) neither timeout runs, whatever was read or
//! written meanwhile: an interim `100 Continue` and a pipelined request's bytes say nothing
//! about a long poll still held.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// When a timeout too long to add to the clock ends: about 30 years from now, as good as never.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

use super::head_cap::HeadCap;

/// Largest request head (request line and headers) accepted, as `docs/api.md` says.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// What a client that opens with HTTP/2's connection preface sends first, as an HTTP/1 head.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";

/// Most bytes read and dropped after a refusal before the connection is closed anyway.
const LINGER_BYTES: usize = 1024 * 1024;

/// The per-connection timeouts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// Longest time to receive a complete request head.
    pub(crate) header: Duration,
    /// Longest time a kept-alive connection may wait for its next request.
    pub(crate) idle: Duration,
}

/// How many of one connection's requests are with the handlers (a long poll may be held for
/// minutes): shared by its [`Guarded`] socket, which runs no timeout meanwhile, and its
/// [`Counted`] service, which counts them.
#[derive(Debug, Clone, Default)]
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn any(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

/// One request with the handlers, until its answer is ready or it is dropped.
struct Entered(InFlight);

impl Entered {
    fn new(in_flight: &InFlight) -> Self {
        in_flight.0.fetch_add(1, Ordering::AcqRel);
        Entered(in_flight.clone())
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's service, counting its requests in [`InFlight`].
pub(crate) struct Counted<S> {
    inner: S,
    in_flight: InFlight,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, in_flight: InFlight) -> Self {
        Counted { inner, in_flight }
    }
}

impl<S: hyper::service::Service<R>, R> hyper::service::Service<R> for Counted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, request: R) -> Self::Future {
        CountedFuture {
            _entered: Entered::new(&self.in_flight),
            // Boxed: the service's future need not be `Unpin`, and this crate pins nothing
            // unsafely.
            future: Box::pin(self.inner.call(request)),
        }
    }
}

/// A request's handling; it leaves [`InFlight`] when this is dropped (answered or cancelled).
pub(crate) struct CountedFuture<F> {
    _entered: Entered,
    future: Pin<Box<F>>,
}

impl<F: Future> Future for CountedFuture<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.future.as_mut().poll(cx)
    }
}

/// Where the connection is, as far as timeouts go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head (the header timeout runs).
    Head,
    /// A request is being handled: its body, the handler (a long poll may take minutes, bounded
    /// by the limiter's `max_wait`) and the answer. No timeout here. Also whenever the
    /// handlers hold a request ([`InFlight`]), whatever the bytes say.
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
    /// Bytes of the current request head so far (where HTTP/2's preface would be).
    head_len: usize,
    /// Where each request head starts and ends, for the exact [`MAX_HEAD`] on every one.
    cap: HeadCap,
    /// A pipelined head over the cap that hyper answers itself after the earlier requests (it
    /// has its first [`MAX_HEAD`] bytes and gets nothing more): the status its answer must
    /// carry (414 or 431). The close that follows lingers, as a refusal's does.
    withheld: Option<u16>,
    /// Whether the current head is the connection's first (only it may be HTTP/2's preface).
    first_head: bool,
    /// How many bytes of [`H2_PREFACE`] the first head has matched so far.
    preface: usize,
    /// An answer this wrapper gives itself (hyper never sees the request), then the connection
    /// ends; see [`Refusal`].
    refusal: Option<Refusal>,
    /// The connection's requests with the handlers.
    in_flight: InFlight,
}

/// An answer written by the wrapper, then a lingering close.
struct Refusal {
    /// The answer.
    bytes: Vec<u8>,
    /// How much of it is written.
    written: usize,
    /// Whether our side is shut (FIN sent).
    shut: bool,
    /// Bytes read and dropped since, bounded by [`LINGER_BYTES`].
    discarded: usize,
}

impl<IO> Guarded<IO> {
    pub(crate) fn new(io: IO, timeouts: Timeouts, in_flight: InFlight) -> Self {
        Guarded {
            io,
            timeouts,
            phase: Phase::Head,
            matched: 0,
            deadline: Some(Box::pin(tokio::time::sleep(timeouts.header))),
            pending: None,
            head_len: 0,
            cap: HeadCap::default(),
            withheld: None,
            first_head: true,
            preface: 0,
            refusal: None,
            in_flight,
        }
    }

    /// While the handlers hold a request, no timeout runs: the next answer written re-arms
    /// the idle one.
    fn hold_while_in_flight(&mut self) {
        if self.in_flight.any() {
            self.phase = Phase::Busy;
            self.deadline = None;
        }
    }

    fn arm(&mut self, after: Duration) {
        // A timeout too long to add to the clock (the library takes any `Duration`) is never.
        let now = Instant::now();
        let at = now
            .checked_add(after)
            .or_else(|| now.checked_add(FAR_FUTURE))
            .unwrap_or(now);
        match &mut self.deadline {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Follows the bytes a read returned (for the timeouts); an answer to give instead of
    /// passing them on when the head is HTTP/2's preface.
    fn saw_read(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        if bytes.is_empty() {
            return None;
        }
        if self.phase == Phase::Idle {
            self.phase = Phase::Head;
            self.matched = 0;
            self.head_len = 0;
            self.arm(self.timeouts.header);
        }
        if self.phase != Phase::Head {
            return None;
        }
        for &b in bytes {
            if self.first_head
                && self.preface == self.head_len
                && H2_PREFACE.get(self.preface) == Some(&b)
            {
                self.preface += 1;
            }
            self.head_len += 1;
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
                let h2 = self.first_head && self.preface == H2_PREFACE.len();
                self.first_head = false;
                return h2.then(h2_goaway);
            }
        }
        None
    }

    /// Follows a write of `n` bytes: an answer (or part of one) went out, unless the handlers
    /// still hold a request (then it was an interim `100 Continue`, or an earlier answer of a
    /// pipeline).
    fn saw_write(&mut self, n: usize) {
        if n > 0 && !self.in_flight.any() {
            self.phase = Phase::Idle;
            self.matched = 0;
            self.arm(self.timeouts.idle);
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Guarded<IO> {
    /// Answers `answer` in hyper's place and ends the connection after a lingering close.
    fn refuse(&mut self, cx: &mut Context<'_>, answer: Vec<u8>) -> Poll<io::Result<()>> {
        self.refusal = Some(Refusal {
            bytes: answer,
            written: 0,
            shut: false,
            discarded: 0,
        });
        self.arm(self.timeouts.header);
        self.poll_refusal(cx)
    }

    /// Writes the refusal, shuts our side, then reads and drops what the client still sends
    /// (bounded by [`LINGER_BYTES`] and the header deadline) so that closing does not reset
    /// the connection before the client read the answer; then ends the connection.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(r) = &mut self.refusal else {
            return Poll::Ready(Ok(()));
        };
        loop {
            if let Some(rest) = r.bytes.get(r.written..).filter(|rest| !rest.is_empty()) {
                match Pin::new(&mut self.io).poll_write(cx, rest) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => r.written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            if !r.shut {
                match Pin::new(&mut self.io).poll_shutdown(cx) {
                    Poll::Ready(_) => r.shut = true,
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            if r.discarded < LINGER_BYTES {
                let mut scratch = [0u8; 4096];
                let mut drop_buf = ReadBuf::new(&mut scratch);
                match Pin::new(&mut self.io).poll_read(cx, &mut drop_buf) {
                    Poll::Ready(Ok(())) if !drop_buf.filled().is_empty() => {
                        r.discarded += drop_buf.filled().len();
                        continue;
                    }
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(_) => {}
                }
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request refused before parsing (head too large, or HTTP/2)",
            )));
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.refusal.is_none() && this.withheld.is_none() {
            this.hold_while_in_flight();
        }
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
        if this.refusal.is_some() {
            return this.poll_refusal(cx);
        }
        if this.withheld.is_some() {
            // hyper holds the over-long head's first MAX_HEAD bytes, a full buffer: it refuses
            // the head without reading again.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if let Some(over) = this
                .cap
                .feed(buf.filled().get(before..).unwrap_or_default())
            {
                if over.answered {
                    // Nothing is waiting for an answer: refused here and now.
                    buf.set_filled(before);
                    return this.refuse(cx, json_answer(over.code));
                }
                // Earlier requests first: hyper gets the bytes up to the cap, no more.
                buf.set_filled(before + over.at);
                this.withheld = Some(over.code);
                if over.at == 0 {
                    return Poll::Pending;
                }
            }
            if let Some(answer) = this.saw_read(buf.filled().get(before..).unwrap_or_default()) {
                // hyper never sees these bytes; the refusal is the answer.
                buf.set_filled(before);
                return this.refuse(cx, answer);
            }
        }
        polled
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            if let Some(json) = rewrite_bare_error(buf, this.withheld) {
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
            this.cap.wrote(buf);
            this.saw_write(buf.len());
            return Poll::Ready(Ok(buf.len()));
        }
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.cap.wrote(buf.get(..n).unwrap_or_default());
            this.saw_write(n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.withheld.is_none() {
            return Pin::new(&mut this.io).poll_shutdown(cx);
        }
        // hyper refused the withheld head and closes: linger as a refusal does, so the bytes
        // of it that were never read do not reset the connection before the client read the
        // answers.
        if this.refusal.is_none() {
            this.refusal = Some(Refusal {
                bytes: Vec::new(),
                written: 0,
                shut: false,
                discarded: 0,
            });
            this.arm(this.timeouts.header);
        }
        if let Some(deadline) = &mut this.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
        }
        match this.poll_refusal(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }
}

/// The API's error body for an answer given below the handlers.
fn error_json(code: u16) -> String {
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
    format!(r#"{{"error":"{error}","message":"{message}"}}"#)
}

/// A whole error answer (414 or 431) with the API's JSON body, closing the connection.
fn json_answer(code: u16) -> Vec<u8> {
    let reason = if code == 414 {
        "URI Too Long"
    } else {
        "Request Header Fields Too Large"
    };
    let json = error_json(code);
    format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{json}",
        json.len()
    )
    .into_bytes()
}

/// HTTP/2's answer to a client that must use HTTP/1.1: the server's preface (an empty
/// SETTINGS frame), then GOAWAY with last stream 0 and error `HTTP_1_1_REQUIRED` (0xd,
/// RFC 9113 section 7), with a short reason as its debug data.
fn h2_goaway() -> Vec<u8> {
    let debug = b"this server speaks HTTP/1.1 only";
    let mut out = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0];
    let len = u32::try_from(8 + debug.len()).unwrap_or(0).to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], 0x7, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0xd]);
    out.extend_from_slice(debug);
    out
}

/// If `head` is one of hyper's bodiless error answers, the same answer with a JSON body.
/// `withheld`: hyper's 431 to a head cut at the cap is that head's status (414 for a request
/// line).
fn rewrite_bare_error(head: &[u8], withheld: Option<u16>) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let (status_line, rest) = text.split_once("\r\n")?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?;
    let code: u16 = parts.next()?.parse().ok()?;
    let reason = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") || !(400..600).contains(&code) {
        return None;
    }
    let (code, reason) = match withheld {
        Some(414) if code == 431 => (414, "URI Too Long"),
        _ => (code, reason),
    };
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
    let json = error_json(code);
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
        let out =
            String::from_utf8(rewrite_bare_error(head, None).expect("rewritten")).expect("utf8");
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
            assert!(rewrite_bare_error(head, None).is_none());
        }
    }
}
