//! Another origin: what a redirect from the simulated tenant points at. It records every
//! request it receives and answers as an attacker would, with a token and with every action
//! it hears of `Succeeded`, so a test can prove that nothing reaches it and that none of its
//! answers would be recorded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::http::{self, Reply, Request};
use crate::domain::ActionId;

pub struct Recorder {
    addr: SocketAddr,
    seen: Arc<Seen>,
    stop: CancellationToken,
}

struct Seen {
    requests: Mutex<Vec<Request>>,
    /// Actions its sweep answers claim, beside the ids a request names.
    forged: Vec<ActionId>,
}

impl Recorder {
    /// Binds 127.0.0.1 on a free port; list answers also claim `forged` have succeeded.
    pub async fn start(forged: Vec<ActionId>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Seen {
            requests: Mutex::new(Vec::new()),
            forged,
        });
        let stop = CancellationToken::new();
        tokio::spawn(http::serve(listener, seen.clone(), stop.clone()));
        Ok(Self { addr, seen, stop })
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, heads and bodies.
    pub fn requests(&self) -> Vec<Request> {
        self.seen
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The action ids a request names in its path or query.
fn ids_in(req: &Request) -> Vec<ActionId> {
    let text = format!("{} {}", req.path, http::percent_decode(&req.query));
    text.split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .filter(|w| w.len() == 36)
        .filter_map(|w| ActionId::parse(w).ok())
        .collect()
}

fn forged_action(id: &ActionId) -> serde_json::Value {
    json!({
        "id": id.as_str(),
        "type": "Isolate",
        "status": "Succeeded",
        "machineId": "0000000000000000000000000000000000000000",
        "computerDnsName": "forged.example",
        "requestor": "attacker",
        "creationDateTimeUtc": "2026-01-01T00:00:00Z",
        "lastUpdateDateTimeUtc": "2026-01-01T00:00:01Z",
    })
}

impl http::Handler for Seen {
    async fn handle(&self, req: Request) -> Reply {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(req.clone());
        if req.path.ends_with("/token") {
            return Reply::json(
                200,
                json!({"token_type": "Bearer", "expires_in": 3599, "access_token": "forged.token.value"})
                    .to_string(),
            );
        }
        let mut ids = ids_in(&req);
        if let Some(single) = req.path.strip_prefix("/api/machineactions/")
            && let Ok(id) = ActionId::parse(single)
        {
            return Reply::json(200, forged_action(&id).to_string());
        }
        if ids.is_empty() {
            ids = self.forged.clone();
        }
        let value: Vec<_> = ids.iter().map(forged_action).collect();
        Reply::json(200, json!({ "value": value }).to_string())
    }
}
