//! What each kind of destination receives, built from the stored envelope (the webhook body):
//! the envelope itself, a Teams Workflows message with an Adaptive Card, a Slack
//! incoming-webhook message, or a Splunk HEC event.

use serde_json::{Value, json};

use crate::config::NotifyKind;

/// The body for `kind`, from `envelope` (the stored payload, JSON text).
pub fn body(kind: NotifyKind, envelope: &str, portal: &str, host: &str) -> Vec<u8> {
    let render: fn(&Value, &str, &str) -> Value = match kind {
        NotifyKind::Webhook => return envelope.as_bytes().to_vec(),
        NotifyKind::Teams => |v, portal, _| teams(v, portal),
        NotifyKind::Slack => |v, portal, _| slack(v, portal),
        NotifyKind::SplunkHec => |v, _, host| splunk(v, host),
    };
    // The envelope was written by our own SQL: it is valid JSON. Should it ever not be,
    // the receiver still gets the text rather than nothing.
    let value: Value = serde_json::from_str(envelope).unwrap_or_else(|_| json!({"data": {}}));
    serde_json::to_vec(&render(&value, portal, host)).unwrap_or_default()
}

fn text<'a>(data: &'a Value, key: &str) -> Option<&'a str> {
    data.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// One line saying what happened: "Isolate on host-1: InProgress → Succeeded".
pub fn headline(envelope: &Value) -> String {
    let data = &envelope["data"];
    let kind = text(data, "type").unwrap_or("Machine action");
    let device = text(data, "computerDnsName")
        .or_else(|| text(data, "machineId"))
        .unwrap_or("an unknown device");
    let status = text(data, "status").unwrap_or("unknown");
    match envelope["type"].as_str() {
        Some("machine_action.stuck") => {
            let hours = data["activeSeconds"].as_f64().unwrap_or(0.0) / 3600.0;
            format!("{kind} on {device} still {status} after {hours:.1} h")
        }
        Some("machine_action.test") => "mde-actiond test event".to_string(),
        _ => match text(data, "fromStatus") {
            Some(from) => format!("{kind} on {device}: {from} → {status}"),
            None => format!("{kind} on {device}: {status}"),
        },
    }
}

/// The facts a person wants first, in order, skipping what MDE did not say.
fn facts(data: &Value) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for (title, key) in [
        ("Action", "type"),
        ("Status", "status"),
        ("Device", "computerDnsName"),
        ("Machine id", "machineId"),
        ("Requested by", "requestor"),
        ("Comment", "requestorComment"),
        ("Source", "requestSource"),
        ("Created", "creationDateTimeUtc"),
        ("Updated", "lastUpdateDateTimeUtc"),
        ("Cancelled by", "cancellationRequestor"),
        ("Correlation", "correlation"),
        ("Action id", "id"),
    ] {
        if let Some(v) = text(data, key) {
            out.push((title, v.to_string()));
        }
    }
    if let Some(code) = data["errorHResult"].as_i64().filter(|c| *c != 0) {
        out.push(("Error", format!("0x{:08X}", code as u32)));
    }
    out
}

fn portal_link(data: &Value, portal: &str) -> String {
    match text(data, "tenantId") {
        Some(t) => format!("{portal}/action-center/history?tid={t}"),
        None => format!("{portal}/action-center/history"),
    }
}

fn teams(envelope: &Value, portal: &str) -> Value {
    let data = &envelope["data"];
    let facts: Vec<Value> = facts(data)
        .into_iter()
        .map(|(t, v)| json!({"title": t, "value": v}))
        .collect();
    let color = match text(data, "status") {
        Some("Succeeded") => "Good",
        Some("Failed" | "TimeOut") => "Attention",
        Some("Cancelled") => "Warning",
        _ => "Default",
    };
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "body": [
                    {"type": "TextBlock", "text": headline(envelope), "weight": "Bolder",
                     "size": "Medium", "wrap": true, "color": color},
                    {"type": "FactSet", "facts": facts},
                ],
                "actions": [{
                    "type": "Action.OpenUrl",
                    "title": "Open in Microsoft Defender",
                    "url": portal_link(data, portal),
                }],
            },
        }],
    })
}

/// Slack's mrkdwn treats these as markup; user text must not become links or mentions.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn slack(envelope: &Value, portal: &str) -> Value {
    let data = &envelope["data"];
    let headline = slack_escape(&headline(envelope));
    // Slack allows at most 10 fields per section.
    let fields: Vec<Value> = facts(data)
        .into_iter()
        .take(10)
        .map(|(t, v)| json!({"type": "mrkdwn", "text": format!("*{t}*\n{}", slack_escape(&v))}))
        .collect();
    json!({
        "text": headline,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": format!("*{headline}*")}},
            {"type": "section", "fields": fields},
            {"type": "actions", "elements": [{
                "type": "button",
                "text": {"type": "plain_text", "text": "Open in Microsoft Defender"},
                "url": portal_link(data, portal),
            }]},
        ],
    })
}

fn splunk(envelope: &Value, host: &str) -> Value {
    let sourcetype = match envelope["type"].as_str() {
        Some("machine_action.stuck") => "mde:action:stuck",
        Some("machine_action.test") => "mde:action:test",
        _ => "mde:action:transition",
    };
    let time = envelope["timestamp"]
        .as_str()
        .and_then(crate::domain::parse_time)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0);
    json!({
        "time": time,
        "host": host,
        "source": "mde-actiond",
        "sourcetype": sourcetype,
        "event": envelope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = r#"{"type":"machine_action.status_changed","timestamp":"2026-12-01T10:00:00.000Z",
      "data":{"id":"2e9da30d-27f6-4208-81f2-9cd3d67893ba","type":"Isolate","status":"Failed",
      "fromStatus":"InProgress","computerDnsName":"<host>&1","tenantId":"t1","errorHResult":-2147024891}}"#;

    #[test]
    fn chat_bodies_carry_the_facts() {
        let teams: Value =
            serde_json::from_slice(&body(NotifyKind::Teams, EVENT, "https://p", "h")).unwrap();
        let card = &teams["attachments"][0]["content"];
        assert_eq!(card["version"], "1.4");
        assert_eq!(card["body"][1]["type"], "FactSet");
        assert_eq!(
            card["actions"][0]["url"],
            "https://p/action-center/history?tid=t1"
        );
        assert!(card.to_string().contains("0x80070005"));
        let slack: Value =
            serde_json::from_slice(&body(NotifyKind::Slack, EVENT, "https://p", "h")).unwrap();
        assert!(
            slack["text"]
                .as_str()
                .unwrap()
                .contains("&lt;host&gt;&amp;1")
        );
        let hec: Value =
            serde_json::from_slice(&body(NotifyKind::SplunkHec, EVENT, "https://p", "h")).unwrap();
        assert_eq!(hec["sourcetype"], "mde:action:transition");
        assert_eq!(hec["event"]["data"]["status"], "Failed");
        assert!(hec["time"].as_f64().unwrap() > 1.7e9);
    }
}
