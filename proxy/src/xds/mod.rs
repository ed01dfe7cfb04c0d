//! The ADS client (state of the world): subscribes to CDS and LDS, then to the EDS and RDS names
//! those reference; validates each response as a whole and applies it, or NACKs it with an
//! `error_detail` naming the resource and field and keeps serving the previous config.
//! Reconnects with jittered exponential backoff; the last good config keeps serving meanwhile.

mod apply;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_xds_proto::envoy::config::core::v3::Node;
use weft_xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_xds_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use weft_xds_proto::pb::google::rpc::Status as RpcStatus;
use weft_xds_proto::type_url;

use crate::state::Proxy;

const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// Per-type subscription state that survives reconnects.
#[derive(Debug, Default, Clone)]
struct TypeState {
    /// Last accepted version (sent back in ACKs, NACKs and on reconnect).
    version: String,
    /// Nonce of the last response on the current stream.
    nonce: String,
    /// Subscribed names (empty: wildcard, for CDS/LDS).
    names: BTreeSet<String>,
    /// Whether a request for this type was sent on the current stream.
    requested: bool,
}

pub struct XdsClient {
    node: Node,
    uri: String,
    types: BTreeMap<&'static str, TypeState>,
    apply: apply::Applier,
    /// Responses received on the current stream.
    responses: u64,
    /// TLS to weftd's 15012, authenticated with the workload certificate.
    pub tls: Option<crate::identity::CaTls>,
}

impl XdsClient {
    pub fn new(proxy: Arc<Proxy>, node: Node, xds_address: &str) -> XdsClient {
        let uri = if xds_address.contains("://") {
            xds_address.to_string()
        } else {
            format!("http://{xds_address}")
        };
        XdsClient {
            apply: apply::Applier::new(proxy),
            node,
            uri,
            types: BTreeMap::new(),
            responses: 0,
            tls: None,
        }
    }

    /// Builds the bootstrap's static listeners and clusters; call before `run`.
    pub async fn apply_static(&mut self) -> Result<(), crate::Rejection> {
        self.apply.apply_static().await
    }

