//! Route tables: virtual host selection by `:authority` and route matching on path and headers,
//! translated from Envoy `RouteConfiguration`s. What a route asks for that this version cannot
//! do is rejected by field name, never served wrongly.

use std::time::Duration;

use http::HeaderMap;
use regex::Regex;
use weft_xds_proto::envoy::config::route::v3::{
    HeaderMatcher, Route as XdsRoute, RouteAction as XdsRouteAction, RouteConfiguration,
    VirtualHost as XdsVirtualHost, header_matcher, route, route_action, route_match,
};
use weft_xds_proto::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};

use super::cors::{self, CorsPolicy};
use super::fault::{self, Fault};
use super::retry::RetryPolicy;
use super::rewrite::{HeaderEdits, PathRewrite, Redirect, regex_rewrite};
use crate::{Rejection, duration};

/// Envoy's default route timeout when a route does not set one.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    /// Headers removed from every request (`internal_only_headers`: Envoy removes them from
    /// requests it does not count as internal, and weft-proxy counts none as internal).
    pub internal_only: Vec<http::HeaderName>,
    virtual_hosts: Vec<VirtualHost>,
    exact: crate::state::NameMap<usize>,
    /// `*.example.com` -> ".example.com", longest suffix first.
    suffixes: Vec<(String, usize)>,
    /// `example.*` -> "example.", longest prefix first.
    prefixes: Vec<(String, usize)>,
    any: Option<usize>,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Route>,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    path: PathMatch,
    case_sensitive: bool,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
    /// `match.runtime_fraction`: the share of requests the route matches (its default value;
    /// weft-proxy has no runtime).
    runtime: Option<fault::Fraction>,
    /// `match.grpc`: gRPC requests only.
    grpc: bool,
    pub action: Action,
    /// The fault filter's per-route config (overrides the connection manager's).
    pub fault: Option<Fault>,
    /// The CORS filter's per-route policy.
    /// Boxed, as `tracing`: rare, and a mesh's sidecar holds thousands of routes.
    pub cors: Option<Box<CorsPolicy>>,
    /// The local rate limit filter's config for this route (its own, else its virtual host's;
    /// shared, bucket and all, by the routes it comes from).
    pub local_rate_limit: Option<std::sync::Arc<super::local_ratelimit::LocalRateLimit>>,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    /// `tracing`: the percentages of the trace decision for this route (see `trace`).
    pub tracing: Option<Box<super::trace::Sampling>>,
    /// `decorator`: the operation, which names the route's spans and, when propagated, goes on
    /// as `x-envoy-decorator-operation` (with `tracing` on the connection manager; see `trace`).
    pub operation: Option<super::trace::Operation>,
}

/// What a matched route does.
// Held in the route table and read by reference: boxing the forwarding action would cost every
// request a pointer chase to save a few hundred bytes per redirect or direct-response route.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Action {
    Forward(RouteAction),
    Redirect(Redirect),
    /// A fixed status and body answered by the proxy.
    Direct {
        status: u16,
        body: bytes::Bytes,
    },
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
    /// Envoy's `path_separated_prefix`: the prefix followed by `/`, `?` or the end.
    SeparatedPrefix(String),
}

#[derive(Debug, Clone)]
pub(crate) struct HeaderMatch {
    name: HeaderKey,
    rule: HeaderRule,
    invert: bool,
}

/// A header matcher's name: a regular header or one of HTTP/2's pseudo-headers, which Envoy
/// lets routes match for HTTP/1.1 requests too.
#[derive(Debug, Clone)]
enum HeaderKey {
    Regular(http::HeaderName),
    Method,
    Authority,
    Scheme,
    Path,
}

/// What a route matches against.
pub struct RequestView<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    /// Path and query as received.
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
}

#[derive(Debug)]
struct QueryMatch {
    name: String,
    /// None: present.
    rule: Option<StringRule>,
}

#[derive(Debug, Clone)]
enum HeaderRule {
    Present(bool),
    String(StringRule),
}

