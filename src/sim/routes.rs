//! The tenant's routes: the token endpoint and the MachineAction calls as the service
//! answers them, with the rate limit, the faults and the hostile answers a test switches on.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::time::Instant;

use super::actions::{ActionJson, SimAction};
use super::evidence::Blob;
use super::filter::{Selection, parse_filter};
use super::http::{self, Reply, Request, form_decode};
use super::identity::{check_client_credential, issue_token, token_forbidden};
use super::{
    Fault, Hostile, SIM_API_AUDIENCE, SIM_CLIENT_ID, SIM_SCOPE, SIM_TENANT, SimConfig, State,
    Tenant,
};
use crate::domain::{ActionId, ActionStatus, format_time};

impl Tenant {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl http::Handler for Tenant {
    fn max_head(&self) -> usize {
        self.lock().config.max_request_head
    }

    fn head_too_long(&self) {
        self.lock().stats.oversized_heads += 1;
    }

    async fn handle(&self, req: Request) -> Reply {
        if req.method == "POST" && req.path.ends_with("/oauth2/v2.0/token") {
            let hostile = self.lock().config.hostile_token.clone();
            if let Some(reply) = hostile.as_ref().and_then(|h| self.hostile(h, &req, true)) {
                return reply;
            }
            return self.token(&req).await;
        }
        if req.method == "GET"
            && (req.path == "/metadata/identity/oauth2/token" || req.path == "/msi/token")
        {
            return self.managed_identity(&req);
        }
        if req.path == "/api/machineactions" || req.path.starts_with("/api/machineactions/") {
            if req.method != "GET" {
                return odata_error(405, "MethodNotAllowed", "Only GET is simulated");
            }
            let hostile = self.lock().config.hostile_api.clone();
            if let Some(reply) = hostile.as_ref().and_then(|h| self.hostile(h, &req, false)) {
                return reply;
            }
            return self.api(&req).await;
        }
        // What a wrong `api.base_url` path meets: the front end's page, not the API's JSON.
        Reply::Full {
            status: 404,
            content_type: "text/html",
            extra_headers: Vec::new(),
            body: b"<!DOCTYPE html><html><head><title>404 - File or directory not found.</title></head><body><h2>404 - File or directory not found.</h2></body></html>".to_vec(),
        }
    }
}

impl Tenant {
    /// The hostile answer to `req`, or `None` when `hostile` is one the normal path gives
    /// (the token endpoint's long tokens and odd lifetimes).
    fn hostile(&self, hostile: &Hostile, req: &Request, token_endpoint: bool) -> Option<Reply> {
        let reply = match hostile {
            Hostile::RedirectTo(origin) => {
                let target = if req.query.is_empty() {
                    format!("{}{}", origin.trim_end_matches('/'), req.path)
                } else {
                    format!("{}{}?{}", origin.trim_end_matches('/'), req.path, req.query)
                };
                Reply::Full {
                    status: 307,
                    content_type: "text/html",
                    extra_headers: vec![("location", target)],
                    body: b"<html><body>Moved</body></html>".to_vec(),
                }
            }
            // Something that starts like the answer it replaces, then goes on and on.
            Hostile::Huge(bytes) => Reply::Stream {
                status: 200,
                head: if token_endpoint {
                    b"{\"token_type\":\"Bearer\",\"expires_in\":3599,\"access_token\":\"".to_vec()
                } else {
                    b"{\"value\":[{\"status\":\"Succeeded\",\"id\":\"".to_vec()
                },
                fill: b'A',
                tail: if token_endpoint {
                    b"\"}".to_vec()
                } else {
                    b"\"}]}".to_vec()
                },
                length: Some(*bytes),
            },
            Hostile::Endless => Reply::Stream {
                status: 200,
                head: b"{\"value\":\"".to_vec(),
                fill: b'A',
                tail: Vec::new(),
                length: None,
            },
            Hostile::LongToken(_) | Hostile::ExpiresIn(_) => return None,
        };
        self.lock().stats.hostile_answers += 1;
        Some(reply)
    }
}

pub(super) fn odata_error(status: u16, code: &str, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"error": {"code": code, "message": message, "target": format!("{:x}", fastrand::u64(..))}})
            .to_string(),
    )
}

