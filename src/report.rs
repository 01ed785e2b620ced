//! What `report`, `list` and `export` print: tables that fit the terminal, CSV and JSON.

use std::io::Write;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::domain::{ACTION_FIELDS, Cell, format_time, parse_duration, parse_time};
use crate::store::{ActionRow, ReportCounts, Store, TransitionExport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// `--since`: an RFC 3339 time or a duration back from now (`7d`, `12h`).
pub fn parse_since(s: &str) -> Result<SystemTime, String> {
    if let Some(t) = parse_time(s) {
        return Ok(t);
    }
    match parse_duration(s) {
        Ok(d) => {
            crate::domain::time_ago(d).ok_or_else(|| format!("'{s}' reaches back before 1970"))
        }
        Err(_) => Err(format!(
            "'{s}' is neither a time (2026-11-28T00:00:00Z) nor a duration back from now (7d, 12h)"
        )),
    }
}

/// Columns available to a table: the terminal's width, `COLUMNS`, or 120 when neither is
/// known (output to a file or pipe).
pub fn terminal_width() -> usize {
    if let Some((terminal_size::Width(w), _)) = terminal_size::terminal_size() {
        return usize::from(w).max(40);
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(120)
        .max(40)
}

/// A table whose widest columns give way (with `…`) until it fits `width`.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    /// Columns that may be shortened, most expendable first.
    shrinkable: Vec<usize>,
}

impl Table {
    pub fn new(headers: &[&str], shrinkable: &[usize]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            shrinkable: shrinkable.to_vec(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self, width: usize) -> String {
        let n = self.headers.len();
        let mut widths: Vec<usize> = (0..n)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([self.headers[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * (n.saturating_sub(1));
        for &i in &self.shrinkable {
            let over = total(&widths).saturating_sub(width);
            if over == 0 {
                break;
            }
            let floor = self.headers[i].chars().count().max(6);
            widths[i] = widths[i].saturating_sub(over).max(floor);
        }
        let mut out = String::new();
        let line = |cells: &[String], out: &mut String| {
            let parts: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{:<w$}", fit(c, *w), w = *w))
                .collect();
            out.push_str(parts.join("  ").trim_end());
            out.push('\n');
        };
        line(&self.headers, &mut out);
        for r in &self.rows {
            line(r, &mut out);
        }
        out
    }
}

fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// One CSV field, quoted when it must be.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn csv_line(fields: &[String]) -> String {
    let mut s = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    s.push('\n');
    s
}

/// A CSV header line.
pub fn csv_header(columns: &[&str]) -> String {
    csv_line(&columns.iter().map(|c| c.to_string()).collect::<Vec<_>>())
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

/// The columns of an action in exports and `list --format csv`: `last_response` last (`list`
/// leaves it out).
pub fn action_columns() -> Vec<&'static str> {
    let mut columns = vec!["action_id", "tracking", "status"];
    columns.extend(ACTION_FIELDS.iter().map(|f| f.column));
    columns.extend([
        "mde_updated_at",
        "enqueued_at",
        "last_polled_at",
        "next_poll_at",
        "poll_count",
        "error_count",
        "last_error",
        "last_error_at",
        "finished_at",
        "revived_at",
        "source",
        "correlation",
        "last_response",
    ]);
    columns
}

/// An action's values in the order of `action_columns`.
pub fn action_values(r: &ActionRow) -> Vec<String> {
    let mut values = vec![r.action_id.clone(), r.tracking.to_string(), opt(&r.status)];
    values.extend(r.fields.cells().iter().map(Cell::to_string));
    values.extend([
        opt(&r.mde_updated_at),
        r.enqueued_at.clone(),
        opt(&r.last_polled_at),
        opt(&r.next_poll_at),
        r.poll_count.to_string(),
        r.error_count.to_string(),
        opt(&r.last_error),
        opt(&r.last_error_at),
        opt(&r.finished_at),
        opt(&r.revived_at),
        opt(&r.source),
        opt(&r.correlation),
        opt(&r.last_response),
    ]);
    values
}

/// The columns of a transition in exports: the transition, then its action's fields.
pub fn transition_columns() -> Vec<&'static str> {
    let mut columns = vec![
        "id",
        "action_id",
        "from_status",
        "to_status",
        "observed_at",
        "mde_updated_at",
    ];
    columns.extend(ACTION_FIELDS.iter().map(|f| f.column));
    columns.extend(["tracking", "current_status"]);
    columns
}

/// A transition's values in the order of `transition_columns`.
pub fn transition_values(t: &TransitionExport) -> Vec<String> {
    let tr = &t.transition;
    let mut values = vec![
        tr.id.to_string(),
        tr.action_id.clone(),
        opt(&tr.from_status),
        tr.to_status.clone(),
        tr.observed_at.clone(),
        opt(&tr.mde_updated_at),
    ];
    values.extend(t.action.cells().iter().map(Cell::to_string));
    values.extend([t.tracking.to_string(), opt(&t.current_status)]);
    values
}

/// `status`'s text: one action, what MDE said about it where it said something, and its
/// transitions.
pub fn status_text(row: &ActionRow, transitions: &[crate::store::TransitionRow]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let v = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let _ = writeln!(out, "action        {}", row.action_id);
    let _ = writeln!(out, "tracking      {}", row.tracking);
    let _ = writeln!(out, "status        {}", v(&row.status));
    let _ = writeln!(out, "type          {}", v(&row.fields.action_type));
    let _ = writeln!(
        out,
        "device        {} ({})",
        v(&row.fields.computer_dns_name),
        v(&row.fields.machine_id)
    );
    let _ = writeln!(out, "requestor     {}", v(&row.fields.requestor));
    if let Some(how) = &row.source {
        let _ = writeln!(out, "tracked via   {how}");
    }
    if let Some(c) = &row.correlation {
        let _ = writeln!(out, "correlation   {c}");
    }
    write_what_mde_said(&mut out, &row.fields);
    if let Some(at) = &row.revived_at {
        let _ = writeln!(
            out,
            "revived       {at} (had ended not_found; MDE showed it later)"
        );
    }
    let _ = writeln!(out, "created (MDE) {}", v(&row.fields.mde_created_at));
    let _ = writeln!(out, "updated (MDE) {}", v(&row.mde_updated_at));
    let _ = writeln!(out, "enqueued      {}", row.enqueued_at);
    let _ = writeln!(out, "last polled   {}", v(&row.last_polled_at));
    let _ = writeln!(out, "next poll     {}", v(&row.next_poll_at));
    let _ = writeln!(out, "finished      {}", v(&row.finished_at));
    let _ = writeln!(
        out,
        "polls         {} ({} failed)",
        row.poll_count, row.error_count
    );
    if let Some(e) = &row.last_error {
        let _ = writeln!(out, "last error    {e} (at {})", v(&row.last_error_at));
    }
    write_transitions(&mut out, transitions);
    out
}

/// The free text and the rarer fields of MDE's answer, each where MDE said something.
fn write_what_mde_said(out: &mut String, fields: &crate::domain::ActionFields) {
    use std::fmt::Write as _;
    let v = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let _ = writeln!(out, "comment       {}", v(&fields.requestor_comment));
    // Only where MDE said something: most actions have none of these.
    if let Some(source) = &fields.request_source {
        let _ = writeln!(out, "source        {source}");
    }
    if let Some(scope) = &fields.scope {
        let _ = writeln!(out, "scope         {scope}");
    }
    if let Some(title) = &fields.title {
        let _ = writeln!(out, "title         {title}");
    }
    if let Some(h) = fields.error_hresult.filter(|h| *h != 0) {
        // HRESULTs read as hex: 0x80070005 is "access denied".
        let _ = writeln!(out, "error         {} ({h})", hresult_hex(h));
    }
    if fields.cancelled_at.is_some() || fields.cancellation_requestor.is_some() {
        let _ = writeln!(
            out,
            "cancelled     {} by {}{}",
            v(&fields.cancelled_at),
            v(&fields.cancellation_requestor),
            fields
                .cancellation_comment
                .as_deref()
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        );
    }
}

fn write_transitions(out: &mut String, transitions: &[crate::store::TransitionRow]) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "transitions");
    if transitions.is_empty() {
        let _ = writeln!(out, "  (none yet)");
    }
    for t in transitions {
        let _ = writeln!(
            out,
            "  {}  {} -> {}",
            t.observed_at,
            t.from_status.as_deref().unwrap_or("(first seen)"),
            t.to_status
        );
    }
}

/// One action as JSON (`status --json`, `export`, the HTTP API): every column, MDE's last
/// answer embedded as JSON rather than as a string.
pub fn action_json(row: &ActionRow) -> serde_json::Value {
    let mut v = serde_json::to_value(row).unwrap_or_default();
    if let Some(raw) = &row.last_response {
        v["last_response"] =
            serde_json::from_str(raw).unwrap_or_else(|_| serde_json::Value::String(raw.clone()));
    }
    v
}

/// One action in `list --json`: the columns without MDE's last answer (a list stays small).
pub fn action_list_json(row: &ActionRow) -> serde_json::Value {
    let mut v = serde_json::to_value(row).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("last_response");
    }
    v
}

