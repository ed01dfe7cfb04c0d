//! Envoy's trace sampling decision, carried in `x-request-id`. A connection manager with a
//! `tracing` config decides per request whether it is traced (`x-client-trace-id` with
//! `client_sampling`, an internal request's `x-envoy-force-trace`, else `random_sampling` of the
//! request id, all under `overall_sampling`; a route's own `tracing` replaces the percentages)
//! and writes the decision into the request id's version digit, so that every proxy after it
//! (and the tracer) agrees: `9` sampled, `a` forced, `b` client-requested, `4` not traced. A
//! decision already in the id is kept. Without a `tracing.provider` the decision is all that a
//! `tracing` config changes, as in Envoy; with Zipkin's (the one supported), the decision also
//! samples the spans it reports (see `zipkin`).

use http::{HeaderMap, HeaderValue};
use weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use weft_xds_proto::envoy::extensions::request_id::uuid::v3::UuidRequestIdConfig;
use weft_xds_proto::envoy::r#type::v3::{FractionalPercent, Percent, fractional_percent};

use super::names::X_REQUEST_ID;

/// Where a UUID request id holds the decision.
const REASON_AT: usize = 14;
const UUID_LENGTH: usize = 36;

const UUID_REQUEST_ID: &str =
    "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig";

/// `num` in `den`: admits a value when `value % den < num`, as Envoy's fractional percents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fraction {
    num: u64,
    den: u64,
}

impl Fraction {
    const ALL: Fraction = Fraction { num: 1, den: 1 };

    fn admits(self, value: u64) -> bool {
        value % self.den < self.num
    }

    /// A `Percent` of the connection manager as a fraction of `den`, its numerator taken by
    /// `whole` as Envoy takes it: `random_sampling` and `overall_sampling` rounded in
    /// ten-thousandths, `client_sampling` truncated to whole percents. Unset, 100%.
    fn of_percent(
        p: Option<&Percent>,
        den: u64,
        whole: fn(f64) -> f64,
    ) -> Result<Fraction, String> {
        match p {
            None => Ok(Fraction::ALL),
            Some(p) if (0.0..=100.0).contains(&p.value) => Ok(Fraction {
                num: whole(p.value * den as f64 / 100.0) as u64,
                den,
            }),
            Some(p) => Err(format!("{} is outside 0-100", p.value)),
        }
    }

    /// A route's `FractionalPercent`; unset, 100%.
    fn of(f: Option<&FractionalPercent>) -> Result<Fraction, String> {
        use fractional_percent::DenominatorType as D;
        let Some(f) = f else {
            return Ok(Fraction::ALL);
        };
        let den = match D::try_from(f.denominator) {
            Ok(D::Hundred) => 100,
            Ok(D::TenThousand) => 10_000,
            Ok(D::Million) => 1_000_000,
            Err(_) => return Err(format!("unknown denominator {}", f.denominator)),
        };
        Ok(Fraction {
            num: u64::from(f.numerator),
            den,
        })
    }
}

/// The three percentages of a connection manager's or a route's `tracing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling {
    client: Fraction,
    random: Fraction,
    overall: Fraction,
}

impl Sampling {
    /// A route's `tracing`: its percentages replace the connection manager's, each unset one
    /// as 100%.
    pub fn of_route(
        t: &weft_xds_proto::envoy::config::route::v3::Tracing,
    ) -> Result<Sampling, (&'static str, String)> {
        // `custom_tags` go on spans; there are none, as in Envoy without a tracer.
        Ok(Sampling {
            client: Fraction::of(t.client_sampling.as_ref()).map_err(|e| ("client_sampling", e))?,
            random: Fraction::of(t.random_sampling.as_ref()).map_err(|e| ("random_sampling", e))?,
            overall: Fraction::of(t.overall_sampling.as_ref())
                .map_err(|e| ("overall_sampling", e))?,
        })
    }
}

/// A route's `decorator`: its operation names the route's spans and, when propagated, Envoy's
/// connection manager with `tracing` sends it upstream (egress listeners) or back on the answer
/// (ingress ones) as `x-envoy-decorator-operation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub value: HeaderValue,
    pub propagate: bool,
}

pub fn operation(
    d: Option<&weft_xds_proto::envoy::config::route::v3::Decorator>,
) -> Result<Option<Operation>, String> {
    let Some(d) = d else { return Ok(None) };
    if d.operation.is_empty() {
        return Err("must not be empty".into());
    }
    let value = HeaderValue::from_str(&d.operation)
        .map_err(|_| format!("{:?} is not a valid header value", d.operation))?;
    Ok(Some(Operation {
        value,
        propagate: d.propagate.as_ref().is_none_or(|p| p.value),
    }))
}

