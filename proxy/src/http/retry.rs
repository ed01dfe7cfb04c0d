//! Route retry policies (Envoy's `RetryPolicy`): which outcomes are retried (`retry_on`), how
//! often, with which per-try timeout and backoff, and whether a retry must pick another host.

use std::time::Duration;

use http::HeaderMap;
use weft_xds_proto::envoy::config::route::v3::RetryPolicy as XdsRetryPolicy;

use super::router::{HeaderMatch, RequestView, header_match};
use crate::cluster::UpstreamError;
use crate::duration;

const PREVIOUS_HOSTS: &str =
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

/// Conditions from `retry_on`, as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn(u32);

impl RetryOn {
    pub const FIVE_XX: u32 = 1;
    pub const GATEWAY_ERROR: u32 = 1 << 1;
    pub const CONNECT_FAILURE: u32 = 1 << 2;
    pub const REFUSED_STREAM: u32 = 1 << 3;
    pub const RESET: u32 = 1 << 4;
    pub const RETRIABLE_4XX: u32 = 1 << 5;
    pub const RETRIABLE_STATUS_CODES: u32 = 1 << 6;
    pub const GRPC_CANCELLED: u32 = 1 << 7;
    pub const GRPC_DEADLINE_EXCEEDED: u32 = 1 << 8;
    pub const GRPC_INTERNAL: u32 = 1 << 9;
    pub const GRPC_RESOURCE_EXHAUSTED: u32 = 1 << 10;
    pub const GRPC_UNAVAILABLE: u32 = 1 << 11;
    pub const RETRIABLE_HEADERS: u32 = 1 << 12;
    /// The conditions read from a response's `grpc-status`.
    pub const GRPC_CONDITIONS: u32 = Self::GRPC_CANCELLED
        | Self::GRPC_DEADLINE_EXCEEDED
        | Self::GRPC_INTERNAL
        | Self::GRPC_RESOURCE_EXHAUSTED
        | Self::GRPC_UNAVAILABLE;

    pub fn parse(s: &str) -> Result<RetryOn, String> {
        let mut bits = 0;
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            bits |= match token {
                "5xx" => Self::FIVE_XX,
                "gateway-error" => Self::GATEWAY_ERROR,
                "connect-failure" => Self::CONNECT_FAILURE,
                "refused-stream" => Self::REFUSED_STREAM,
                "reset" => Self::RESET,
                "retriable-4xx" => Self::RETRIABLE_4XX,
                "retriable-status-codes" => Self::RETRIABLE_STATUS_CODES,
                "retriable-headers" => Self::RETRIABLE_HEADERS,
                "cancelled" => Self::GRPC_CANCELLED,
                "deadline-exceeded" => Self::GRPC_DEADLINE_EXCEEDED,
                "internal" => Self::GRPC_INTERNAL,
                "resource-exhausted" => Self::GRPC_RESOURCE_EXHAUSTED,
                "unavailable" => Self::GRPC_UNAVAILABLE,
                other => return Err(format!("retry_on condition {other:?} is not supported")),
            };
        }
        Ok(RetryOn(bits))
    }

    pub fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }

    /// A request header's conditions, as Envoy's router reads them: tokens it does not know
    /// are skipped; `grpc`: only the gRPC conditions count (`x-envoy-retry-grpc-on`).
    fn parse_header(s: &str, grpc: bool) -> RetryOn {
        let bits = s
            .split(',')
            .filter_map(|t| RetryOn::parse(t.trim()).ok())
            .fold(0, |bits, on| bits | on.0);
        RetryOn(if grpc {
            bits & Self::GRPC_CONDITIONS
        } else {
            bits & !Self::GRPC_CONDITIONS
        })
    }
}

