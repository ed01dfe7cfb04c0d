//! The fault injection filter (`envoy.filters.http.fault`): a fixed delay and/or an abort with
//! an HTTP or gRPC status, each for a percentage of requests. Configured on the connection
//! manager and overridden per route (`typed_per_filter_config`), as Istio's VirtualService
//! `fault` is translated.

use std::time::Duration;

use weft_xds_proto::envoy::extensions::filters::common::fault::v3::fault_delay;
use weft_xds_proto::envoy::extensions::filters::http::fault::v3::{HttpFault, fault_abort};
use weft_xds_proto::envoy::r#type::v3::{FractionalPercent, fractional_percent::DenominatorType};

use crate::duration;

pub const FILTER_NAME: &str = "envoy.filters.http.fault";
pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    /// A gRPC status, answered as HTTP 200 with `grpc-status`.
    Grpc(u32),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, Fraction)>,
    pub abort: Option<(Abort, Fraction)>,
}

/// A share of requests, in millionths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction(pub u32);

impl Fraction {
    pub fn from_xds(p: Option<&FractionalPercent>) -> Fraction {
        // No percentage is Envoy's default FractionalPercent: numerator 0, no request.
        let Some(p) = p else { return Fraction(0) };
        let scale = match DenominatorType::try_from(p.denominator) {
            Ok(DenominatorType::TenThousand) => 100,
            Ok(DenominatorType::Million) => 1,
            _ => 10_000,
        };
        Fraction(p.numerator.saturating_mul(scale).min(1_000_000))
    }

    pub fn hit(self) -> bool {
        self.0 >= 1_000_000 || fastrand::u32(..1_000_000) < self.0
    }

    /// As `hit`, decided by a random value drawn elsewhere.
    pub fn hit_with(self, random: u64) -> bool {
        self.0 >= 1_000_000 || random % 1_000_000 < u64::from(self.0)
    }
}

impl Fault {
    pub fn from_xds(f: &HttpFault) -> Result<Fault, (String, String)> {
        let bad = |field: &str, r: &str| Err((field.to_string(), r.to_string()));
        if !f.headers.is_empty() || !f.downstream_nodes.is_empty() || !f.upstream_cluster.is_empty()
        {
            return bad(
                "headers",
                "fault matching on headers, nodes or clusters is not supported yet",
            );
        }
        if f.response_rate_limit.is_some() {
            return bad(
                "response_rate_limit",
                "not supported by this weft-proxy version",
            );
        }
        let delay = match &f.delay {
            None => None,
            Some(d) => match &d.fault_delay_secifier {
                Some(fault_delay::FaultDelaySecifier::FixedDelay(t)) => {
                    Some((duration(t), Fraction::from_xds(d.percentage.as_ref())))
                }
                _ => {
                    return bad(
                        "delay",
                        "only fixed_delay is supported (not header-controlled delays)",
                    );
                }
            },
        };
        let abort = match &f.abort {
            None => None,
            Some(a) => {
                let kind = match a.error_type {
                    Some(fault_abort::ErrorType::HttpStatus(s)) if (200..600).contains(&s) => {
                        Abort::Http(s as u16)
                    }
                    Some(fault_abort::ErrorType::GrpcStatus(s)) => Abort::Grpc(s),
                    Some(fault_abort::ErrorType::HttpStatus(s)) => {
                        return Err(("abort.http_status".into(), format!("{s} is not in 200-599")));
                    }
                    _ => {
                        return bad(
                            "abort",
                            "only http_status and grpc_status aborts are supported (not header-controlled)",
                        );
                    }
                };
                Some((kind, Fraction::from_xds(a.percentage.as_ref())))
            }
        };
        Ok(Fault { delay, abort })
    }

    pub fn is_empty(&self) -> bool {
        self.delay.is_none() && self.abort.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_xds_proto::envoy::extensions::filters::common::fault::v3::FaultDelay;
    use weft_xds_proto::envoy::extensions::filters::http::fault::v3::FaultAbort;
    use weft_xds_proto::wkt::Duration as PbDuration;

    #[test]
    fn percentages_and_kinds() {
        let f = HttpFault {
            delay: Some(FaultDelay {
                percentage: Some(FractionalPercent {
                    numerator: 50,
                    denominator: 0,
                }),
                fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(
                    PbDuration {
                        seconds: 0,
                        nanos: 300_000_000,
                    },
                )),
            }),
            abort: Some(FaultAbort {
                percentage: Some(FractionalPercent {
                    numerator: 1_000_000,
                    denominator: 2,
                }),
                error_type: Some(fault_abort::ErrorType::HttpStatus(418)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let fault = Fault::from_xds(&f).unwrap();
        assert_eq!(
            fault.delay,
            Some((Duration::from_millis(300), Fraction(500_000)))
        );
        assert_eq!(fault.abort, Some((Abort::Http(418), Fraction(1_000_000))));
        let hits = (0..10_000).filter(|_| Fraction(500_000).hit()).count();
        assert!((4_500..5_500).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|_| Fraction(0).hit()));
    }
}
