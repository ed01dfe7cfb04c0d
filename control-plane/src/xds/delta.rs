//! Delta (incremental) ADS: the proxy subscribes and unsubscribes by name; a response carries
//! only resources whose version changed since the proxy last got them, plus the names removed.

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use weft_xds_proto::envoy::config::core::v3::ControlPlane;
use weft_xds_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use weft_xds_proto::type_url;

use super::status::{Nack, now_ms};
use super::{XdsServer, is_wildcard_type};
use crate::generate::Generated;

#[derive(Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the proxy holds: name -> version.
    sent: BTreeMap<String, String>,
    pending_nonce: String,
}

impl Subscription {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

pub struct Connection {
    server: XdsServer,
    id: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    node: Option<weft_xds_proto::envoy::config::core::v3::Node>,
    generated: Generated,
    subs: BTreeMap<String, Subscription>,
    nonce: u64,
}

impl Connection {
    pub fn new(
        server: XdsServer,
        peer: String,
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> Connection {
        let id = server.status.open("delta", peer);
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

    pub async fn run(mut self, mut requests: Streaming<DeltaDiscoveryRequest>) {
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
                        tracing::debug!(connection = self.id, "delta ADS stream ended: {e}");
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

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        if self.node.is_none() {
            let node = req.node.clone().ok_or_else(|| {
                Status::invalid_argument("the first DeltaDiscoveryRequest must carry the node")
            })?;
            let (proxy, generated) = self.server.generate_for(&node)?;
            tracing::info!(connection = self.id, proxy = %proxy.id, "proxy connected (delta ADS)");
            self.server.status.set_proxy(self.id, &node.id);
            self.node = Some(node);
            self.generated = generated;
        }
        let type_url = req.type_url.clone();
        let short = type_url::short_name(&type_url);
        let first = !self.subs.contains_key(&type_url);
        let sub = self.subs.entry(type_url.clone()).or_default();
        if let Some(err) = &req.error_detail {
            self.server.status.record_nack(
                self.id,
                short,
                Nack {
                    nonce: req.response_nonce.clone(),
                    version: String::new(),
                    message: err.message.clone(),
                    at_unix_ms: now_ms(),
                },
            );
            return Ok(());
        }
        if !req.response_nonce.is_empty() && req.response_nonce == sub.pending_nonce {
            self.server.status.update(self.id, short, |t| {
                t.acked_nonce = req.response_nonce.clone();
                t.acked_version = t.sent_version.clone();
                t.acks += 1;
            });
        }
        if first {
            sub.wildcard = is_wildcard_type(&type_url) && req.resource_names_subscribe.is_empty();
            // Resources the proxy already holds from an earlier stream need not be resent.
            sub.sent.extend(req.initial_resource_versions.clone());
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                sub.wildcard = true;
            } else {
                sub.names.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(name);
            }
            sub.sent.remove(name);
        }
        let subscribed_something = first || !req.resource_names_subscribe.is_empty();
        self.send_diff(&type_url, subscribed_something).await
    }

    async fn on_mesh_change(&mut self) -> Result<(), Status> {
        let Some(node) = &self.node else {
            return Ok(());
        };
        let (_, generated) = self.server.generate_for(node)?;
        self.generated = generated;
        for t in type_url::PUSH_ORDER {
            if self.subs.contains_key(t) {
                self.send_diff(t, false).await?;
            }
        }
        Ok(())
    }

    /// Sends what changed for `type_url`; with `always`, sends even an empty response (a proxy
    /// waits for one answer to each new subscription before it finishes initializing).
    async fn send_diff(&mut self, type_url: &str, always: bool) -> Result<(), Status> {
        let Some(sub) = self.subs.get_mut(type_url) else {
            return Ok(());
        };
        let empty = BTreeMap::new();
        let current = self.generated.of_type(type_url).unwrap_or(&empty);
        let mut resources = Vec::new();
        for (name, r) in current.iter().filter(|(n, _)| sub.wants(n)) {
            if sub.sent.get(name) != Some(&r.version) {
                resources.push(Resource {
                    name: name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.any.clone()),
                    ..Default::default()
                });
            }
        }
        let removed: Vec<String> = sub
            .sent
            .keys()
            .filter(|n| !current.contains_key(*n) || !sub.wants(n))
            .cloned()
            .collect();
        if resources.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }
        for r in &resources {
            sub.sent.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            sub.sent.remove(n);
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        sub.pending_nonce = nonce.clone();
        let version = self.generated.type_version(type_url, None);
        let count = sub.sent.len();
        let resp = DeltaDiscoveryResponse {
            system_version_info: version.clone(),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
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