#[derive(Debug, Clone)]
pub(crate) enum StringRule {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub enum ClusterChoice {
    Single(String),
    Weighted {
        clusters: Vec<(String, u32)>,
        total: u64,
    },
}

#[derive(Debug, Clone)]
pub struct RouteAction {
    pub cluster: ClusterChoice,
    /// None: no timeout.
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub path_rewrite: Option<PathRewrite>,
    pub host_rewrite: Option<String>,
    /// Shadow copies of the request (fire and forget).
    pub mirrors: Vec<Mirror>,
    /// How to hash the request for consistent-hash load balancers.
    pub hash_policy: Vec<super::hash::HashPolicy>,
    /// Each attempt tells the upstream its number (`x-envoy-attempt-count`; the virtual host's
    /// `include_request_attempt_count`, which Istio sets everywhere).
    pub attempt_header: bool,
    /// `rate_limits`: the descriptors a local rate limit with descriptors matches against.
    pub rate_limits: std::sync::Arc<Vec<super::local_ratelimit::RateLimitRule>>,
    /// The virtual host's `rate_limits`.
    pub vh_rate_limits: std::sync::Arc<Vec<super::local_ratelimit::RateLimitRule>>,
    /// `include_vh_rate_limits` (deprecated in Envoy, still honoured): the virtual host's
    /// `rate_limits` apply too.
    pub include_vh_rate_limits: bool,
    /// The answer tells the client how many attempts were made (the virtual host's
    /// `include_attempt_count_in_response`).
    pub attempts_in_response: bool,
    /// `idle_timeout`: replaces the connection manager's `stream_idle_timeout` for requests
    /// on this route (`Some(None)`: none at all).
    pub idle_timeout: Option<Option<Duration>>,
    /// `max_grpc_timeout` (zero: no cap) and `grpc_timeout_offset`: a gRPC request's timeout is
    /// its `grpc-timeout` (less the offset), at most the cap.
    pub grpc_timeout: Option<GrpcTimeout>,
    /// `max_stream_duration`: the stream's own time limit. Set, it replaces `timeout` and
    /// `max_grpc_timeout` (Envoy's "new timeouts": the route's timeout is then none).
    pub stream_duration: Option<StreamDuration>,
}

/// A route's `max_stream_duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamDuration {
    /// `max_stream_duration` (zero: none; unset: the connection manager's).
    pub max: Option<Duration>,
    /// `grpc_timeout_header_max`: a request's `grpc-timeout` is its limit, at most this (zero:
    /// no cap).
    pub grpc_header_max: Option<Duration>,
    /// `grpc_timeout_header_offset`, taken off the `grpc-timeout`.
    pub grpc_header_offset: Option<Duration>,
}

impl StreamDuration {
    /// The request's time limit from its start, as Envoy's connection manager sets it: its
    /// `grpc-timeout` (capped, less the offset) when the route reads the header and it has one,
    /// else `max_stream_duration`, else the connection manager's (`fallback`); `None` is no
    /// limit.
    pub fn of(&self, headers: &http::HeaderMap, fallback: Option<Duration>) -> Option<Duration> {
        let header = headers
            .get("grpc-timeout")
            .and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let (Some(mut t), Some(max)) = (header, self.grpc_header_max) else {
            return match self.max {
                Some(d) => (!d.is_zero()).then_some(d),
                None => fallback,
            };
        };
        if !max.is_zero() && t > max {
            t = max;
        }
        if !t.is_zero()
            && let Some(offset) = self.grpc_header_offset
        {
            t = t.saturating_sub(offset);
        }
        Some(t)
    }
}

/// How a gRPC request's `grpc-timeout` sets the route's timeout (Envoy's `max_grpc_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcTimeout {
    pub max: Option<Duration>,
    pub offset: Option<Duration>,
}

impl GrpcTimeout {
    /// The route's timeout for a gRPC request with these headers, as Envoy's router decides it:
    /// the `grpc-timeout` header (none: no timeout), less the offset when that leaves some
    /// time, capped at `max`; `None` is no timeout.
    pub fn of(&self, headers: &http::HeaderMap) -> Option<Duration> {
        let mut t = headers
            .get("grpc-timeout")
            .and_then(|v| parse_grpc_timeout(v.as_bytes()))
            .unwrap_or(Duration::ZERO);
        if let Some(offset) = self.offset
            && offset < t
        {
            t -= offset;
        }
        if let Some(max) = self.max
            && (t.is_zero() || t > max)
        {
            t = max;
        }
        (!t.is_zero()).then_some(t)
    }
}

/// A `grpc-timeout` value: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`), in whole
/// milliseconds, rounded up.
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let nanos: u128 = match unit {
        b'H' => u128::from(n) * 3_600_000_000_000,
        b'M' => u128::from(n) * 60_000_000_000,
        b'S' => u128::from(n) * 1_000_000_000,
        b'm' => u128::from(n) * 1_000_000,
        b'u' => u128::from(n) * 1_000,
        b'n' => u128::from(n),
        _ => return None,
    };
    let ms = nanos.div_ceil(1_000_000);
    Some(Duration::from_millis(u64::try_from(ms).ok()?))
}

/// A timeout as `grpc-timeout` writes it: milliseconds, in a larger unit when over 8 digits.
pub fn grpc_timeout_value(t: Duration) -> http::HeaderValue {
    let mut n = t.as_millis();
    let mut unit = 'm';
    for (next, per) in [('S', 1000), ('M', 60), ('H', 60)] {
        if n <= 99_999_999 {
            break;
        }
        n /= per;
        unit = next;
    }
    http::HeaderValue::from_str(&format!("{n}{unit}"))
        .unwrap_or(http::HeaderValue::from_static("1m"))
}

