//! The proxy-wasm adapter of the usage reporter: a thin shell around `aigw-plugin-core`.
//!
//! It loads and checks its config (refusing one it does not understand, so a bad rollout fails at
//! config time instead of silently reporting nothing). Three modes, one module:
//!
//! - `scrub` (an instance placed before ext-auth) removes client-sent gateway headers;
//! - `credentials` (an instance after ext-auth, before ai-proxy) removes the client's key;
//! - `report` reads the `x-aigw-*` headers authz set, the requested model and the start time;
//!   feeds every response body chunk to [`UsageParser`]; and at the end of the response sends one
//!   [`UsageEvent`] to billing ingest with `dispatch_http_call`. A failed report is logged and
//!   counted (`aigw_usage_report_failures`), never allowed to disturb the response. Every event goes
//!   through the root context's [`Outbox`] (Envoy cancels the calls of a request context it
//!   destroys): sent on the next timer tick, and re-sent with exponential backoff (200 ms doubling
//!   to 10 s, [`MAX_ATTEMPTS`] tries, at most [`OUTBOX_LIMIT`] events waiting) when ingest fails. What is still undelivered after that is billed by
//!   billing's pending sweep at the admission estimate.

use std::{
    cell::RefCell,
    collections::{BTreeMap, VecDeque},
    rc::Rc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aigw_plugin_core::{
    EVENT_VERSION, Framing, INGEST_SECRET_HEADER, Mode, PluginConfig, UsageEvent, UsageParser,
    channel_from_cluster, headers, is_envoy_header, is_gateway_header,
    rules::{RequestKeys, RuleSet},
};
use proxy_wasm::{
    hostcalls,
    traits::{Context, HttpContext, RootContext},
    types::{Action, ContextType, LogLevel, MetricType},
};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// Tries of one usage event, the first included.
pub const MAX_ATTEMPTS: u32 = 8;
/// Most events waiting for a retry; a report beyond it is dropped (counted, logged).
pub const OUTBOX_LIMIT: usize = 10_000;
/// The root context's timer period in report mode.
const TICK: Duration = Duration::from_millis(200);
/// How long a retired root context keeps sending its outbox.
const DRAIN: Duration = Duration::from_secs(30);

/// The wait before try `attempt + 1`: 200 ms doubling, at most 10 s.
/// How long the report of a failed answer (5xx, 429) waits before it is sent (see `report`).
const FAILED_REPORT_DELAY: Duration = Duration::from_secs(5);

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.saturating_sub(1).min(6)))
        .min(Duration::from_secs(10))
}

/// A usage event waiting to be sent again.
#[derive(Debug, Clone)]
struct Retry {
    /// The configuration the event was first sent under (ingest cluster, path, secret).
    config: Rc<PluginConfig>,
    body: Vec<u8>,
    event_id: String,
    /// Tries made so far (0: not sent yet).
    attempt: u32,
    due: SystemTime,
}

/// Reports to re-send, shared by the root context (which sends them) and the request contexts
/// (which hand over every finished event).
#[derive(Debug, Default)]
struct Outbox {
    waiting: VecDeque<Retry>,
    // A BTreeMap: a HashMap would seed from WASI random_get, which Higress does not provide.
    in_flight: BTreeMap<u32, Retry>,
    /// Metric ids: sends (first tries and retries), reports given up.
    attempts: Option<u32>,
    dropped: Option<u32>,
}

impl Outbox {
    /// Schedules `r`'s next try, or gives it up after [`MAX_ATTEMPTS`] (or when full).
    fn again(&mut self, mut r: Retry, now: SystemTime) {
        if r.attempt >= MAX_ATTEMPTS || self.waiting.len() >= OUTBOX_LIMIT {
            log(
                LogLevel::Error,
                &format!(
                    "aigw-plugin: usage event {} given up after {} tries; billing bills its admission estimate",
                    r.event_id, r.attempt
                ),
            );
            count(self.dropped);
            return;
        }
        r.due = now + backoff(r.attempt);
        self.waiting.push_back(r);
    }
}

#[derive(Debug, Default)]
struct Root {
    /// The delivered configuration: global and per-route (see `aigw_plugin_core::rules`).
    rules: Option<Rc<RuleSet<Rc<PluginConfig>>>>,
    /// Set when Envoy retires this root context (new config, drain) while reports still wait: it
    /// keeps sending until the outbox is empty or [`DRAIN`] has passed, then says it is done.
    draining_since: Option<SystemTime>,
    /// Metric ids: reports sent, reports that failed.
    sent: Option<u32>,
    failed: Option<u32>,
    outbox: Rc<RefCell<Outbox>>,
}