pub(super) fn aad_error(status: u16, error: &str, description: &str) -> Reply {
    Reply::json(
        status,
        json!({
            "error": error,
            "error_description": format!("{description}\r\nTrace ID: 0000\r\nCorrelation ID: 0000\r\nTimestamp: {}", format_time(SystemTime::now())),
            "error_codes": [description.get(5..12).and_then(|c| c.parse::<u32>().ok()).unwrap_or(0)],
        })
        .to_string(),
    )
}

impl Tenant {
    async fn token(&self, req: &Request) -> Reply {
        let form: HashMap<String, String> = form_decode(&String::from_utf8_lossy(&req.body))
            .into_iter()
            .collect();
        let tenant = req
            .path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        let mut s = self.lock();
        s.stats.token_requests += 1;
        let fault_rate = s.config.token_fault_rate;
        if fault_rate > 0.0 && s.rng.f64() < fault_rate {
            s.stats.faults_injected += 1;
            *s.stats
                .faults_by_kind
                .entry("token_503".into())
                .or_default() += 1;
            return Reply::Full {
                status: 503,
                content_type: "text/html",
                extra_headers: Vec::new(),
                body: b"<html><head><title>Service Unavailable</title></head></html>".to_vec(),
            };
        }
        let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        let refusal = if tenant != SIM_TENANT {
            Some(aad_error(
                400,
                "invalid_request",
                &format!(
                    "AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
                ),
            ))
        } else if field("grant_type") != "client_credentials" {
            Some(aad_error(
                400,
                "unsupported_grant_type",
                "AADSTS70003: The app requested an unsupported grant type.",
            ))
        } else if field("client_id") != SIM_CLIENT_ID {
            Some(aad_error(
                400,
                "unauthorized_client",
                &format!(
                    "AADSTS700016: Application with identifier '{}' was not found in the directory.",
                    field("client_id")
                ),
            ))
        } else if let Some(r) = check_client_credential(&mut s, &form, &tenant, req) {
            Some(r)
        } else if field("scope") != SIM_SCOPE {
            Some(aad_error(
                400,
                "invalid_scope",
                &format!(
                    "AADSTS1002012: The provided value for scope {} is not valid.",
                    field("scope")
                ),
            ))
        } else {
            None
        };
        if let Some(r) = refusal {
            s.stats.token_refusals += 1;
            return r;
        }
        let (token, lifetime) = issue_token(&mut s, SIM_CLIENT_ID);
        if let Some(Hostile::ExpiresIn(raw)) = s.config.hostile_token.clone() {
            s.stats.hostile_answers += 1;
            return Reply::json(
                200,
                format!(
                    r#"{{"token_type":"Bearer","expires_in":{raw},"ext_expires_in":{raw},"access_token":"{token}"}}"#
                ),
            );
        }
        if matches!(s.config.hostile_token, Some(Hostile::LongToken(_))) {
            s.stats.hostile_answers += 1;
        }
        Reply::json(
            200,
            json!({
                "token_type": "Bearer",
                "expires_in": lifetime.as_secs().max(1),
                "ext_expires_in": lifetime.as_secs().max(1),
                "access_token": token,
            })
            .to_string(),
        )
    }

