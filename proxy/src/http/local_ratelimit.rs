//! The local rate limit filter (`envoy.filters.http.local_ratelimit`): a token bucket shared by
//! every worker of the process, configured on the connection manager and replaced per route or
//! virtual host (`typed_per_filter_config`). A request the bucket has no token for is answered
//! 429 (or the configured status) `local_rate_limited` with `response_headers_to_add` and the
//! `RL` response flag, when the filter is enforced for it; when it is only enabled, the request
//! passes with `request_headers_to_add_when_not_enforced`. As in Envoy, `filter_enabled` and
//! `filter_enforced` default to 0% of requests, and the bucket starts full and refills
//! continuously at `tokens_per_fill` per `fill_interval`. With
//! `local_rate_limit_per_downstream_connection`, each downstream connection has buckets of its
//! own instead (see [`ConnectionBuckets`]). With `enable_x_ratelimit_headers`, every answer
//! tells the client of the bucket that decided (see [`XRateLimit`]).

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderName;
use weft_xds_proto::envoy::config::route::v3::RateLimit as XdsRateLimit;
use weft_xds_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit as XdsLocalRateLimit;

use super::fault::Fraction;
use super::rewrite::HeaderEdits;
use super::router::{HeaderMatch, RequestView};
use crate::duration;
use crate::stats::Counter;

pub const FILTER_NAME: &str = "envoy.filters.http.local_ratelimit";
pub const TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// One local rate limit config, with its own bucket and counters.
#[derive(Debug)]
pub struct LocalRateLimit {
    pub stat_prefix: String,
    pub status: u16,
    /// `rate_limited_as_resource_exhausted`: a gRPC client is refused RESOURCE_EXHAUSTED.
    pub resource_exhausted: bool,
    bucket: Option<TokenBucket>,
    /// `local_rate_limit_per_downstream_connection`: these buckets are only the model of each
    /// connection's own (see [`ConnectionBuckets`]).
    per_connection: bool,
    /// `enable_x_ratelimit_headers: DRAFT_VERSION_03`.
    pub x_ratelimit_headers: bool,
    /// `enable_retry_after_header`: a refused request's answer says when to come back.
    pub retry_after: bool,
    /// `descriptors`: buckets of their own for requests whose descriptors (made by the
    /// `rate_limits` that apply) equal theirs; slowest refill first, as Envoy checks them.
    descriptors: Vec<DescriptorLimit>,
    /// `always_consume_default_token_bucket` (true unless set false): a request a descriptor
    /// matched takes a token from the default bucket too.
    always_consume_default: bool,
    /// Only `rate_limits` of this `stage` make descriptors.
    stage: u32,
    /// `rate_limits` of the filter's own: used instead of the route's and virtual host's.
    own_rules: Option<Vec<RateLimitRule>>,
    vh_rate_limits: VhRateLimits,
    enabled: Fraction,
    enforced: Fraction,
    pub request_headers_when_not_enforced: HeaderEdits,
    pub response_headers: HeaderEdits,
    pub stats: RateLimitStats,
}

/// Envoy's `<stat_prefix>.http_local_rate_limit.*` counters.
#[derive(Debug, Default)]
pub struct RateLimitStats {
    pub enabled: Counter,
    pub enforced: Counter,
    pub rate_limited: Counter,
    pub ok: Counter,
}

/// `enable_x_ratelimit_headers` (`DRAFT_VERSION_03`): what every answer to a request the filter
/// decided tells of the bucket that decided, as Envoy 1.40 fills them: `x-ratelimit-limit` its
/// `max_tokens`, `x-ratelimit-remaining` its whole tokens left, `x-ratelimit-reset` 0 while one
/// is left, else the seconds (rounded up) until the next one. The bucket is the descriptor's
/// that refused, else the default's that refused, else the strictest matched descriptor's,
/// else the default's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XRateLimit {
    pub limit: u32,
    pub remaining: u32,
    pub reset: u64,
}

impl XRateLimit {
    /// The three headers, in Envoy's order.
    pub fn headers(&self) -> [(HeaderName, http::HeaderValue); 3] {
        [
            (
                HeaderName::from_static("x-ratelimit-limit"),
                http::HeaderValue::from(self.limit),
            ),
            (
                HeaderName::from_static("x-ratelimit-remaining"),
                http::HeaderValue::from(self.remaining),
            ),
            (
                HeaderName::from_static("x-ratelimit-reset"),
                http::HeaderValue::from(self.reset),
            ),
        ]
    }
}

/// What the filter decides for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not limited (or the filter is not enabled for this request).
    Pass,
    /// Over the limit but not enforced: pass, with the not-enforced request headers.
    PassNotEnforced,
    /// Over the limit: answer locally.
    Limited,
}

