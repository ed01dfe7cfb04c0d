//! The local rate limit filter (`envoy.filters.http.local_ratelimit`): a token bucket shared by
//! every worker of the process, configured on the connection manager and replaced per route or
//! virtual host (`typed_per_filter_config`). A request the bucket has no token for is answered
//! 429 (or the configured status) `local_rate_limited` with `response_headers_to_add` and the
//! `RL` response flag, when the filter is enforced for it; when it is only enabled, the request
//! passes with `request_headers_to_add_when_not_enforced`. As in Envoy, `filter_enabled` and
//! `filter_enforced` default to 0% of requests, and the bucket starts full and refills
//! continuously at `tokens_per_fill` per `fill_interval`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use weft_xds_proto::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit as XdsLocalRateLimit;

use super::fault::Fraction;
use super::rewrite::HeaderEdits;
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
    bucket: Option<TokenBucket>,
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

impl TokenBucket {
    fn new(max: u32, per_fill: u32, interval: Duration) -> TokenBucket {
        TokenBucket {
            max: f64::from(max),
            rate: f64::from(per_fill) / interval.as_secs_f64(),
            state: Mutex::new((f64::from(max), Instant::now())),
        }
    }

    fn take_at(&self, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.max);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

type Rejected = (String, String);

impl LocalRateLimit {
    pub fn from_xds(c: &XdsLocalRateLimit) -> Result<LocalRateLimit, Rejected> {
        if c.stat_prefix.is_empty() {
            return Err(("stat_prefix".into(), "a stat_prefix is required".into()));
        }
        for (field, set) in [
            ("descriptors", !c.descriptors.is_empty()),
            ("stage", c.stage != 0),
            (
                "local_rate_limit_per_downstream_connection",
                c.local_rate_limit_per_downstream_connection,
            ),
            (
                "local_cluster_rate_limit",
                c.local_cluster_rate_limit.is_some(),
            ),
            (
                "enable_x_ratelimit_headers",
                c.enable_x_ratelimit_headers != 0,
            ),
            ("vh_rate_limits", c.vh_rate_limits != 0),
            (
                "always_consume_default_token_bucket",
                c.always_consume_default_token_bucket.is_some(),
            ),
            (
                "rate_limited_as_resource_exhausted",
                c.rate_limited_as_resource_exhausted,
            ),
            ("rate_limits", !c.rate_limits.is_empty()),
            (
                "max_dynamic_descriptors",
                c.max_dynamic_descriptors.is_some(),
            ),
            ("enable_retry_after_header", c.enable_retry_after_header),
        ] {
            if set {
                return Err((
                    field.into(),
                    "not supported by this weft-proxy version (one token bucket per config is)"
                        .into(),
                ));
            }
        }
        let bucket = match &c.token_bucket {
            None => None,
            Some(b) => {
                let interval = b.fill_interval.as_ref().map(duration).unwrap_or_default();
                if interval < Duration::from_millis(50) {
                    return Err((
                        "token_bucket.fill_interval".into(),
                        "a fill interval of at least 50ms is required".into(),
                    ));
                }
                if b.max_tokens == 0 {
                    return Err((
                        "token_bucket.max_tokens".into(),
                        "max_tokens must be above 0".into(),
                    ));
                }
                let per_fill = b.tokens_per_fill.map(|v| v.value).unwrap_or(1);
                if per_fill == 0 {
                    return Err((
                        "token_bucket.tokens_per_fill".into(),
                        "tokens_per_fill must be above 0".into(),
                    ));
                }
                Some(TokenBucket::new(b.max_tokens, per_fill, interval))
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
            bucket,
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

    /// Decides one request (takes a token when there is one).
    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Verdict {
        let Some(bucket) = &self.bucket else {
            return Verdict::Pass;
        };
        if !self.enabled.hit() {
            return Verdict::Pass;
        }
        self.stats.enabled.inc();
        if bucket.take_at(now) {
            self.stats.ok.inc();
            return Verdict::Pass;
        }
        self.stats.rate_limited.inc();
        if self.enforced.hit() {
            self.stats.enforced.inc();
            Verdict::Limited
        } else {
            Verdict::PassNotEnforced
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<LocalRateLimit, Rejected> {
        LocalRateLimit::from_xds(&weft_xds_proto::from_yaml(yaml).unwrap())
    }

    const ON: &str = "filter_enabled: { default_value: { numerator: 100 } }, filter_enforced: { default_value: { numerator: 100 } }";

    #[test]
    fn a_full_bucket_passes_max_tokens_then_refills_continuously() {
        let l = parse(&format!(
            "{{ stat_prefix: p, token_bucket: {{ max_tokens: 3, tokens_per_fill: 1, fill_interval: 1s }}, {ON} }}"
        ))
        .unwrap();
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..5).map(|_| l.check_at(t0)).collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Pass).count(), 3);
        assert_eq!(verdicts[4], Verdict::Limited);
        assert_eq!(
            l.check_at(t0 + Duration::from_millis(500)),
            Verdict::Limited
        );
        assert_eq!(l.check_at(t0 + Duration::from_millis(1000)), Verdict::Pass);
        // Never more than max_tokens, however long the wait.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(
            (0..10)
                .filter(|_| l.check_at(later) == Verdict::Pass)
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
            (0..5).all(|_| off.check() == Verdict::Pass),
            "0% enabled by default"
        );
        assert_eq!(off.stats.enabled.get(), 0);
        let shadow = parse(
            "{ stat_prefix: p, token_bucket: { max_tokens: 1, fill_interval: 60s }, filter_enabled: { default_value: { numerator: 100 } } }",
        )
        .unwrap();
        assert_eq!(shadow.check(), Verdict::Pass);
        assert_eq!(shadow.check(), Verdict::PassNotEnforced);
        assert_eq!(shadow.stats.rate_limited.get(), 1);
        assert_eq!(shadow.stats.enforced.get(), 0);
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
                "descriptors",
            ),
            (
                "{ stat_prefix: p, local_rate_limit_per_downstream_connection: true }",
                "local_rate_limit_per_downstream_connection",
            ),
        ] {
            let err = parse(yaml).unwrap_err();
            assert_eq!(err.0, field, "{yaml}: {err:?}");
        }
    }
}