/// A request's own retry and timeout settings: Envoy's router headers
/// (`x-envoy-upstream-rq-timeout-ms`, `x-envoy-upstream-rq-per-try-timeout-ms`,
/// `x-envoy-retry-on`, `x-envoy-retry-grpc-on`, `x-envoy-max-retries`), which its router honours
/// on requests the connection manager counts as internal (and removes from every request).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controls {
    /// Zero: no timeout.
    timeout: Option<Duration>,
    per_try: Option<Duration>,
    on: RetryOn,
    max_retries: Option<u32>,
}

impl Controls {
    /// The settings a request carries; None when it carries none (or none that parse).
    pub fn read(headers: &HeaderMap) -> Option<Controls> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let ms = |name: &str| {
            text(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
        };
        let c = Controls {
            timeout: ms("x-envoy-upstream-rq-timeout-ms"),
            per_try: ms("x-envoy-upstream-rq-per-try-timeout-ms"),
            on: RetryOn(
                text("x-envoy-retry-on").map_or(0, |v| RetryOn::parse_header(v, false).0)
                    | text("x-envoy-retry-grpc-on").map_or(0, |v| RetryOn::parse_header(v, true).0),
            ),
            max_retries: text("x-envoy-max-retries").and_then(|v| v.trim().parse().ok()),
        };
        (c != Controls::default()).then_some(c)
    }

    /// The route's action with these settings applied, as Envoy's router applies them: the
    /// timeout replaces the route's; the conditions add to the route policy's (a route without
    /// one retries once); `x-envoy-max-retries` counts only where some condition retries; a
    /// per-try timeout not below the request's timeout is ignored.
    pub fn apply(&self, action: &super::router::RouteAction) -> super::router::RouteAction {
        let mut a = action.clone();
        if let Some(t) = self.timeout {
            a.timeout = (!t.is_zero()).then_some(t);
        }
        let per_try = self
            .per_try
            .filter(|p| !p.is_zero() && a.timeout.is_none_or(|t| *p < t));
        if self.on.0 != 0 || per_try.is_some() || a.retry.is_some() {
            let mut r = match a.retry.take() {
                Some(r) => r,
                None => {
                    let mut r = RetryPolicy::from_xds(&XdsRetryPolicy::default())
                        .expect("the default retry policy is valid");
                    // Only the headers' conditions retry.
                    r.num_retries = u32::from(self.on.0 != 0);
                    r
                }
            };
            r.on = RetryOn(r.on.0 | self.on.0);
            if let Some(n) = self.max_retries
                && r.on.0 != 0
            {
                r.num_retries = n;
            }
            if per_try.is_some() {
                r.per_try_timeout = per_try;
            }
            a.retry = Some(r);
        }
        a
    }
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    pub base_interval: Duration,
    pub max_interval: Duration,
    /// `previous_hosts`: a retry goes to a host not tried yet, when there is one.
    pub other_host: bool,
    pub host_selection_attempts: u32,
    /// `retriable_headers`: a response with any of these is retried (`retriable-headers`).
    pub(crate) retriable_headers: Vec<HeaderMatch>,
    /// `retriable_request_headers`: when set, only requests with one of these are retried.
    pub(crate) retriable_request_headers: Vec<HeaderMatch>,
}

/// Header matchers of a retry policy; `response`: they look at response headers, where
/// request pseudo-headers do not exist.
fn matchers(
    list: &[weft_xds_proto::envoy::config::route::v3::HeaderMatcher],
    field: &str,
    response: bool,
) -> Result<Vec<HeaderMatch>, (String, String)> {
    list.iter()
        .enumerate()
        .map(|(i, h)| {
            let f = format!("retry_policy.{field}[{i}]");
            if response && h.name.starts_with(':') {
                return Err((
                    format!("{f}.name"),
                    format!(
                        "{:?}: pseudo-headers cannot be matched in responses here",
                        h.name
                    ),
                ));
            }
            header_match(h).map_err(|r| (f, r))
        })
        .collect()
}