/// An action's type and device as one-line views show them ("" for what MDE did not say).
pub fn kind_and_device(row: &ActionRow) -> (&str, &str) {
    (
        row.fields.action_type.as_deref().unwrap_or_default(),
        row.fields.computer_dns_name.as_deref().unwrap_or_default(),
    )
}

/// The `list` table: the columns a person scans, shortened to fit.
pub fn action_table(rows: &[ActionRow]) -> Table {
    let mut t = Table::new(
        &[
            "ACTION", "TRACKING", "STATUS", "TYPE", "DEVICE", "POLLS", "ENQUEUED",
        ],
        // The id goes last: shortened, it no longer identifies anything.
        &[4, 3, 6, 2, 1, 0],
    );
    for r in rows {
        t.row(vec![
            r.action_id.clone(),
            r.tracking.to_string(),
            r.status.clone().unwrap_or_else(|| "-".into()),
            r.fields.action_type.clone().unwrap_or_else(|| "-".into()),
            r.fields
                .computer_dns_name
                .clone()
                .unwrap_or_else(|| "-".into()),
            r.poll_count.to_string(),
            r.enqueued_at.clone(),
        ]);
    }
    t
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub finished: usize,
    pub p50_seconds: Option<f64>,
    pub p95_seconds: Option<f64>,
}