#[derive(Debug)]
struct TokenBucket {
    max: f64,
    /// Tokens per second.
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

/// One downstream connection's buckets, for configs with
/// `local_rate_limit_per_downstream_connection`: made full from the config when a request of
/// the connection first needs them. As in Envoy (one per-connection limiter in the
/// connection's filter state), a connection has one set, made from the first such config its
/// requests use.
#[derive(Debug, Clone, Default)]
pub struct ConnectionBuckets(std::sync::OnceLock<std::sync::Arc<Buckets>>);

/// A default bucket and the descriptors' buckets.
#[derive(Debug)]
pub struct Buckets {
    bucket: TokenBucket,
    descriptors: Vec<DescriptorLimit>,
}

impl TokenBucket {
    fn new(max: u32, per_fill: u32, interval: Duration) -> TokenBucket {
        TokenBucket {
            max: f64::from(max),
            rate: f64::from(per_fill) / interval.as_secs_f64(),
            state: Mutex::new((f64::from(max), Instant::now())),
        }
    }

    /// A bucket of the same size and rate, full.
    fn fresh(&self) -> TokenBucket {
        TokenBucket {
            max: self.max,
            rate: self.rate,
            state: Mutex::new((self.max, Instant::now())),
        }
    }

    /// Takes a token if there is one; the tokens left either way.
    fn take_at(&self, now: Instant) -> (bool, f64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.max);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            (true, s.0)
        } else {
            (false, s.0)
        }
    }

    /// What `enable_x_ratelimit_headers` tells of this bucket with `left` tokens.
    fn tell(&self, left: f64) -> XRateLimit {
        XRateLimit {
            limit: self.max as u32,
            remaining: left.max(0.0).floor() as u32,
            // Rounded up, less the floating-point error of the refill (0.7 tokens at 0.1 a
            // second is 7 s, not 8).
            reset: if left >= 1.0 {
                0
            } else {
                ((1.0 - left) / self.rate - 1e-6).ceil().max(0.0) as u64
            },
        }
    }
}

type Rejected = (String, String);

/// A rate limit descriptor: its entries (key, value), in order.
pub type Descriptor = Vec<(String, String)>;

#[derive(Debug)]
struct DescriptorLimit {
    entries: Descriptor,
    bucket: TokenBucket,
}

/// How a virtual host's `rate_limits` join a route's (`vh_rate_limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VhRateLimits {
    /// The virtual host's, unless the route has its own.
    Override,
    /// Both.
    Include,
    /// The route's only.
    Ignore,
}

/// One of a route's or virtual host's `rate_limits`: the descriptor its actions make for a
/// request (none when an action cannot make its entry).
#[derive(Debug)]
pub struct RateLimitRule {
    stage: u32,
    actions: Vec<RuleAction>,
}

#[derive(Debug)]
enum RuleAction {
    /// `generic_key`: a fixed entry.
    Fixed(String, String),
    /// `request_headers`: the header's (first) value under `key`.
    Header {
        name: HeaderSource,
        key: String,
        skip_if_absent: bool,
    },
    /// `remote_address`: the trusted client address.
    RemoteAddress,
    /// `header_value_match`: a fixed entry when the headers match (or, `expect_match: false`,
    /// when they do not).
    HeaderValueMatch {
        entry: (String, String),
        expect_match: bool,
        headers: Vec<HeaderMatch>,
    },
}

/// Where a `request_headers` action reads its value: a pseudo-header (read off the request) or
/// a header.
#[derive(Debug)]
enum HeaderSource {
    Authority,
    Path,
    Method,
    Regular(HeaderName),
}

