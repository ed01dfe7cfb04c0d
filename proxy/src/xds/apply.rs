//! Turning one validated xDS response into live config. Every resource of a response is
//! translated before anything is swapped in, so a rejected response changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use prost::{Message, Name};
use weft_xds_proto::envoy::config::cluster::v3::Cluster as XdsCluster;
use weft_xds_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use weft_xds_proto::envoy::config::listener::v3::Listener as XdsListener;
use weft_xds_proto::envoy::config::route::v3::RouteConfiguration;
use weft_xds_proto::envoy::service::discovery::v3::DiscoveryResponse;
use weft_xds_proto::type_url;

use crate::Rejection;
use crate::cluster::{Cluster, Discovery};
use crate::http::router::RouteTable;
use crate::listener::ListenerConfig;
use crate::state::{Proxy, ServerState};

/// What applying a response implies: a subscription to update.
pub struct Applied {
    pub subscribe: Option<(&'static str, BTreeSet<String>)>,
}

pub struct Applier {
    proxy: Arc<Proxy>,
    /// The bootstrap's `static_resources` (less the clusters that carry xDS itself): part of
    /// every cluster and listener set, and never replaced over xDS.
    /// Static clusters, encoded (as resources from xDS arrive), by name.
    static_clusters: Vec<(String, Vec<u8>)>,
    static_listeners: Vec<XdsListener>,
    /// Last load assignment per EDS service name, encoded (a tenth of its decoded size): a
    /// cluster created later (or re-created by a CDS update) starts with its endpoints instead
    /// of empty, and a state-of-the-world response's unchanged assignments are skipped.
    eds_cache: HashMap<String, Vec<u8>>,
    rds_names: BTreeSet<String>,
}

fn decode<M: Message + Name + Default>(
    kind: &'static str,
    resp: &DiscoveryResponse,
) -> Result<Vec<M>, Rejection> {
    let mut out = Vec::with_capacity(resp.resources.len());
    for (i, any) in resp.resources.iter().enumerate() {
        let m: M = weft_xds_proto::unpack(any).map_err(|e| {
            Rejection::new(kind, &format!("resources[{i}]"), "type_url", e.to_string())
        })?;
        out.push(m);
    }
    Ok(out)
}

/// The encoded resources of a response, each checked to be of the response's type.
fn typed<'a>(
    kind: &'static str,
    type_url: &str,
    resp: &'a DiscoveryResponse,
) -> Result<Vec<&'a [u8]>, Rejection> {
    resp.resources
        .iter()
        .enumerate()
        .map(|(i, any)| {
            if any.type_url == type_url {
                Ok(any.value.as_slice())
            } else {
                Err(Rejection::new(
                    kind,
                    &format!("resources[{i}]"),
                    "type_url",
                    format!("expected {type_url}, got {}", any.type_url),
                ))
            }
        })
        .collect()
}

fn no_duplicates<'a>(
    kind: &'static str,
    names: impl Iterator<Item = &'a str>,
) -> Result<(), Rejection> {
    let mut seen = BTreeSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err(Rejection::new(
                kind,
                n,
                "name",
                "duplicate resource name in one response",
            ));
        }
    }
    Ok(())
}

impl Applier {
    pub fn new(proxy: Arc<Proxy>) -> Applier {
        let infra = crate::bootstrap::ads_clusters(&proxy.bootstrap);
        let statics = proxy.bootstrap.static_resources.clone().unwrap_or_default();
        Applier {
            static_clusters: statics
                .clusters
                .into_iter()
                .filter(|c| !infra.contains(&c.name))
                .map(|c| (c.name.clone(), c.encode_to_vec()))
                .collect(),
            static_listeners: statics.listeners,
            proxy,
            eds_cache: HashMap::new(),
            rds_names: BTreeSet::new(),
        }
    }

