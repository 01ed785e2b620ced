//! A deliberately small HTTP/1.1 server for the simulator.
//!
//! Hand-rolled rather than built on a framework because the simulator must misbehave at the
//! wire level: drop a connection without answering, or promise a body and cut it short.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub enum Reply {
    Full {
        status: u16,
        content_type: &'static str,
        extra_headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// Close the connection without a word.
    Drop,
    /// Send the head with the full Content-Length, then only `keep` bytes, then close.
    CutShort {
        status: u16,
        body: Vec<u8>,
        keep: usize,
    },
    /// `head`, then `fill` bytes up to `length` (announced), or without a length until the
    /// client hangs up; then close. Never held in memory.
    Stream {
        status: u16,
        head: Vec<u8>,
        fill: u8,
        /// Ends the body when it has a length (so that it is whole JSON).
        tail: Vec<u8>,
        length: Option<u64>,
    },
}

impl Reply {
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Reply::Full {
            status,
            content_type: "application/json; odata.metadata=minimal; charset=utf-8",
            extra_headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        if let Reply::Full { extra_headers, .. } = &mut self {
            extra_headers.push((name, value));
        }
        self
    }
}

pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request) -> impl std::future::Future<Output = Reply> + Send;

    /// The longest request head taken; a longer one is answered 431 and the connection
    /// closed.
    fn max_head(&self) -> usize {
        MAX_HEAD
    }

    /// Told of each request refused for its head's length.
    fn head_too_long(&self) {}
}

/// Why no request was read.
enum NoRequest {
    /// The connection ended, or what came was not HTTP.
    Closed,
    /// The head went past the limit.
    HeadTooLong,
}

pub async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, peer)) = accepted else {
            continue;
        };
        let handler = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = connection(stream, peer, handler) => {}
            }
        });
    }
}

async fn connection<H: Handler>(stream: TcpStream, _peer: SocketAddr, handler: Arc<H>) {
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream);
    loop {
        let req = match read_request(&mut reader, handler.max_head()).await {
            Ok(req) => req,
            Err(NoRequest::Closed) => return,
            Err(NoRequest::HeadTooLong) => {
                handler.head_too_long();
                let body = br#"{"error":{"code":"RequestHeaderFieldsTooLarge","message":"Request Header Fields Too Large"}}"#;
                let head = head(431, "application/json", body.len(), &[], true);
                let stream = reader.get_mut();
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body).await;
                let _ = stream.flush().await;
                return;
            }
        };
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let reply = handler.handle(req).await;
        let stream = reader.get_mut();
        match reply {
            Reply::Drop => return,
            Reply::CutShort { status, body, keep } => {
                let head = head(status, "application/json", body.len(), &[], true);
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&body[..keep.min(body.len())]).await;
                let _ = stream.flush().await;
                return;
            }
            Reply::Stream {
                status,
                head: start,
                fill,
                tail,
                length,
            } => {
                let mut h = format!(
                    "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\n",
                    reason(status)
                );
                if let Some(n) = length {
                    h.push_str(&format!("content-length: {n}\r\n"));
                }
                h.push_str("connection: close\r\n\r\n");
                if stream.write_all(h.as_bytes()).await.is_err()
                    || stream.write_all(&start).await.is_err()
                {
                    return;
                }
                let block = vec![fill; 64 * 1024];
                let mut left = length.map(|n| n.saturating_sub((start.len() + tail.len()) as u64));
                while left != Some(0) {
                    let n = left.map_or(block.len(), |l| l.min(block.len() as u64) as usize);
                    if stream.write_all(&block[..n]).await.is_err() {
                        return;
                    }
                    left = left.map(|l| l - n as u64);
                }
                let _ = stream.write_all(&tail).await;
                let _ = stream.flush().await;
                return;
            }
            Reply::Full {
                status,
                content_type,
                extra_headers,
                body,
            } => {
                let mut out =
                    head(status, content_type, body.len(), &extra_headers, close).into_bytes();
                out.extend_from_slice(&body);
                if stream.write_all(&out).await.is_err() || close {
                    return;
                }
            }
        }
    }
}

fn head(
    status: u16,
    content_type: &str,
    len: usize,
    extra: &[(&'static str, String)],
    close: bool,
) -> String {
    let mut h = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {len}\r\n",
        reason(status)
    );
    for (k, v) in extra {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        h.push_str("connection: close\r\n");
    }
    h.push_str("\r\n");
    h
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        307 => "Temporary Redirect",
        431 => "Request Header Fields Too Large",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

async fn read_request(
    reader: &mut BufReader<TcpStream>,
    max_head: usize,
) -> Result<Request, NoRequest> {
    use NoRequest::Closed;
    let mut line = String::new();
    let mut head_len = 0usize;
    // Each line is read at most as far as the head may still grow, so a client sending an
    // endless header costs this server nothing.
    let limit = max_head.min(MAX_HEAD);
    async fn next_line(
        reader: &mut BufReader<TcpStream>,
        line: &mut String,
        head_len: &mut usize,
        limit: usize,
    ) -> Result<usize, NoRequest> {
        line.clear();
        let room = (limit + 1).saturating_sub(*head_len) as u64;
        let n = (&mut *reader)
            .take(room)
            .read_line(line)
            .await
            .map_err(|_| NoRequest::Closed)?;
        *head_len += n;
        if *head_len > limit {
            return Err(NoRequest::HeadTooLong);
        }
        Ok(n)
    }
    // Tolerate stray blank lines between requests.
    loop {
        let n = next_line(reader, &mut line, &mut head_len, limit).await?;
        if n == 0 {
            return Err(Closed);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().ok_or(Closed)?.to_string();
    let target = parts.next().ok_or(Closed)?.to_string();
    let mut headers = Vec::new();
    loop {
        let n = next_line(reader, &mut line, &mut head_len, limit).await?;
        if n == 0 {
            return Err(Closed);
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or(Closed)?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    if len > MAX_BODY {
        return Err(Closed);
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).await.map_err(|_| Closed)?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    Ok(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

/// Decodes `application/x-www-form-urlencoded` text (also used for query strings).
pub fn form_decode(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_forms_and_queries() {
        assert_eq!(
            form_decode("a=1&b=x%20y+z&c=%27q%27&d=%zz&e=%2"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y z".into()),
                ("c".into(), "'q'".into()),
                ("d".into(), "%zz".into()),
                ("e".into(), "%2".into()),
            ]
        );
    }
}
