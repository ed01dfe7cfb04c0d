//! The TCP proxy filter: each downstream connection is joined to one upstream endpoint of the
//! cluster (weighted clusters supported) and bytes are copied both ways until either side closes.

use std::sync::Arc;

use weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy as XdsTcpProxy, tcp_proxy,
};

use crate::Rejection;
use crate::http::router::ClusterChoice;
use crate::state::Proxy;
use crate::stats::{GaugeGuard, TcpStats};

#[derive(Debug)]
pub struct TcpProxy {
    /// `idle_timeout`: the connection is closed after this long without a byte either way.
    pub idle_timeout: Option<std::time::Duration>,
    pub stat_prefix: String,
    pub cluster: ClusterChoice,
    pub stats: Arc<TcpStats>,
}

impl TcpProxy {
    pub fn from_xds(listener: &str, t: &XdsTcpProxy) -> Result<TcpProxy, Rejection> {
        let reject = |field: &str, reason: &str| {
            Rejection::new("Listener", listener, format!("tcp_proxy.{field}"), reason)
        };
        let cluster = match &t.cluster_specifier {
            Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => ClusterChoice::Single(c.clone()),
            Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                let clusters: Vec<(String, u32)> = w
                    .clusters
                    .iter()
                    .map(|c| (c.name.clone(), c.weight))
                    .collect();
                let total = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
                if total == 0 {
                    return Err(reject(
                        "weighted_clusters",
                        "the sum of weights must be greater than 0",
                    ));
                }
                ClusterChoice::Weighted { clusters, total }
            }
            None => return Err(reject("cluster_specifier", "a cluster is required")),
        };
        for (field, set) in [
            ("tunneling_config", t.tunneling_config.is_some()),
            ("metadata_match", t.metadata_match.is_some()),
            ("max_connect_attempts", t.max_connect_attempts.is_some()),
            ("access_log", !t.access_log.is_empty()),
        ] {
            if set {
                return Err(reject(field, "not supported by this weft-proxy version"));
            }
        }
        Ok(TcpProxy {
            // Envoy's default: an hour without a byte either way; zero is never.
            idle_timeout: match &t.idle_timeout {
                None => Some(std::time::Duration::from_secs(3600)),
                Some(d) => Some(crate::duration(d)).filter(|d| !d.is_zero()),
            },
            stat_prefix: t.stat_prefix.clone(),
            cluster,
            stats: Arc::new(TcpStats::default()),
        })
    }

    pub async fn serve<S>(
        &self,
        proxy: &Proxy,
        mut downstream: S,
        down: &crate::listener::Downstream,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.stats.downstream_cx_total.inc();
        let _active = GaugeGuard::new(&self.stats.downstream_cx_active);
        let endpoint = {
            let snapshot = proxy.snapshot();
            let Some(cluster) = snapshot.clusters.get(self.cluster.pick()) else {
                tracing::debug!(stat_prefix = %self.stat_prefix, "tcp proxy: cluster not found");
                return;
            };
            let Some(endpoint) = cluster.pick(down.local, &[], 1, None) else {
                cluster.stats.upstream_cx_none_healthy.inc();
                return;
            };
            cluster.stats.upstream_cx_total.inc();
            (endpoint, cluster.clone())
        };
        let (endpoint, cluster) = endpoint;
        let mut upstream = match endpoint.pool.connect().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(stat_prefix = %self.stat_prefix, "tcp proxy: {e}");
                cluster.stats.upstream_cx_connect_fail.inc();
                return;
            }
        };
        let _cx = GaugeGuard::new(&endpoint.pool.stats.cx_active);
        let spliced = crate::idle::splice(&mut downstream, &mut upstream, self.idle_timeout).await;
        self.stats.downstream_cx_rx_bytes_total.add(spliced.a_read);
        self.stats.downstream_cx_tx_bytes_total.add(spliced.b_read);
        if spliced.idle {
            self.stats.idle_timeout.inc();
        }
    }
}