#[derive(Debug, Clone)]
pub struct Mirror {
    pub cluster: String,
    pub share: fault::Fraction,
    /// Whether the shadow's authority gets Envoy's `-shadow` suffix.
    pub shadow_suffix: bool,
}

impl ClusterChoice {
    /// Picks the cluster for one request (weighted: proportionally to the weights).
    pub fn pick(&self) -> &str {
        match self {
            ClusterChoice::Single(c) => c,
            ClusterChoice::Weighted { clusters, total } => {
                let mut r = fastrand::u64(..*total);
                for (name, w) in clusters {
                    if r < u64::from(*w) {
                        return name;
                    }
                    r -= u64::from(*w);
                }
                &clusters[clusters.len() - 1].0
            }
        }
    }
}

fn compile_regex(m: &RegexMatcher) -> Result<Regex, String> {
    // Envoy's safe_regex matches the whole value (RE2 full match).
    Regex::new(&format!("^(?:{})$", m.regex))
        .map_err(|e| format!("invalid regex {:?}: {e}", m.regex))
}

pub(crate) fn string_rule(m: &StringMatcher) -> Result<StringRule, String> {
    let ic = m.ignore_case;
    let lower = |s: &String| {
        if ic {
            s.to_ascii_lowercase()
        } else {
            s.clone()
        }
    };
    Ok(match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(s)) => StringRule::Exact(lower(s), ic),
        Some(string_matcher::MatchPattern::Prefix(s)) => StringRule::Prefix(lower(s), ic),
        Some(string_matcher::MatchPattern::Suffix(s)) => StringRule::Suffix(lower(s), ic),
        Some(string_matcher::MatchPattern::Contains(s)) => StringRule::Contains(lower(s), ic),
        Some(string_matcher::MatchPattern::SafeRegex(r)) => StringRule::Regex(compile_regex(r)?),
        _ => {
            return Err(
                "only exact, prefix, suffix, contains and safe_regex string matchers are supported"
                    .into(),
            );
        }
    })
}