    /// Runs forever: connect, stream, and on failure back off and reconnect.
    pub async fn run(mut self) {
        let mut backoff = Backoff::default();
        loop {
            self.responses = 0;
            match self.stream_once().await {
                Ok(()) => {
                    tracing::warn!(xds = %self.uri, "control plane closed the ADS stream; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(xds = %self.uri, "ADS stream failed: {e:#}; keeping the last good config and reconnecting")
                }
            }
            // A stream that carried config was healthy: start the backoff over.
            if self.responses > 0 {
                backoff = Backoff::default();
            }
            tokio::time::sleep(backoff.next(fastrand::f64())).await;
        }
    }

    async fn stream_once(&mut self) -> anyhow::Result<()> {
        let endpoint = tonic::transport::Endpoint::from_shared(self.uri.clone())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30));
        if self.tls.is_some() && crate::identity::global().current().is_none() {
            anyhow::bail!(
                "waiting for the workload certificate to authenticate to the TLS xDS port"
            );
        }
        let address = self
            .uri
            .split_once("://")
            .map(|(_, a)| a)
            .unwrap_or(&self.uri)
            .to_string();
        let channel = crate::identity::channel(endpoint, &address, self.tls.as_ref(), true).await?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024);
        let (tx, rx) = mpsc::channel(64);
        for t in self.types.values_mut() {
            t.nonce.clear();
            t.requested = false;
        }
        // CDS before LDS, as Envoy: listeners refer to clusters.
        let mut first = true;
        for t in [type_url::CLUSTER, type_url::LISTENER] {
            let req = self.request(t, first);
            first = false;
            tx.send(req).await?;
        }
        // Resubscribe to what the last config referenced, so it refreshes on reconnect.
        for t in [
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            type_url::ROUTE_CONFIGURATION,
        ] {
            if self.types.get(t).is_some_and(|s| !s.names.is_empty()) {
                let req = self.request(t, false);
                tx.send(req).await?;
            }
        }
        let mut inbound = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        tracing::info!(xds = %self.uri, node = %self.node.id, "ADS stream established");
        while let Some(resp) = inbound.message().await? {
            self.responses += 1;
            for req in self.on_response(resp).await {
                tx.send(req).await?;
            }
        }
        Ok(())
    }

    fn request(&mut self, type_url: &'static str, with_node: bool) -> DiscoveryRequest {
        let t = self.types.entry(type_url).or_default();
        t.requested = true;
        DiscoveryRequest {
            version_info: t.version.clone(),
            node: with_node.then(|| self.node.clone()),
            resource_names: t.names.iter().cloned().collect(),
            type_url: type_url.to_string(),
            response_nonce: t.nonce.clone(),
            ..Default::default()
        }
    }

    /// Applies one response and returns the requests to send: its ACK or NACK, then any new
    /// subscriptions it implies (EDS names after CDS, RDS names after LDS).
    async fn on_response(&mut self, resp: DiscoveryResponse) -> Vec<DiscoveryRequest> {
        let Some(type_url) = known_type(&resp.type_url) else {
            tracing::warn!(r#type = %resp.type_url, "ignoring a response of a type never requested");
            return Vec::new();
        };
        let result = self.apply.apply(type_url, &resp).await;
        let mut out = Vec::new();
        let state = self.types.entry(type_url).or_default();
        state.nonce = resp.nonce.clone();
        match result {
            Ok(applied) => {
                state.version = resp.version_info.clone();
                tracing::info!(r#type = type_url::short_name(type_url), version = %resp.version_info, resources = resp.resources.len(), "applied");
                out.push(DiscoveryRequest {
                    version_info: state.version.clone(),
                    resource_names: state.names.iter().cloned().collect(),
                    type_url: type_url.to_string(),
                    response_nonce: resp.nonce.clone(),
                    ..Default::default()
                });
                if let Some((dependent, names)) = applied.subscribe {
                    let dep = self.types.entry(dependent).or_default();
                    if dep.names != names || !dep.requested {
                        dep.names = names;
                        out.push(self.request(dependent, false));
                    }
                }
            }
            Err(rejection) => {
                tracing::warn!(r#type = type_url::short_name(type_url), version = %resp.version_info, "rejected (NACK): {rejection}");
                out.push(DiscoveryRequest {
                    version_info: state.version.clone(),
                    resource_names: state.names.iter().cloned().collect(),
                    type_url: type_url.to_string(),
                    response_nonce: resp.nonce.clone(),
                    error_detail: Some(RpcStatus {
                        code: 3,
                        message: rejection.to_string(),
                        details: vec![],
                    }),
                    ..Default::default()
                });
            }
        }
        self.apply.update_readiness(
            &self
                .types
                .iter()
                .map(|(k, v)| (*k, !v.version.is_empty()))
                .collect(),
        );
        out
    }
}

/// Exponential backoff between reconnects, 250 ms doubling to 15 s, with jitter: each wait is
/// drawn from [half, all] of the current step so a fleet of proxies does not reconnect in
/// lockstep when the control plane comes back.
#[derive(Debug, Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The next wait; `unit` is a random number in [0, 1).
    fn next(&mut self, unit: f64) -> Duration {
        let step = BACKOFF_BASE
            .saturating_mul(1 << self.attempt.min(6))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        step.mul_f64(0.5 + unit.clamp(0.0, 1.0) * 0.5)
    }
}

fn known_type(t: &str) -> Option<&'static str> {
    type_url::PUSH_ORDER.into_iter().find(|k| *k == t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::default();
        let steps: Vec<Duration> = (0..10).map(|_| b.next(1.0)).collect();
        assert_eq!(steps[0], Duration::from_millis(250));
        assert_eq!(steps[1], Duration::from_millis(500));
        assert_eq!(steps[5], Duration::from_secs(8));
        assert!(steps[6..].iter().all(|d| *d == BACKOFF_MAX), "{steps:?}");
        let mut b = Backoff::default();
        assert_eq!(
            b.next(0.0),
            Duration::from_millis(125),
            "jitter never goes below half a step"
        );
    }
}
