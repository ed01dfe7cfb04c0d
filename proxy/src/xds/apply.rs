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
    static_clusters: Vec<XdsCluster>,
    static_listeners: Vec<XdsListener>,
    /// Last load assignment per EDS service name: a cluster created later (or re-created by a
    /// CDS update) starts with its endpoints instead of empty.
    eds_cache: HashMap<String, ClusterLoadAssignment>,
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
        let xds: Vec<XdsCluster> = decode("Cluster", resp)?;
        let eds_names = self.set_clusters(&xds).await?;
        self.proxy.record_accepted(
            type_url::CLUSTER,
            &resp.version_info,
            xds.iter()
                .map(|c| (c.name.clone(), weft_xds_proto::pack(c))),
            true,
        );
        Ok(Applied {
            subscribe: Some((type_url::CLUSTER_LOAD_ASSIGNMENT, eds_names)),
        })
    }

    /// Replaces the cluster set with the static clusters plus `dynamic`; returns the EDS
    /// service names it needs.
    async fn set_clusters(
        &mut self,
        dynamic: &[XdsCluster],
    ) -> Result<BTreeSet<String>, Rejection> {
        no_duplicates("Cluster", dynamic.iter().map(|c| c.name.as_str()))?;
        if let Some(c) = dynamic
            .iter()
            .find(|c| self.static_clusters.iter().any(|s| s.name == c.name))
        {
            return Err(Rejection::new(
                "Cluster",
                &c.name,
                "name",
                "a static cluster of the bootstrap has this name; static clusters cannot be replaced over CDS",
            ));
        }
        let xds: Vec<&XdsCluster> = self.static_clusters.iter().chain(dynamic).collect();
        let current = self.proxy.snapshot();
        let mut clusters = HashMap::with_capacity(xds.len());
        let mut fresh_dns = Vec::new();
        for c in xds {
            let cluster = match current.clusters.get(&c.name) {
                Some(existing) if existing.source == *c => existing.clone(),
                _ => {
                    let built = Cluster::from_xds(c)?;
                    if let Discovery::Eds(service) = &built.discovery
                        && let Some(cla) = self.eds_cache.get(service)
                    {
                        built.assign(cla)?;
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
            clusters.insert(c.name.clone(), cluster);
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
                Discovery::Static | Discovery::Dns(_) => None,
            })
            .collect();
        drop(current);
        self.proxy.update(|s| crate::state::Snapshot {
            clusters,
            routes: s.routes.clone(),
        });
        self.eds_cache.retain(|k, _| eds_names.contains(k));
        Ok(eds_names)
    }

    fn endpoints(&mut self, resp: &DiscoveryResponse) -> Result<Applied, Rejection> {
        let xds: Vec<ClusterLoadAssignment> = decode("ClusterLoadAssignment", resp)?;
        no_duplicates(
            "ClusterLoadAssignment",
            xds.iter().map(|c| c.cluster_name.as_str()),
        )?;
        let snapshot = self.proxy.snapshot();
        let by_service: BTreeMap<&str, &ClusterLoadAssignment> =
            xds.iter().map(|c| (c.cluster_name.as_str(), c)).collect();
        // Translate everything first; only then swap endpoint sets in.
        let mut updates = Vec::new();
        for cluster in snapshot.clusters.values() {
            if let Discovery::Eds(service) = &cluster.discovery
                && let Some(cla) = by_service.get(service.as_str())
                // A state-of-the-world response repeats every assignment: rebuild only the
                // clusters whose assignment changed (a cluster created since got it from the
                // cache already).
                && self.eds_cache.get(service) != Some(*cla)
            {
                let existing = cluster.current_endpoints();
                updates.push((cluster.clone(), cluster.endpoint_set(cla, &existing)?));
            }
        }
        for (cluster, set) in updates {
            cluster.endpoints.store(Arc::new(set));
            cluster.stats.update_success.inc();
        }
        for cla in &xds {
            self.eds_cache.insert(cla.cluster_name.clone(), cla.clone());
        }
        self.proxy.record_accepted(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            &resp.version_info,
            xds.iter()
                .map(|c| (c.cluster_name.clone(), weft_xds_proto::pack(c))),
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
            let mut routes: HashMap<_, _> = s
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