/// `tracing.provider.typed_config` is Zipkin's whatever the provider's name.
fn zipkin_typed(p: &weft_xds_proto::envoy::config::trace::v3::tracing::Http) -> bool {
    use weft_xds_proto::envoy::config::trace::v3::tracing::http::ConfigType;
    matches!(&p.config_type, Some(ConfigType::TypedConfig(a)) if a.type_url.ends_with(".ZipkinConfig"))
}

/// A Zipkin config field's place under the connection manager.
fn tracing_field(f: &'static str) -> &'static str {
    match f {
        "custom_tags" => "tracing.custom_tags",
        _ => "tracing.provider.typed_config",
    }
}

/// The trace decisions of a connection manager with a `tracing` config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracing {
    sampling: Sampling,
    /// The request id extension packs the decision into the id and samples by it (the UUID
    /// extension's defaults); else no decision is made.
    decides: bool,
    /// The listener's `traffic_direction` is OUTBOUND: decorator operations go upstream (else
    /// back to the client, and a client's own is removed).
    pub egress: bool,
    /// The Zipkin tracer (`provider`): every request gets a span context.
    pub zipkin: Option<std::sync::Arc<super::zipkin::Zipkin>>,
}

/// What the request id says of the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    NotTraced,
    Sampled,
    Forced,
    Client,
}

impl Reason {
    fn of(id: &[u8]) -> Reason {
        if id.len() != UUID_LENGTH {
            return Reason::NotTraced;
        }
        match id[REASON_AT] {
            b'9' => Reason::Sampled,
            b'a' => Reason::Forced,
            b'b' => Reason::Client,
            _ => Reason::NotTraced,
        }
    }

    fn digit(self) -> u8 {
        match self {
            Reason::NotTraced => b'4',
            Reason::Sampled => b'9',
            Reason::Forced => b'a',
            Reason::Client => b'b',
        }
    }
}

impl Tracing {
    /// The connection manager's `tracing` and `request_id_extension`: None without `tracing`.
    pub fn from_hcm(
        hcm: &HttpConnectionManager,
    ) -> Result<Option<Tracing>, (&'static str, String)> {
        let mut decides = true;
        if let Some(ext) = &hcm.request_id_extension {
            let Some(any) = &ext.typed_config else {
                return Err(("request_id_extension", "typed_config is required".into()));
            };
            if any.type_url != UUID_REQUEST_ID {
                return Err((
                    "request_id_extension",
                    format!(
                        "{} is not supported by this weft-proxy version (UuidRequestIdConfig is)",
                        any.type_url
                    ),
                ));
            }
            let uuid: UuidRequestIdConfig =
                weft_xds_proto::unpack(any).map_err(|e| ("request_id_extension", e.to_string()))?;
            let on = |b: Option<bool>| b.unwrap_or(true);
            decides = on(uuid.pack_trace_reason.map(|b| b.value))
                && on(uuid.use_request_id_for_trace_sampling.map(|b| b.value));
        }
        let Some(t) = &hcm.tracing else {
            return Ok(None);
        };
        let zipkin = match &t.provider {
            None => None,
            Some(p) if p.name == super::zipkin::PROVIDER || zipkin_typed(p) => Some(
                super::zipkin::Zipkin::from_xds(
                    p,
                    &t.custom_tags,
                    t.max_path_tag_length.as_ref().map(|m| m.value),
                    t.no_context_propagation,
                    t.spawn_upstream_span.as_ref().is_some_and(|b| b.value),
                )
                .map_err(|(f, e)| (tracing_field(f), e))?,
            ),
            Some(p) => {
                return Err((
                    "tracing.provider",
                    format!(
                        "{:?} is not supported by this weft-proxy version (envoy.tracers.zipkin is)",
                        p.name
                    ),
                ));
            }
        };
        if t.verbose {
            return Err((
                "tracing.verbose",
                "span annotations of stream events are not supported by this weft-proxy version"
                    .into(),
            ));
        }
        if !t.operation.is_empty() || !t.upstream_operation.is_empty() {
            return Err((
                "tracing.operation",
                "formatted operation names are not supported by this weft-proxy version (route decorators are)".into(),
            ));
        }
        let sampling = Sampling {
            client: Fraction::of_percent(t.client_sampling.as_ref(), 100, f64::trunc)
                .map_err(|e| ("tracing.client_sampling", e))?,
            random: Fraction::of_percent(t.random_sampling.as_ref(), 10_000, f64::round)
                .map_err(|e| ("tracing.random_sampling", e))?,
            overall: Fraction::of_percent(t.overall_sampling.as_ref(), 10_000, f64::round)
                .map_err(|e| ("tracing.overall_sampling", e))?,
        };
        Ok(Some(Tracing {
            sampling,
            decides,
            egress: false,
            zipkin: zipkin.map(std::sync::Arc::new),
        }))
    }

