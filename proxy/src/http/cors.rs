//! The CORS filter (`envoy.filters.http.cors`) with per-route `CorsPolicy`: preflight requests
//! from an allowed origin are answered by the proxy; actual requests from an allowed origin get
//! the access-control response headers. Origins that do not match pass through untouched.

use http::header::{HeaderMap, HeaderValue};
use weft_xds_proto::envoy::extensions::filters::http::cors::v3::CorsPolicy as XdsCorsPolicy;

use super::fault::Fraction;
use super::router::{StringRule, string_rule};

pub const FILTER_NAME: &str = "envoy.filters.http.cors";
pub const FILTER_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors";
pub const POLICY_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";

#[derive(Debug)]
pub struct CorsPolicy {
    origins: Vec<StringRule>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    enabled: Fraction,
}

fn value(field: &str, s: &str) -> Result<Option<HeaderValue>, (String, String)> {
    if s.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(s).map(Some).map_err(|_| {
        (
            field.to_string(),
            format!("{s:?} is not a valid header value"),
        )
    })
}

impl CorsPolicy {
    pub fn from_xds(p: &XdsCorsPolicy) -> Result<CorsPolicy, (String, String)> {
        if p.shadow_enabled.is_some() || p.allow_private_network_access.is_some_and(|b| b.value) {
            return Err((
                "shadow_enabled".into(),
                "shadow mode and private network access are not supported".into(),
            ));
        }
        if p.forward_not_matching_preflights.is_some_and(|b| !b.value) {
            return Err((
                "forward_not_matching_preflights".into(),
                "only forwarding unmatched preflights is supported".into(),
            ));
        }
        let origins = p
            .allow_origin_string_match
            .iter()
            .enumerate()
            .map(|(i, m)| {
                string_rule(m).map_err(|e| (format!("allow_origin_string_match[{i}]"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CorsPolicy {
            origins,
            allow_methods: value("allow_methods", &p.allow_methods)?,
            allow_headers: value("allow_headers", &p.allow_headers)?,
            expose_headers: value("expose_headers", &p.expose_headers)?,
            max_age: value("max_age", &p.max_age)?,
            allow_credentials: p.allow_credentials.is_some_and(|b| b.value),
            enabled: match &p.filter_enabled {
                None => Fraction(1_000_000),
                Some(f) => Fraction::from_xds(f.default_value.as_ref()),
            },
        })
    }

    /// The request's origin, when the policy is on and allows it.
    pub fn allowed_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(http::header::ORIGIN)?;
        let s = origin.to_str().ok()?;
        (self.enabled.hit() && self.origins.iter().any(|r| r.matches(s))).then(|| origin.clone())
    }

    /// Headers of the proxy's own answer to an allowed preflight.
    pub fn preflight_headers(&self, origin: HeaderValue, out: &mut HeaderMap) {
        out.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        // Envoy sends the expose list on preflights too.
        for (name, v) in [
            (
                http::header::ACCESS_CONTROL_ALLOW_METHODS,
                &self.allow_methods,
            ),
            (
                http::header::ACCESS_CONTROL_ALLOW_HEADERS,
                &self.allow_headers,
            ),
            (
                http::header::ACCESS_CONTROL_EXPOSE_HEADERS,
                &self.expose_headers,
            ),
            (http::header::ACCESS_CONTROL_MAX_AGE, &self.max_age),
        ] {
            if let Some(v) = v {
                out.insert(name, v.clone());
            }
        }
        if self.allow_credentials {
            out.insert(
                http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }

    /// Headers added to the upstream's answer to an allowed actual request.
    pub fn response_headers(&self, origin: HeaderValue, out: &mut HeaderMap) {
        out.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.allow_credentials {
            out.insert(
                http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.expose_headers {
            out.insert(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

/// A preflight: OPTIONS with an origin and the method it asks about.
pub fn is_preflight(method: &http::Method, headers: &HeaderMap) -> bool {
    method == http::Method::OPTIONS
        && headers.contains_key(http::header::ORIGIN)
        && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}