impl StringRule {
    pub(crate) fn matches(&self, v: &str) -> bool {
        let norm = |ic: bool| {
            if ic {
                std::borrow::Cow::Owned(v.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(v)
            }
        };
        match self {
            StringRule::Exact(s, ic) => norm(*ic) == s.as_str(),
            StringRule::Prefix(s, ic) => norm(*ic).starts_with(s.as_str()),
            StringRule::Suffix(s, ic) => norm(*ic).ends_with(s.as_str()),
            StringRule::Contains(s, ic) => norm(*ic).contains(s.as_str()),
            StringRule::Regex(r) => r.is_match(v),
        }
    }
}

#[allow(deprecated)]
pub(crate) fn header_match(h: &HeaderMatcher) -> Result<HeaderMatch, String> {
    use header_matcher::HeaderMatchSpecifier as S;
    let name = match h.name.as_str() {
        ":method" => HeaderKey::Method,
        ":authority" | "host" => HeaderKey::Authority,
        ":scheme" => HeaderKey::Scheme,
        ":path" => HeaderKey::Path,
        other => HeaderKey::Regular(
            http::HeaderName::from_bytes(other.as_bytes())
                .map_err(|_| format!("invalid header name {other:?}"))?,
        ),
    };
    let rule = match &h.header_match_specifier {
        None => HeaderRule::Present(true),
        Some(S::PresentMatch(p)) => HeaderRule::Present(*p),
        Some(S::StringMatch(m)) => HeaderRule::String(string_rule(m)?),
        Some(S::ExactMatch(s)) => HeaderRule::String(StringRule::Exact(s.clone(), false)),
        Some(S::PrefixMatch(s)) => HeaderRule::String(StringRule::Prefix(s.clone(), false)),
        Some(S::SuffixMatch(s)) => HeaderRule::String(StringRule::Suffix(s.clone(), false)),
        Some(S::ContainsMatch(s)) => HeaderRule::String(StringRule::Contains(s.clone(), false)),
        Some(S::SafeRegexMatch(r)) => HeaderRule::String(StringRule::Regex(compile_regex(r)?)),
        Some(S::RangeMatch(_)) => return Err("range_match is not supported yet".into()),
    };
    if h.treat_missing_header_as_empty {
        return Err("treat_missing_header_as_empty is not supported yet".into());
    }
    Ok(HeaderMatch {
        name,
        rule,
        invert: h.invert_match,
    })
}

impl HeaderMatch {
    pub(crate) fn matches(&self, req: &RequestView<'_>) -> bool {
        let pseudo = match &self.name {
            HeaderKey::Regular(_) => None,
            HeaderKey::Method => Some(req.method),
            HeaderKey::Authority => Some(req.authority),
            // weft serves plaintext HTTP: the scheme is always `http`.
            HeaderKey::Scheme => Some("http"),
            HeaderKey::Path => Some(req.path_and_query),
        };
        if let Some(v) = pseudo {
            let result = match &self.rule {
                HeaderRule::Present(want) => *want,
                HeaderRule::String(rule) => rule.matches(v),
            };
            return result != self.invert;
        }
        let HeaderKey::Regular(name) = &self.name else {
            return false;
        };
        let mut values = req.headers.get_all(name).iter();
        if matches!(self.rule, HeaderRule::String(_)) && !req.headers.contains_key(name) {
            // As Envoy: a value matcher never matches a missing header, inverted or not
            // (Istio's `withoutHeaders` needs the header present with another value).
            return false;
        }
        let result = match &self.rule {
            HeaderRule::Present(want) => values.next().is_some() == *want,
            HeaderRule::String(rule) => {
                let first = values.next();
                match first {
                    None => false,
                    Some(v) => {
                        // Several values of one header are matched joined by ',' (as Envoy).
                        let rest: Vec<&str> = values.filter_map(|v| v.to_str().ok()).collect();
                        match v.to_str() {
                            Ok(s) if rest.is_empty() => rule.matches(s),
                            Ok(s) => rule.matches(
                                &[s].into_iter().chain(rest).collect::<Vec<_>>().join(","),
                            ),
                            Err(_) => false,
                        }
                    }
                }
            }
        };
        result != self.invert
    }
}

#[allow(deprecated)] // `cors` moved to a typed filter config; still reject it when set
fn route_action(
    a: &XdsRouteAction,
    matched_prefix: Option<usize>,
) -> Result<RouteAction, (String, String)> {
    let bad = |f: &str, r: &str| Err((format!("route.{f}"), r.to_string()));
    for (field, set) in [
        ("cors", a.cors.is_some()),
        ("hedge_policy", a.hedge_policy.is_some()),
        ("metadata_match", a.metadata_match.is_some()),
        // Fields that change what a request gets, not implemented: refused, not ignored.
        ("upgrade_configs", !a.upgrade_configs.is_empty()),
        (
            "internal_redirect_policy",
            a.internal_redirect_policy.is_some(),
        ),
        ("internal_redirect_action", a.internal_redirect_action != 0),
        ("max_internal_redirects", a.max_internal_redirects.is_some()),
        ("flush_timeout", a.flush_timeout.is_some()),
        ("path_rewrite_policy", a.path_rewrite_policy.is_some()),
        ("append_x_forwarded_host", a.append_x_forwarded_host),
        (
            "retry_policy_typed_config",
            a.retry_policy_typed_config.is_some(),
        ),
        // weft-proxy answers a missing cluster 503, Envoy's default.
        (
            "cluster_not_found_response_code",
            a.cluster_not_found_response_code != 0,
        ),
    ] {
        if set {
            return bad(field, "not supported by this weft-proxy version");
        }
    }
    let cluster = match &a.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => ClusterChoice::Single(c.clone()),
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
            let clusters: Vec<(String, u32)> = w
                .clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight.map(|w| w.value).unwrap_or(0)))
                .collect();
            let total: u64 = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
            if clusters.is_empty() || total == 0 {
                return bad(
                    "weighted_clusters",
                    "the sum of weights must be greater than 0",
                );
            }
            if w.clusters.iter().any(|c| {
                !c.cluster_header.is_empty()
                    || !c.request_headers_to_add.is_empty()
                    || !c.response_headers_to_add.is_empty()
            }) {
                return bad(
                    "weighted_clusters.clusters",
                    "cluster_header and per-cluster header edits are not supported yet",
                );
            }
            ClusterChoice::Weighted { clusters, total }
        }
        _ => {
            return bad(
                "cluster_specifier",
                "cluster and weighted_clusters are supported",
            );
        }
    };
    let timeout = match &a.timeout {
        None => Some(DEFAULT_TIMEOUT),
        Some(d) if d.seconds == 0 && d.nanos == 0 => None,
        Some(d) => Some(duration(d)),
    };
    let idle_timeout = a
        .idle_timeout
        .as_ref()
        .map(|d| Some(duration(d)).filter(|d| !d.is_zero()));
    let retry = a
        .retry_policy
        .as_ref()
        .map(RetryPolicy::from_xds)
        .transpose()?;
    let path_rewrite = match (&a.prefix_rewrite, &a.regex_rewrite) {
        (p, Some(_)) if !p.is_empty() => {
            return bad(
                "prefix_rewrite",
                "only one of prefix_rewrite and regex_rewrite",
            );
        }
        (_, Some(r)) => Some(regex_rewrite(r).map_err(|e| ("route.regex_rewrite".to_string(), e))?),
        (p, None) if !p.is_empty() => match matched_prefix {
            Some(matched) => Some(PathRewrite::Prefix {
                matched,
                with: p.clone(),
            }),
            None => {
                return bad(
                    "prefix_rewrite",
                    "prefix_rewrite needs a prefix or exact path match",
                );
            }
        },
        _ => None,
    };
    let host_rewrite = match &a.host_rewrite_specifier {
        None => None,
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h.clone()),
        Some(_) => {
            return bad(
                "host_rewrite_specifier",
                "only host_rewrite_literal is supported",
            );
        }
    };
    let mut mirrors = Vec::new();
    for (i, m) in a.request_mirror_policies.iter().enumerate() {
        let field = format!("request_mirror_policies[{i}]");
        if m.cluster.is_empty()
            || !m.cluster_header.is_empty()
            || !m.host_rewrite_literal.is_empty()
            || !m.request_headers_mutations.is_empty()
        {
            return bad(
                &field,
                "a mirror needs a cluster; cluster_header, host_rewrite_literal and header mutations are not supported yet",
            );
        }
        let share = match &m.runtime_fraction {
            None => fault::Fraction(1_000_000),
            Some(rf) => fault::Fraction::from_xds(rf.default_value.as_ref()),
        };
        mirrors.push(Mirror {
            cluster: m.cluster.clone(),
            share,
            shadow_suffix: !m.disable_shadow_host_suffix_append,
        });
    }
    let stream_duration = a.max_stream_duration.as_ref().map(|d| {
        let of = |d: &Option<weft_xds_proto::wkt::Duration>| d.as_ref().map(crate::duration);
        StreamDuration {
            max: of(&d.max_stream_duration),
            grpc_header_max: of(&d.grpc_timeout_header_max),
            grpc_header_offset: of(&d.grpc_timeout_header_offset).filter(|d| !d.is_zero()),
        }
    });
    Ok(RouteAction {
        cluster,
        // With `max_stream_duration` the route's own timeout is none, as in Envoy.
        timeout: if stream_duration.is_some() {
            None
        } else {
            timeout
        },
        retry,
        path_rewrite,
        host_rewrite,
        mirrors,
        hash_policy: super::hash::from_xds(&a.hash_policy)
            .map_err(|(f, r)| (format!("route.{f}"), r))?,
        // The virtual host's, set by `virtual_host`.
        attempt_header: false,
        rate_limits: std::sync::Arc::new(
            rate_limits(&a.rate_limits).map_err(|(f, e)| (format!("route.{f}"), e))?,
        ),
        vh_rate_limits: Default::default(),
        include_vh_rate_limits: a.include_vh_rate_limits.is_some_and(|b| b.value),
        attempts_in_response: false,
        idle_timeout,
        stream_duration,
        grpc_timeout: a
            .max_grpc_timeout
            .as_ref()
            .filter(|_| stream_duration.is_none())
            .map(|max| GrpcTimeout {
                max: Some(crate::duration(max)).filter(|d| !d.is_zero()),
                offset: a
                    .grpc_timeout_offset
                    .as_ref()
                    .map(crate::duration)
                    .filter(|d| !d.is_zero()),
            }),
    })
}

