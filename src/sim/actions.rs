//! The simulated actions: their scripted lifecycles, the devices they run on, and the
//! MachineAction JSON the service answers with (times in MDE's varying precision).

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::domain::{ActionId, ActionStatus, format_time};

/// An action's scripted life: from each offset on, the status is the one given.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    pub steps: Vec<(Duration, ActionStatus)>,
}

impl Lifecycle {
    pub fn new(steps: Vec<(Duration, ActionStatus)>) -> Self {
        assert!(!steps.is_empty(), "a lifecycle needs at least one status");
        Self { steps }
    }

    /// Pending for `pending`, InProgress for `running`, then `end`.
    pub fn simple(pending: Duration, running: Duration, end: ActionStatus) -> Self {
        Self::new(vec![
            (Duration::ZERO, ActionStatus::Pending),
            (pending, ActionStatus::InProgress),
            (pending + running, end),
        ])
    }

    /// A realistic mix scaled to `scale`: most succeed, some fail or time out, some are
    /// cancelled while pending or running, a few run three times as long.
    pub fn random(rng: &mut fastrand::Rng, scale: Duration) -> Self {
        let s = scale.as_secs_f64();
        let pending = Duration::from_secs_f64(s * (0.05 + 0.3 * rng.f64()));
        let running = Duration::from_secs_f64(s * (0.1 + 0.6 * rng.f64()));
        match rng.u32(0..100) {
            0..55 => Self::simple(pending, running, ActionStatus::Succeeded),
            55..67 => Self::simple(pending, running, ActionStatus::Failed),
            67..75 => Self::simple(pending, running * 2, ActionStatus::TimeOut),
            75..85 => Self::new(vec![
                (Duration::ZERO, ActionStatus::Pending),
                (pending, ActionStatus::Cancelled),
            ]),
            85..90 => Self::simple(pending, running, ActionStatus::Cancelled),
            _ => Self::simple(pending, scale * 2 + running, ActionStatus::Succeeded),
        }
    }

    pub(super) fn at(&self, elapsed: Duration) -> (usize, &ActionStatus) {
        let i = self
            .steps
            .iter()
            .rposition(|(t, _)| *t <= elapsed)
            .unwrap_or(0);
        (i, &self.steps[i].1)
    }

    pub fn terminal(&self) -> &ActionStatus {
        &self.steps.last().expect("non-empty").1
    }

    /// How long until the last status is reached.
    pub fn length(&self) -> Duration {
        self.steps.last().expect("non-empty").0
    }
}

pub const ACTION_TYPES: [&str; 8] = [
    "Isolate",
    "Unisolate",
    "RunAntiVirusScan",
    "CollectInvestigationPackage",
    "RestrictCodeExecution",
    "UnrestrictCodeExecution",
    "LiveResponse",
    "StopAndQuarantineFile",
];

pub(super) struct SimAction {
    pub(super) id: ActionId,
    pub(super) index: usize,
    pub(super) lifecycle: Lifecycle,
    pub(super) created: Instant,
    pub(super) created_wall: SystemTime,
    pub(super) action_type: &'static str,
    pub(super) device: usize,
    /// How long after its creation the service starts to show it.
    pub(super) hidden_for: Duration,
    /// Someone other than the automation started it (an analyst in the portal, another
    /// tool): its `requestor`, with `requestSource` "Portal".
    pub(super) requested_by: Option<&'static str>,
    /// How long before `created` it was really created (a monotonic instant cannot reach
    /// back before boot; days-old actions need this).
    pub(super) backdate: Duration,
}

/// The simulated tenant's devices: actions land on a small fleet, so one device sees
/// several actions (isolate, later release) as in real incidents.
pub(super) const DEVICES: usize = 24;

pub(super) fn machine_id(device: usize) -> String {
    // 40 hex digits, like MDE's machine ids, stable per device.
    let seed = (device as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..40)
        .map(|_| char::from_digit(rng.u32(0..16), 16).unwrap_or('0'))
        .collect()
}

pub(super) fn dns_name(device: usize) -> String {
    format!("ws-{device:04}.contoso.local")
}