/// Nearest-rank percentile of ascending values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank - 1).copied()
}

#[derive(Debug, Serialize)]
pub struct OldActive {
    pub action_id: String,
    pub action_type: Option<String>,
    pub computer_dns_name: Option<String>,
    pub status: Option<String>,
    pub since: String,
    pub age_seconds: u64,
}

/// A finished action that did not succeed, with what MDE said about why.
#[derive(Debug, Serialize)]
pub struct Unsuccessful {
    pub action_id: String,
    pub action_type: Option<String>,
    pub computer_dns_name: Option<String>,
    pub status: Option<String>,
    pub finished_at: Option<String>,
    /// `errorHResult` as MDE reports it (signed 32-bit), absent when 0 or not given.
    pub error_hresult: Option<i64>,
    pub cancellation_requestor: Option<String>,
    pub cancellation_comment: Option<String>,
    pub cancelled_at: Option<String>,
}

impl Unsuccessful {
    /// What the table shows after the status: the HRESULT in hex (how Windows errors are
    /// looked up) and who cancelled, with their comment.
    fn why(&self) -> String {
        let mut parts = Vec::new();
        if let Some(h) = self.error_hresult {
            parts.push(hresult_hex(h));
        }
        if let Some(by) = &self.cancellation_requestor {
            parts.push(format!("cancelled by {by}"));
        }
        if let Some(c) = self
            .cancellation_comment
            .as_deref()
            .filter(|c| !c.is_empty())
        {
            parts.push(format!("\"{c}\""));
        }
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join(", ")
        }
    }
}