type RateLimitConfig = Option<std::sync::Arc<super::local_ratelimit::LocalRateLimit>>;

/// A route's or virtual host's `rate_limits` (descriptors for local rate limits).
fn rate_limits(
    xds: &[weft_xds_proto::envoy::config::route::v3::RateLimit],
) -> Result<Vec<super::local_ratelimit::RateLimitRule>, (String, String)> {
    xds.iter()
        .enumerate()
        .map(|(i, r)| {
            super::local_ratelimit::RateLimitRule::from_xds(r)
                .map_err(|(f, e)| (format!("rate_limits[{i}].{f}"), e))
        })
        .collect()
}

/// The local rate limit filter's per-route or per-virtual-host config, if it has one.
fn local_rate_limit(
    configs: &std::collections::HashMap<String, weft_xds_proto::wkt::Any>,
) -> Result<RateLimitConfig, (String, String)> {
    use super::local_ratelimit::{FILTER_NAME, LocalRateLimit, TYPE_URL};
    let Some(any) = configs.get(FILTER_NAME) else {
        return Ok(None);
    };
    let field = format!("typed_per_filter_config[{FILTER_NAME}]");
    if any.type_url != TYPE_URL {
        return Err((field, format!("expected {TYPE_URL}, got {}", any.type_url)));
    }
    let c = weft_xds_proto::unpack(any).map_err(|e| (field.clone(), e.to_string()))?;
    LocalRateLimit::from_xds(&c)
        .map(|l| Some(std::sync::Arc::new(l)))
        .map_err(|(f2, r)| (format!("{field}.{f2}"), r))
}