    /// Decides the request's trace and writes it into its `x-request-id` (after routing, with
    /// the route's `tracing` if it has one; `x-envoy-force-trace` is only still there on an
    /// internal request). A request id that does not start with 8 hex digits is left alone.
    /// Decides, and counts the decision in the connection manager's `tracing.*` stats; the id
    /// as marked, when the decision changed it, and whether the request is traced.
    pub fn decide_counted(
        &self,
        headers: &mut HeaderMap,
        route: Option<&Sampling>,
        stats: &crate::stats::HttpStats,
    ) -> (Option<HeaderValue>, bool) {
        let (marked, reason) = self.decide(headers, route);
        match reason {
            Reason::Sampled => stats.tracing_random_sampling.inc(),
            Reason::Forced => stats.tracing_service_forced.inc(),
            Reason::Client => stats.tracing_client_enabled.inc(),
            Reason::NotTraced => stats.tracing_not_traceable.inc(),
        }
        (marked, reason != Reason::NotTraced)
    }

    /// The id as marked (when the decision changed it) and the decision. A decision is made
    /// for an id that starts with 8 hex digits; it is written only into a UUID-long one (as
    /// Envoy, which counts it all the same).
    fn decide(
        &self,
        headers: &mut HeaderMap,
        route: Option<&Sampling>,
    ) -> (Option<HeaderValue>, Reason) {
        let s = route.unwrap_or(&self.sampling);
        let Some(id) = headers.get(X_REQUEST_ID).map(|v| v.as_bytes()) else {
            return (None, Reason::NotTraced);
        };
        if !self.decides {
            return (None, Reason::NotTraced);
        }
        let current = Reason::of(id);
        let Some(number) = id
            .get(..8)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u64::from_str_radix(h, 16).ok())
        else {
            return (None, current);
        };
        let result = number % 10_000;
        let mut decided = None;
        if current == Reason::NotTraced {
            if headers.contains_key("x-client-trace-id") && s.client.admits(fastrand::u64(..)) {
                decided = Some(Reason::Client);
            } else if headers.contains_key(super::names::X_ENVOY_FORCE_TRACE) {
                decided = Some(Reason::Forced);
            } else if s.random.admits(result) {
                decided = Some(Reason::Sampled);
            }
        }
        if !s.overall.admits(result) {
            decided = Some(Reason::NotTraced);
        }
        let Some(reason) = decided else {
            return (None, current);
        };
        if id.len() != UUID_LENGTH || id[REASON_AT] == reason.digit() {
            return (None, reason);
        }
        let mut marked = id.to_vec();
        marked[REASON_AT] = reason.digit();
        let Ok(marked) = HeaderValue::from_bytes(&marked) else {
            return (None, reason);
        };
        headers.insert(X_REQUEST_ID, marked.clone());
        (Some(marked), reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
        RequestIdExtension, http_connection_manager,
    };
    use weft_xds_proto::wkt::BoolValue;

    fn hcm(tracing: Option<http_connection_manager::Tracing>) -> HttpConnectionManager {
        HttpConnectionManager {
            tracing,
            ..Default::default()
        }
    }

    fn percent(value: f64) -> Option<Percent> {
        Some(Percent { value })
    }