    /// IMDS (`Metadata: true`) and App Service (`X-IDENTITY-HEADER`) managed identity.
    fn managed_identity(&self, req: &Request) -> Reply {
        let query: HashMap<String, String> = form_decode(&req.query).into_iter().collect();
        let mut s = self.lock();
        s.stats.token_requests += 1;
        let Some(mi) = s.config.managed_identity.clone() else {
            return aad_error(400, "invalid_request", "Identity not found");
        };
        let app_service = req.path == "/msi/token";
        if app_service {
            if req.header("x-identity-header") != Some(mi.identity_header.as_str()) {
                s.stats.token_refusals += 1;
                return aad_error(401, "unauthorized", "X-IDENTITY-HEADER missing or wrong");
            }
        } else if req.header("metadata") != Some("true") {
            s.stats.token_refusals += 1;
            return aad_error(
                400,
                "invalid_request",
                "Required metadata header not specified",
            );
        }
        let expected_version = if app_service {
            "2019-08-01"
        } else {
            "2018-02-01"
        };
        let resource = query.get("resource").map(String::as_str).unwrap_or("");
        let client_id = query.get("client_id").cloned();
        let refusal = if query.get("api-version").map(String::as_str) != Some(expected_version) {
            Some("api-version missing or unsupported")
        } else if resource != SIM_API_AUDIENCE {
            Some("resource is not a known application")
        } else if client_id != mi.user_assigned_client_id {
            Some("Identity not found")
        } else {
            None
        };
        if let Some(r) = refusal {
            s.stats.token_refusals += 1;
            return aad_error(400, "invalid_request", r);
        }
        let (token, lifetime) =
            issue_token(&mut s, client_id.as_deref().unwrap_or("system-assigned"));
        let expires_on = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + lifetime.as_secs().max(1);
        let mut body = json!({
            "access_token": token,
            "expires_on": expires_on.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        });
        if !app_service {
            body["expires_in"] = json!(lifetime.as_secs().max(1).to_string());
        }
        Reply::json(200, body.to_string())
    }

    async fn api(&self, req: &Request) -> Reply {
        let (reply, delay) = self.api_reply(req);
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        reply
    }

