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
        let Some(req) = read_request(&mut reader).await else {
            return;
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

async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    let mut head_len = 0;
    // Tolerate stray blank lines between requests.
    loop {
        line.clear();
        let n = reader.read_line(&mut line).await.ok()?;
        if n == 0 {
            return None;
        }
        head_len += n;
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).await.ok()?;
        head_len += n;
        if n == 0 || head_len > MAX_HEAD {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    if len > MAX_BODY {
        return None;
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).await.ok()?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    Some(Request {
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