/// The ingest request for one event body.
fn ingest_headers(config: &PluginConfig) -> Vec<(&str, &str)> {
    vec![
        (":method", "POST"),
        (":path", config.ingest_path.as_str()),
        (":authority", "aigw-ingest"),
        ("content-type", "application/json"),
        (INGEST_SECRET_HEADER, config.ingest_secret.as_str()),
    ]
}

/// The status of the response to an http call (0: none, the call failed).
fn call_status() -> u16 {
    hostcalls::get_map_value(
        proxy_wasm::types::MapType::HttpCallResponseHeaders,
        ":status",
    )
    .ok()
    .flatten()
    .and_then(|s| s.parse::<u16>().ok())
    .unwrap_or(0)
}

fn log(level: LogLevel, msg: &str) {
    hostcalls::log(level, msg).ok();
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        let outbox = self.outbox.borrow();
        if outbox.waiting.is_empty() && outbox.in_flight.is_empty() {
            return true;
        }
        drop(outbox);
        // A config change or a drain retires this context: what the last requests queued must
        // still reach ingest (sending them is what the timer does; `done` follows on a tick).
        self.draining_since = Some(self.get_current_time());
        false
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        let status = call_status();
        let Some(r) = self.outbox.borrow_mut().in_flight.remove(&token_id) else {
            return;
        };
        if (200..300).contains(&status) {
            count(self.sent);
        } else {
            count(self.failed);
            let now = self.get_current_time();
            self.outbox.borrow_mut().again(r, now);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
            log(LogLevel::Error, "aigw-plugin: no plugin configuration");
            return false;
        };
        match PluginConfig::parse_delivered(&bytes) {
            Ok(rules) => {
                if rules.configs().any(|c| c.reports()) {
                    self.sent =
                        hostcalls::define_metric(MetricType::Counter, "aigw_usage_reports").ok();
                    self.failed =
                        hostcalls::define_metric(MetricType::Counter, "aigw_usage_report_failures")
                            .ok();
                    let mut outbox = self.outbox.borrow_mut();
                    outbox.attempts =
                        hostcalls::define_metric(MetricType::Counter, "aigw_usage_report_attempts")
                            .ok();
                    outbox.dropped =
                        hostcalls::define_metric(MetricType::Counter, "aigw_usage_reports_dropped")
                            .ok();
                    drop(outbox);
                    self.set_tick_period(TICK);
                }
                self.rules = Some(Rc::new(rules));
                true
            }
            Err(e) => {
                log(LogLevel::Error, &format!("aigw-plugin: {e}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let now = self.get_current_time();
        if let Some(since) = self.draining_since {
            let outbox = self.outbox.borrow();
            let empty = outbox.waiting.is_empty() && outbox.in_flight.is_empty();
            drop(outbox);
            if empty || now.duration_since(since).unwrap_or_default() >= DRAIN {
                if !empty {
                    log(
                        LogLevel::Error,
                        "aigw-plugin: retired with usage events still unsent; billing bills their estimates",
                    );
                }
                self.draining_since = None;
                self.done();
                return;
            }
        }
        let due: Vec<Retry> = {
            let mut outbox = self.outbox.borrow_mut();
            let (ready, later): (Vec<Retry>, Vec<Retry>) =
                outbox.waiting.drain(..).partition(|r| r.due <= now);
            outbox.waiting = later.into();
            ready
        };
        for mut r in due {
            r.attempt += 1;
            let config = r.config.clone();
            let timeout = Duration::from_millis(u64::from(config.timeout_ms));
            let mut outbox = self.outbox.borrow_mut();
            count(outbox.attempts);
            if let Ok(token) = self.dispatch_http_call(
                &config.ingest_cluster,
                ingest_headers(&config),
                Some(&r.body),
                vec![],
                timeout,
            ) {
                outbox.in_flight.insert(token, r);
            } else {
                count(self.failed);
                outbox.again(r, now);
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let rules = self.rules.clone()?;
        Some(Box::new(Request {
            context_id,
            rules,
            config: None,
            outbox: self.outbox.clone(),
            failed: self.failed,
            report: None,
            parser: None,
            status: 0,
            reported: false,
            local_only: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// What the request said, kept until the response ends.
#[derive(Debug)]
struct Pending {
    event_id: String,
    tenant: String,
    user: String,
    token: String,
    model: String,
    reservation: String,
    /// authz's estimate (`x-aigw-estimate`), billed if the response carries no usage.
    estimate: Option<aigw_plugin_core::TokenUsage>,
    started: SystemTime,
    stream: bool,
    /// The request's W3C trace context (authz's span, copied on by ext-auth), when well formed.
    trace_parent: Option<String>,
}

#[derive(Debug)]
struct Request {
    /// The host's id of this request's context (unique within this VM).
    context_id: u32,
    rules: Rc<RuleSet<Rc<PluginConfig>>>,
    /// The configuration chosen for this request (none: the plugin does nothing for it).
    config: Option<Rc<PluginConfig>>,
    outbox: Rc<RefCell<Outbox>>,
    failed: Option<u32>,
    /// Set for admitted requests (authz headers present) in report mode.
    report: Option<Pending>,
    parser: Option<UsageParser>,
    status: u16,
    reported: bool,
    /// Credentials mode: report only if the request never reached an upstream.
    local_only: bool,
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn count(metric: Option<u32>) {
    if let Some(id) = metric {
        hostcalls::increment_metric(id, 1).ok();
    }
}

impl Request {
    /// What an admitted request said (authz's `x-aigw-*` headers); `None` for a request authz did
    /// not admit (no tenant), which is not billed here.
    fn pending(&self) -> Option<Pending> {
        let tenant = self.get_http_request_header(headers::TENANT)?;
        let header = |name: &str| self.get_http_request_header(name).unwrap_or_default();
        let started = self.get_current_time();
        // authz issues one id per admitted request; the client can neither choose nor repeat it
        // (the scrub instance drops client-sent x-aigw-*). Without it (an authz that predates it)
        // the id is made unique here: token, time and this context.
        let event_id = self
            .get_http_request_header(headers::EVENT_ID)
            .unwrap_or_else(|| {
                format!(
                    "{}-{}-{}",
                    header(headers::TOKEN),
                    millis(started),
                    self.context_id
                )
            });
        Some(Pending {
            event_id,
            tenant,
            user: header(headers::USER),
            token: header(headers::TOKEN),
            model: header(headers::MODEL),
            reservation: self
                .get_http_request_header(headers::RESERVATION)
                .unwrap_or_else(|| "none".to_owned()),
            estimate: self
                .get_http_request_header(headers::ESTIMATE)
                .and_then(|v| aigw_plugin_core::estimate::parse(&v)),
            started,
            stream: false,
            trace_parent: self
                .get_http_request_header(headers::TRACEPARENT)
                .filter(|v| aigw_plugin_core::is_traceparent(v)),
        })
    }

    /// Finishes the parser and sends the event, once.
    fn report(&mut self, ended: bool) {
        if self.reported {
            return;
        }
        self.reported = true;
        let Some(p) = self.report.take() else {
            return;
        };
        let parser = self
            .parser
            .take()
            .unwrap_or_else(|| UsageParser::new(Framing::Sniff));
        let mut extracted = parser.finish(self.status, ended);
        if self.local_only {
            // Answered inside the gateway: nothing was served, nothing is billed.
            let details = hostcalls::get_property(vec!["response", "code_details"])
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            extracted.usage = aigw_plugin_core::TokenUsage::default();
            extracted.outcome = aigw_plugin_core::Outcome::UpstreamError;
            extracted.error = Some(format!("not sent upstream ({details})"));
        }
        let channel = hostcalls::get_property(vec!["cluster_name"])
            .ok()
            .flatten()
            .map(|b| channel_from_cluster(&String::from_utf8_lossy(&b)))
            .unwrap_or_default();
        let ended_at = self.get_current_time();
        let event = UsageEvent {
            version: EVENT_VERSION,
            event_id: p.event_id,
            tenant: p.tenant,
            user: p.user,
            token: p.token,
            channel,
            model: if p.model.is_empty() {
                extracted.model.clone().unwrap_or_default()
            } else {
                p.model
            },
            response_model: extracted.model,
            reservation: p.reservation,
            usage: extracted.usage,
            estimated: false,
            estimate: p.estimate,
            stream: p.stream,
            status: self.status,
            outcome: extracted.outcome,
            error: extracted.error,
            started_at_ms: millis(p.started),
            ended_at_ms: millis(ended_at).max(millis(p.started)),
            trace_parent: p.trace_parent,
        };
        let body = match serde_json::to_vec(&event) {
            Ok(b) => b,
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("aigw-plugin: encode usage event: {e}"),
                );
                count(self.failed);
                return;
            }
        };
        let Some(config) = self.config.clone() else {
            return;
        };
        // Sent from the root context, which outlives this request: Envoy cancels the http calls
        // of a context it destroys, so a call made from here would be lost (and never retried)
        // whenever the stream ends before ingest answers — the usual case. The root's timer sends
        // it within one tick.
        let mut outbox = self.outbox.borrow_mut();
        if outbox.waiting.len() >= OUTBOX_LIMIT {
            log(
                LogLevel::Error,
                &format!(
                    "aigw-plugin: outbox full, usage event {} dropped; billing bills its admission estimate",
                    event.event_id
                ),
            );
            count(outbox.dropped);
            return;
        }
        // A failed answer (5xx, 429) may be the first pass of a fallback: its report waits a
        // few seconds, so authz retires the first pass (on the second pass's grant) before the
        // worker bills and forgets it — which would take the grant with it. It carries no usage,
        // so nothing is billed later for the wait.
        let due = if self.status >= 500 || self.status == 429 {
            ended_at + FAILED_REPORT_DELAY
        } else {
            ended_at
        };
        outbox.waiting.push_back(Retry {
            config,
            body,
            event_id: event.event_id,
            attempt: 0,
            due,
        });
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // The configuration for this request, chosen as Higress's SDK chooses it.
        let property = |name: &str| {
            hostcalls::get_property(vec![name])
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let (route, cluster) = (property("route_name"), property("cluster_name"));
        let host = self
            .get_http_request_header(":authority")
            .unwrap_or_default();
        let Some(config) = self
            .rules
            .select(RequestKeys {
                route: &route,
                cluster: &cluster,
                host: &host,
            })
            .cloned()
        else {
            return Action::Continue;
        };
        self.config = Some(config.clone());
        match config.mode {
            Mode::Scrub => {
                // Drop client-sent copies of the headers only the gateway may set; ext-auth, which
                // runs after this instance, adds the real ones. Also every `x-envoy-*`: Envoy
                // obeys `x-envoy-retry-on`/`-max-retries` and friends from peers it takes for
                // internal (a private address behind a load balancer), and a client could have a
                // served answer retried — provider work the plugins never see — or choose the
                // path a fallback redirect restores (`x-envoy-original-path`).
                for (name, _) in self.get_http_request_headers() {
                    if is_gateway_header(&name) || is_envoy_header(&name) {
                        self.set_http_request_header(&name, None);
                    }
                }
            }
            Mode::Credentials => {
                // authz has seen the key (ext-auth runs before this instance); ai-proxy, after it,
                // sets the provider's own credentials. Nothing of the client's goes upstream.
                for name in headers::CLIENT_CREDENTIALS {
                    self.set_http_request_header(name, None);
                }
                // For a fallback redirect (Envoy's custom_response, configured by the operator):
                // the request's event id and grant in filter state, which the redirect copies
                // into `x-aigw-fallback` for authz to admit the second pass on. (The client's
                // host and path for the redirect are ai-proxy's: it keeps them in
                // `x-envoy-original-host/-path` when it rewrites them.)
                if let Some(grant) = self.get_http_request_header(headers::GRANT) {
                    self.set_http_request_header(headers::GRANT, None);
                    if let Some(id) = self.get_http_request_header(headers::EVENT_ID) {
                        let value = format!("{id}.{grant}");
                        // A host without filter state only loses the fallback, never the request.
                        let _ = hostcalls::set_property(
                            vec![headers::FALLBACK_STATE],
                            Some(value.as_bytes()),
                        );
                    }
                }
                if config.reports() {
                    self.report = self.pending();
                    self.local_only = true;
                }
            }
            Mode::Report => {
                // Only requests authz admitted carry a tenant; anything else is not billed here.
                self.report = self.pending();
                if self.report.is_some() {
                    // Tells the credentials instance (earlier in the chain) that this request's
                    // report is taken care of here.
                    let _ = hostcalls::set_property(vec![headers::REPORTING_STATE], Some(b"1"));
                }
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.report.is_none() {
            return Action::Continue;
        }
        self.status = self
            .get_http_response_header(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if self.local_only {
            // Decided when the stream ends (`on_log`), when it is known whether it went upstream.
            return Action::Continue;
        }
        let ct = self.get_http_response_header("content-type");
        let framing = Framing::from_content_type(ct.as_deref());
        if let Some(p) = &mut self.report {
            p.stream = framing == Framing::Sse;
        }
        self.parser = Some(UsageParser::new(framing));
        if end_of_stream {
            self.report(true);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.report.is_none() || self.local_only {
            return Action::Continue;
        }
        if body_size > 0
            && let Some(chunk) = self.get_http_response_body(0, body_size)
            && let Some(parser) = &mut self.parser
        {
            parser.feed(&chunk);
        }
        if end_of_stream {
            self.report(true);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if self.local_only {
            // Reported here, billed at nothing, only when both say the request was not served:
            // the report instance (the last plugin before the router) never took it on, and
            // Envoy picked no upstream host (`upstream.address`). Either alone could be wrong —
            // a report instance that failed to configure, or a retry whose second attempt had
            // not connected yet when the client left — and the report of a served request must
            // never be replaced by "not served".
            let present = |path: Vec<&str>| {
                hostcalls::get_property(path)
                    .ok()
                    .flatten()
                    .is_some_and(|v| !v.is_empty())
            };
            if present(vec![headers::REPORTING_STATE]) || present(vec!["upstream", "address"]) {
                self.report = None;
            }
            self.report(true);
            return;
        }
        // The response never reached its end (client gone, upstream reset): report what arrived.
        self.report(false);
    }
}