    fn api_reply(&self, req: &Request) -> (Reply, Option<Duration>) {
        let now = Instant::now();
        let mut guard = self.lock();
        let s = &mut *guard;
        s.stats.api_calls += 1;
        let single = req
            .path
            .strip_prefix("/api/machineactions/")
            .map(str::to_string);
        // `{id}/getPackageUri`, `{id}/GetLiveResponseResultDownloadLink(index=N)`.
        let (single, follow_up) = match single {
            Some(path) => match path.split_once('/') {
                Some((id, rest)) => (Some(id.to_string()), Some(rest.to_string())),
                None => (Some(path), None),
            },
            None => (None, None),
        };
        match (&single, &follow_up) {
            (Some(_), None) => s.stats.get_calls += 1,
            (None, _) => s.stats.list_calls += 1,
            (Some(_), Some(_)) => {}
        }

        // A Retry-After in force answers everything with another 429.
        if let Some((written, until)) = s.retry_window {
            if now < until {
                if now.duration_since(written) > s.config.early_retry_grace {
                    s.stats.early_retries += 1;
                }
                s.stats.rate_limited += 1;
                return (self.too_many(&s.config, until - now), None);
            }
            s.retry_window = None;
        }

        let token = req
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or("");
        match s.tokens.get(token).filter(|_| !s.config.reject_all_tokens) {
            None => {
                s.stats.unknown_token_calls += 1;
                return (
                    odata_error(
                        401,
                        "Unauthorized",
                        "Authorization token is missing or invalid.",
                    ),
                    None,
                );
            }
            Some(exp) if *exp <= now => {
                s.stats.expired_token_calls += 1;
                return (
                    odata_error(401, "Unauthorized", "The access token has expired."),
                    None,
                );
            }
            Some(_) => {}
        }
        if let Some(why) = token_forbidden(token) {
            s.stats.forbidden_calls += 1;
            return (odata_error(403, "Forbidden", &why), None);
        }

        // A call counts against both windows; either one full earns a 429.
        let mut until: Option<Instant> = None;
        for (limit, window) in [
            (s.config.rate_limit.clone(), &mut s.window),
            (s.config.long_rate_limit.clone(), &mut s.long_window),
        ] {
            let Some(limit) = limit else { continue };
            while window
                .front()
                .is_some_and(|t| now.duration_since(*t) >= limit.window)
            {
                window.pop_front();
            }
            if window.len() >= limit.calls as usize {
                let free = window[window.len() - limit.calls as usize] + limit.window;
                until = until.max(Some(free));
            }
        }
        if let Some(until) = until {
            s.retry_window = Some((now, until));
            s.stats.rate_limited += 1;
            return (self.too_many(&s.config, until - now), None);
        }
        if s.config.rate_limit.is_some() {
            s.window.push_back(now);
        }
        if s.config.long_rate_limit.is_some() {
            s.long_window.push_back(now);
        }

        let fault = if s.config.fault_rate > 0.0
            && !s.config.faults.is_empty()
            && s.rng.f64() < s.config.fault_rate
        {
            Some(s.config.faults[s.rng.usize(0..s.config.faults.len())])
        } else {
            None
        };
        if let Some(f) = fault {
            s.stats.faults_injected += 1;
            *s.stats.faults_by_kind.entry(format!("{f:?}")).or_default() += 1;
        }
        let mut delay = None;
        match fault {
            Some(Fault::InternalError) => {
                return (
                    odata_error(500, "InternalServerError", "An unexpected error occurred"),
                    None,
                );
            }
            Some(Fault::Unavailable) => {
                return (
                    Reply::json(
                        503,
                        r#"{"error":{"code":"","message":"The service is temporarily unavailable.","details":[{"code":"Transient","message":"retry later"}]}}"#,
                    ),
                    None,
                );
            }
            Some(Fault::BadGatewayHtml) => {
                return (
                    Reply::Full {
                        status: 502,
                        content_type: "text/html",
                        extra_headers: Vec::new(),
                        body: b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1><p>The proxy server received an invalid response from an upstream server.</p></body></html>".to_vec(),
                    },
                    None,
                );
            }
            Some(Fault::Drop) => return (Reply::Drop, None),
            Some(Fault::TooManyRequests) => {
                let wait = s.config.fault_retry_after;
                s.retry_window = Some((now, now + wait));
                s.stats.rate_limited += 1;
                let reply = match &s.config.fault_retry_after_header {
                    Some(raw) => odata_error(
                        429,
                        "TooManyRequests",
                        "Rate limit is exceeded. Try again later.",
                    )
                    .with_header("retry-after", raw.clone()),
                    None => self.too_many(&s.config, wait),
                };
                return (reply, None);
            }
            Some(Fault::Slow) => delay = Some(s.config.slow_delay),
            _ => {}
        }

        if let (Some(raw_id), Some(rest)) = (&single, &follow_up) {
            return (self.follow_up(s, raw_id, rest, now), delay);
        }
        let body = match single {
            Some(raw_id) => {
                let Ok(id) = ActionId::parse(&raw_id) else {
                    return (
                        odata_error(
                            400,
                            "InvalidRequestBody",
                            &format!("'{raw_id}' is not a valid action id"),
                        ),
                        None,
                    );
                };
                *s.stats.calls_by_action.entry(id.clone()).or_default() += 1;
                match s.actions.get(&id).filter(|a| a.visible(now)) {
                    Some(a) => serde_json::to_string(&a.to_json(now, true)).expect("serializes"),
                    None => {
                        s.stats.not_found_answers += 1;
                        return (
                            odata_error(
                                404,
                                "ResourceNotFound",
                                &format!("MachineAction {id} was not found"),
                            ),
                            delay,
                        );
                    }
                }
            }
            None => {
                let query: HashMap<String, String> = form_decode(&req.query).into_iter().collect();
                let filter = query.get("$filter").map(String::as_str).unwrap_or("");
                let parsed = parse_filter(filter);
                if let Some((form, _)) = &parsed {
                    *s.stats.list_calls_by_form.entry(*form).or_default() += 1;
                }
                let refused = match &parsed {
                    None => true,
                    Some((form, _)) => s.config.rejected_filters.contains(form),
                };
                if refused {
                    // Both shapes the service is seen to use: with a code, and the query
                    // parser's own with an empty code, no target and `details`.
                    let reply = if s.rng.bool() {
                        odata_error(
                            400,
                            "ODataError",
                            &format!("Invalid filter clause: '{filter}' is not supported."),
                        )
                    } else {
                        Reply::json(
                            400,
                            json!({"error": {"code": "", "message": "The query specified in the URI is not valid. Could not find a property named 'x' on type 'MachineAction'.", "details": []}}).to_string(),
                        )
                    };
                    return (reply, None);
                }
                let (form, selection) = parsed.expect("refused above when None");
                let selection = if s.config.ignored_filters.contains(&form) {
                    Selection::All
                } else {
                    selection
                };
                let top = match query.get("$top").map(|t| t.parse::<usize>()) {
                    None => 10_000,
                    Some(Ok(t)) if t <= 10_000 => t,
                    Some(_) => {
                        return (
                            odata_error(
                                400,
                                "ODataError",
                                "The limit of '10000' for Top query has been exceeded.",
                            ),
                            None,
                        );
                    }
                };
                let skip = query
                    .get("$skip")
                    .and_then(|t| t.parse::<usize>().ok())
                    .unwrap_or(0);
                let mut value = Vec::new();
                if let Selection::Ids(ids) = &selection {
                    for id in ids {
                        *s.stats.calls_by_action.entry(id.clone()).or_default() += 1;
                        if let Some(a) = s.actions.get(id)
                            && a.visible(now)
                            && value.len() < top
                        {
                            value.push(a.to_json(now, false));
                            if s.config.stale_copies {
                                let (step, _) = a.lifecycle.at(a.age(now));
                                for earlier in 0..step {
                                    let then = (a.created + a.lifecycle.steps[earlier].0)
                                        .checked_sub(a.backdate)
                                        .unwrap_or(a.created);
                                    value.push(a.to_json(then, false));
                                }
                            }
                        }
                    }
                } else {
                    // Newest first, as the service pages them; $skip counts in that order.
                    let mut matching: Vec<&SimAction> = s
                        .actions
                        .values()
                        .filter(|a| a.visible(now) && selection.admits(a, now))
                        .collect();
                    matching.sort_unstable_by_key(|a| std::cmp::Reverse((a.created_wall, a.index)));
                    value.extend(
                        matching
                            .into_iter()
                            .skip(skip)
                            .take(top)
                            .map(|a| a.to_json(now, false)),
                    );
                }
                #[derive(serde::Serialize)]
                struct Page<'a> {
                    #[serde(rename = "@odata.context")]
                    context: &'static str,
                    value: Vec<ActionJson<'a>>,
                }
                serde_json::to_string(&Page {
                    context: "https://api.securitycenter.microsoft.com/api/$metadata#MachineActions",
                    value,
                })
                .expect("serializes")
            }
        };
        let reply = match fault {
            Some(Fault::TruncatedJson) => {
                let cut = body.len() / 2;
                Reply::json(200, body.as_bytes()[..cut].to_vec())
            }
            Some(Fault::CutConnection) => Reply::CutShort {
                status: 200,
                keep: body.len() / 2,
                body: body.into_bytes(),
            },
            _ => Reply::json(200, body),
        };
        (reply, delay)
    }
}

