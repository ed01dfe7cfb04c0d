//! Load balancing: which endpoint of a cluster serves the next request. Weighted round robin
//! (Envoy's default), least request (power of two choices), random, and the consistent-hash
//! balancers ring hash and maglev, which map the request's hash (from the route's hash policy)
//! to a host so that one key keeps reaching one host while the host set stays the same. The
//! endpoint set (with its schedule, ring or table) is immutable and swapped on updates.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use weft_xds_proto::envoy::config::cluster::v3::Cluster as XdsCluster;
use weft_xds_proto::envoy::config::cluster::v3::cluster::{LbConfig, LbPolicy as XdsLbPolicy};

use super::Endpoint;
use crate::http::hash::hash64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of two choices on in-flight requests, as Envoy's default least-request.
    LeastRequest,
    Random,
    /// Ketama-style ring with at least `min_size` entries (at most `max_size`).
    RingHash {
        min_size: u64,
        max_size: u64,
    },
    /// Google's Maglev lookup table of `table_size` (a prime) entries.
    Maglev {
        table_size: u64,
    },
}

/// Envoy's defaults.
const RING_MIN: u64 = 1024;
const RING_MAX: u64 = 8 * 1024 * 1024;
const MAGLEV_TABLE: u64 = 65537;

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

impl LbPolicy {
    /// The cluster's `lb_policy` with its `lb_config`; unsupported options are named.
    pub fn from_xds(c: &XdsCluster) -> Result<LbPolicy, (String, String)> {
        let policy = c.lb_policy;
        let bad = |f: &str, r: String| Err((f.to_string(), r));
        let lb = match XdsLbPolicy::try_from(policy) {
            Ok(XdsLbPolicy::RoundRobin) => LbPolicy::RoundRobin,
            Ok(XdsLbPolicy::Random) => LbPolicy::Random,
            Ok(XdsLbPolicy::LeastRequest) => LbPolicy::LeastRequest,
            Ok(XdsLbPolicy::RingHash) => {
                let (mut min_size, mut max_size) = (RING_MIN, RING_MAX);
                if let Some(LbConfig::RingHashLbConfig(r)) = &c.lb_config {
                    min_size = r.minimum_ring_size.map(|v| v.value).unwrap_or(RING_MIN);
                    max_size = r.maximum_ring_size.map(|v| v.value).unwrap_or(RING_MAX);
                }
                if min_size == 0 || min_size > max_size || max_size > RING_MAX {
                    return bad(
                        "ring_hash_lb_config",
                        format!(
                            "ring sizes must satisfy 0 < minimum ({min_size}) <= maximum ({max_size}) <= {RING_MAX}"
                        ),
                    );
                }
                LbPolicy::RingHash { min_size, max_size }
            }
            Ok(XdsLbPolicy::Maglev) => {
                let mut table_size = MAGLEV_TABLE;
                if let Some(LbConfig::MaglevLbConfig(m)) = &c.lb_config {
                    table_size = m.table_size.map(|v| v.value).unwrap_or(MAGLEV_TABLE);
                }
                if !is_prime(table_size) || table_size > 5_000_011 {
                    return bad(
                        "maglev_lb_config.table_size",
                        format!("{table_size} must be a prime number no larger than 5000011"),
                    );
                }
                LbPolicy::Maglev { table_size }
            }
            Ok(other) => {
                return bad(
                    "lb_policy",
                    format!(
                        "{} is not supported yet (ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH and MAGLEV are)",
                        other.as_str_name()
                    ),
                );
            }
            Err(_) => {
                return bad(
                    "lb_policy",
                    format!("unknown load balancing policy {policy}"),
                );
            }
        };
        match (&c.lb_config, lb) {
            (None, _)
            | (Some(LbConfig::RingHashLbConfig(_)), LbPolicy::RingHash { .. })
            | (Some(LbConfig::MaglevLbConfig(_)), LbPolicy::Maglev { .. }) => {}
            (Some(LbConfig::LeastRequestLbConfig(l)), LbPolicy::LeastRequest) => {
                if l.choice_count.is_some_and(|c| c.value != 2)
                    || l.active_request_bias.is_some()
                    || l.slow_start_config.is_some()
                {
                    return bad(
                        "least_request_lb_config",
                        "only the default (two choices, no bias, no slow start) is supported"
                            .into(),
                    );
                }
            }
            (Some(_), _) => {
                return bad(
                    "lb_config",
                    "this load balancer option is not supported (or does not match lb_policy)"
                        .into(),
                );
            }
        }
        Ok(lb)
    }
}