/// An HRESULT as Windows documents it: 0x80070005 is "access denied".
pub fn hresult_hex(h: i64) -> String {
    format!("HRESULT 0x{:08X}", h as i32 as u32)
}

#[derive(Debug, Serialize)]
pub struct ApiCalls {
    pub total: i64,
    pub per_tracked_action: Option<f64>,
    pub by_endpoint_and_outcome: Vec<(String, String, i64)>,
}

/// How fresh tracking is: over the last hour of calls, how long an active action waited
/// between checks on average (the figure the API budget buys).
#[derive(Debug, Serialize)]
pub struct Checking {
    pub window_seconds: f64,
    pub checks: i64,
    pub active: i64,
    pub effective_interval_seconds: Option<f64>,
    pub sweeps: i64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub generated_at: String,
    pub since: Option<String>,
    pub counts: ReportCounts,
    pub time_to_terminal: Percentiles,
    pub oldest_active: Vec<OldActive>,
    /// The ten most recently finished actions that failed, timed out or were cancelled.
    pub unsuccessful: Vec<Unsuccessful>,
    pub api_calls: ApiCalls,
    pub checking: Checking,
}

impl Report {
    pub async fn build(store: &Store, since: Option<SystemTime>) -> crate::store::Result<Self> {
        let now = SystemTime::now();
        let counts = store.report_counts(since).await?;
        let times = store.times_to_terminal(since).await?;
        let oldest = store.oldest_active(10).await?;
        let unsuccessful = store.recent_unsuccessful(since, 10).await?;
        let calls = store.api_call_summary(since).await?;
        let total: i64 = calls.iter().map(|(_, _, n)| n).sum();
        let tracked: i64 = counts.by_tracking.iter().map(|(_, n)| n).sum();
        let hour_ago = now - Duration::from_secs(3600);
        let checks = store.check_summary(hour_ago, now).await?;
        let sweeps = store.sweeps_since(hour_ago).await?;
        Ok(Self {
            generated_at: format_time(now),
            since: since.map(format_time),
            time_to_terminal: Percentiles {
                finished: times.len(),
                p50_seconds: percentile(&times, 0.50),
                p95_seconds: percentile(&times, 0.95),
            },
            oldest_active: oldest
                .into_iter()
                .map(|r| {
                    let since = r
                        .fields
                        .mde_created_at
                        .clone()
                        .unwrap_or_else(|| r.enqueued_at.clone());
                    let age = parse_time(&since)
                        .and_then(|t| now.duration_since(t).ok())
                        .unwrap_or_default();
                    OldActive {
                        action_id: r.action_id,
                        action_type: r.fields.action_type,
                        computer_dns_name: r.fields.computer_dns_name,
                        status: r.status,
                        since,
                        age_seconds: age.as_secs(),
                    }
                })
                .collect(),
            unsuccessful: unsuccessful
                .into_iter()
                .map(|r| Unsuccessful {
                    action_id: r.action_id,
                    action_type: r.fields.action_type,
                    computer_dns_name: r.fields.computer_dns_name,
                    status: r.status,
                    finished_at: r.finished_at,
                    error_hresult: r.fields.error_hresult.filter(|h| *h != 0),
                    cancellation_requestor: r.fields.cancellation_requestor,
                    cancellation_comment: r.fields.cancellation_comment,
                    cancelled_at: r.fields.cancelled_at,
                })
                .collect(),
            api_calls: ApiCalls {
                total,
                per_tracked_action: (tracked > 0).then(|| total as f64 / tracked as f64),
                by_endpoint_and_outcome: calls,
            },
            checking: Checking {
                window_seconds: checks.window_seconds,
                checks: checks.checks,
                active: checks.active,
                effective_interval_seconds: checks.effective_interval().map(|d| d.as_secs_f64()),
                sweeps,
            },
            counts,
        })
    }