impl RetryPolicy {
    pub fn from_xds(p: &XdsRetryPolicy) -> Result<RetryPolicy, (String, String)> {
        let bad = |f: &str, r: String| Err((format!("retry_policy.{f}"), r));
        let on = match RetryOn::parse(&p.retry_on) {
            Ok(on) => on,
            Err(e) => return bad("retry_on", e),
        };
        for (field, set) in [
            ("retry_priority", p.retry_priority.is_some()),
            (
                "retry_options_predicates",
                !p.retry_options_predicates.is_empty(),
            ),
            (
                "rate_limited_retry_back_off",
                p.rate_limited_retry_back_off.is_some(),
            ),
            ("per_try_idle_timeout", p.per_try_idle_timeout.is_some()),
        ] {
            if set {
                return bad(field, "not supported by this weft-proxy version".into());
            }
        }
        let mut other_host = false;
        for (i, pred) in p.retry_host_predicate.iter().enumerate() {
            use weft_xds_proto::envoy::config::route::v3::retry_policy::retry_host_predicate::ConfigType;
            let type_url = match &pred.config_type {
                Some(ConfigType::TypedConfig(a)) => a.type_url.as_str(),
                None => "",
            };
            if type_url == PREVIOUS_HOSTS
                || pred.name == "envoy.retry_host_predicates.previous_hosts"
            {
                other_host = true;
            } else {
                return bad(
                    &format!("retry_host_predicate[{i}]"),
                    format!(
                        "predicate {:?} is not supported (previous_hosts is)",
                        pred.name
                    ),
                );
            }
        }
        let mut retriable_status_codes = Vec::new();
        for c in &p.retriable_status_codes {
            match u16::try_from(*c).ok().filter(|c| (100..=599).contains(c)) {
                Some(c) => retriable_status_codes.push(c),
                None => {
                    return bad(
                        "retriable_status_codes",
                        format!("{c} is not an HTTP status"),
                    );
                }
            }
        }
        let base_interval = p
            .retry_back_off
            .as_ref()
            .and_then(|b| b.base_interval.as_ref())
            .map(duration)
            .unwrap_or(Duration::from_millis(25));
        let max_interval = p
            .retry_back_off
            .as_ref()
            .and_then(|b| b.max_interval.as_ref())
            .map(duration)
            .unwrap_or(base_interval * 10);
        if base_interval.is_zero() || max_interval < base_interval {
            return bad(
                "retry_back_off",
                "base_interval must be > 0 and max_interval >= base_interval".into(),
            );
        }
        Ok(RetryPolicy {
            on,
            num_retries: p.num_retries.map(|n| n.value).unwrap_or(1),
            per_try_timeout: p
                .per_try_timeout
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero()),
            retriable_status_codes,
            base_interval,
            max_interval,
            other_host,
            host_selection_attempts: u32::try_from(p.host_selection_retry_max_attempts.max(1))
                .unwrap_or(1),
            retriable_headers: matchers(&p.retriable_headers, "retriable_headers", true)?,
            retriable_request_headers: matchers(
                &p.retriable_request_headers,
                "retriable_request_headers",
                false,
            )?,
        })
    }

    /// May this request be retried at all (`retriable_request_headers`)?
    pub fn retries_request(&self, req: &RequestView<'_>) -> bool {
        self.retriable_request_headers.is_empty()
            || self
                .retriable_request_headers
                .iter()
                .any(|m| m.matches(req))
    }

    /// Should a response with this status (and headers, for gRPC and `retriable_headers`) be
    /// retried?
    pub fn retries_response(&self, status: u16, headers: &HeaderMap) -> bool {
        let on = self.on;
        if on.has(RetryOn::RETRIABLE_HEADERS) && !self.retriable_headers.is_empty() {
            let view = RequestView {
                method: "",
                authority: "",
                path_and_query: "",
                headers,
            };
            if self.retriable_headers.iter().any(|m| m.matches(&view)) {
                return true;
            }
        }
        if on.has(RetryOn::FIVE_XX) && status >= 500 {
            return true;
        }
        if on.has(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504) {
            return true;
        }
        if on.has(RetryOn::RETRIABLE_4XX) && status == 409 {
            return true;
        }
        if on.has(RetryOn::RETRIABLE_STATUS_CODES) && self.retriable_status_codes.contains(&status)
        {
            return true;
        }
        // gRPC conditions look at a trailers-only response's grpc-status.
        if on.has(RetryOn::GRPC_CONDITIONS)
            && let Some(code) = headers
                .get(crate::http::names::GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
        {
            let bit = match code {
                1 => RetryOn::GRPC_CANCELLED,
                4 => RetryOn::GRPC_DEADLINE_EXCEEDED,
                8 => RetryOn::GRPC_RESOURCE_EXHAUSTED,
                13 => RetryOn::GRPC_INTERNAL,
                14 => RetryOn::GRPC_UNAVAILABLE,
                _ => 0,
            };
            return bit != 0 && on.has(bit);
        }
        false
    }

    /// Should a failure to get a response be retried?
    pub fn retries_error(&self, e: &UpstreamError) -> bool {
        let on = self.on;
        if on.has(RetryOn::FIVE_XX) || on.has(RetryOn::GATEWAY_ERROR) {
            return true;
        }
        if e.is_connect_failure() {
            on.has(RetryOn::CONNECT_FAILURE)
        } else {
            on.has(RetryOn::RESET) || on.has(RetryOn::REFUSED_STREAM)
        }
    }

    /// Per-try timeouts are retried by 5xx, gateway-error and reset (as Envoy's router, which
    /// counts an upstream that did not answer in time as reset).
    pub fn retries_timeout(&self) -> bool {
        self.on.has(RetryOn::FIVE_XX)
            || self.on.has(RetryOn::GATEWAY_ERROR)
            || self.on.has(RetryOn::RESET)
    }

    /// The wait before retry `n` (1-based): exponential from base_interval, capped, full jitter.
    pub fn backoff(&self, n: u32, unit: f64) -> Duration {
        let step = self
            .base_interval
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.max_interval);
        step.mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_default_retry_on_parses_and_unknown_is_named() {
        let on = RetryOn::parse(
            "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        )
        .unwrap();
        assert!(
            on.has(RetryOn::CONNECT_FAILURE)
                && on.has(RetryOn::GRPC_UNAVAILABLE)
                && !on.has(RetryOn::FIVE_XX)
        );
        assert!(RetryOn::parse("5xx,teapot").unwrap_err().contains("teapot"));
    }

    #[test]
    fn which_responses_are_retried() {
        let p = RetryPolicy {
            on: RetryOn::parse("gateway-error,retriable-status-codes,unavailable").unwrap(),
            num_retries: 2,
            per_try_timeout: None,
            retriable_status_codes: vec![409],
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
            other_host: false,
            host_selection_attempts: 1,
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
        };
        let h = HeaderMap::new();
        assert!(p.retries_response(503, &h));
        assert!(!p.retries_response(500, &h), "500 is not a gateway error");
        assert!(p.retries_response(409, &h));
        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", "14".parse().unwrap());
        assert!(p.retries_response(200, &grpc));
        grpc.insert("grpc-status", "13".parse().unwrap());
        assert!(!p.retries_response(200, &grpc));
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(25));
        assert_eq!(p.backoff(3, 1.0), Duration::from_millis(100));
        assert_eq!(p.backoff(10, 1.0), Duration::from_millis(250));
    }

    #[test]
    fn retriable_headers_and_request_headers() {
        let p: XdsRetryPolicy = weft_xds_proto::from_yaml(
            "{ retry_on: retriable-headers, retriable_headers: [{ name: x-retry-me, string_match: { exact: 'yes' } }], retriable_request_headers: [{ name: x-may-retry }] }",
        )
        .unwrap();
        let p = RetryPolicy::from_xds(&p).unwrap();
        let mut h = HeaderMap::new();
        assert!(!p.retries_response(200, &h));
        h.insert("x-retry-me", "yes".parse().unwrap());
        assert!(p.retries_response(200, &h));
        let req = HeaderMap::new();
        let view = |headers| RequestView {
            method: "GET",
            authority: "a",
            path_and_query: "/",
            headers,
        };
        assert!(!p.retries_request(&view(&req)));
        let mut req = HeaderMap::new();
        req.insert("x-may-retry", "1".parse().unwrap());
        assert!(p.retries_request(&view(&req)));
        let bad: XdsRetryPolicy = weft_xds_proto::from_yaml(
            "{ retry_on: retriable-headers, retriable_headers: [{ name: ':status', string_match: { exact: '503' } }] }",
        )
        .unwrap();
        let err = RetryPolicy::from_xds(&bad).unwrap_err();
        assert_eq!(err.0, "retry_policy.retriable_headers[0].name");
    }

    #[test]
    fn router_headers_read_and_applied_as_envoys_router() {
        use super::super::router::{ClusterChoice, RouteAction};
        let mut h = HeaderMap::new();
        assert_eq!(Controls::read(&h), None);
        h.insert("x-envoy-upstream-rq-timeout-ms", "soon".parse().unwrap());
        assert_eq!(
            Controls::read(&h),
            None,
            "a value that is not a number is ignored"
        );
        h.insert("x-envoy-upstream-rq-timeout-ms", "250".parse().unwrap());
        h.insert("x-envoy-retry-on", "5xx, bogus".parse().unwrap());
        h.insert("x-envoy-retry-grpc-on", "unavailable,5xx".parse().unwrap());
        h.insert("x-envoy-max-retries", "4".parse().unwrap());
        let c = Controls::read(&h).unwrap();
        let route = RouteAction {
            cluster: ClusterChoice::Single("c".into()),
            timeout: Some(Duration::from_secs(15)),
            retry: None,
            path_rewrite: None,
            host_rewrite: None,
            mirrors: Vec::new(),
            hash_policy: Vec::new(),
            attempt_header: false,
            attempts_in_response: false,
            idle_timeout: None,
            grpc_timeout: None,
            stream_duration: None,
            rate_limits: Default::default(),
            vh_rate_limits: Default::default(),
            include_vh_rate_limits: false,
        };
        let a = c.apply(&route);
        assert_eq!(a.timeout, Some(Duration::from_millis(250)));
        let r = a.retry.unwrap();
        assert_eq!(r.num_retries, 4);
        assert!(r.on.has(RetryOn::FIVE_XX) && r.on.has(RetryOn::GRPC_UNAVAILABLE));
        // `5xx` in the gRPC header does not count as an HTTP condition there, and vice versa.
        assert_eq!(
            RetryOn::parse_header("unavailable,5xx", true),
            RetryOn(RetryOn::GRPC_UNAVAILABLE)
        );
        // A per-try timeout alone: no retries, each attempt timed; ignored when not below the
        // request's timeout.
        let mut h = HeaderMap::new();
        h.insert(
            "x-envoy-upstream-rq-per-try-timeout-ms",
            "300".parse().unwrap(),
        );
        let a = Controls::read(&h).unwrap().apply(&route);
        let r = a.retry.unwrap();
        assert_eq!(
            (r.num_retries, r.per_try_timeout),
            (0, Some(Duration::from_millis(300)))
        );
        h.insert("x-envoy-upstream-rq-timeout-ms", "200".parse().unwrap());
        let a = Controls::read(&h).unwrap().apply(&route);
        assert!(a.retry.is_none_or(|r| r.per_try_timeout.is_none()));
        // Zero is no timeout at all.
        let mut h = HeaderMap::new();
        h.insert("x-envoy-upstream-rq-timeout-ms", "0".parse().unwrap());
        assert_eq!(Controls::read(&h).unwrap().apply(&route).timeout, None);
    }
}