/// Per-route filter configs: the fault filter's, the CORS filter's and the local rate limit
/// filter's are understood.
type RouteFilters = (Option<Fault>, Option<Box<CorsPolicy>>);

fn route_filters(r: &XdsRoute) -> Result<RouteFilters, (String, String)> {
    let (mut fault, mut cors) = (None, None);
    for (name, any) in &r.typed_per_filter_config {
        let field = format!("typed_per_filter_config[{name}]");
        if name == super::local_ratelimit::FILTER_NAME {
            // Read by `local_rate_limit`.
        } else if name == fault::FILTER_NAME && any.type_url == fault::TYPE_URL {
            let f = weft_xds_proto::unpack(any).map_err(|e| (field.clone(), e.to_string()))?;
            fault = Some(Fault::from_xds(&f).map_err(|(f2, r)| (format!("{field}.{f2}"), r))?);
        } else if name == cors::FILTER_NAME && any.type_url == cors::POLICY_TYPE_URL {
            let p = weft_xds_proto::unpack(any).map_err(|e| (field.clone(), e.to_string()))?;
            cors = Some(Box::new(
                CorsPolicy::from_xds(&p).map_err(|(f2, r)| (format!("{field}.{f2}"), r))?,
            ));
        } else {
            return Err((
                field,
                format!(
                    "per-route config for {name:?} ({}) is not supported",
                    any.type_url
                ),
            ));
        }
    }
    Ok((fault, cors))
}

// Deprecated fields are read to be rejected by name.
#[allow(deprecated)]
fn route(r: &XdsRoute, vh_rate_limit: &RateLimitConfig) -> Result<Route, (String, String)> {
    let m = r
        .r#match
        .as_ref()
        .ok_or(("match".to_string(), "a route needs a match".to_string()))?;
    let path = match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(route_match::PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(route_match::PathSpecifier::SafeRegex(re)) => {
            PathMatch::Regex(compile_regex(re).map_err(|e| ("match.safe_regex".to_string(), e))?)
        }
        Some(route_match::PathSpecifier::PathSeparatedPrefix(p)) => {
            PathMatch::SeparatedPrefix(p.clone())
        }
        _ => {
            return Err((
                "match.path_specifier".into(),
                "prefix, path, safe_regex and path_separated_prefix are supported".into(),
            ));
        }
    };
    let mut query = Vec::new();
    for (i, q) in m.query_parameters.iter().enumerate() {
        use weft_xds_proto::envoy::config::route::v3::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let field = format!("match.query_parameters[{i}]");
        if q.name.is_empty() {
            return Err((format!("{field}.name"), "a name is required".into()));
        }
        let rule = match &q.query_parameter_match_specifier {
            Some(Q::StringMatch(sm)) => Some(string_rule(sm).map_err(|e| (field.clone(), e))?),
            Some(Q::PresentMatch(true)) => None,
            _ => {
                return Err((
                    field,
                    "string_match or present_match: true is required".into(),
                ));
            }
        };
        query.push(QueryMatch {
            name: q.name.clone(),
            rule,
        });
    }
    for (field, set) in [
        (
            "per_request_buffer_limit_bytes",
            r.per_request_buffer_limit_bytes.is_some(),
        ),
        (
            "request_body_buffer_limit",
            r.request_body_buffer_limit.is_some(),
        ),
        ("match.tls_context", m.tls_context.is_some()),
        ("match.dynamic_metadata", !m.dynamic_metadata.is_empty()),
    ] {
        if set {
            return Err((
                field.into(),
                "not supported by this weft-proxy version".into(),
            ));
        }
    }
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_match(h).map_err(|e| (format!("match.headers[{i}]"), e)))
        .collect::<Result<Vec<_>, _>>()?;
    // How much of the path the match covered, for prefix rewrites.
    let matched_prefix = match &path {
        PathMatch::Prefix(p) | PathMatch::Exact(p) | PathMatch::SeparatedPrefix(p) => Some(p.len()),
        PathMatch::Regex(_) => None,
    };
    let action = match &r.action {
        Some(route::Action::Route(a)) => Action::Forward(route_action(a, matched_prefix)?),
        Some(route::Action::Redirect(rd)) => {
            Action::Redirect(Redirect::from_xds(rd, matched_prefix)?)
        }
        Some(route::Action::DirectResponse(d)) => {
            use weft_xds_proto::envoy::config::core::v3::data_source::Specifier;
            if d.body_format.is_some() {
                return Err((
                    "direct_response.body_format".into(),
                    "not supported by this weft-proxy version".into(),
                ));
            }
            let status = u16::try_from(d.status)
                .ok()
                .filter(|s| (200..600).contains(s));
            let Some(status) = status else {
                return Err((
                    "direct_response.status".into(),
                    format!("{} is not an HTTP status (200-599)", d.status),
                ));
            };
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => bytes::Bytes::new(),
                Some(Specifier::InlineString(s)) => bytes::Bytes::from(s.clone()),
                Some(Specifier::InlineBytes(b)) => bytes::Bytes::from(b.clone()),
                Some(_) => {
                    return Err((
                        "direct_response.body".into(),
                        "only inline bodies are supported".into(),
                    ));
                }
            };
            Action::Direct { status, body }
        }
        _ => return Err(("action".into(), "only route actions are supported".into())),
    };
    let (fault, cors) = route_filters(r)?;
    let local_rate_limit = local_rate_limit(&r.typed_per_filter_config)?.or(vh_rate_limit.clone());
    Ok(Route {
        name: r.name.clone(),
        path,
        case_sensitive: m.case_sensitive.map(|b| b.value).unwrap_or(true),
        headers,
        query,
        runtime: m
            .runtime_fraction
            .as_ref()
            .map(|r| fault::Fraction::from_xds(r.default_value.as_ref())),
        grpc: m.grpc.is_some(),
        action,
        fault,
        cors,
        local_rate_limit,
        tracing: r
            .tracing
            .as_ref()
            .map(|t| super::trace::Sampling::of_route(t).map(Box::new))
            .transpose()
            .map_err(|(f, e)| (format!("tracing.{f}"), e))?,
        operation: super::trace::operation(r.decorator.as_ref())
            .map_err(|e| ("decorator.operation".to_string(), e))?,
        request_headers: HeaderEdits::from_xds(
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
        )
        .map_err(|e| {
            (
                format!("request_headers_to_add{e}"),
                "invalid header edit".to_string(),
            )
        })?,
        response_headers: HeaderEdits::from_xds(
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
        )
        .map_err(|e| {
            (
                format!("response_headers_to_add{e}"),
                "invalid header edit".to_string(),
            )
        })?,
    })
}

