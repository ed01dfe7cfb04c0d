//! STRICT_DNS and LOGICAL_DNS clusters: the proxy resolves the names in the cluster's load
//! assignment itself (through the system resolver), on the cluster's refresh interval, and swaps
//! the resolved hosts in. A failed lookup keeps the last good hosts, as Envoy does.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use weft_xds_proto::envoy::config::cluster::v3::cluster::DnsLookupFamily;
use weft_xds_proto::envoy::config::core::v3::{address, socket_address};
use weft_xds_proto::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};

use super::Cluster;

/// What a DNS cluster resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// LOGICAL_DNS: one name, and only its first address is used.
    pub logical: bool,
    pub targets: Vec<DnsTarget>,
    pub family: Family,
    pub refresh: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub host: String,
    pub port: u16,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// AUTO and V4_PREFERRED: IPv4 answers when there are any, else IPv6.
    PreferV4,
    V4Only,
    V6Only,
    All,
}

/// Envoy's default `dns_refresh_rate`.
const DEFAULT_REFRESH: Duration = Duration::from_secs(5);

impl DnsConfig {
    pub fn from_xds(
        c: &weft_xds_proto::envoy::config::cluster::v3::Cluster,
        logical: bool,
    ) -> Result<DnsConfig, (String, String)> {
        #[allow(deprecated)]
        let unsupported = [
            ("dns_resolvers", !c.dns_resolvers.is_empty()),
            ("use_tcp_for_dns_lookups", c.use_tcp_for_dns_lookups),
            ("dns_resolution_config", c.dns_resolution_config.is_some()),
            (
                "typed_dns_resolver_config",
                c.typed_dns_resolver_config.is_some(),
            ),
        ];
        for (field, set) in unsupported {
            if set {
                return Err((
                    field.into(),
                    "weft-proxy resolves with the system resolver; custom resolvers are not supported"
                        .into(),
                ));
            }
        }
        let family = match DnsLookupFamily::try_from(c.dns_lookup_family) {
            Ok(DnsLookupFamily::Auto | DnsLookupFamily::V4Preferred) => Family::PreferV4,
            Ok(DnsLookupFamily::V4Only) => Family::V4Only,
            Ok(DnsLookupFamily::V6Only) => Family::V6Only,
            Ok(DnsLookupFamily::All) => Family::All,
            Err(_) => {
                return Err((
                    "dns_lookup_family".into(),
                    format!("unknown value {}", c.dns_lookup_family),
                ));
            }
        };
        #[allow(deprecated)]
        let refresh = c
            .dns_refresh_rate
            .as_ref()
            .map(crate::duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_REFRESH);
        let Some(cla) = &c.load_assignment else {
            return Err((
                "load_assignment".into(),
                "a DNS cluster needs the names to resolve in load_assignment".into(),
            ));
        };
        let targets = targets(cla)?;
        if logical && targets.len() != 1 {
            return Err((
                "load_assignment".into(),
                format!(
                    "LOGICAL_DNS clusters must have exactly one host ({} given)",
                    targets.len()
                ),
            ));
        }
        Ok(DnsConfig {
            logical,
            targets,
            family,
            refresh,
        })
    }
}

fn targets(cla: &ClusterLoadAssignment) -> Result<Vec<DnsTarget>, (String, String)> {
    let mut out = Vec::new();
    for (i, group) in cla.endpoints.iter().enumerate() {
        if group.priority != 0 {
            return Err((
                format!("load_assignment.endpoints[{i}].priority"),
                "priorities other than 0 are not supported yet".into(),
            ));
        }
        for (j, lbe) in group.lb_endpoints.iter().enumerate() {
            let field =
                format!("load_assignment.endpoints[{i}].lb_endpoints[{j}].endpoint.address");
            let sa = match &lbe.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => {
                    match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
                        Some(address::Address::SocketAddress(sa)) => sa,
                        _ => return Err((field, "a socket address is required".into())),
                    }
                }
                _ => return Err((field, "a socket address is required".into())),
            };
            let port = match sa.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) if p <= 65535 => p as u16,
                _ => return Err((field, "a port_value up to 65535 is required".into())),
            };
            if sa.address.is_empty() {
                return Err((field, "a host name is required".into()));
            }
            out.push(DnsTarget {
                host: sa.address.clone(),
                port,
                weight: lbe
                    .load_balancing_weight
                    .map(|w| w.value)
                    .unwrap_or(1)
                    .max(1),
            });
        }
    }
    Ok(out)
}

