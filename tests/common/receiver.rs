//! A webhook receiver for the notification tests: a small HTTP/1.1 server (one request per
//! connection) that verifies Standard Webhooks signatures the way the spec's reference
//! libraries do (required headers, a 5-minute timestamp tolerance, any `v1,` signature of
//! the space-separated list, compared in constant time) and can be told to fail: answer
//! 500, 429 with Retry-After, 410, or any status, hang past the sender's timeout, or drop
//! the connection without an answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the receiver does with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    Status(u16),
    /// 429 with `Retry-After: <seconds>`.
    TooMany(u32),
    /// Answers only after this long (past the sender's timeout).
    Hang(Duration),
    /// Closes the connection after reading the request, without an answer.
    Drop,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: SystemTime,
    /// The signature verified (false when unsigned or wrong).
    pub verified: bool,
    /// The answer was 2xx.
    pub accepted: bool,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn id(&self) -> &str {
        self.headers.get("webhook-id").map_or("", String::as_str)
    }
}

#[derive(Default)]
struct Plan {
    /// Probability of a fault drawn from `faults`.
    rate: f64,
    faults: Vec<Fault>,
    /// Every request gets this fault (overrides `rate`).
    always: Option<Fault>,
    /// The next requests get these, in order (before `always` and `rate`).
    script: Vec<Fault>,
}

struct State {
    keys: Vec<Vec<u8>>,
    plan: Mutex<Plan>,
    got: Mutex<Vec<Received>>,
    changed: tokio::sync::Notify,
    rng: Mutex<fastrand::Rng>,
}

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
}

/// A fresh Standard Webhooks key, as `whsec_...` text.
pub fn new_secret() -> String {
    let bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    format!("whsec_{}", STANDARD.encode(bytes))
}

impl Receiver {
    /// Listens on 127.0.0.1; `secrets` are the keys it accepts (empty: no verification).
    pub async fn start(secrets: &[&str], seed: u64) -> Self {
        let keys = secrets
            .iter()
            .map(|s| {
                STANDARD
                    .decode(s.strip_prefix("whsec_").expect("whsec_ key"))
                    .expect("base64 key")
            })
            .collect();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            keys,
            plan: Mutex::new(Plan::default()),
            got: Mutex::new(Vec::new()),
            changed: tokio::sync::Notify::new(),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &s).await;
                });
            }
        });
        Self { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_faults(&self, rate: f64, faults: Vec<Fault>) {
        let mut p = self.state.plan.lock().unwrap();
        p.rate = rate;
        p.faults = faults;
    }

    pub fn set_always(&self, fault: Option<Fault>) {
        self.state.plan.lock().unwrap().always = fault;
    }

    pub fn script(&self, faults: Vec<Fault>) {
        self.state.plan.lock().unwrap().script = faults;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        self.state.got.lock().unwrap().clone()
    }

    /// The requests answered 2xx.
    pub fn accepted(&self) -> Vec<Received> {
        self.requests().into_iter().filter(|r| r.accepted).collect()
    }

    /// Waits until `check` holds for the requests so far; panics after `limit`.
    pub async fn wait_for(&self, limit: Duration, what: &str, check: impl Fn(&[Received]) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.state.changed.notified();
            if check(&self.state.got.lock().unwrap()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let got = self.state.got.lock().unwrap().len();
                panic!("receiver: {what} not reached within {limit:?} ({got} requests)");
            }
        }
    }
}

fn verify(keys: &[Vec<u8>], headers: &HashMap<String, String>, body: &[u8]) -> bool {
    let (Some(id), Some(ts), Some(sigs)) = (
        headers.get("webhook-id"),
        headers.get("webhook-timestamp"),
        headers.get("webhook-signature"),
    ) else {
        return false;
    };
    let Ok(ts_num) = ts.parse::<i64>() else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if (now - ts_num).abs() > 300 {
        return false;
    }
    let mut signed = format!("{id}.{ts}.").into_bytes();
    signed.extend_from_slice(body);
    for key in keys {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
        let expected = aws_lc_rs::hmac::sign(&key, &signed);
        for sig in sigs.split(' ') {
            let Some(("v1", b64)) = sig.split_once(',') else {
                continue;
            };
            let Ok(given) = STANDARD.decode(b64) else {
                continue;
            };
            if aws_lc_rs::constant_time::verify_slices_are_equal(expected.as_ref(), &given).is_ok()
            {
                return true;
            }
        }
    }
    false
}

async fn serve(mut stream: TcpStream, s: &State) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let verified = !s.keys.is_empty() && verify(&s.keys, &headers, &body);
    let fault = {
        let mut plan = s.plan.lock().unwrap();
        if !plan.script.is_empty() {
            Some(plan.script.remove(0))
        } else if plan.always.is_some() {
            plan.always.clone()
        } else {
            let mut rng = s.rng.lock().unwrap();
            (!plan.faults.is_empty() && rng.f64() < plan.rate)
                .then(|| plan.faults[rng.usize(..plan.faults.len())].clone())
        }
    };
    let status = match &fault {
        None if !s.keys.is_empty() && !verified => 401,
        None => 200,
        Some(Fault::Status(c)) => *c,
        Some(Fault::TooMany(_)) => 429,
        Some(Fault::Hang(d)) => {
            tokio::time::sleep(*d).await;
            500
        }
        Some(Fault::Drop) => 0,
    };
    let accepted = (200..300).contains(&status);
    s.got.lock().unwrap().push(Received {
        path,
        headers,
        body,
        at: SystemTime::now(),
        verified,
        accepted,
    });
    s.changed.notify_waiters();
    if status == 0 {
        return Ok(());
    }
    let extra = match &fault {
        Some(Fault::TooMany(secs)) => format!("Retry-After: {secs}\r\n"),
        Some(Fault::Status(300..=399)) => "Location: /redirected\r\n".to_string(),
        _ => String::new(),
    };
    let text = if accepted {
        "ok"
    } else {
        "<html><body>receiver says no</body></html>"
    };
    let response = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