    pub fn write(&self, format: Format, out: &mut impl Write) -> std::io::Result<()> {
        match format {
            Format::Json => {
                serde_json::to_writer_pretty(&mut *out, self)?;
                writeln!(out)
            }
            Format::Csv => out.write_all(self.csv().as_bytes()),
            Format::Table => out.write_all(self.table(terminal_width()).as_bytes()),
        }
    }

    /// Long form: one `section,key,value` row per figure.
    fn csv(&self) -> String {
        let mut s = csv_line(&["section".into(), "key".into(), "value".into()]);
        let mut row = |section: &str, key: &str, value: String| {
            s.push_str(&csv_line(&[section.into(), key.into(), value]));
        };
        row("report", "generated_at", self.generated_at.clone());
        row("report", "since", self.since.clone().unwrap_or_default());
        for (k, n) in &self.counts.by_tracking {
            row("tracking", k, n.to_string());
        }
        for (k, n) in &self.counts.by_status {
            row("status", k, n.to_string());
        }
        for (k, n) in &self.counts.by_type {
            row("type", k, n.to_string());
        }
        for (k, n) in &self.counts.by_source {
            row("source", k, n.to_string());
        }
        let t = &self.time_to_terminal;
        row("time_to_terminal", "finished", t.finished.to_string());
        row("time_to_terminal", "p50_seconds", num(t.p50_seconds));
        row("time_to_terminal", "p95_seconds", num(t.p95_seconds));
        for o in &self.oldest_active {
            row("oldest_active", &o.action_id, o.age_seconds.to_string());
        }
        for u in &self.unsuccessful {
            row(
                "unsuccessful",
                &u.action_id,
                format!("{} {}", u.status.as_deref().unwrap_or("-"), u.why()),
            );
        }
        row("api_calls", "total", self.api_calls.total.to_string());
        row(
            "api_calls",
            "per_tracked_action",
            num(self.api_calls.per_tracked_action),
        );
        for (endpoint, outcome, n) in &self.api_calls.by_endpoint_and_outcome {
            row("api_calls", &format!("{endpoint}/{outcome}"), n.to_string());
        }
        let c = &self.checking;
        row(
            "checking",
            "window_seconds",
            format!("{:.0}", c.window_seconds),
        );
        row("checking", "checks", c.checks.to_string());
        row("checking", "active", c.active.to_string());
        row(
            "checking",
            "effective_interval_seconds",
            num(c.effective_interval_seconds),
        );
        row("checking", "sweeps", c.sweeps.to_string());
        s
    }

    fn table(&self, width: usize) -> String {
        let mut s = format!("mde-actiond report at {}\n", self.generated_at);
        if let Some(t) = &self.since {
            s.push_str(&format!("actions enqueued since {t}\n"));
        }
        s.push('\n');
        let counts = |title: &str, rows: &[(String, i64)]| {
            let mut t = Table::new(&[title, "ACTIONS"], &[0]);
            for (k, n) in rows {
                t.row(vec![k.clone(), n.to_string()]);
            }
            t.render(width)
        };
        s.push_str(&counts("TRACKING", &self.counts.by_tracking));
        s.push('\n');
        s.push_str(&counts("STATUS", &self.counts.by_status));
        s.push('\n');
        s.push_str(&counts("TYPE", &self.counts.by_type));
        s.push('\n');
        s.push_str(&counts("SOURCE", &self.counts.by_source));
        let t = &self.time_to_terminal;
        s.push_str(&format!(
            "\nTime to terminal: p50 {}, p95 {} ({} finished)\n",
            human(t.p50_seconds),
            human(t.p95_seconds),
            t.finished
        ));
        s.push_str(&format!(
            "API calls: {}{}\n",
            self.api_calls.total,
            self.api_calls
                .per_tracked_action
                .map(|p| format!(" ({p:.3} per tracked action)"))
                .unwrap_or_default()
        ));
        s.push_str(&self.checking.describe());
        if !self.oldest_active.is_empty() {
            s.push_str("\nOldest active actions\n");
            let rows = self.oldest_active.iter().map(|o| {
                let age = human(Some(o.age_seconds as f64));
                (
                    &o.action_id,
                    &o.action_type,
                    &o.computer_dns_name,
                    &o.status,
                    age,
                )
            });
            s.push_str(&actions_table("AGE", &[2, 1, 3, 0], rows).render(width));
        }
        if !self.unsuccessful.is_empty() {
            s.push_str("\nRecently failed, timed out or cancelled\n");
            let rows = self.unsuccessful.iter().map(|u| {
                let why = u.why();
                (
                    &u.action_id,
                    &u.action_type,
                    &u.computer_dns_name,
                    &u.status,
                    why,
                )
            });
            s.push_str(&actions_table("WHY", &[4, 2, 1, 0], rows).render(width));
        }
        s
    }
}