/// Resolves every target once; None when every lookup failed.
async fn resolve(cfg: &DnsConfig) -> Option<Vec<(SocketAddr, u32)>> {
    let lookups = cfg.targets.iter().map(|t| async move {
        let found = tokio::net::lookup_host((t.host.as_str(), t.port)).await;
        (t, found)
    });
    let mut out = Vec::new();
    let mut any_ok = false;
    for (t, found) in futures::future::join_all(lookups).await {
        let addrs: Vec<SocketAddr> = match found {
            Ok(a) => {
                any_ok = true;
                a.collect()
            }
            Err(e) => {
                tracing::warn!(host = %t.host, error = %e, "DNS lookup failed");
                continue;
            }
        };
        let v4: Vec<SocketAddr> = addrs.iter().copied().filter(|a| a.is_ipv4()).collect();
        let v6: Vec<SocketAddr> = addrs.iter().copied().filter(|a| a.is_ipv6()).collect();
        let mut picked = match cfg.family {
            Family::V4Only => v4,
            Family::V6Only => v6,
            Family::PreferV4 if !v4.is_empty() => v4,
            Family::PreferV4 => v6,
            Family::All => addrs,
        };
        picked.dedup();
        if cfg.logical {
            picked.truncate(1);
        }
        out.extend(picked.into_iter().map(|a| (a, t.weight)));
    }
    any_ok.then_some(out)
}

impl Cluster {
    /// Swaps in freshly resolved hosts, keeping pools of addresses that stay.
    fn set_resolved(&self, hosts: Vec<(SocketAddr, u32)>) {
        let existing = self.current_endpoints();
        let mut seen = std::collections::HashSet::new();
        let endpoints = hosts
            .into_iter()
            .filter(|(a, _)| seen.insert(*a))
            .map(|(a, w)| self.endpoint(a, w, None, &existing))
            .collect();
        self.endpoints
            .store(Arc::new(super::lb::EndpointSet::for_policy(
                endpoints,
                self.lb.policy,
            )));
        self.stats.update_success.inc();
    }
}

/// Resolves a new DNS cluster's names before it is used (as Envoy warms it), giving up after
/// `first_wait`; then keeps re-resolving in the background for as long as the cluster lives.
pub async fn start(cluster: &Arc<Cluster>, first_wait: Duration) {
    let super::Discovery::Dns(cfg) = &cluster.discovery else {
        return;
    };
    let cfg = cfg.clone();
    if let Ok(Some(hosts)) = tokio::time::timeout(first_wait, resolve(&cfg)).await {
        cluster.set_resolved(hosts);
    }
    let weak: Weak<Cluster> = Arc::downgrade(cluster);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(cfg.refresh).await;
            if weak.strong_count() == 0 {
                return;
            }
            let resolved = resolve(&cfg).await;
            let Some(cluster) = weak.upgrade() else {
                return;
            };
            match resolved {
                Some(hosts) => cluster.set_resolved(hosts),
                None => {
                    tracing::warn!(cluster = %cluster.name, "DNS refresh failed; keeping the last resolved hosts")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn cfg(logical: bool, family: Family, hosts: &[&str]) -> DnsConfig {
        DnsConfig {
            logical,
            targets: hosts
                .iter()
                .map(|h| DnsTarget {
                    host: h.to_string(),
                    port: 8080,
                    weight: 2,
                })
                .collect(),
            family,
            refresh: DEFAULT_REFRESH,
        }
    }

    #[tokio::test]
    async fn literal_and_localhost_names_resolve_with_the_family_filter() {
        let got = resolve(&cfg(false, Family::V4Only, &["localhost", "127.0.0.9"]))
            .await
            .expect("resolves");
        assert!(got.contains(&(([127, 0, 0, 1], 8080).into(), 2)), "{got:?}");
        assert!(got.contains(&(([127, 0, 0, 9], 8080).into(), 2)), "{got:?}");
        assert!(got.iter().all(|(a, _)| a.is_ipv4()));
        let v6 = resolve(&cfg(false, Family::V6Only, &["127.0.0.9"]))
            .await
            .expect("lookup itself succeeds");
        assert!(v6.is_empty());
    }

    #[tokio::test]
    async fn logical_dns_keeps_only_the_first_address_and_bad_names_fail() {
        let got = resolve(&cfg(true, Family::All, &["127.0.0.7"]))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.ip(), IpAddr::from([127, 0, 0, 7]));
        assert!(
            resolve(&cfg(false, Family::All, &["no such host.invalid"]))
                .await
                .is_none()
        );
    }
}
