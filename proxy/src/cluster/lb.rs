//! Load balancing: which endpoint of a cluster serves the next request. Weighted round robin
//! (Envoy's default) and random; the endpoint set is immutable and swapped on EDS updates.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use weft_xds_proto::envoy::config::cluster::v3::cluster::LbPolicy as XdsLbPolicy;

use super::Endpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of two choices on in-flight requests, as Envoy's default least-request.
    LeastRequest,
    Random,
}

impl LbPolicy {
    pub fn from_xds(policy: i32) -> Result<LbPolicy, String> {
        match XdsLbPolicy::try_from(policy) {
            Ok(XdsLbPolicy::RoundRobin) => Ok(LbPolicy::RoundRobin),
            Ok(XdsLbPolicy::Random) => Ok(LbPolicy::Random),
            Ok(XdsLbPolicy::LeastRequest) => Ok(LbPolicy::LeastRequest),
            Ok(other) => Err(format!(
                "{} is not supported yet (ROUND_ROBIN, LEAST_REQUEST and RANDOM are)",
                other.as_str_name()
            )),
            Err(_) => Err(format!("unknown load balancing policy {policy}")),
        }
    }
}

/// The endpoints of a cluster plus a weight-expanded schedule for round robin.
#[derive(Debug, Default)]
pub struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    /// Indexes into `endpoints`, each repeated by its weight (reduced by the weights' GCD) and
    /// interleaved, so weighted round robin is one atomic increment.
    schedule: Vec<u32>,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Longest schedule we build; beyond it weights are scaled down proportionally.
const MAX_SCHEDULE: u64 = 4096;

impl EndpointSet {
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> EndpointSet {
        let g = endpoints.iter().map(|e| e.weight).fold(0, gcd).max(1);
        let total: u64 = endpoints.iter().map(|e| u64::from(e.weight / g)).sum();
        let scale = if total > MAX_SCHEDULE {
            total as f64 / MAX_SCHEDULE as f64
        } else {
            1.0
        };
        let weights: Vec<u32> = endpoints
            .iter()
            .map(|e| (((e.weight / g) as f64 / scale).round() as u32).max(1))
            .collect();
        // Smooth weighted round robin (as nginx does) gives an interleaved schedule.
        let mut current = vec![0i64; endpoints.len()];
        let sum: i64 = weights.iter().map(|w| i64::from(*w)).sum();
        let mut schedule = Vec::with_capacity(sum as usize);
        for _ in 0..sum {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += i64::from(*w);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= sum;
            schedule.push(best as u32);
        }
        EndpointSet {
            endpoints,
            schedule,
        }
    }

    pub fn all(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

#[derive(Debug)]
pub struct Balancer {
    pub policy: LbPolicy,
    next: AtomicUsize,
}

impl Balancer {
    pub fn new(policy: LbPolicy) -> Balancer {
        // Start at a random point so that many proxies do not all hit the first host together.
        Balancer {
            policy,
            next: AtomicUsize::new(fastrand::usize(..1024)),
        }
    }

    /// Picks an endpoint; None when the cluster has none.
    pub fn pick(&self, set: &EndpointSet) -> Option<Arc<Endpoint>> {
        if set.schedule.is_empty() {
            return None;
        }
        let slot = match self.policy {
            LbPolicy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % set.schedule.len(),
            LbPolicy::Random => fastrand::usize(..set.schedule.len()),
            LbPolicy::LeastRequest => {
                let n = set.endpoints.len();
                let (a, b) = (fastrand::usize(..n), fastrand::usize(..n));
                let load = |i: usize| set.endpoints[i].stats.rq_active.get();
                return Some(set.endpoints[if load(b) < load(a) { b } else { a }].clone());
            }
        };
        Some(set.endpoints[set.schedule[slot] as usize].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{EndpointStats, Pool, UpstreamProtocol};
    use std::time::Duration;

    fn ep(port: u16, weight: u32) -> Arc<Endpoint> {
        let address = ([127, 0, 0, 1], port).into();
        Arc::new(Endpoint {
            address,
            weight,
            pool: Pool::new(
                address,
                UpstreamProtocol::Http1,
                Duration::from_secs(1),
                Default::default(),
            ),
            stats: EndpointStats::default(),
            health: Default::default(),
        })
    }

    #[test]
    fn round_robin_honours_weights_and_interleaves() {
        let set = EndpointSet::new(vec![ep(1, 3), ep(2, 1)]);
        let b = Balancer::new(LbPolicy::RoundRobin);
        let picks: Vec<u16> = (0..8)
            .map(|_| b.pick(&set).unwrap().address.port())
            .collect();
        assert_eq!(picks.iter().filter(|p| **p == 1).count(), 6);
        assert!(
            picks.windows(4).all(|w| w.contains(&2)),
            "weight-1 host appears in every window of 4: {picks:?}"
        );
    }

    #[test]
    fn empty_set_picks_nothing() {
        assert!(
            Balancer::new(LbPolicy::Random)
                .pick(&EndpointSet::default())
                .is_none()
        );
    }
}