impl SimAction {
    /// Time since it was created, as of `now`.
    pub(super) fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.created) + self.backdate
    }

    /// Whether the service shows the action yet: a new id answers 404 and is missing from
    /// listings for a few seconds after its creation.
    pub(super) fn visible(&self, now: Instant) -> bool {
        self.age(now) >= self.hidden_for
    }

    /// The wall-clock time of step `i`, as the service reports it (see `sim_time`).
    pub(super) fn step_time(&self, i: usize) -> SystemTime {
        sim_time(self.created_wall + self.lifecycle.steps[i].0)
    }

    pub(super) fn to_json(&self, now: Instant, context: bool) -> ActionJson<'_> {
        let (step, status) = self.lifecycle.at(self.age(now));
        // Real answers print 2 to 7 fractional digits (.92Z, .93163Z, .1341831Z).
        let digits = 2 + self.index % 6;
        let updated = mde_time(self.step_time(step), digits);
        let external = format!("soar-{}", self.index);
        // Half the actions use the spellings some docs show, as real answers vary.
        let (a, b) = (self.index.is_multiple_of(2), !self.index.is_multiple_of(2));
        let cancelled = *status == ActionStatus::Cancelled;
        let scope = match self.action_type {
            "Isolate" => Some(if self.index.is_multiple_of(3) {
                "Selective"
            } else {
                "Full"
            }),
            "RunAntiVirusScan" => Some(if self.index.is_multiple_of(2) {
                "Quick"
            } else {
                "Full"
            }),
            _ => None,
        };
        let commands = (self.action_type == "LiveResponse").then(|| {
            // Cancelled after it ran: the "partial cancel" of real answers, whose command
            // completed although the action says Cancelled.
            let ran = step > 1 || (step == 1 && *status != ActionStatus::Cancelled);
            let start_time = ran.then(|| mde_time(self.step_time(1), 7));
            let command_status = match status {
                ActionStatus::Succeeded => "Completed",
                ActionStatus::Failed | ActionStatus::TimeOut => "Failed",
                ActionStatus::Cancelled if ran => "Completed",
                _ => "Created",
            };
            let command =
                |index: u32, command_type: &'static str, key: &'static str, value: &'static str| {
                    LiveResponseCommand {
                        index,
                        start_time: start_time.clone(),
                        end_time: status
                            .is_terminal()
                            .then(|| mde_time(self.step_time(step), 7)),
                        command_status,
                        errors: if command_status == "Failed" {
                            vec!["The script timed out or failed on the device"]
                        } else {
                            Vec::new()
                        },
                        command: LiveResponseCommandBody {
                            command_type,
                            params: vec![KeyValue { key, value }],
                        },
                    }
                };
            let mut commands = vec![command(0, "RunScript", "ScriptName", "collect-triage.ps1")];
            // Every third session also fetches a file (its output is the file, gzipped).
            if self.index % 3 == 2 {
                commands.push(command(
                    1,
                    "GetFile",
                    "Path",
                    "C:\\Windows\\Temp\\suspicious.ps1",
                ));
            }
            commands
        });
        ActionJson {
            context: context.then_some(
                "https://api.securitycenter.microsoft.com/api/$metadata#MachineActions/$entity",
            ),
            id: self.id.as_str(),
            action_type: self.action_type,
            title: (self.index % 4 == 3).then(|| format!("{} by automation", self.action_type)),
            requestor: match self.requested_by {
                Some(r) => r,
                None if self.index % 5 == 4 => "Contoso SOAR app",
                None => "soc-automation@contoso.com",
            },
            requestor_comment: format!("Automated response to alert {}", 3200 + self.index),
            status: status.as_str(),
            machine_id: machine_id(self.device),
            computer_dns_name: dns_name(self.device),
            created: mde_time(sim_time(self.created_wall), digits),
            cancellation_requestor: cancelled.then_some("lead@contoso.com"),
            cancellation_comment: cancelled.then_some("Cancelled: wrong device"),
            cancellation_time: cancelled.then(|| mde_time(self.step_time(step), digits)),
            error_hresult: if *status == ActionStatus::Failed {
                -2_147_024_891
            } else {
                0
            },
            scope,
            request_source: if self.requested_by.is_some() {
                "Portal"
            } else {
                "PublicApi"
            },
            related_file_info: None,
            commands: commands.unwrap_or_default(),
            troubleshoot_info: None,
            last_update_long: a.then(|| updated.clone()),
            last_update_short: b.then_some(updated),
            external_id: a.then(|| external.clone()),
            external_id_caps: b.then_some(external),
        }
    }
}