    pub async fn apply(
        &mut self,
        type_url: &'static str,
        resp: &DiscoveryResponse,
    ) -> Result<Applied, Rejection> {
        match type_url {
            type_url::CLUSTER => self.clusters(resp).await,
            type_url::CLUSTER_LOAD_ASSIGNMENT => self.endpoints(resp),
            type_url::LISTENER => self.listeners(resp).await,
            type_url::ROUTE_CONFIGURATION => self.routes(resp),
            _ => Ok(Applied { subscribe: None }),
        }
    }

    /// Builds the bootstrap's static clusters and listeners (before any xDS arrives). A
    /// static resource that cannot be honoured stops the start-up, as it does Envoy's.
    pub async fn apply_static(&mut self) -> Result<(), Rejection> {
        if self.static_clusters.is_empty() && self.static_listeners.is_empty() {
            return Ok(());
        }
        self.set_clusters(&[]).await?;
        let rds = self.set_listeners(&[]).await?;
        if !rds.is_empty() && !self.has_ads() {
            return Err(Rejection::new(
                "Listener",
                "static_resources.listeners",
                "http_connection_manager.rds",
                format!(
                    "static listeners refer to route configurations over RDS ({}), which a bootstrap without ADS cannot serve",
                    rds.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Ok(())
    }

    fn has_ads(&self) -> bool {
        self.proxy
            .bootstrap
            .dynamic_resources
            .as_ref()
            .is_some_and(|d| d.ads_config.is_some())
    }

    async fn clusters(&mut self, resp: &DiscoveryResponse) -> Result<Applied, Rejection> {
        let dynamic = typed("Cluster", type_url::CLUSTER, resp)?;
        let (eds_names, names) = self.set_clusters(&dynamic).await?;
        self.proxy.record_accepted(
            type_url::CLUSTER,
            &resp.version_info,
            names.into_iter().zip(resp.resources.iter().cloned()),
            true,
        );
        Ok(Applied {
            subscribe: Some((type_url::CLUSTER_LOAD_ASSIGNMENT, eds_names)),
        })
    }

    /// Replaces the cluster set with the static clusters plus `dynamic` (encoded resources);
    /// returns the EDS service names it needs and the names of the dynamic clusters in order.
    /// Resources are decoded one at a time, and only those that differ from the running
    /// cluster of their name are rebuilt.
    async fn set_clusters(
        &mut self,
        dynamic: &[&[u8]],
    ) -> Result<(BTreeSet<String>, Vec<String>), Rejection> {
        let mut names = Vec::with_capacity(dynamic.len());
        let current = self.proxy.snapshot();
        let mut clusters: crate::state::NameMap<Arc<Cluster>> = HashMap::with_capacity_and_hasher(
            self.static_clusters.len() + dynamic.len(),
            Default::default(),
        );
        let mut fresh_dns = Vec::new();
        let statics = self
            .static_clusters
            .iter()
            .map(|(_, b)| (b.as_slice(), true));
        for (i, (bytes, is_static)) in statics
            .chain(dynamic.iter().map(|b| (*b, false)))
            .enumerate()
        {
            let c = XdsCluster::decode(bytes).map_err(|e| {
                Rejection::new(
                    "Cluster",
                    &format!("resources[{i}]"),
                    "type_url",
                    e.to_string(),
                )
            })?;
            if !is_static && self.static_clusters.iter().any(|(n, _)| *n == c.name) {
                return Err(Rejection::new(
                    "Cluster",
                    &c.name,
                    "name",
                    "a static cluster of the bootstrap has this name; static clusters cannot be replaced over CDS",
                ));
            }
            if clusters.contains_key(&c.name) {
                return Err(Rejection::new(
                    "Cluster",
                    &c.name,
                    "name",
                    "duplicate resource name in one response",
                ));
            }
            let cluster = match current.clusters.get(&c.name) {
                Some(existing) if existing.source == bytes => existing.clone(),
                _ => {
                    let built = Cluster::from_xds(&c)?;
                    if let Discovery::Eds(service) = &built.discovery
                        && let Some(cla) = self.eds_cache.get(service)
                    {
                        let cla = ClusterLoadAssignment::decode(cla.as_slice()).map_err(|e| {
                            Rejection::new("ClusterLoadAssignment", service, "", e.to_string())
                        })?;
                        built.assign(&cla)?;
                    }
                    let built = Arc::new(built);
                    crate::cluster::health::start(&built);
                    crate::cluster::outlier::start(&built);
                    if matches!(built.discovery, Discovery::Dns(_)) {
                        fresh_dns.push(built.clone());
                    }
                    built
                }
            };
            if !is_static {
                names.push(c.name.clone());
            }
            clusters.insert(c.name, cluster);
        }
        // New DNS clusters resolve before they serve (Envoy warms them the same way), all at
        // once and for at most a few seconds; after that they refresh in the background.
        futures::future::join_all(
            fresh_dns
                .iter()
                .map(|c| crate::cluster::dns::start(c, std::time::Duration::from_secs(5))),
        )
        .await;
        let eds_names: BTreeSet<String> = clusters
            .values()
            .filter_map(|c| match &c.discovery {
                Discovery::Eds(s) => Some(s.clone()),
                Discovery::Static | Discovery::Dns(_) | Discovery::OriginalDst { .. } => None,
            })
            .collect();
        drop(current);
        self.proxy.update(|s| crate::state::Snapshot {
            clusters,
            routes: s.routes.clone(),
        });
        self.eds_cache.retain(|k, _| eds_names.contains(k));
        Ok((eds_names, names))
    }

    fn endpoints(&mut self, resp: &DiscoveryResponse) -> Result<Applied, Rejection> {
        let resources = typed(
            "ClusterLoadAssignment",
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            resp,
        )?;
        let snapshot = self.proxy.snapshot();
        // The EDS clusters of each service name (subset clusters have names of their own).
        let mut by_service: HashMap<&str, Vec<&Arc<Cluster>>> = HashMap::new();
        for cluster in snapshot.clusters.values() {
            if let Discovery::Eds(service) = &cluster.discovery {
                by_service
                    .entry(service.as_str())
                    .or_default()
                    .push(cluster);
            }
        }
        // Translate everything first, one assignment at a time; only then swap endpoint sets
        // in. A state-of-the-world response repeats every assignment: only those whose bytes
        // changed are decoded further than their name.
        let mut seen = BTreeSet::new();
        let mut names = Vec::with_capacity(resources.len());
        let mut updates = Vec::new();
        let mut fresh: Vec<(String, &[u8])> = Vec::new();
        for (i, bytes) in resources.iter().enumerate() {
            let cla = ClusterLoadAssignment::decode(*bytes).map_err(|e| {
                Rejection::new(
                    "ClusterLoadAssignment",
                    &format!("resources[{i}]"),
                    "type_url",
                    e.to_string(),
                )
            })?;
            names.push(cla.cluster_name.clone());
            if !seen.insert(cla.cluster_name.clone()) {
                return Err(Rejection::new(
                    "ClusterLoadAssignment",
                    &cla.cluster_name,
                    "name",
                    "duplicate resource name in one response",
                ));
            }
            if self
                .eds_cache
                .get(&cla.cluster_name)
                .is_some_and(|b| b.as_slice() == *bytes)
            {
                continue;
            }
            for cluster in by_service
                .get(cla.cluster_name.as_str())
                .into_iter()
                .flatten()
            {
                let existing = cluster.current_endpoints();
                updates.push(((*cluster).clone(), cluster.endpoint_set(&cla, &existing)?));
            }
            fresh.push((cla.cluster_name, bytes));
        }
        for (cluster, set) in updates {
            cluster.endpoints.store(Arc::new(set));
            cluster.stats.update_success.inc();
        }
        for (name, bytes) in fresh {
            self.eds_cache.insert(name, bytes.to_vec());
        }
        self.proxy.record_accepted(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            &resp.version_info,
            names.into_iter().zip(resp.resources.iter().cloned()),
            false,
        );
        Ok(Applied { subscribe: None })
    }

    async fn listeners(&mut self, resp: &DiscoveryResponse) -> Result<Applied, Rejection> {
        let xds: Vec<XdsListener> = decode("Listener", resp)?;
        let rds = self.set_listeners(&xds).await?;
        self.proxy.record_accepted(
            type_url::LISTENER,
            &resp.version_info,
            xds.iter()
                .map(|l| (l.name.clone(), weft_xds_proto::pack(l))),
            true,
        );
        Ok(Applied {
            subscribe: Some((type_url::ROUTE_CONFIGURATION, rds)),
        })
    }

    /// Replaces the listener set with the static listeners plus `dynamic`; returns the route
    /// configuration names they need over RDS.
    async fn set_listeners(
        &mut self,
        dynamic: &[XdsListener],
    ) -> Result<BTreeSet<String>, Rejection> {
        no_duplicates("Listener", dynamic.iter().map(|l| l.name.as_str()))?;
        if let Some(l) = dynamic
            .iter()
            .find(|l| self.static_listeners.iter().any(|s| s.name == l.name))
        {
            return Err(Rejection::new(
                "Listener",
                &l.name,
                "name",
                "a static listener of the bootstrap has this name; static listeners cannot be replaced over LDS",
            ));
        }
        let configs = self
            .static_listeners
            .iter()
            .chain(dynamic)
            .map(ListenerConfig::from_xds)
            .collect::<Result<Vec<_>, _>>()?;
        let rds: BTreeSet<String> = configs
            .iter()
            .flat_map(|c| c.route_config_names().into_iter().map(str::to_string))
            .collect();
        self.proxy.listeners.apply(&self.proxy, configs).await?;
        self.rds_names = rds.clone();
        Ok(rds)
    }

    fn routes(&mut self, resp: &DiscoveryResponse) -> Result<Applied, Rejection> {
        let xds: Vec<RouteConfiguration> = decode("RouteConfiguration", resp)?;
        no_duplicates("RouteConfiguration", xds.iter().map(|r| r.name.as_str()))?;
        let tables = xds
            .iter()
            .map(|rc| RouteTable::from_xds(rc).map(|t| (rc.name.clone(), Arc::new(t))))
            .collect::<Result<Vec<_>, _>>()?;
        let wanted = self.rds_names.clone();
        self.proxy.update(|s| {
            let mut routes: crate::state::NameMap<_> = s
                .routes
                .iter()
                .filter(|(n, _)| wanted.contains(*n))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect();
            routes.extend(tables);
            crate::state::Snapshot {
                clusters: s.clusters.clone(),
                routes,
            }
        });
        self.proxy.record_accepted(
            type_url::ROUTE_CONFIGURATION,
            &resp.version_info,
            xds.iter()
                .map(|r| (r.name.clone(), weft_xds_proto::pack(r))),
            false,
        );
        Ok(Applied { subscribe: None })
    }

    /// LIVE once clusters and listeners have been accepted and every referenced route config
    /// has arrived (Envoy's initialization, simplified to the resources weft serves).
    pub fn update_readiness(&self, accepted: &BTreeMap<&'static str, bool>) {
        if self.proxy.state() == ServerState::Live {
            return;
        }
        let has = |t: &str| accepted.get(t).copied().unwrap_or(false);
        let routes_ready = {
            let snapshot = self.proxy.snapshot();
            self.rds_names
                .iter()
                .all(|n| snapshot.routes.contains_key(n))
        };
        if has(type_url::CLUSTER) && has(type_url::LISTENER) && routes_ready {
            tracing::info!("initial config applied; proxy is LIVE");
            self.proxy.set_state(ServerState::Live);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_xds_proto::envoy::config::bootstrap::v3::Bootstrap;

    fn response(type_url: &str, version: &str, yaml: &[&str]) -> DiscoveryResponse {
        let resources = yaml
            .iter()
            .map(|y| {
                let bytes = match type_url {
                    type_url::CLUSTER => weft_xds_proto::from_yaml::<XdsCluster>(y)
                        .unwrap()
                        .encode_to_vec(),
                    _ => weft_xds_proto::from_yaml::<ClusterLoadAssignment>(y)
                        .unwrap()
                        .encode_to_vec(),
                };
                weft_xds_proto::wkt::Any {
                    type_url: type_url.to_string(),
                    value: bytes,
                }
            })
            .collect();
        DiscoveryResponse {
            version_info: version.into(),
            type_url: type_url.into(),
            resources,
            ..Default::default()
        }
    }

    const EDS_CLUSTER: &str = "{ name: c, type: EDS, eds_cluster_config: { service_name: svc } }";

    fn cla(port: u32) -> String {
        format!(
            "{{ cluster_name: svc, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}] }}"
        )
    }

    #[tokio::test]
    async fn unchanged_resources_are_kept_and_changed_ones_rebuilt() {
        let proxy = Proxy::new(Bootstrap::default(), Vec::new());
        let mut a = Applier::new(proxy.clone());
        // Endpoints before their cluster: cached, then used when the cluster arrives.
        a.endpoints(&response(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "1",
            &[&cla(1000)],
        ))
        .unwrap();
        a.clusters(&response(type_url::CLUSTER, "1", &[EDS_CLUSTER]))
            .await
            .unwrap();
        let first = proxy.snapshot().clusters["c"].clone();
        assert_eq!(first.current_endpoints().len(), 1);
        // The same cluster again: the running one is kept (pools, stats, health).
        a.clusters(&response(type_url::CLUSTER, "2", &[EDS_CLUSTER]))
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&first, &proxy.snapshot().clusters["c"]));
        // The same assignment again (state of the world) changes nothing; a new one does.
        let updates = first.stats.update_success.get();
        a.endpoints(&response(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "2",
            &[&cla(1000)],
        ))
        .unwrap();
        assert_eq!(first.stats.update_success.get(), updates);
        a.endpoints(&response(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "3",
            &[&cla(2000)],
        ))
        .unwrap();
        assert_eq!(first.stats.update_success.get(), updates + 1);
        let ports: Vec<u16> = first.current_endpoints().keys().map(|a| a.port()).collect();
        assert_eq!(ports, [2000]);
        // A changed cluster is rebuilt, with the cached endpoints.
        a.clusters(&response(
            type_url::CLUSTER,
            "4",
            &["{ name: c, type: EDS, connect_timeout: 2s, eds_cluster_config: { service_name: svc } }"],
        ))
        .await
        .unwrap();
        let second = proxy.snapshot().clusters["c"].clone();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.current_endpoints().len(), 1);
        let dump = proxy.accepted.lock().unwrap();
        assert_eq!(dump[type_url::CLUSTER]["c"].version, "4");
        assert_eq!(dump[type_url::CLUSTER_LOAD_ASSIGNMENT]["svc"].version, "3");
    }

    #[tokio::test]
    async fn duplicates_and_wrong_types_are_refused_whole() {
        let proxy = Proxy::new(Bootstrap::default(), Vec::new());
        let mut a = Applier::new(proxy.clone());
        let err = a
            .clusters(&response(
                type_url::CLUSTER,
                "1",
                &[EDS_CLUSTER, EDS_CLUSTER],
            ))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("duplicate"), "{err}");
        let err = a
            .endpoints(&response(
                type_url::CLUSTER_LOAD_ASSIGNMENT,
                "1",
                &[&cla(1), &cla(2)],
            ))
            .err()
            .unwrap();
        assert!(err.to_string().contains("duplicate"), "{err}");
        let mut wrong = response(type_url::CLUSTER, "1", &[EDS_CLUSTER]);
        wrong.resources[0].type_url = type_url::LISTENER.into();
        let err = a.clusters(&wrong).await.err().unwrap();
        assert!(err.to_string().contains("expected"), "{err}");
        assert!(proxy.snapshot().clusters.is_empty(), "nothing applied");
    }
}
