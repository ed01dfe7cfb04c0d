//! Passive health: outlier detection by consecutive 5xx and consecutive gateway failures, as
//! Envoy does it (local-origin failures count as both when they are not split out), and, every
//! `interval`, by success rate (hosts below the mean by `success_rate_stdev_factor` standard
//! deviations) and failure percentage (hosts at or above `failure_percentage_threshold`),
//! never ejecting more than `max_ejection_percent` of the cluster at once. An ejected host
//! returns on the first `interval` tick after `base_ejection_time` x its backoff (see
//! [`HostHealth::tick`]). Ejected hosts are skipped by the load balancer unless too few hosts
//! are left (the panic threshold).

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
    /// How often success rates and failure percentages are evaluated.
    pub interval: Duration,
    pub success_rate: Option<RateRule>,
    pub failure_percentage: Option<RateRule>,
}

/// A statistical ejection rule, evaluated every interval over the hosts that carried at least
/// `request_volume` requests, when at least `minimum_hosts` of them did.
#[derive(Debug, Clone, PartialEq)]
pub struct RateRule {
    pub minimum_hosts: u32,
    pub request_volume: u32,
    /// Success rate: the stdev factor (x1000); failure percentage: the threshold in percent.
    pub threshold: f64,
    /// Percentage of ejections enforced.
    pub enforcing: u32,
}

impl RateRule {
    /// The hosts (index, success rate) with at least `request_volume` requests, when at least
    /// `minimum_hosts` of them have; None otherwise (no verdict this interval).
    fn counted(&self, hosts: &[(u32, f64)]) -> Option<Vec<(usize, f64)>> {
        let counted: Vec<(usize, f64)> = hosts
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| *n >= self.request_volume)
            .map(|(i, (_, r))| (i, *r))
            .collect();
        (counted.len() >= self.minimum_hosts.max(1) as usize).then_some(counted)
    }
}

