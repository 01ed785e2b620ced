//! Times `Store::record_polls` as the first sweeps of many new actions call it: every row
//! gets its first answer (about 700 bytes, like the simulator's), then a second one
//! (`Pending` to `InProgress`). Ids are random, as MDE's are, so rows land all over the
//! table. A profiling aid:
//!
//!     cargo run --release --example store_write -- 20000 1000 10  # actions, rows per
//!                                             # statement batch, batches per transaction
//!     perf record -g target/release/examples/store_write 20000 1000 10

//!
//! A sweep page of 10,000 is ten batches of 1,000 in one transaction (`PollBatch`).
use std::time::{Duration, Instant, SystemTime};

use mde_actiond::domain::ActionId;
use mde_actiond::mde::FetchedAction;
use mde_actiond::store::{NextStep, OpenMode, PollResult, PollWrite, Store};

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(100_000, |s| s.parse().unwrap());
    let chunk: usize = std::env::args().nth(2).map_or(1000, |s| s.parse().unwrap());
    let per_tx: usize = std::env::args().nth(3).map_or(10, |s| s.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("w.db"), OpenMode::ReadWrite)
        .await
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let ids: Vec<ActionId> = (0..n).map(|_| ActionId::random(&mut rng)).collect();
    let now = SystemTime::now();
    let t = Instant::now();
    for c in ids.chunks(10_000) {
        store.enqueue(c, now).await.unwrap();
    }
    eprintln!("enqueue {n}: {:?}", t.elapsed());
    let pad = "x".repeat(400);
    for status in ["Pending", "InProgress"] {
        let t = Instant::now();
        for page in ids.chunks(chunk * per_tx) {
            let mut batch = store.begin_polls().await.unwrap();
            for c in page.chunks(chunk) {
                let writes: Vec<PollWrite> = c
                .iter()
                .map(|id| {
                    let raw = format!(
                        "{{\"id\":\"{}\",\"type\":\"Isolate\",\"status\":\"{status}\",\"machineId\":\"1e5bc9d7e413ddd7902c2932e418702b84d0cc07\",\"computerDnsName\":\"desktop-01.contoso.com\",\"scope\":\"Full\",\"requestSource\":\"PublicApi\",\"errorHResult\":0,\"requestor\":\"soc@contoso.com\",\"requestorComment\":\"{pad}\",\"creationDateTimeUtc\":\"2026-12-01T10:00:00.000Z\",\"lastUpdateDateTimeUtc\":\"2026-12-01T10:00:00.000Z\"}}",
                        id.as_str()
                    );
                    // The observation as the daemon derives it from an answer.
                    let found = FetchedAction::from_json(&raw).expect("a MachineAction");
                    PollWrite {
                        id: id.clone(),
                        result: PollResult::Observed(Box::new(found.observation)),
                        next: NextStep::PollAt(now + Duration::from_secs(1200)),
                    }
                })
                .collect();
                batch
                    .record(&writes, SystemTime::now(), true)
                    .await
                    .unwrap();
            }
            batch.commit().await.unwrap();
        }
        eprintln!(
            "record {n} {status} in batches of {chunk}, {per_tx} a transaction: {:?}",
            t.elapsed()
        );
    }
    let size = std::fs::metadata(dir.path().join("w.db")).unwrap().len();
    eprintln!("database: {} MiB", size >> 20);
    if std::env::var_os("KEEP_DB").is_some() {
        eprintln!("kept at {}", dir.keep().join("w.db").display());
    }
}