/// A row of `actions_table`: id, type, device, status and the last column's text.
type ActionLine<'a> = (
    &'a String,
    &'a Option<String>,
    &'a Option<String>,
    &'a Option<String>,
    String,
);

/// The report's tables of actions: id, type, device, status, then `last`.
fn actions_table<'a>(
    last: &str,
    shrink_order: &[usize],
    rows: impl Iterator<Item = ActionLine<'a>>,
) -> Table {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut t = Table::new(&["ACTION", "TYPE", "DEVICE", "STATUS", last], shrink_order);
    for (id, kind, device, status, tail) in rows {
        t.row(vec![
            id.clone(),
            dash(kind),
            dash(device),
            dash(status),
            tail,
        ]);
    }
    t
}

impl Checking {
    /// The checking figures in a line each, when there are any.
    fn describe(&self) -> String {
        let mut s = String::new();
        if self.checks > 0 {
            s.push_str(&format!(
                "Checks: {} in the last {} ({} sweeps)\n",
                self.checks,
                human(Some(self.window_seconds)),
                self.sweeps,
            ));
        }
        if let Some(every) = self.effective_interval_seconds {
            s.push_str(&format!(
                "Each active action checked every {}\n",
                human(Some(every))
            ));
        }
        s
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), for `--stats` and benchmarks.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn num(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_default()
}

/// Seconds as a short duration for people (`42s`, `3m 5s`, `2h 10m`).
fn human(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(secs) if secs < 60.0 => format!("{secs:.1}s"),
        Some(secs) => {
            let d = Duration::from_secs(secs.round() as u64);
            let (h, m, s) = (d.as_secs() / 3600, d.as_secs() / 60 % 60, d.as_secs() % 60);
            match (d.as_secs() / 86_400, h % 24) {
                (0, 0) => format!("{m}m {s}s"),
                (0, h) => format!("{h}h {m}m"),
                (days, h) => format!("{days}d {h}h"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(10.0));
        assert_eq!(percentile(&v, 0.95), Some(19.0));
        assert_eq!(percentile(&[3.0], 0.95), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn tables_fit_the_width() {
        let mut t = Table::new(&["ID", "NAME", "N"], &[1]);
        t.row(vec!["a".into(), "x".repeat(80), "1".into()]);
        let out = t.render(40);
        assert!(out.lines().all(|l| l.chars().count() <= 40), "{out}");
        assert!(out.contains('…'));
        let wide = t.render(200);
        assert!(wide.contains(&"x".repeat(80)));
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\"\n"), "\"say \"\"hi\"\"\n\"");
    }

    #[test]
    fn since_accepts_times_and_durations() {
        assert!(parse_since("2026-11-28T00:00:00Z").is_ok());
        let week = parse_since("7d").unwrap();
        let ago = SystemTime::now().duration_since(week).unwrap();
        assert!(ago >= Duration::from_secs(7 * 86400 - 5));
        assert!(
            parse_since("last tuesday")
                .unwrap_err()
                .contains("last tuesday")
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Some(4.25)), "4.2s");
        assert_eq!(human(Some(185.0)), "3m 5s");
        assert_eq!(human(Some(7800.0)), "2h 10m");
        assert_eq!(human(Some(3.0 * 86400.0 + 7200.0)), "3d 2h");
        assert_eq!(human(None), "-");
    }
}