impl OutlierConfig {
    pub fn from_xds(o: &XdsOutlier) -> Result<OutlierConfig, (String, String)> {
        let u = |v: Option<u32>, d: u32| v.unwrap_or(d);
        for (field, set) in [
            (
                "enforcing_local_origin_success_rate",
                o.enforcing_local_origin_success_rate
                    .is_some_and(|v| v.value > 0),
            ),
            (
                "enforcing_failure_percentage_local_origin",
                o.enforcing_failure_percentage_local_origin
                    .is_some_and(|v| v.value > 0),
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
        let enforcing_sr = u(o.enforcing_success_rate.map(|v| v.value), 100).min(100);
        let success_rate = (enforcing_sr > 0).then(|| RateRule {
            minimum_hosts: u(o.success_rate_minimum_hosts.map(|v| v.value), 5),
            request_volume: u(o.success_rate_request_volume.map(|v| v.value), 100),
            threshold: f64::from(u(o.success_rate_stdev_factor.map(|v| v.value), 1900)),
            enforcing: enforcing_sr,
        });
        let enforcing_fp = u(o.enforcing_failure_percentage.map(|v| v.value), 0).min(100);
        let fp_threshold = u(o.failure_percentage_threshold.map(|v| v.value), 85);
        if fp_threshold > 100 {
            return Err((
                "outlier_detection.failure_percentage_threshold".into(),
                format!("{fp_threshold} is not a percentage"),
            ));
        }
        let failure_percentage = (enforcing_fp > 0).then(|| RateRule {
            minimum_hosts: u(o.failure_percentage_minimum_hosts.map(|v| v.value), 5),
            request_volume: u(o.failure_percentage_request_volume.map(|v| v.value), 50),
            threshold: f64::from(fp_threshold),
            enforcing: enforcing_fp,
        });
        let interval = o
            .interval
            .as_ref()
            .map(duration)
            .unwrap_or(Duration::from_secs(10));
        if interval.is_zero() {
            return Err((
                "outlier_detection.interval".into(),
                "the interval must be above 0".into(),
            ));
        }
        Ok(OutlierConfig {
            interval,
            success_rate,
            failure_percentage,
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
    /// Envoy's ejection-time backoff: an ejection lasts `base_ejection_time` times this (at most
    /// `max_ejection_time`); it grows with each ejection and shrinks by one every interval the
    /// host spends not ejected.
    backoff: AtomicU32,
    /// Milliseconds since `epoch()` (at least 1) at which the host was ejected; 0: not ejected.
    ejected_at_ms: AtomicU64,
    /// Requests and successes in the current interval (success rate, failure percentage).
    interval_total: AtomicU32,
    interval_success: AtomicU32,
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
        self.ejected_at_ms.load(Ordering::Relaxed) != 0
    }

    /// Records an outcome; true if the host crossed a threshold and should be ejected.
    pub fn record(&self, cfg: &OutlierConfig, outcome: Outcome) -> bool {
        if cfg.success_rate.is_some() || cfg.failure_percentage.is_some() {
            self.interval_total.fetch_add(1, Ordering::Relaxed);
            if outcome == Outcome::Success {
                self.interval_success.fetch_add(1, Ordering::Relaxed);
            }
        }
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

    /// Ejects the host; it returns on the first interval tick after its ejection time
    /// (`tick`), as in Envoy.
    pub fn eject(&self, cfg: &OutlierConfig) {
        self.eject_at(cfg, now_ms());
    }

    fn eject_at(&self, cfg: &OutlierConfig, now: u64) {
        let backoff = self.backoff.load(Ordering::Relaxed);
        // Envoy stops growing the backoff once base x backoff passes max + base.
        if cfg.base_ejection.saturating_mul(backoff) < cfg.max_ejection + cfg.base_ejection {
            self.backoff.store(backoff + 1, Ordering::Relaxed);
        }
        self.ejected_at_ms.store(now.max(1), Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
    }

    /// The interval timer's look at the host (Envoy's `checkHostForUneject`): a host not ejected
    /// has its backoff lowered by one; an ejected one returns once `base_ejection_time` times
    /// its backoff (at most `max_ejection_time`) has passed since its ejection. True when it
    /// returned.
    pub fn tick(&self, cfg: &OutlierConfig, now: u64) -> bool {
        let at = self.ejected_at_ms.load(Ordering::Relaxed);
        let backoff = self.backoff.load(Ordering::Relaxed);
        if at == 0 {
            if backoff > 0 {
                self.backoff.store(backoff - 1, Ordering::Relaxed);
            }
            return false;
        }
        let time = cfg
            .base_ejection
            .saturating_mul(backoff)
            .min(cfg.max_ejection);
        if now.saturating_sub(at) < time.as_millis() as u64 {
            return false;
        }
        // The counters start over: a few new errors must not eject the host again at once.
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.ejected_at_ms.store(0, Ordering::Relaxed);
        true
    }
}

/// One host's requests and success rate (percent) over the interval that just ended; the
/// counters start over.
fn take_interval(h: &HostHealth) -> (u32, f64) {
    let total = h.interval_total.swap(0, Ordering::Relaxed);
    let success = h.interval_success.swap(0, Ordering::Relaxed);
    let rate = if total == 0 {
        100.0
    } else {
        f64::from(success) * 100.0 / f64::from(total)
    };
    (total, rate)
}

/// The hosts (by index) that the interval's statistics say to eject: Envoy's success-rate rule
/// (below mean - factor/1000 x stdev) and failure-percentage rule (failures >= threshold),
/// each over the hosts with enough requests, when enough hosts have them. `roll` decides
/// enforcement (a number in [0, 100)).
pub fn interval_outliers(
    cfg: &OutlierConfig,
    hosts: &[(u32, f64)],
    mut roll: impl FnMut() -> u32,
) -> Vec<usize> {
    let mut out = Vec::new();
    if let Some(rule) = &cfg.success_rate
        && let Some(counted) = rule.counted(hosts)
    {
        let n = counted.len() as f64;
        let mean = counted.iter().map(|(_, r)| r).sum::<f64>() / n;
        let var = counted.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
        let limit = mean - rule.threshold / 1000.0 * var.sqrt();
        for (i, r) in counted {
            if r < limit && roll() < rule.enforcing {
                out.push(i);
            }
        }
    }
    if let Some(rule) = &cfg.failure_percentage
        && let Some(counted) = rule.counted(hosts)
    {
        for (i, r) in counted {
            if 100.0 - r >= rule.threshold && !out.contains(&i) && roll() < rule.enforcing {
                out.push(i);
            }
        }
    }
    out
}

/// Envoy's interval timer, every `interval` while the cluster lives: ejected hosts whose time
/// is up return, the others' backoff shrinks, then success rates and failure percentages are
/// evaluated.
pub fn start(cluster: &std::sync::Arc<super::Cluster>) {
    let Some(cfg) = cluster.outlier.clone() else {
        return;
    };
    let statistics = cfg.success_rate.is_some() || cfg.failure_percentage.is_some();
    let weak = std::sync::Arc::downgrade(cluster);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(c) = weak.upgrade() else { return };
            let set = c.endpoints.load_full();
            let all = set.all();
            let now = now_ms();
            for e in all {
                if e.health.tick(&cfg, now) {
                    tracing::info!(cluster = %c.name, host = %e.address, "outlier detection: host returned");
                }
            }
            if !statistics {
                continue;
            }
            let stats: Vec<(u32, f64)> = all.iter().map(|e| take_interval(&e.health)).collect();
            for i in interval_outliers(&cfg, &stats, || fastrand::u32(..100)) {
                if !all[i].health.is_ejected() {
                    c.eject_if_allowed(&all[i], &cfg);
                }
            }
        }
    });
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
            interval: Duration::from_secs(10),
            success_rate: None,
            failure_percentage: None,
        }
    }

    #[test]
    fn success_rate_and_failure_percentage_pick_the_outlier() {
        let mut c = cfg();
        c.success_rate = Some(RateRule {
            minimum_hosts: 5,
            request_volume: 10,
            threshold: 1900.0,
            enforcing: 100,
        });
        // Four perfect hosts and one that always fails: mean 80, stdev 40, limit 4.
        let hosts = [
            (20, 100.0),
            (20, 100.0),
            (20, 100.0),
            (20, 100.0),
            (20, 0.0),
        ];
        assert_eq!(interval_outliers(&c, &hosts, || 0), vec![4]);
        // Too few hosts with enough requests: no verdict.
        let quiet = [(20, 100.0), (20, 100.0), (20, 100.0), (9, 100.0), (20, 0.0)];
        assert!(interval_outliers(&c, &quiet, || 0).is_empty());
        // A host at 90% among perfect ones: the limit is 98 - 1.9 x 4 = 90.4, so it goes;
        // with a factor of 3 the limit is 86 and it stays.
        let mild = [
            (20, 100.0),
            (20, 100.0),
            (20, 100.0),
            (20, 100.0),
            (20, 90.0),
        ];
        assert_eq!(interval_outliers(&c, &mild, || 0), vec![4]);
        c.success_rate.as_mut().unwrap().threshold = 3000.0;
        assert!(interval_outliers(&c, &mild, || 0).is_empty());
        // Not enforced when the roll is above the enforcing percentage.
        c.success_rate.as_mut().unwrap().enforcing = 50;
        assert!(interval_outliers(&c, &hosts, || 60).is_empty());
        c.success_rate = None;
        c.failure_percentage = Some(RateRule {
            minimum_hosts: 5,
            request_volume: 10,
            threshold: 50.0,
            enforcing: 100,
        });
        let half = [(20, 100.0), (20, 100.0), (20, 50.0), (20, 60.0), (20, 0.0)];
        assert_eq!(interval_outliers(&c, &half, || 0), vec![2, 4]);
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

    /// As Envoy's interval timer: an ejected host returns on the first tick after
    /// base_ejection_time x backoff; each ejection raises the backoff, each interval spent not
    /// ejected lowers it.
    #[test]
    fn an_ejected_host_returns_on_a_tick_and_its_backoff_decays() {
        let c = cfg(); // base 30 s, max 300 s
        let h = HostHealth::default();
        h.eject_at(&c, 1_000);
        assert!(h.is_ejected());
        assert!(!h.tick(&c, 30_999), "30 s are not up");
        assert!(h.is_ejected());
        assert!(h.tick(&c, 31_000));
        assert!(!h.is_ejected());
        // Ejected again at once: twice as long.
        h.eject_at(&c, 40_000);
        assert!(!h.tick(&c, 99_999));
        assert!(h.tick(&c, 100_000));
        // Two intervals without an ejection: the backoff is back to none, the next ejection
        // lasts 30 s again.
        assert!(!h.tick(&c, 110_000));
        assert!(!h.tick(&c, 120_000));
        h.eject_at(&c, 130_000);
        assert!(!h.tick(&c, 159_999));
        assert!(h.tick(&c, 160_000));
    }

    /// The backoff stops growing past max + base, and an ejection lasts at most
    /// max_ejection_time.
    #[test]
    fn ejection_time_is_capped() {
        let c = cfg();
        let h = HostHealth::default();
        for _ in 0..20 {
            h.eject_at(&c, 1);
            assert!(h.tick(&c, 10_000_000));
        }
        assert_eq!(h.backoff.load(Ordering::Relaxed), 11);
        h.eject_at(&c, 1_000);
        assert!(!h.tick(&c, 300_999));
        assert!(h.tick(&c, 301_000));
    }

    #[test]
    fn envoy_defaults_enforce_success_rate_only() {
        let c = OutlierConfig::from_xds(&XdsOutlier::default()).unwrap();
        assert_eq!(
            c.success_rate,
            Some(RateRule {
                minimum_hosts: 5,
                request_volume: 100,
                threshold: 1900.0,
                enforcing: 100
            })
        );
        assert_eq!(
            c.failure_percentage, None,
            "enforcing_failure_percentage is 0 by default"
        );
        assert_eq!(c.interval, Duration::from_secs(10));
        let split = XdsOutlier {
            split_external_local_origin_errors: true,
            ..Default::default()
        };
        let err = OutlierConfig::from_xds(&split).unwrap_err();
        assert_eq!(
            err.0,
            "outlier_detection.split_external_local_origin_errors"
        );
    }
}