/// A MachineAction as the service prints it; a struct rather than a `json!` map because
/// serializing 10,000 of them for one page was the simulator's own bottleneck.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ActionJson<'a> {
    #[serde(rename = "@odata.context", skip_serializing_if = "Option::is_none")]
    pub(super) context: Option<&'static str>,
    pub(super) id: &'a str,
    #[serde(rename = "type")]
    pub(super) action_type: &'a str,
    pub(super) title: Option<String>,
    pub(super) requestor: &'static str,
    pub(super) requestor_comment: String,
    pub(super) status: &'a str,
    pub(super) machine_id: String,
    pub(super) computer_dns_name: String,
    #[serde(rename = "creationDateTimeUtc")]
    pub(super) created: String,
    pub(super) cancellation_requestor: Option<&'static str>,
    pub(super) cancellation_comment: Option<&'static str>,
    #[serde(rename = "cancellationDateTimeUtc")]
    pub(super) cancellation_time: Option<String>,
    #[serde(rename = "errorHResult")]
    pub(super) error_hresult: i64,
    pub(super) scope: Option<&'static str>,
    pub(super) request_source: &'static str,
    pub(super) related_file_info: Option<()>,
    pub(super) commands: Vec<LiveResponseCommand>,
    pub(super) troubleshoot_info: Option<()>,
    #[serde(
        rename = "lastUpdateDateTimeUtc",
        skip_serializing_if = "Option::is_none"
    )]
    pub(super) last_update_long: Option<String>,
    #[serde(rename = "lastUpdateTimeUtc", skip_serializing_if = "Option::is_none")]
    pub(super) last_update_short: Option<String>,
    #[serde(rename = "externalId", skip_serializing_if = "Option::is_none")]
    pub(super) external_id: Option<String>,
    #[serde(rename = "externalID", skip_serializing_if = "Option::is_none")]
    pub(super) external_id_caps: Option<String>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct LiveResponseCommand {
    pub(super) index: u32,
    pub(super) start_time: Option<String>,
    pub(super) end_time: Option<String>,
    pub(super) command_status: &'static str,
    pub(super) errors: Vec<&'static str>,
    pub(super) command: LiveResponseCommandBody,
}

#[derive(serde::Serialize)]
pub(super) struct LiveResponseCommandBody {
    #[serde(rename = "type")]
    pub(super) command_type: &'static str,
    pub(super) params: Vec<KeyValue>,
}

#[derive(serde::Serialize)]
pub(super) struct KeyValue {
    pub(super) key: &'static str,
    pub(super) value: &'static str,
}

/// The simulator's times are whole hundredths of a second, so that every number of
/// fractional digits it prints (2 to 7) states the same instant and the truth it is checked
/// against.
pub(super) fn sim_time(t: SystemTime) -> SystemTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let centis = since.as_millis() / 10;
    SystemTime::UNIX_EPOCH + Duration::from_millis((centis * 10) as u64)
}

/// MDE's format with `digits` (2 to 7) fractional digits.
pub(super) fn mde_time(t: SystemTime, digits: usize) -> String {
    let ms = format_time(t);
    // "2018-12-04T12:18:27.129Z": the three digits, padded to seven, cut to `digits`.
    let (head, frac) = ms[..ms.len() - 1].split_at(ms.len() - 4);
    let frac = format!("{}0000", &frac[..3]);
    format!("{head}{}Z", &frac[..digits.clamp(1, 7)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mde_times_have_two_to_seven_digits() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_543_925_907_129);
        assert_eq!(mde_time(t, 7), "2018-12-04T12:18:27.1290000Z");
        assert_eq!(mde_time(sim_time(t), 2), "2018-12-04T12:18:27.12Z");
        assert_eq!(mde_time(sim_time(t), 5), "2018-12-04T12:18:27.12000Z");
        for digits in 2..=7 {
            assert_eq!(
                crate::domain::normalize_time(&mde_time(sim_time(t), digits)).as_deref(),
                Some("2018-12-04T12:18:27.120Z")
            );
        }
    }
}