impl RateLimitRule {
    pub fn from_xds(r: &XdsRateLimit) -> Result<RateLimitRule, Rejected> {
        use weft_xds_proto::envoy::config::route::v3::rate_limit::action::ActionSpecifier as A;
        let unsupported = |f: &str| {
            Err((
                f.to_string(),
                "not supported by this weft-proxy version".to_string(),
            ))
        };
        if r.limit.is_some() {
            return unsupported("limit");
        }
        if r.hits_addend.is_some() {
            return unsupported("hits_addend");
        }
        if r.apply_on_stream_done {
            return unsupported("apply_on_stream_done");
        }
        if r.actions.is_empty() {
            return Err(("actions".into(), "at least one action is required".into()));
        }
        let mut actions = Vec::with_capacity(r.actions.len());
        for (i, a) in r.actions.iter().enumerate() {
            let field = |f: &str| format!("actions[{i}].{f}");
            let action = match &a.action_specifier {
                Some(A::GenericKey(g)) => {
                    if !g.default_value.is_empty() {
                        return unsupported(&field("generic_key.default_value"));
                    }
                    if g.descriptor_value.is_empty() {
                        return Err((
                            field("generic_key.descriptor_value"),
                            "a value is required".into(),
                        ));
                    }
                    let key = if g.descriptor_key.is_empty() {
                        "generic_key"
                    } else {
                        &g.descriptor_key
                    };
                    RuleAction::Fixed(key.to_string(), g.descriptor_value.clone())
                }
                Some(A::RequestHeaders(h)) => {
                    let name = match h.header_name.as_str() {
                        ":authority" | "host" => Some(HeaderSource::Authority),
                        ":path" => Some(HeaderSource::Path),
                        ":method" => Some(HeaderSource::Method),
                        other => HeaderName::from_bytes(other.as_bytes())
                            .ok()
                            .map(HeaderSource::Regular),
                    };
                    let (Some(name), false) = (name, h.descriptor_key.is_empty()) else {
                        return Err((
                            field("request_headers"),
                            "a valid header_name and a descriptor_key are required".into(),
                        ));
                    };
                    RuleAction::Header {
                        name,
                        key: h.descriptor_key.clone(),
                        skip_if_absent: h.skip_if_absent,
                    }
                }
                Some(A::RemoteAddress(_)) => RuleAction::RemoteAddress,
                Some(A::HeaderValueMatch(m)) => {
                    if !m.default_value.is_empty() {
                        return unsupported(&field("header_value_match.default_value"));
                    }
                    let headers = m
                        .headers
                        .iter()
                        .enumerate()
                        .map(|(j, h)| {
                            super::router::header_match(h).map_err(|e| {
                                (field(&format!("header_value_match.headers[{j}]")), e)
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let key = if m.descriptor_key.is_empty() {
                        "header_match"
                    } else {
                        &m.descriptor_key
                    };
                    RuleAction::HeaderValueMatch {
                        entry: (key.to_string(), m.descriptor_value.clone()),
                        expect_match: m.expect_match.map(|b| b.value).unwrap_or(true),
                        headers,
                    }
                }
                Some(A::SourceCluster(_)) => return unsupported(&field("source_cluster")),
                Some(A::DestinationCluster(_)) => {
                    return unsupported(&field("destination_cluster"));
                }
                Some(A::QueryParameters(_)) => return unsupported(&field("query_parameters")),
                #[allow(deprecated)] // Still in Envoy's API: refused by name like the others.
                Some(A::DynamicMetadata(_)) => return unsupported(&field("dynamic_metadata")),
                Some(A::Metadata(_)) => return unsupported(&field("metadata")),
                Some(A::Extension(_)) => return unsupported(&field("extension")),
                Some(A::MaskedRemoteAddress(_)) => {
                    return unsupported(&field("masked_remote_address"));
                }
                Some(A::QueryParameterValueMatch(_)) => {
                    return unsupported(&field("query_parameter_value_match"));
                }
                Some(A::RemoteAddressMatch(_)) => {
                    return unsupported(&field("remote_address_match"));
                }
                None => return Err((field("action_specifier"), "an action is required".into())),
            };
            actions.push(action);
        }
        Ok(RateLimitRule {
            stage: r.stage.map(|s| s.value).unwrap_or(0),
            actions,
        })
    }

    /// The descriptor this rule makes for the request, if every action makes its entry (an
    /// absent header with `skip_if_absent` adds none).
    fn descriptor(&self, req: &RequestView<'_>, remote: Option<IpAddr>) -> Option<Descriptor> {
        let mut entries = Vec::with_capacity(self.actions.len());
        for action in &self.actions {
            match action {
                RuleAction::Fixed(k, v) => entries.push((k.clone(), v.clone())),
                RuleAction::Header {
                    name,
                    key,
                    skip_if_absent,
                } => {
                    let value = match name {
                        HeaderSource::Authority => Some(req.authority),
                        HeaderSource::Path => Some(req.path_and_query),
                        HeaderSource::Method => Some(req.method),
                        HeaderSource::Regular(n) => {
                            req.headers.get(n).and_then(|v| v.to_str().ok())
                        }
                    };
                    match value {
                        Some(v) => entries.push((key.clone(), v.to_string())),
                        None if *skip_if_absent => {}
                        None => return None,
                    }
                }
                RuleAction::RemoteAddress => {
                    entries.push(("remote_address".into(), remote?.to_string()));
                }
                RuleAction::HeaderValueMatch {
                    entry,
                    expect_match,
                    headers,
                } => {
                    if headers.iter().all(|h| h.matches(req)) != *expect_match {
                        return None;
                    }
                    entries.push(entry.clone());
                }
            }
        }
        Some(entries)
    }
}

impl LocalRateLimit {
    pub fn from_xds(c: &XdsLocalRateLimit) -> Result<LocalRateLimit, Rejected> {
        if c.stat_prefix.is_empty() {
            return Err(("stat_prefix".into(), "a stat_prefix is required".into()));
        }
        for (field, set) in [
            (
                "local_cluster_rate_limit",
                c.local_cluster_rate_limit.is_some(),
            ),
            (
                "max_dynamic_descriptors",
                c.max_dynamic_descriptors.is_some(),
            ),
        ] {
            if set {
                return Err((
                    field.into(),
                    "not supported by this weft-proxy version".into(),
                ));
            }
        }
        // XRateLimitHeadersRFCVersion: OFF (0) or DRAFT_VERSION_03 (1).
        let x_ratelimit_headers = match c.enable_x_ratelimit_headers {
            0 => false,
            1 => true,
            other => {
                return Err((
                    "enable_x_ratelimit_headers".into(),
                    format!("{other} is not an XRateLimitHeadersRFCVersion value"),
                ));
            }
        };
        let bucket = c
            .token_bucket
            .as_ref()
            .map(|b| TokenBucket::from_xds(b, "token_bucket"))
            .transpose()?;
        let mut descriptors: Vec<(DescriptorLimit, u64)> = Vec::new();
        for (i, d) in c.descriptors.iter().enumerate() {
            let field = |f: &str| format!("descriptors[{i}].{f}");
            if bucket.is_none() {
                return Err((
                    "token_bucket".into(),
                    "descriptors need the filter's own token_bucket too".into(),
                ));
            }
            if d.shadow_mode {
                return Err((
                    field("shadow_mode"),
                    "not supported by this weft-proxy version".into(),
                ));
            }
            if d.entries.is_empty() {
                return Err((field("entries"), "at least one entry is required".into()));
            }
            if let Some(j) = d.entries.iter().position(|e| e.value.is_empty()) {
                return Err((
                    field(&format!("entries[{j}].value")),
                    "an entry without a value (a dynamic descriptor) is not supported by this weft-proxy version".into(),
                ));
            }
            let entries: Descriptor = d
                .entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect();
            if descriptors
                .iter()
                .any(|(other, _)| other.entries == entries)
            {
                return Err((field("entries"), "a duplicate descriptor".into()));
            }
            let Some(b) = &d.token_bucket else {
                return Err((field("token_bucket"), "a token bucket is required".into()));
            };
            let fill = b.fill_interval.as_ref().map(duration).unwrap_or_default();
            // Envoy's order: tokens per whole second of fill interval (at least 1 s).
            let per_second =
                u64::from(b.tokens_per_fill.map(|v| v.value).unwrap_or(1)) / fill.as_secs().max(1);
            let bucket = TokenBucket::from_xds(b, &field("token_bucket"))?;
            descriptors.push((DescriptorLimit { entries, bucket }, per_second));
        }
        // The strictest first, so that a request one limits takes no token from the others.
        descriptors.sort_by_key(|(_, per_second)| *per_second);
        let own_rules = if c.rate_limits.is_empty() {
            None
        } else {
            Some(
                c.rate_limits
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        RateLimitRule::from_xds(r)
                            .map_err(|(f, e)| (format!("rate_limits[{i}].{f}"), e))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        let vh_rate_limits = match c.vh_rate_limits {
            0 => VhRateLimits::Override,
            1 => VhRateLimits::Include,
            2 => VhRateLimits::Ignore,
            other => {
                return Err((
                    "vh_rate_limits".into(),
                    format!("{other} is not a VhRateLimitsOptions value"),
                ));
            }
        };
        let status = match c.status.as_ref().map(|s| s.code) {
            None | Some(0) => 429,
            Some(code @ 200..=599) => code as u16,
            Some(code) => {
                return Err((
                    "status.code".into(),
                    format!("{code} is not an HTTP status a rate limit can answer"),
                ));
            }
        };
        let fraction =
            |r: &Option<weft_xds_proto::envoy::config::core::v3::RuntimeFractionalPercent>| {
                Fraction::from_xds(r.as_ref().and_then(|r| r.default_value.as_ref()))
            };
        Ok(LocalRateLimit {
            stat_prefix: c.stat_prefix.clone(),
            status,
            resource_exhausted: c.rate_limited_as_resource_exhausted,
            bucket,
            per_connection: c.local_rate_limit_per_downstream_connection,
            x_ratelimit_headers,
            retry_after: c.enable_retry_after_header,
            descriptors: descriptors.into_iter().map(|(d, _)| d).collect(),
            always_consume_default: c
                .always_consume_default_token_bucket
                .is_none_or(|b| b.value),
            stage: c.stage,
            own_rules,
            vh_rate_limits,
            enabled: fraction(&c.filter_enabled),
            enforced: fraction(&c.filter_enforced),
            request_headers_when_not_enforced: HeaderEdits::from_xds(
                &c.request_headers_to_add_when_not_enforced,
                &[],
            )
            .map_err(|r| ("request_headers_to_add_when_not_enforced".into(), r))?,
            response_headers: HeaderEdits::from_xds(&c.response_headers_to_add, &[])
                .map_err(|r| ("response_headers_to_add".into(), r))?,
            stats: RateLimitStats::default(),
        })
    }

    /// The descriptors the request makes, when this config has descriptors to match: from the
    /// filter's own `rate_limits`, else the route's and its virtual host's (`vh_rate_limits`),
    /// those of this config's `stage`. Routes that do not forward make none.
    pub fn descriptors_for(
        &self,
        route: &super::router::RouteAction,
        req: &RequestView<'_>,
        remote: Option<IpAddr>,
    ) -> Vec<Descriptor> {
        if self.descriptors.is_empty() {
            return Vec::new();
        }
        let vh: &[RateLimitRule] = match (&self.own_rules, self.vh_rate_limits) {
            (Some(_), _) => &[],
            _ if route.include_vh_rate_limits => &route.vh_rate_limits,
            (None, VhRateLimits::Include) => &route.vh_rate_limits,
            (None, VhRateLimits::Override) if route.rate_limits.is_empty() => &route.vh_rate_limits,
            (None, _) => &[],
        };
        let own = self.own_rules.as_deref().unwrap_or(&route.rate_limits);
        own.iter()
            .chain(vh)
            .filter(|r| r.stage == self.stage)
            .filter_map(|r| r.descriptor(req, remote))
            .collect()
    }

    /// Decides one request of the downstream connection whose buckets `conn` holds (takes a
    /// token when there is one), given the descriptors it made; with
    /// `enable_x_ratelimit_headers` or `enable_retry_after_header`, also what its answer tells
    /// of the bucket that decided.
    pub fn check(
        &self,
        descriptors: &[Descriptor],
        conn: &ConnectionBuckets,
    ) -> (Verdict, Option<XRateLimit>) {
        self.check_on(Instant::now(), descriptors, conn)
    }

    #[cfg(test)]
    fn check_at(&self, now: Instant, request: &[Descriptor]) -> Verdict {
        self.check_on(now, request, &ConnectionBuckets::default()).0
    }

    fn check_on(
        &self,
        now: Instant,
        request: &[Descriptor],
        conn: &ConnectionBuckets,
    ) -> (Verdict, Option<XRateLimit>) {
        let Some(bucket) = &self.bucket else {
            return (Verdict::Pass, None);
        };
        if !self.enabled.hit() {
            return (Verdict::Pass, None);
        }
        self.stats.enabled.inc();
        let (allowed, decider, left) = if self.per_connection {
            let own = conn.0.get_or_init(|| {
                std::sync::Arc::new(Buckets {
                    bucket: bucket.fresh(),
                    descriptors: self
                        .descriptors
                        .iter()
                        .map(|d| DescriptorLimit {
                            entries: d.entries.clone(),
                            bucket: d.bucket.fresh(),
                        })
                        .collect(),
                })
            });
            self.decide(&own.bucket, &own.descriptors, now, request)
        } else {
            self.decide(bucket, &self.descriptors, now, request)
        };
        let told = (self.x_ratelimit_headers || self.retry_after).then(|| decider.tell(left));
        if allowed {
            self.stats.ok.inc();
            return (Verdict::Pass, told);
        }
        self.stats.rate_limited.inc();
        if self.enforced.hit() {
            self.stats.enforced.inc();
            (Verdict::Limited, told)
        } else {
            (Verdict::PassNotEnforced, told)
        }
    }
}

impl LocalRateLimit {
    /// Every descriptor limit the request's descriptors match must have a token (the strictest
    /// is asked first; the first without one refuses), then the default bucket, unless a
    /// descriptor matched and `always_consume_default_token_bucket` is false. Also the bucket
    /// that decided (see [`XRateLimit`]) and its tokens left.
    fn decide<'b>(
        &self,
        bucket: &'b TokenBucket,
        descriptors: &'b [DescriptorLimit],
        now: Instant,
        request: &[Descriptor],
    ) -> (bool, &'b TokenBucket, f64) {
        let mut strictest: Option<(&TokenBucket, f64)> = None;
        for d in descriptors {
            if request.contains(&d.entries) {
                let (taken, left) = d.bucket.take_at(now);
                if !taken {
                    return (false, &d.bucket, left);
                }
                strictest.get_or_insert((&d.bucket, left));
            }
        }
        if let Some((matched, left)) = strictest
            && !self.always_consume_default
        {
            return (true, matched, left);
        }
        let (taken, left) = bucket.take_at(now);
        match strictest {
            Some((matched, matched_left)) if taken => (true, matched, matched_left),
            _ => (taken, bucket, left),
        }
    }
}

impl TokenBucket {
    fn from_xds(
        b: &weft_xds_proto::envoy::r#type::v3::TokenBucket,
        field: &str,
    ) -> Result<TokenBucket, Rejected> {
        let interval = b.fill_interval.as_ref().map(duration).unwrap_or_default();
        if interval < Duration::from_millis(50) {
            return Err((
                format!("{field}.fill_interval"),
                "a fill interval of at least 50ms is required".into(),
            ));
        }
        if b.max_tokens == 0 {
            return Err((
                format!("{field}.max_tokens"),
                "max_tokens must be above 0".into(),
            ));
        }
        let per_fill = b.tokens_per_fill.map(|v| v.value).unwrap_or(1);
        if per_fill == 0 {
            return Err((
                format!("{field}.tokens_per_fill"),
                "tokens_per_fill must be above 0".into(),
            ));
        }
        Ok(TokenBucket::new(b.max_tokens, per_fill, interval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<LocalRateLimit, Rejected> {
        LocalRateLimit::from_xds(&weft_xds_proto::from_yaml(yaml).unwrap())
    }

    const ON: &str = "filter_enabled: { default_value: { numerator: 100 } }, filter_enforced: { default_value: { numerator: 100 } }";

    /// `enable_x_ratelimit_headers`: the numbers Envoy 1.40 gave for the same requests (a
    /// bucket of 3 refilled by 1 every 10 s, one request every 1.5 s; then a descriptor of 2
    /// per 20 s).
    #[test]
    fn x_ratelimit_headers_tell_of_the_bucket_that_decided() {
        let l = parse(&format!(
            "{{ stat_prefix: p, {ON}, enable_x_ratelimit_headers: DRAFT_VERSION_03,
               token_bucket: {{ max_tokens: 3, tokens_per_fill: 1, fill_interval: 10s }},
               descriptors: [ {{ entries: [{{ key: client, value: a }}], token_bucket: {{ max_tokens: 2, tokens_per_fill: 2, fill_interval: 20s }} }} ] }}"
        ))
        .unwrap();
        let conn = ConnectionBuckets::default();
        let t0 = Instant::now();
        let at = |ms: u64, request: &[Descriptor]| {
            let (verdict, told) = l.check_on(t0 + Duration::from_millis(ms), request, &conn);
            let told = told.unwrap();
            (verdict, told.limit, told.remaining, told.reset)
        };
        assert_eq!(at(0, &[]), (Verdict::Pass, 3, 2, 0));
        assert_eq!(at(1500, &[]), (Verdict::Pass, 3, 1, 0));
        assert_eq!(at(3000, &[]), (Verdict::Pass, 3, 0, 7));
        assert_eq!(at(4500, &[]), (Verdict::Limited, 3, 0, 6));
        assert_eq!(at(6000, &[]), (Verdict::Limited, 3, 0, 4));
        let a = vec![vec![("client".to_string(), "a".to_string())]];
        // The descriptor has a token, the default bucket none: the default refuses.
        assert_eq!(at(7500, &a), (Verdict::Limited, 3, 0, 3));
        assert_eq!(at(7600, &a), (Verdict::Limited, 3, 0, 3));
        // The descriptor's two are gone: it refuses.
        assert_eq!(at(7700, &a), (Verdict::Limited, 2, 0, 10));
        // Both have tokens: the matched descriptor's is told.
        assert_eq!(at(40_000, &a), (Verdict::Pass, 2, 1, 0));
        // Off: nothing told.
        let off = parse(&format!(
            "{{ stat_prefix: p, {ON}, token_bucket: {{ max_tokens: 3, fill_interval: 10s }} }}"
        ))
        .unwrap();
        assert_eq!(off.check_on(t0, &[], &conn).1, None);
        assert_eq!(
            XRateLimit {
                limit: 3,
                remaining: 2,
                reset: 0
            }
            .headers()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap())),
            [
                "x-ratelimit-limit: 3",
                "x-ratelimit-remaining: 2",
                "x-ratelimit-reset: 0"
            ]
        );
    }

    /// `local_rate_limit_per_downstream_connection`: every connection has full buckets of its
    /// own (descriptors' too); the config's own are not drawn from. As in Envoy, a connection's
    /// buckets are made from the first such config it uses.
    #[test]
    fn per_connection_buckets_are_each_connections_own() {
        let config = |max: u32| {
            parse(&format!(
                "{{ stat_prefix: p, {ON}, local_rate_limit_per_downstream_connection: true,
                   token_bucket: {{ max_tokens: {max}, fill_interval: 60s }},
                   descriptors: [ {{ entries: [{{ key: client, value: a }}], token_bucket: {{ max_tokens: 1, fill_interval: 60s }} }} ] }}"
            ))
            .unwrap()
        };
        let l = config(2);
        let (one, two) = (ConnectionBuckets::default(), ConnectionBuckets::default());
        let t0 = Instant::now();
        let passed = |conn: &ConnectionBuckets, request: &[Descriptor]| {
            (0..4)
                .filter(|_| l.check_on(t0, request, conn).0 == Verdict::Pass)
                .count()
        };
        assert_eq!(passed(&one, &[]), 2);
        assert_eq!(
            passed(&two, &[]),
            2,
            "another connection has its own bucket"
        );
        let a = vec![vec![("client".to_string(), "a".to_string())]];
        let three = ConnectionBuckets::default();
        assert_eq!(
            passed(&three, &a),
            1,
            "a descriptor's bucket per connection too"
        );
        assert_eq!(l.stats.rate_limited.get(), 2 + 2 + 3);
        // The config's own buckets were never drawn from.
        assert_eq!(
            l.bucket.as_ref().unwrap().state.lock().unwrap().0,
            2.0,
            "the shared bucket is untouched"
        );
        // A second per-connection config on a connection that has buckets uses those.
        let other = config(5);
        assert_eq!(
            (0..6)
                .filter(|_| other.check_on(t0, &[], &one).0 == Verdict::Pass)
                .count(),
            0,
            "connection one's bucket (from the first config) is empty"
        );
    }

    #[test]
    fn a_full_bucket_passes_max_tokens_then_refills_continuously() {
        let l = parse(&format!(
            "{{ stat_prefix: p, token_bucket: {{ max_tokens: 3, tokens_per_fill: 1, fill_interval: 1s }}, {ON} }}"
        ))
        .unwrap();
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..5).map(|_| l.check_at(t0, &[])).collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Pass).count(), 3);
        assert_eq!(verdicts[4], Verdict::Limited);
        assert_eq!(
            l.check_at(t0 + Duration::from_millis(500), &[]),
            Verdict::Limited
        );
        assert_eq!(
            l.check_at(t0 + Duration::from_millis(1000), &[]),
            Verdict::Pass
        );
        // Never more than max_tokens, however long the wait.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(
            (0..10)
                .filter(|_| l.check_at(later, &[]) == Verdict::Pass)
                .count(),
            3
        );
        assert_eq!(l.stats.enforced.get(), 2 + 1 + 7);
        assert_eq!(l.stats.ok.get(), 3 + 1 + 3);
    }

    #[test]
    fn not_enabled_or_not_enforced_passes() {
        let off = parse("{ stat_prefix: p, token_bucket: { max_tokens: 1, fill_interval: 60s } }")
            .unwrap();
        assert!(
            (0..5).all(|_| off.check(&[], &ConnectionBuckets::default()).0 == Verdict::Pass),
            "0% enabled by default"
        );
        assert_eq!(off.stats.enabled.get(), 0);
        let shadow = parse(
            "{ stat_prefix: p, token_bucket: { max_tokens: 1, fill_interval: 60s }, filter_enabled: { default_value: { numerator: 100 } } }",
        )
        .unwrap();
        assert_eq!(shadow.check_at(Instant::now(), &[]), Verdict::Pass);
        assert_eq!(
            shadow.check_at(Instant::now(), &[]),
            Verdict::PassNotEnforced
        );
        assert_eq!(shadow.stats.rate_limited.get(), 1);
        assert_eq!(shadow.stats.enforced.get(), 0);
    }

    fn descriptor(pairs: &[(&str, &str)]) -> Descriptor {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn descriptors_take_their_own_tokens_and_the_default_buckets() {
        let config = |always: &str| {
            parse(&format!(
                "{{ stat_prefix: p, {ON}, {always} token_bucket: {{ max_tokens: 4, fill_interval: 60s }},
                   descriptors: [
                     {{ entries: [{{ key: client, value: b }}], token_bucket: {{ max_tokens: 3, tokens_per_fill: 3, fill_interval: 1s }} }},
                     {{ entries: [{{ key: client, value: a }}], token_bucket: {{ max_tokens: 1, fill_interval: 60s }} }},
                     {{ entries: [{{ key: client, value: a }}, {{ key: path, value: /x }}], token_bucket: {{ max_tokens: 2, fill_interval: 60s }} }} ] }}"
            ))
            .unwrap()
        };
        let t0 = Instant::now();
        let a = [descriptor(&[("client", "a")])];
        let b = [descriptor(&[("client", "b")])];
        let other = [descriptor(&[("client", "c")])];
        // `client: a` has one token; the default bucket is taken from too.
        let l = config("");
        assert_eq!(l.check_at(t0, &a), Verdict::Pass);
        assert_eq!(l.check_at(t0, &a), Verdict::Limited);
        // A descriptor no limit has: the default bucket (3 of 4 left).
        let passed = (0..5).filter(|_| l.check_at(t0, &other) == Verdict::Pass);
        assert_eq!(passed.count(), 3);
        // Without `always_consume_default_token_bucket`, a matched request spares it.
        let l = config("always_consume_default_token_bucket: false,");
        let passed = (0..5).filter(|_| l.check_at(t0, &b) == Verdict::Pass);
        assert_eq!(passed.count(), 3);
        let passed = (0..5).filter(|_| l.check_at(t0, &other) == Verdict::Pass);
        assert_eq!(passed.count(), 4);
        // Two matched limits: the strictest (`client: a`, fewest tokens a second) is asked
        // first, and when it refuses the other keeps its tokens.
        let l = config("always_consume_default_token_bucket: false,");
        let both = [
            descriptor(&[("client", "a"), ("path", "/x")]),
            descriptor(&[("client", "a")]),
        ];
        assert_eq!(l.check_at(t0, &both), Verdict::Pass);
        assert_eq!(l.check_at(t0, &both), Verdict::Limited);
        let ax = [descriptor(&[("client", "a"), ("path", "/x")])];
        assert_eq!(l.check_at(t0, &ax), Verdict::Pass);
        assert_eq!(l.check_at(t0, &ax), Verdict::Limited);
    }

    #[test]
    fn rate_limit_actions_make_descriptors_as_envoy_does() {
        let rule = |yaml: &str| {
            RateLimitRule::from_xds(&weft_xds_proto::from_yaml(yaml).unwrap()).unwrap()
        };
        let mut headers = http::HeaderMap::new();
        headers.insert("x-client", "alpha".parse().unwrap());
        let req = RequestView {
            method: "GET",
            authority: "svc",
            path_and_query: "/p?q=1",
            headers: &headers,
        };
        let ip: Option<IpAddr> = "10.1.2.3".parse().ok();
        let r = rule(
            "{ actions: [{ generic_key: { descriptor_value: g } }, { request_headers: { header_name: x-client, descriptor_key: client } }, { request_headers: { header_name: ':path', descriptor_key: path } }, { remote_address: {} }] }",
        );
        assert_eq!(
            r.descriptor(&req, ip),
            Some(descriptor(&[
                ("generic_key", "g"),
                ("client", "alpha"),
                ("path", "/p?q=1"),
                ("remote_address", "10.1.2.3")
            ]))
        );
        // An absent header: no descriptor, or, with `skip_if_absent`, one without its entry.
        let r =
            rule("{ actions: [{ request_headers: { header_name: x-none, descriptor_key: n } }] }");
        assert_eq!(r.descriptor(&req, ip), None);
        let r = rule(
            "{ actions: [{ request_headers: { header_name: x-none, descriptor_key: n, skip_if_absent: true } }, { generic_key: { descriptor_key: k, descriptor_value: v } }] }",
        );
        assert_eq!(r.descriptor(&req, ip), Some(descriptor(&[("k", "v")])));
        // Header value matches, and their inverse.
        let matches = "headers: [{ name: x-client, string_match: { exact: alpha } }]";
        let r = rule(&format!(
            "{{ actions: [{{ header_value_match: {{ descriptor_value: m, {matches} }} }}] }}"
        ));
        assert_eq!(
            r.descriptor(&req, ip),
            Some(descriptor(&[("header_match", "m")]))
        );
        let r = rule(&format!(
            "{{ actions: [{{ header_value_match: {{ descriptor_value: m, expect_match: false, {matches} }} }}] }}"
        ));
        assert_eq!(r.descriptor(&req, ip), None);
        // No address, no descriptor.
        let r = rule("{ actions: [{ remote_address: {} }] }");
        assert_eq!(r.descriptor(&req, None), None);
        assert_eq!(r.stage, 0);
    }

    #[test]
    fn unsupported_and_invalid_fields_are_named() {
        for (yaml, field) in [
            (
                "{ token_bucket: { max_tokens: 1, fill_interval: 1s } }",
                "stat_prefix",
            ),
            (
                "{ stat_prefix: p, token_bucket: { max_tokens: 1, fill_interval: 0.01s } }",
                "token_bucket.fill_interval",
            ),
            (
                "{ stat_prefix: p, token_bucket: { max_tokens: 0, fill_interval: 1s } }",
                "token_bucket.max_tokens",
            ),
            ("{ stat_prefix: p, status: { code: 700 } }", "status.code"),
            (
                "{ stat_prefix: p, descriptors: [{ entries: [{ key: a, value: b }], token_bucket: { max_tokens: 1, fill_interval: 1s } }] }",
                "token_bucket",
            ),
            (
                "{ stat_prefix: p, token_bucket: { max_tokens: 1, fill_interval: 1s }, descriptors: [{ entries: [{ key: a }], token_bucket: { max_tokens: 1, fill_interval: 1s } }] }",
                "descriptors[0].entries[0].value",
            ),
            (
                "{ stat_prefix: p, token_bucket: { max_tokens: 1, fill_interval: 1s }, descriptors: [{ entries: [{ key: a, value: b }], token_bucket: { max_tokens: 1, fill_interval: 1s } }, { entries: [{ key: a, value: b }], token_bucket: { max_tokens: 2, fill_interval: 1s } }] }",
                "descriptors[1].entries",
            ),
            (
                "{ stat_prefix: p, token_bucket: { max_tokens: 1, fill_interval: 1s }, descriptors: [{ entries: [{ key: a, value: b }] }] }",
                "descriptors[0].token_bucket",
            ),
            (
                "{ stat_prefix: p, rate_limits: [{ actions: [{ masked_remote_address: {} }] }] }",
                "rate_limits[0].actions[0].masked_remote_address",
            ),
            (
                "{ stat_prefix: p, rate_limits: [{ actions: [{ request_headers: { header_name: x } }] }] }",
                "rate_limits[0].actions[0].request_headers",
            ),
            (
                "{ stat_prefix: p, enable_x_ratelimit_headers: 7 }",
                "enable_x_ratelimit_headers",
            ),
        ] {
            let err = parse(yaml).unwrap_err();
            assert_eq!(err.0, field, "{yaml}: {err:?}");
        }
    }
}