    fn decided(
        t: &Tracing,
        id: &str,
        extra: &[(&'static str, &str)],
        route: Option<&Sampling>,
    ) -> String {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_str(id).unwrap());
        for (k, v) in extra {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        let _ = t.decide(&mut h, route);
        h[X_REQUEST_ID].to_str().unwrap().to_string()
    }

    const UNDER: &str = "00001387-0000-4000-8000-000000000000"; // 4999 of 10,000
    const AT: &str = "00001388-0000-4000-8000-000000000000"; // 5000

    #[test]
    fn the_decision_goes_into_the_request_id() {
        assert_eq!(Tracing::from_hcm(&hcm(None)).unwrap(), None);
        let half = Tracing::from_hcm(&hcm(Some(http_connection_manager::Tracing {
            random_sampling: percent(50.0),
            ..Default::default()
        })))
        .unwrap()
        .unwrap();
        // Random sampling by the id's first 8 hex digits modulo 10,000.
        assert_eq!(&decided(&half, UNDER, &[], None)[14..15], "9");
        assert_eq!(decided(&half, AT, &[], None), AT);
        // Forced, asked by the client, already decided.
        assert_eq!(
            &decided(&half, AT, &[("x-envoy-force-trace", "1")], None)[14..15],
            "a"
        );
        assert_eq!(
            &decided(&half, AT, &[("x-client-trace-id", "c")], None)[14..15],
            "b"
        );
        let sampled = AT.replacen('4', "9", 1);
        assert_eq!(decided(&half, &sampled, &[], None), sampled);
        // An unknown digit in the id's place stays when nothing is decided.
        let other = AT.replacen('4', "c", 1);
        assert_eq!(decided(&half, &other, &[], None), other);
        // Not a UUID: left alone (too short, not hex, not 36 long).
        for id in [
            "abc",
            "zzzzzzzz-0000-4000-8000-000000000000",
            "00001387-rest",
        ] {
            assert_eq!(decided(&half, id, &[], None), id);
        }
        // A route's own percentages replace the connection manager's.
        let none = Sampling::of_route(&weft_xds_proto::envoy::config::route::v3::Tracing {
            random_sampling: Some(FractionalPercent {
                numerator: 0,
                denominator: 0,
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(decided(&half, UNDER, &[], Some(&none)), UNDER);
        // Overall sampling undoes any decision past it.
        let overall = Tracing::from_hcm(&hcm(Some(http_connection_manager::Tracing {
            overall_sampling: percent(10.0),
            ..Default::default()
        })))
        .unwrap()
        .unwrap();
        assert_eq!(decided(&overall, &sampled, &[], None), AT);
        assert_eq!(
            &decided(&overall, "000003e7-0000-4000-8000-000000000000", &[], None)[14..15],
            "9"
        );
    }

    #[test]
    fn decorators_give_their_operation_when_propagated() {
        use weft_xds_proto::envoy::config::route::v3::Decorator;
        let d = |operation: &str, propagate: Option<bool>| Decorator {
            operation: operation.into(),
            propagate: propagate.map(|value| BoolValue { value }),
        };
        assert_eq!(operation(None), Ok(None));
        let op = |propagate| {
            Ok(Some(Operation {
                value: HeaderValue::from_static("svc-op"),
                propagate,
            }))
        };
        assert_eq!(operation(Some(&d("svc-op", None))), op(true));
        assert_eq!(operation(Some(&d("svc-op", Some(false)))), op(false));
        assert!(operation(Some(&d("", None))).is_err());
        assert!(operation(Some(&d("bad\nop", None))).is_err());
    }

    #[test]
    fn providers_and_other_request_ids_are_refused_by_field() {
        use weft_xds_proto::envoy::config::trace::v3::tracing::Http;
        let with_provider = |name: &str| {
            hcm(Some(http_connection_manager::Tracing {
                provider: Some(Http {
                    name: name.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }))
        };
        assert_eq!(
            Tracing::from_hcm(&with_provider("envoy.tracers.datadog"))
                .unwrap_err()
                .0,
            "tracing.provider"
        );
        // Zipkin's without its config.
        assert_eq!(
            Tracing::from_hcm(&with_provider("envoy.tracers.zipkin"))
                .unwrap_err()
                .0,
            "tracing.provider.typed_config"
        );
        let verbose = hcm(Some(http_connection_manager::Tracing {
            verbose: true,
            ..Default::default()
        }));
        assert_eq!(
            Tracing::from_hcm(&verbose).unwrap_err().0,
            "tracing.verbose"
        );
        let bad = hcm(Some(http_connection_manager::Tracing {
            random_sampling: percent(120.0),
            ..Default::default()
        }));
        assert_eq!(
            Tracing::from_hcm(&bad).unwrap_err().0,
            "tracing.random_sampling"
        );
        let mut other = hcm(Some(Default::default()));
        other.request_id_extension = Some(RequestIdExtension {
            typed_config: Some(weft_xds_proto::wkt::Any {
                type_url: "type.googleapis.com/example.Other".into(),
                value: vec![],
            }),
        });
        assert_eq!(
            Tracing::from_hcm(&other).unwrap_err().0,
            "request_id_extension"
        );
        // A UUID extension that does not pack the reason: no decision is written.
        let mut unpacked = hcm(Some(Default::default()));
        unpacked.request_id_extension = Some(RequestIdExtension {
            typed_config: Some(weft_xds_proto::pack(&UuidRequestIdConfig {
                pack_trace_reason: Some(BoolValue { value: false }),
                ..Default::default()
            })),
        });
        let unpacked = Tracing::from_hcm(&unpacked).unwrap().unwrap();
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static(UNDER));
        assert_eq!(unpacked.decide(&mut h, None), (None, Reason::NotTraced));
        assert_eq!(h[X_REQUEST_ID], UNDER);
    }
}
