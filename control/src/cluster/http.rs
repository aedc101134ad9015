//! A minimal blocking HTTP/1.1 client over any byte stream: enough for etcd's JSON gateway
//! (small request/response calls and the watch's endless chunked stream) and for fetching a
//! journal checkpoint from a peer over TLS. Requests carry `Content-Length`; responses may be
//! length-delimited or chunked. Every read is bounded by the caller's socket timeouts and by
//! a byte limit, so a peer cannot make us buffer without end.

use std::io::{self, BufRead, Read, Write};

/// Longest status line or header line we read.
const LINE_BYTES_MAX: u64 = 16 * 1024;
/// Most header lines in one response.
const HEADERS_MAX: usize = 64;

/// What the status line and headers of a response said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub chunked: bool,
    pub content_length: Option<u64>,
    /// The server will close the connection after this response.
    pub close: bool,
}

/// Writes one request with a body (empty for none).
pub fn write_request(
    w: &mut impl Write,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<()> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// One CRLF-terminated line, without the terminator; EOF before it is an error.
fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut raw = Vec::new();
    r.by_ref()
        .take(LINE_BYTES_MAX)
        .read_until(b'\n', &mut raw)?;
    if raw.last() != Some(&b'\n') {
        return Err(if raw.is_empty() {
            io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed")
        } else {
            bad("line too long or cut short")
        });
    }
    raw.pop();
    if raw.last() == Some(&b'\r') {
        raw.pop();
    }
    String::from_utf8(raw).map_err(|_| bad("line is not UTF-8"))
}

/// Reads the status line and headers.
pub fn read_head(r: &mut impl BufRead) -> io::Result<ResponseHead> {
    let status_line = read_line(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("not an HTTP/1 response: {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut head = ResponseHead {
        status,
        chunked: false,
        content_length: None,
        close: version == "HTTP/1.0",
    };
    for _ in 0..HEADERS_MAX {
        let line = read_line(r)?;
        if line.is_empty() {
            return Ok(head);
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!("bad header line {line:?}")));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                head.content_length = Some(value.parse().map_err(|_| bad("bad Content-Length"))?)
            }
            "transfer-encoding" => head.chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => head.close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    Err(bad("too many headers"))
}

/// The body of a response as a reader: chunked, length-delimited, or (neither given) up to
/// the end of the connection.
pub struct BodyReader<R: BufRead> {
    inner: R,
    kind: BodyKind,
}

enum BodyKind {
    Length(u64),
    /// Bytes left in the current chunk; `None` before the first chunk header.
    Chunked {
        left: Option<u64>,
        done: bool,
    },
    ToEof,
}

impl<R: BufRead> BodyReader<R> {
    /// The body that follows `head` on `inner` (pass `&mut reader` to keep the connection).
    pub fn new(inner: R, head: &ResponseHead) -> BodyReader<R> {
        let kind = if head.chunked {
            BodyKind::Chunked {
                left: None,
                done: false,
            }
        } else if let Some(n) = head.content_length {
            BodyKind::Length(n)
        } else {
            BodyKind::ToEof
        };
        BodyReader { inner, kind }
    }

    /// Reads the whole body, failing past `max` bytes.
    pub fn read_all(mut self, max: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.by_ref().take(max + 1).read_to_end(&mut out)?;
        if out.len() as u64 > max {
            return Err(bad(format!("response body over {max} bytes")));
        }
        Ok(out)
    }
}

impl<R: BufRead> Read for BodyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.kind {
            BodyKind::Length(left) => {
                if *left == 0 || buf.is_empty() {
                    return Ok(0);
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.inner.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body cut short",
                    ));
                }
                *left -= n as u64;
                Ok(n)
            }
            BodyKind::ToEof => self.inner.read(buf),
            BodyKind::Chunked { left, done } => {
                if *done || buf.is_empty() {
                    return Ok(0);
                }
                if left.is_none_or(|l| l == 0) {
                    if left.is_some() {
                        // The CRLF that ends the previous chunk.
                        read_line(&mut self.inner)?;
                    }
                    let line = read_line(&mut self.inner)?;
                    let size_text = line.split(';').next().unwrap_or_default().trim();
                    let size = u64::from_str_radix(size_text, 16)
                        .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
                    if size == 0 {
                        // Trailers, then the empty line.
                        while !read_line(&mut self.inner)?.is_empty() {}
                        *done = true;
                        return Ok(0);
                    }
                    *left = Some(size);
                }
                let chunk_left = left.unwrap_or(0);
                let want = buf
                    .len()
                    .min(usize::try_from(chunk_left).unwrap_or(usize::MAX));
                let n = self.inner.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "chunk cut short",
                    ));
                }
                *left = Some(chunk_left - n as u64);
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    #[test]
    fn length_and_chunked_bodies_read_back() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let mut r = BufReader::new(&raw[..]);
        let head = read_head(&mut r).unwrap();
        assert_eq!((head.status, head.chunked), (200, false));
        assert_eq!(
            BodyReader::new(&mut r, &head).read_all(100).unwrap(),
            b"hello"
        );

        let raw = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
                    3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\nnext";
        let mut r = BufReader::new(&raw[..]);
        let head = read_head(&mut r).unwrap();
        assert_eq!((head.status, head.chunked), (503, true));
        assert_eq!(
            BodyReader::new(&mut r, &head).read_all(100).unwrap(),
            b"abcde"
        );
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "next", "the reader stops at the end of the body");
    }

    #[test]
    fn oversized_and_truncated_bodies_fail() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let mut r = BufReader::new(&raw[..]);
        let head = read_head(&mut r).unwrap();
        assert!(BodyReader::new(&mut r, &head).read_all(4).is_err());
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello";
        let mut r = BufReader::new(&raw[..]);
        let head = read_head(&mut r).unwrap();
        assert!(BodyReader::new(&mut r, &head).read_all(100).is_err());
        let mut r = BufReader::new(&b"garbage\r\n\r\n"[..]);
        assert!(read_head(&mut r).is_err());
    }
}
