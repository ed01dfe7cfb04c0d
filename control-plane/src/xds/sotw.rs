//! State-of-the-world ADS: every response carries the full set of a type's (subscribed)
//! resources. A response is sent on a proxy's first request for a type, when its subscription
//! changes, and when the type's content changes; ACKs and NACKs are recorded, never answered.

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use weft_xds_proto::envoy::config::core::v3::ControlPlane;
use weft_xds_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use weft_xds_proto::type_url;

use super::status::{Nack, now_ms};
use super::{XdsServer, is_wildcard_type};
use crate::generate::Generated;

#[derive(Default)]
struct Subscription {
    /// None: wildcard (everything of the type).
    names: Option<BTreeSet<String>>,
    sent_version: String,
    sent_nonce: String,
}

pub struct Connection {
    server: XdsServer,
    id: u64,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    node: Option<weft_xds_proto::envoy::config::core::v3::Node>,
    generated: Generated,
    subs: BTreeMap<String, Subscription>,
    nonce: u64,
}

impl Connection {
    pub fn new(
        server: XdsServer,
        peer: String,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> Connection {
        let id = server.status.open("sotw", peer);
        Connection {
            server,
            id,
            tx,
            node: None,
            generated: Generated::default(),
            subs: BTreeMap::new(),
            nonce: 0,
        }
    }

    pub async fn run(mut self, mut requests: Streaming<DiscoveryRequest>) {
        let mut mesh = self.server.mesh.clone();
        mesh.mark_unchanged();
        loop {
            tokio::select! {
                req = requests.message() => match req {
                    Ok(Some(req)) => {
                        if let Err(status) = self.on_request(req).await {
                            let _ = self.tx.send(Err(status)).await;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(connection = self.id, "ADS stream ended: {e}");
                        break;
                    }
                },
                changed = mesh.changed() => {
                    if changed.is_err() { break; }
                    if self.on_mesh_change().await.is_err() { break; }
                }
            }
        }
        self.server.status.close(self.id);
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        if self.node.is_none() {
            let node = req.node.clone().ok_or_else(|| {
                Status::invalid_argument("the first DiscoveryRequest must carry the node")
            })?;
            let (proxy, generated) = self.server.generate_for(&node)?;
            tracing::info!(connection = self.id, proxy = %proxy.id, workload = ?proxy.workload.as_ref().map(|w| &w.name), "proxy connected (SotW ADS)");
            self.server.status.set_proxy(self.id, &node.id);
            self.node = Some(node);
            self.generated = generated;
        }
        let type_url = req.type_url.clone();
        let short = type_url::short_name(&type_url);
        let sub = self.subs.entry(type_url.clone()).or_default();
        if let Some(err) = &req.error_detail {
            self.server.status.record_nack(
                self.id,
                short,
                Nack {
                    nonce: req.response_nonce.clone(),
                    version: req.version_info.clone(),
                    message: err.message.clone(),
                    at_unix_ms: now_ms(),
                },
            );
            return Ok(());
        }
        if !req.response_nonce.is_empty() && req.response_nonce != sub.sent_nonce {
            // An answer to a response we have since superseded: ignore it (xDS protocol rule).
            return Ok(());
        }
        if !req.response_nonce.is_empty() {
            self.server.status.update(self.id, short, |t| {
                t.acked_version = req.version_info.clone();
                t.acked_nonce = req.response_nonce.clone();
                t.acks += 1;
            });
        }
        let names: Option<BTreeSet<String>> =
            if req.resource_names.is_empty() && is_wildcard_type(&type_url) {
                None
            } else {
                Some(
                    req.resource_names
                        .iter()
                        .filter(|n| n.as_str() != "*")
                        .cloned()
                        .collect(),
                )
            };
        let initial = req.response_nonce.is_empty();
        let changed = sub.names != names;
        sub.names = names;
        if initial || changed {
            self.send(&type_url).await?;
        }
        Ok(())
    }

    async fn on_mesh_change(&mut self) -> Result<(), Status> {
        let Some(node) = &self.node else {
            return Ok(());
        };
        let (_, generated) = self.server.generate_for(node)?;
        self.generated = generated;
        // Push in Envoy's warming order. A pushed CDS makes clusters re-warm and wait for EDS,
        // and a pushed LDS waits for RDS, so the dependent type follows even if unchanged.
        let mut force_next = false;
        for t in type_url::PUSH_ORDER {
            let Some(sub) = self.subs.get(t) else {
                continue;
            };
            let current = self.generated.type_version(t, sub.names.as_ref());
            let dependent = force_next
                && (t == type_url::CLUSTER_LOAD_ASSIGNMENT || t == type_url::ROUTE_CONFIGURATION);
            let pushed = current != sub.sent_version || dependent;
            if pushed {
                self.send(t).await?;
            }
            force_next = pushed && (t == type_url::CLUSTER || t == type_url::LISTENER);
        }
        Ok(())
    }

    async fn send(&mut self, type_url: &str) -> Result<(), Status> {
        let Some(sub) = self.subs.get_mut(type_url) else {
            return Ok(());
        };
        let resources: Vec<_> = self
            .generated
            .of_type(type_url)
            .into_iter()
            .flatten()
            .filter(|(name, _)| sub.names.as_ref().is_none_or(|n| n.contains(*name)))
            .map(|(_, r)| r.any.clone())
            .collect();
        self.nonce += 1;
        let version = self.generated.type_version(type_url, sub.names.as_ref());
        let nonce = self.nonce.to_string();
        sub.sent_version = version.clone();
        sub.sent_nonce = nonce.clone();
        let count = resources.len();
        let resp = DiscoveryResponse {
            version_info: version.clone(),
            resources,
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            control_plane: Some(ControlPlane {
                identifier: self.server.identifier.clone(),
            }),
            ..Default::default()
        };
        self.server
            .status
            .update(self.id, type_url::short_name(type_url), |t| {
                t.sent_version = version;
                t.sent_nonce = nonce;
                t.sent_resources = count;
            });
        self.tx
            .send(Ok(resp))
            .await
            .map_err(|_| Status::cancelled("proxy went away"))
    }
}
