//! Passive health: outlier detection by consecutive 5xx and consecutive gateway failures, as
//! Envoy does it (local-origin failures count as both when they are not split out), ejecting a
//! host for `base_ejection_time` x its ejection count, never more than `max_ejection_percent` of
//! the cluster at once. Ejected hosts are skipped by the load balancer unless too few hosts are
//! left (the panic threshold).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use weft_xds_proto::envoy::config::cluster::v3::OutlierDetection as XdsOutlier;

use crate::duration;

/// Below this share of healthy hosts, Envoy's load balancer ignores health (panic mode).
pub const PANIC_THRESHOLD_PERCENT: usize = 50;

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    pub consecutive_5xx: u32,
    pub enforcing_5xx: bool,
    pub consecutive_gateway: u32,
    pub enforcing_gateway: bool,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl OutlierConfig {
    pub fn from_xds(o: &XdsOutlier) -> Result<OutlierConfig, (String, String)> {
        let u = |v: Option<u32>, d: u32| v.unwrap_or(d);
        let enforcing_sr = o.enforcing_success_rate.map(|v| v.value).unwrap_or(100);
        if enforcing_sr > 0 {
            return Err((
                "outlier_detection.enforcing_success_rate".into(),
                "success-rate ejection is not supported yet: set enforcing_success_rate to 0 (as Istio does)".into(),
            ));
        }
        for (field, set) in [
            (
                "failure_percentage_threshold",
                o.failure_percentage_threshold.is_some(),
            ),
            (
                "enforcing_failure_percentage",
                o.enforcing_failure_percentage.is_some_and(|v| v.value > 0),
            ),
            (
                "split_external_local_origin_errors",
                o.split_external_local_origin_errors,
            ),
            ("monitors", !o.monitors.is_empty()),
        ] {
            if set {
                return Err((
                    format!("outlier_detection.{field}"),
                    "not supported by this weft-proxy version".into(),
                ));
            }
        }
        let base_ejection = o
            .base_ejection_time
            .as_ref()
            .map(duration)
            .unwrap_or(Duration::from_secs(30));
        Ok(OutlierConfig {
            consecutive_5xx: u(o.consecutive_5xx.map(|v| v.value), 5),
            enforcing_5xx: u(o.enforcing_consecutive_5xx.map(|v| v.value), 100) > 0,
            consecutive_gateway: u(o.consecutive_gateway_failure.map(|v| v.value), 5),
            enforcing_gateway: u(o.enforcing_consecutive_gateway_failure.map(|v| v.value), 0) > 0,
            base_ejection,
            max_ejection: o
                .max_ejection_time
                .as_ref()
                .map(duration)
                .unwrap_or(Duration::from_secs(300))
                .max(base_ejection),
            max_ejection_percent: u(o.max_ejection_percent.map(|v| v.value), 10).min(100),
        })
    }
}

/// One host's passive-health state (kept across EDS updates with the host).
#[derive(Debug, Default)]
pub struct HostHealth {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since `epoch()` until which the host is ejected (0: not ejected).
    ejected_until_ms: AtomicU64,
    /// Active health checking's verdict (see `health`).
    pub active: super::health::ActiveHealth,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// What a request's outcome says about the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// An HTTP status of 500 or more from the host.
    Status(u16),
    /// Connect failure, reset or timeout: a gateway error from the host's side.
    LocalFailure,
}

impl HostHealth {
    /// A host of a cluster that health-checks its hosts starts unhealthy until checked.
    pub fn new(active_checks: bool) -> HostHealth {
        HostHealth {
            active: super::health::ActiveHealth::new(active_checks),
            ..Default::default()
        }
    }

    /// Neither ejected by outlier detection nor failed by active health checking.
    #[inline]
    pub fn is_usable(&self) -> bool {
        !self.active.is_failed() && !self.is_ejected()
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// Records an outcome; true if the host crossed a threshold and should be ejected.
    pub fn record(&self, cfg: &OutlierConfig, outcome: Outcome) -> bool {
        let (five_xx, gateway) = match outcome {
            Outcome::Success => {
                self.consecutive_5xx.store(0, Ordering::Relaxed);
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                return false;
            }
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Outcome::LocalFailure => (true, true),
        };
        let mut eject = false;
        if five_xx {
            let n = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
            eject |= cfg.enforcing_5xx && n >= cfg.consecutive_5xx;
        } else {
            self.consecutive_5xx.store(0, Ordering::Relaxed);
        }
        if gateway {
            let n = self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1;
            eject |= cfg.enforcing_gateway && n >= cfg.consecutive_gateway;
        } else {
            self.consecutive_gateway.store(0, Ordering::Relaxed);
        }
        eject && !self.is_ejected()
    }

    /// Ejects the host for base_ejection_time x (number of ejections), capped.
    pub fn eject(&self, cfg: &OutlierConfig) {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = cfg.base_ejection.saturating_mul(n).min(cfg.max_ejection);
        self.ejected_until_ms
            .store(now_ms() + time.as_millis() as u64 + 1, Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: 3,
            enforcing_5xx: true,
            consecutive_gateway: 5,
            enforcing_gateway: false,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 100,
        }
    }

    #[test]
    fn three_consecutive_5xx_eject_and_a_success_resets_the_count() {
        let h = HostHealth::default();
        assert!(!h.record(&cfg(), Outcome::Status(500)));
        assert!(!h.record(&cfg(), Outcome::Status(503)));
        assert!(!h.record(&cfg(), Outcome::Success));
        assert!(!h.record(&cfg(), Outcome::Status(500)));
        assert!(!h.record(&cfg(), Outcome::LocalFailure));
        assert!(h.record(&cfg(), Outcome::Status(502)));
        h.eject(&cfg());
        assert!(h.is_ejected());
    }

    #[test]
    fn success_rate_detection_must_be_off() {
        let err = OutlierConfig::from_xds(&XdsOutlier::default()).unwrap_err();
        assert!(err.1.contains("enforcing_success_rate"), "{err:?}");
    }
}
