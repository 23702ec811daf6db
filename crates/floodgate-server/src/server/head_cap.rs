//! Where every request head on a connection starts and ends, so the head cap
//! ([`MAX_HEAD`]) holds for each of them, pipelined ones included.
//!
//! A second head can arrive in the read that ended the first, after the first's body, while
//! the first is still being answered. Finding where it starts takes the body framing hyper
//! uses: `Transfer-Encoding` whose last coding is `chunked` (chunk sizes, data, trailers), else
//! `Content-Length`, else no body. Headers hyper refuses (a bad length, a coding other than
//! chunked) end the connection with a 400 anyway, so what is assumed after them does not
//! matter; here they count as no body.

use super::conn_io::MAX_HEAD;

/// A head over the cap, found in a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Over {
    /// How many bytes of the read come before the head's first byte over the cap.
    pub(crate) at: usize,
    /// The answer: 414 while the head is still in its request line, else 431.
    pub(crate) code: u16,
    /// Whether every earlier request was answered (a write came after the last head ended):
    /// then the refusal can be written at once; otherwise hyper must answer the earlier ones
    /// first.
    pub(crate) answered: bool,
}

/// What the next byte read belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// A request head.
    Head,
    /// A `Content-Length` body: this many bytes left.
    Body(u64),
    /// A chunk-size line: the size so far, and whether an extension (or junk) started.
    ChunkSize { size: u64, ext: bool },
    /// Chunk data: this many bytes left.
    ChunkData(u64),
    /// The line end after chunk data.
    ChunkEnd,
    /// Trailer lines after the last chunk; whether the current line is still empty.
    Trailers { blank: bool },
}

/// A header that decides the body's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    ContentLength,
    TransferEncoding,
}

/// Follows a connection's request bytes; see the module documentation.
#[derive(Debug)]
pub(crate) struct HeadCap {
    /// What the next byte is.
    part: Part,
    /// Bytes of the current head so far (leading blank lines not counted, as hyper skips them).
    head_len: usize,
    /// Whether the current head's request line has ended (431, not 414, past the cap).
    line_done: bool,
    /// Bytes of the current line, line ends not counted (an empty line ends the head).
    line_len: usize,
    /// The current header's name, lowercased, up to the colon (bounded: only two names
    /// matter and both are short).
    name: Vec<u8>,
    /// Whether the current header line is past its colon.
    in_value: bool,
    /// Past the colon of a header that decides framing: which one.
    framing: Option<Framing>,
    /// That header's value so far (bounded by the head cap itself).
    value: Vec<u8>,
    /// The head's `Content-Length`: `None` none yet, `Some(None)` one hyper refuses.
    length: Option<Option<u64>>,
    /// The head's `Transfer-Encoding`: `None` none, `Some(chunked)` whether its last coding
    /// is chunked.
    chunked: Option<bool>,
    /// No head has ended since the last answer was written.
    answered: bool,
    /// A head went over the cap: the connection ends, nothing more is followed.
    done: bool,
}

impl Default for HeadCap {
    fn default() -> Self {
        HeadCap {
            part: Part::Head,
            head_len: 0,
            line_done: false,
            line_len: 0,
            name: Vec::new(),
            in_value: false,
            framing: None,
            value: Vec::new(),
            length: None,
            chunked: None,
            answered: true,
            done: false,
        }
    }
}

/// Hyper's `Content-Length` syntax: digits only, no sign, no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .flatten()
    })
}

fn trim(value: &[u8]) -> &[u8] {
    let start = value.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = value.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(s), Some(e)) => &value[s..=e],
        _ => &[],
    }
}

impl HeadCap {
    /// An answer (or part of one) was written. The interim `100 Continue` answers nothing.
    pub(crate) fn wrote(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() && !bytes.starts_with(b"HTTP/1.1 100 ") {
            self.answered = true;
        }
    }