/// The endpoints of a cluster plus a weight-expanded schedule for round robin.
#[derive(Debug, Default)]
pub struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    /// Indexes into `endpoints`, each repeated by its weight (reduced by the weights' GCD) and
    /// interleaved, so weighted round robin is one atomic increment.
    schedule: Vec<u32>,
    /// Ring hash: (point, endpoint index), sorted by point.
    ring: Vec<(u64, u32)>,
    /// Maglev: the lookup table (endpoint indexes).
    table: Vec<u32>,
}

/// Each host's ring points: a share of the ring proportional to its weight, at least one.
fn build_ring(endpoints: &[Arc<Endpoint>], min_size: u64, max_size: u64) -> Vec<(u64, u32)> {
    let total: u64 = endpoints.iter().map(|e| u64::from(e.weight)).sum();
    if total == 0 {
        return Vec::new();
    }
    let min_weight = endpoints.iter().map(|e| e.weight).min().unwrap_or(1).max(1);
    // As Envoy: big enough that the lightest host gets at least one point, within the bounds.
    let size = (total / u64::from(min_weight)).clamp(min_size, max_size);
    let mut ring = Vec::with_capacity(size as usize + endpoints.len());
    for (i, e) in endpoints.iter().enumerate() {
        let points = ((size as f64 * f64::from(e.weight) / total as f64).round() as u64).max(1);
        let key = e.address.to_string();
        for p in 0..points {
            ring.push((hash64(format!("{key}_{p}").as_bytes()), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

/// The Maglev table: every host walks its own permutation of the slots and claims the next free
/// one in turn, hosts with more weight taking proportionally more turns.
fn build_maglev(endpoints: &[Arc<Endpoint>], size: u64) -> Vec<u32> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    let max_weight = f64::from(endpoints.iter().map(|e| e.weight).max().unwrap_or(1).max(1));
    // Per host: its next position in its permutation and its step (offset + k * skip mod size,
    // kept as a running position so the fill loop does no division).
    let mut walk: Vec<(u64, u64)> = endpoints
        .iter()
        .map(|e| {
            let name = e.address.to_string();
            let offset = hash64(name.as_bytes()) % size;
            let skip = hash64(format!("{name}#skip").as_bytes()) % (size - 1) + 1;
            (offset, skip)
        })
        .collect();
    let share: Vec<f64> = endpoints
        .iter()
        .map(|e| f64::from(e.weight) / max_weight)
        .collect();
    let mut table = vec![u32::MAX; size as usize];
    let mut credit = vec![0f64; endpoints.len()];
    let mut filled = 0u64;
    'fill: loop {
        for i in 0..endpoints.len() {
            credit[i] += share[i];
            if credit[i] < 1.0 {
                continue;
            }
            credit[i] -= 1.0;
            let (pos, skip) = &mut walk[i];
            while table[*pos as usize] != u32::MAX {
                *pos += *skip;
                if *pos >= size {
                    *pos -= size;
                }
            }
            table[*pos as usize] = i as u32;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Longest schedule we build; beyond it weights are scaled down proportionally.
const MAX_SCHEDULE: u64 = 4096;

impl EndpointSet {
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> EndpointSet {
        EndpointSet::for_policy(endpoints, LbPolicy::RoundRobin)
    }

    /// The set with what the policy looks up in: a weighted schedule, a ring or a table.
    pub fn for_policy(endpoints: Vec<Arc<Endpoint>>, policy: LbPolicy) -> EndpointSet {
        let mut set = EndpointSet::weighted(endpoints);
        match policy {
            LbPolicy::RingHash { min_size, max_size } => {
                set.ring = build_ring(&set.endpoints, min_size, max_size)
            }
            LbPolicy::Maglev { table_size } => set.table = build_maglev(&set.endpoints, table_size),
            _ => {}
        }
        set
    }

    fn weighted(endpoints: Vec<Arc<Endpoint>>) -> EndpointSet {
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
            ring: Vec::new(),
            table: Vec::new(),
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

    /// Picks an endpoint; None when the cluster has none. Hash-based policies use `hash` (a
    /// random host when the request has none, as Envoy does).
    pub fn pick(&self, set: &EndpointSet, hash: Option<u64>) -> Option<Arc<Endpoint>> {
        if set.schedule.is_empty() {
            return None;
        }
        let h = || hash.unwrap_or_else(|| fastrand::u64(..));
        let slot = match self.policy {
            LbPolicy::RingHash { .. } => {
                let h = h();
                let i = set.ring.partition_point(|(p, _)| *p < h) % set.ring.len();
                return Some(set.endpoints[set.ring[i].1 as usize].clone());
            }
            LbPolicy::Maglev { .. } => {
                let i = (h() % set.table.len() as u64) as usize;
                return Some(set.endpoints[set.table[i] as usize].clone());
            }
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

    fn ep(port: u16, weight: u32) -> Arc<Endpoint> {
        let address = ([127, 0, 0, 1], port).into();
        Arc::new(Endpoint {
            address,
            weight,
            pool: Pool::new(
                address,
                UpstreamProtocol::Http1,
                Default::default(),
                Default::default(),
                None,
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
            .map(|_| b.pick(&set, None).unwrap().address.port())
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
                .pick(&EndpointSet::default(), None)
                .is_none()
        );
    }

    fn hosts(n: u16, weight: u32) -> Vec<Arc<Endpoint>> {
        (1..=n).map(|p| ep(p, weight)).collect()
    }

    /// Which host each of `keys` lands on.
    fn placement(b: &Balancer, set: &EndpointSet, keys: u64) -> Vec<u16> {
        (0..keys)
            .map(|k| {
                b.pick(set, Some(hash64(&k.to_le_bytes())))
                    .unwrap()
                    .address
                    .port()
            })
            .collect()
    }

    #[test]
    fn consistent_hashes_are_sticky_balanced_and_move_few_keys_when_a_host_leaves() {
        for policy in [
            LbPolicy::RingHash {
                min_size: RING_MIN,
                max_size: RING_MAX,
            },
            LbPolicy::Maglev {
                table_size: MAGLEV_TABLE,
            },
        ] {
            let b = Balancer::new(policy);
            let all = hosts(5, 1);
            let set = EndpointSet::for_policy(all.clone(), policy);
            let before = placement(&b, &set, 5000);
            assert_eq!(before, placement(&b, &set, 5000), "{policy:?}: sticky");
            for port in 1..=5 {
                let n = before.iter().filter(|p| **p == port).count();
                assert!(
                    (600..=1400).contains(&n),
                    "{policy:?}: host {port} got {n} of 5000"
                );
            }
            // Host 5 leaves: its keys move; of the other 4000 or so, only the share the
            // remaining hosts' extra ring points / table slots take over (Envoy's ring moves
            // them too), far from a rehash of everything.
            let fewer = EndpointSet::for_policy(all[..4].to_vec(), policy);
            let after = placement(&b, &fewer, 5000);
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(a, b)| a != b && **a != 5)
                .count();
            assert!(
                moved < 800,
                "{policy:?}: {moved} keys of remaining hosts moved"
            );
        }
    }

    #[test]
    fn consistent_hashes_honour_weights() {
        for policy in [
            LbPolicy::RingHash {
                min_size: RING_MIN,
                max_size: RING_MAX,
            },
            LbPolicy::Maglev { table_size: 10007 },
        ] {
            let set = EndpointSet::for_policy(vec![ep(1, 3), ep(2, 1)], policy);
            let placed = placement(&Balancer::new(policy), &set, 8000);
            let heavy = placed.iter().filter(|p| **p == 1).count();
            assert!(
                (5400..=6600).contains(&heavy),
                "{policy:?}: {heavy} of 8000"
            );
        }
    }

    #[test]
    fn maglev_table_sizes_must_be_prime() {
        assert!(is_prime(65537) && is_prime(5_000_011) && !is_prime(65536) && !is_prime(1));
    }

    #[test]
    fn the_largest_maglev_table_builds_in_reasonable_time() {
        // Envoy's maximum table size: must not stall an xDS update (debug builds included).
        let started = std::time::Instant::now();
        let set = EndpointSet::for_policy(
            hosts(3, 1),
            LbPolicy::Maglev {
                table_size: 5_000_011,
            },
        );
        assert_eq!(set.table.len(), 5_000_011);
        assert!(set.table.iter().all(|i| *i < 3));
        eprintln!("maglev 5000011 x 3 hosts: {:?}", started.elapsed());
    }
}