// Deprecated fields are read to be rejected by name.
#[allow(deprecated)]
fn virtual_host(vh: &XdsVirtualHost) -> Result<VirtualHost, (String, String)> {
    for (field, set) in [
        (
            "request_headers_to_add",
            !vh.request_headers_to_add.is_empty(),
        ),
        (
            "response_headers_to_add",
            !vh.response_headers_to_add.is_empty(),
        ),
        (
            "request_headers_to_remove",
            !vh.request_headers_to_remove.is_empty(),
        ),
        (
            "response_headers_to_remove",
            !vh.response_headers_to_remove.is_empty(),
        ),
        ("matcher", vh.matcher.is_some()),
        ("cors", vh.cors.is_some()),
        ("retry_policy", vh.retry_policy.is_some()),
        (
            "retry_policy_typed_config",
            vh.retry_policy_typed_config.is_some(),
        ),
        ("hedge_policy", vh.hedge_policy.is_some()),
        (
            "include_is_timeout_retry_header",
            vh.include_is_timeout_retry_header,
        ),
        (
            "per_request_buffer_limit_bytes",
            vh.per_request_buffer_limit_bytes.is_some(),
        ),
        (
            "request_body_buffer_limit",
            vh.request_body_buffer_limit.is_some(),
        ),
        (
            "request_mirror_policies",
            !vh.request_mirror_policies.is_empty(),
        ),
        (
            "typed_per_filter_config",
            vh.typed_per_filter_config
                .keys()
                .any(|k| k != super::local_ratelimit::FILTER_NAME),
        ),
    ] {
        if set {
            return Err((
                field.into(),
                "not supported by this weft-proxy version".into(),
            ));
        }
    }
    if vh.require_tls != 0 {
        return Err((
            "require_tls".into(),
            "not supported by this weft-proxy version".into(),
        ));
    }
    let vh_rate_limit = local_rate_limit(&vh.typed_per_filter_config)?;
    let vh_rate_limits = std::sync::Arc::new(rate_limits(&vh.rate_limits)?);
    let mut routes = vh
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| route(r, &vh_rate_limit).map_err(|(f, e)| (format!("routes[{i}].{f}"), e)))
        .collect::<Result<Vec<_>, _>>()?;
    for r in &mut routes {
        if let Action::Forward(a) = &mut r.action {
            a.attempt_header = vh.include_request_attempt_count;
            a.vh_rate_limits = vh_rate_limits.clone();
            a.attempts_in_response = vh.include_attempt_count_in_response;
        }
    }
    Ok(VirtualHost {
        name: vh.name.clone(),
        routes,
    })
}