    /// Follows `bytes` just read; the first head over the cap in them, if any.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Option<Over> {
        let mut i = 0;
        while i < bytes.len() && !self.done {
            match self.part {
                Part::Body(left) | Part::ChunkData(left) => {
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - i);
                    i += take;
                    let left = left - u64::try_from(take).unwrap_or(left);
                    self.part = match (self.part, left) {
                        (Part::Body(_), 0) => Part::Head,
                        (Part::Body(_), _) => Part::Body(left),
                        (_, 0) => Part::ChunkEnd,
                        _ => Part::ChunkData(left),
                    };
                }
                Part::Head => {
                    if let Some(over) = self.head_byte(bytes[i]) {
                        self.done = true;
                        return Some(Over { at: i, ..over });
                    }
                    i += 1;
                }
                _ => {
                    self.chunk_byte(bytes[i]);
                    i += 1;
                }
            }
        }
        None
    }

    /// One byte of chunked framing outside chunk data.
    fn chunk_byte(&mut self, b: u8) {
        self.part = match (self.part, b) {
            (Part::ChunkSize { size, ext }, b'\n') => match (size, ext) {
                (0, _) => Part::Trailers { blank: true },
                (size, _) => Part::ChunkData(size),
            },
            (Part::ChunkSize { size, ext: false }, b) if b.is_ascii_hexdigit() => {
                let digit = u64::from(char::from(b).to_digit(16).unwrap_or(0));
                Part::ChunkSize {
                    size: size.saturating_mul(16).saturating_add(digit),
                    ext: false,
                }
            }
            (Part::ChunkSize { size, .. }, _) => Part::ChunkSize { size, ext: true },
            (Part::ChunkEnd, b'\n') => Part::ChunkSize {
                size: 0,
                ext: false,
            },
            (Part::ChunkEnd, _) => Part::ChunkEnd,
            (Part::Trailers { blank: true }, b'\n') => Part::Head,
            (Part::Trailers { .. }, b'\n') => Part::Trailers { blank: true },
            (Part::Trailers { blank }, b'\r') => Part::Trailers { blank },
            (Part::Trailers { .. }, _) => Part::Trailers { blank: false },
            (other, _) => other,
        };
    }

    /// One byte of a head; the refusal when it is the first over the cap.
    fn head_byte(&mut self, b: u8) -> Option<Over> {
        if self.head_len == 0 && matches!(b, b'\r' | b'\n') {
            // Blank lines before a request line (hyper skips them).
            return None;
        }
        self.head_len += 1;
        if self.head_len > MAX_HEAD {
            return Some(Over {
                at: 0,
                code: if self.line_done { 431 } else { 414 },
                answered: self.answered,
            });
        }
        match b {
            b'\r' => {}
            b'\n' if self.line_len == 0 => self.end_head(),
            b'\n' => self.end_line(),
            b => {
                self.line_len += 1;
                if !self.line_done {
                    // The request line.
                } else if self.in_value {
                    if self.framing.is_some() {
                        self.value.push(b);
                    }
                } else if b == b':' {
                    self.in_value = true;
                    self.framing = match self.name.as_slice() {
                        b"content-length" => Some(Framing::ContentLength),
                        b"transfer-encoding" => Some(Framing::TransferEncoding),
                        _ => None,
                    };
                } else if self.name.len() < 32 {
                    self.name.push(b.to_ascii_lowercase());
                }
            }
        }
        None
    }

    /// A header line (or the request line) ended.
    fn end_line(&mut self) {
        if !self.line_done {
            self.line_done = true;
        } else {
            match self.framing {
                Some(Framing::ContentLength) => {
                    let n = digits(trim(&self.value));
                    self.length = match (self.length, n) {
                        (None, n) => Some(n),
                        (Some(Some(a)), Some(b)) if a == b => Some(Some(a)),
                        _ => Some(None),
                    };
                }
                Some(Framing::TransferEncoding) => {
                    let last = self.value.rsplit(|b| *b == b',').next().unwrap_or(&[]);
                    self.chunked = Some(trim(last).eq_ignore_ascii_case(b"chunked"));
                }
                None => {}
            }
        }
        self.line_len = 0;
        self.name.clear();
        self.in_value = false;
        self.framing = None;
        self.value.clear();
    }

    /// The blank line: the head ended; what follows is its body, then the next head.
    fn end_head(&mut self) {
        self.part = match (self.chunked, self.length) {
            (Some(true), _) => Part::ChunkSize {
                size: 0,
                ext: false,
            },
            (Some(false), _) | (None, None | Some(None) | Some(Some(0))) => Part::Head,
            (None, Some(Some(n))) => Part::Body(n),
        };
        self.head_len = 0;
        self.line_done = false;
        self.line_len = 0;
        self.name.clear();
        self.in_value = false;
        self.framing = None;
        self.value.clear();
        self.length = None;
        self.chunked = None;
        self.answered = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pad: usize) -> String {
        format!(
            "GET /x HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\n\r\n",
            "p".repeat(pad)
        )
    }

    /// Feeds `data` one byte per read and in one read; the refusals found must agree.
    fn over(data: &[u8]) -> Option<(usize, u16, bool)> {
        let mut whole = HeadCap::default();
        let at_once = whole.feed(data).map(|o| (o.at, o.code, o.answered));
        let mut bytewise = HeadCap::default();
        let mut one = None;
        for (i, b) in data.iter().enumerate() {
            if let Some(o) = bytewise.feed(std::slice::from_ref(b)) {
                one = Some((i + o.at, o.code, o.answered));
                break;
            }
        }
        assert_eq!(at_once, one);
        at_once
    }

    #[test]
    fn a_head_at_the_cap_passes_one_byte_more_does_not() {
        let base = head(0).len();
        let at_cap = head(MAX_HEAD - base);
        assert_eq!(at_cap.len(), MAX_HEAD);
        assert_eq!(over(at_cap.as_bytes()), None);
        let over_cap = head(MAX_HEAD - base + 1);
        assert_eq!(over(over_cap.as_bytes()), Some((MAX_HEAD, 431, true)));
        let line = format!("GET /{} HTTP/1.1\r\n\r\n", "u".repeat(MAX_HEAD));
        assert_eq!(over(line.as_bytes()), Some((MAX_HEAD, 414, true)));
    }

    #[test]
    fn pipelined_heads_are_each_counted_after_their_bodies() {
        let big = head(MAX_HEAD);
        let cases = [
            "POST /a HTTP/1.1\r\nContent-Length:  5 \r\n\r\nhello".to_owned(),
            "POST /a HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc".to_owned(),
            "POST /a HTTP/1.1\r\ntransfer-encoding: gzip, Chunked\r\ncontent-length: 99\r\n\r\n\
             5;x=y\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\ntrailer: t\r\n\r\n"
                .to_owned(),
            "\r\nGET /a HTTP/1.1\r\n\r\n".to_owned(),
        ];
        for first in cases {
            let data = format!("{first}{big}");
            let found = over(data.as_bytes());
            assert_eq!(
                found,
                Some((first.len() + MAX_HEAD, 431, false)),
                "after {first:?}"
            );
        }
        // A body as large as a head is not a head.
        let body = "b".repeat(3 * MAX_HEAD);
        let data = format!(
            "POST /a HTTP/1.1\r\ncontent-length: {}\r\n\r\n{body}{}",
            body.len(),
            head(10)
        );
        assert_eq!(over(data.as_bytes()), None);
    }

    #[test]
    fn an_answer_written_between_heads_makes_the_next_refusal_immediate() {
        let mut cap = HeadCap::default();
        assert_eq!(cap.feed(head(0).as_bytes()), None);
        cap.wrote(b"HTTP/1.1 100 Continue\r\n\r\n");
        let big = head(MAX_HEAD);
        let mut still = HeadCap::default();
        assert_eq!(still.feed(head(0).as_bytes()), None);
        still.wrote(b"HTTP/1.1 100 Continue\r\n\r\n");
        assert!(!still.feed(big.as_bytes()).expect("over").answered);
        cap.wrote(b"HTTP/1.1 200 OK\r\n");
        assert!(cap.feed(big.as_bytes()).expect("over").answered);
    }
}