impl Tenant {
    /// The evidence calls on one action: a link to its investigation package, or to the
    /// output of one of its live response commands.
    fn follow_up(&self, s: &mut State, raw_id: &str, rest: &str, now: Instant) -> Reply {
        let Ok(id) = ActionId::parse(raw_id) else {
            return odata_error(
                400,
                "InvalidRequestBody",
                &format!("'{raw_id}' is not a valid action id"),
            );
        };
        let not_found = |what: &str| odata_error(404, "ResourceNotFound", what);
        let lifetime = s.config.evidence.link_lifetime;
        if rest.eq_ignore_ascii_case("getPackageUri") {
            s.evidence_stats.package_uri_calls += 1;
            if let Some(until) = s.evidence.package_call(&s.config.evidence, now) {
                s.evidence_stats.package_uri_limited += 1;
                return self.too_many(&s.config, until - now);
            }
            // 404 until the collection has completed; also for any other type.
            let ready = s.actions.get(&id).is_some_and(|a| {
                a.visible(now)
                    && a.action_type == "CollectInvestigationPackage"
                    && *a.lifecycle.at(a.age(now)).1 == ActionStatus::Succeeded
            });
            if !ready {
                return not_found(&format!("Package for action {id} was not found"));
            }
            let sig = s
                .evidence
                .issue(Blob::Package(id.clone()), lifetime, now, &mut s.rng);
            s.evidence_stats.links_issued += 1;
            let url = format!(
                "{}/safedownload/WDATP_Investigation_Package.zip?se={}&sr=b&sp=r&sig={sig}",
                s.blob_base,
                format_time(SystemTime::now() + lifetime)
            );
            // The service wraps the URL in escaped quotes.
            return Reply::json(
                200,
                json!({
                    "@odata.context": "https://api.securitycenter.microsoft.com/api/$metadata#Edm.String",
                    "value": format!("\"{url}\""),
                })
                .to_string(),
            );
        }
        let index = rest
            .strip_prefix("GetLiveResponseResultDownloadLink(index=")
            .and_then(|r| r.strip_suffix(')'))
            .map(str::parse::<u32>);
        match index {
            Some(Ok(index)) => {
                s.evidence_stats.live_response_link_calls += 1;
                let command = s
                    .actions
                    .get(&id)
                    .filter(|a| a.visible(now) && a.action_type == "LiveResponse")
                    .and_then(|a| {
                        a.to_json(now, false)
                            .commands
                            .iter()
                            .find(|c| c.index == index && c.command_status == "Completed")
                            .map(|c| c.command.command_type)
                    });
                let Some(command) = command else {
                    return not_found(&format!("No completed command {index} for action {id}"));
                };
                let blob = Blob::CommandOutput {
                    action: id.clone(),
                    index,
                    command,
                };
                let sig = s.evidence.issue(blob, lifetime, now, &mut s.rng);
                s.evidence_stats.links_issued += 1;
                let url = format!(
                    "{}/liveresponse/{id}/{index}/output?sv=2021-08-06&se={}&sr=b&sp=r&sig={sig}",
                    s.blob_base,
                    format_time(SystemTime::now() + lifetime)
                );
                Reply::json(
                    200,
                    json!({
                        "@odata.context": "https://api.securitycenter.microsoft.com/api/$metadata#Edm.String",
                        "value": url,
                    })
                    .to_string(),
                )
            }
            Some(Err(_)) => odata_error(400, "InvalidInput", "index must be a whole number"),
            None => not_found(&format!("Resource '{rest}' was not found")),
        }
    }

    fn too_many(&self, config: &SimConfig, wait: Duration) -> Reply {
        // Whole seconds, rounded up, as the service sends; fractions only for time-scaled
        // benchmarks, where a whole second would be minutes of simulated time.
        let value = if config.fractional_retry_after {
            format!("{:.3}", wait.as_secs_f64())
        } else {
            wait.as_millis().div_ceil(1000).max(1).to_string()
        };
        odata_error(
            429,
            "TooManyRequests",
            "Rate limit is exceeded. Try again later.",
        )
        .with_header("retry-after", value)
    }
}