impl RouteTable {
    pub fn from_xds(rc: &RouteConfiguration) -> Result<RouteTable, Rejection> {
        let reject = |field: String, reason: String| {
            Rejection::new("RouteConfiguration", &rc.name, field, reason)
        };
        if !rc.request_headers_to_add.is_empty()
            || !rc.response_headers_to_add.is_empty()
            || !rc.response_headers_to_remove.is_empty()
            || !rc.request_headers_to_remove.is_empty()
        {
            return Err(reject(
                "*_headers_to_*".into(),
                "header edits are not supported by this weft-proxy version".into(),
            ));
        }
        if rc.vhds.is_some() {
            return Err(reject("vhds".into(), "VHDS is not supported".into()));
        }
        let mut internal_only = Vec::new();
        for (i, h) in rc.internal_only_headers.iter().enumerate() {
            let name = http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                reject(
                    format!("internal_only_headers[{i}]"),
                    format!("{h:?} is not a valid header name"),
                )
            })?;
            internal_only.push(name);
        }
        let mut table = RouteTable {
            name: rc.name.clone(),
            internal_only,
            virtual_hosts: Vec::new(),
            exact: Default::default(),
            suffixes: Vec::new(),
            prefixes: Vec::new(),
            any: None,
        };
        for (i, vh) in rc.virtual_hosts.iter().enumerate() {
            let built =
                virtual_host(vh).map_err(|(f, e)| reject(format!("virtual_hosts[{i}].{f}"), e))?;
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                let dup = if d == "*" {
                    table.any.replace(i).is_some()
                } else if let Some(s) = d.strip_prefix('*') {
                    let dup = table.suffixes.iter().any(|(x, _)| x == s);
                    table.suffixes.push((s.to_string(), i));
                    dup
                } else if let Some(p) = d.strip_suffix('*') {
                    let dup = table.prefixes.iter().any(|(x, _)| x == p);
                    table.prefixes.push((p.to_string(), i));
                    dup
                } else {
                    table.exact.insert(d.clone(), i).is_some()
                };
                if dup {
                    // Envoy rejects a route configuration that lists a domain twice.
                    return Err(reject(
                        format!("virtual_hosts[{i}].domains"),
                        format!("domain {d:?} is already used by another virtual host"),
                    ));
                }
            }
            table.virtual_hosts.push(built);
        }
        table
            .suffixes
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        table
            .prefixes
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(table)
    }

    /// Envoy's order: exact domain, then longest `*suffix`, then longest `prefix*`, then `*`.
    pub fn virtual_hosts(&self) -> &[VirtualHost] {
        &self.virtual_hosts
    }

    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        let lower;
        let host = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = authority.to_ascii_lowercase();
            lower.as_str()
        } else {
            authority
        };
        let idx = self
            .exact
            .get(host)
            .copied()
            .or_else(|| {
                self.suffixes
                    .iter()
                    .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
                    .map(|(_, i)| *i)
            })
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()))
                    .map(|(_, i)| *i)
            })
            .or(self.any)?;
        self.virtual_hosts.get(idx)
    }

    /// The first route of the matching virtual host whose path and headers match.
    pub fn route(&self, req: &RequestView<'_>) -> Option<&Route> {
        let vh = self.virtual_host(req.authority)?;
        let path = req.path_and_query.split(['?', '#']).next().unwrap_or("");
        // One random value per request serves every route's runtime fraction, as Envoy uses
        // the stream's one: of two routes with the same share, a request matches both or
        // neither.
        let draw = std::cell::OnceCell::new();
        vh.routes.iter().find(|r| {
            r.matches(path, req)
                && r.runtime
                    .is_none_or(|f| f.hit_with(*draw.get_or_init(|| fastrand::u64(..))))
        })
    }
}

/// A gRPC request, as Envoy tells one: `content-type` `application/grpc`, or that followed by
/// `+` or `;`.
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
}

/// The first value of a query parameter, percent-decoded (as Envoy matches it).
fn query_value<'a>(path_and_query: &'a str, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let query = path_and_query.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or("");
    query
        .split('&')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains('%') {
        return std::borrow::Cow::Borrowed(v);
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

impl Route {
    fn matches(&self, path: &str, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => starts_with(path, p, self.case_sensitive),
            PathMatch::Exact(p) => {
                if self.case_sensitive {
                    path == p
                } else {
                    path.eq_ignore_ascii_case(p)
                }
            }
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::SeparatedPrefix(p) => {
                starts_with(path, p, self.case_sensitive)
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
        };
        path_ok
            && (!self.grpc || is_grpc(req.headers))
            && self.headers.iter().all(|h| h.matches(req))
            && self.query.iter().all(|q| {
                match (query_value(req.path_and_query, &q.name), &q.rule) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(v), Some(rule)) => rule.matches(&v),
                }
            })
    }
}

fn starts_with(path: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        path.starts_with(prefix)
    } else {
        path.len() >= prefix.len()
            && path.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    }
}

#[cfg(test)]
mod tests;
