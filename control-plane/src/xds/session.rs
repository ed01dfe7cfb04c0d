//! What state-of-the-world and delta streams share: the driving loop (requests in, mesh changes
//! in), the proxy's identity and generated resources, nonces, and the status bookkeeping.

use std::future::Future;

use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use weft_xds_proto::envoy::config::core::v3::{ControlPlane, Node};
use weft_xds_proto::type_url;

use super::XdsServer;
use super::status::{Nack, now_ms};
use crate::generate::Generated;

pub struct Session<Resp> {
    pub server: XdsServer,
    pub id: u64,
    protocol: &'static str,
    tx: mpsc::Sender<Result<Resp, Status>>,
    node: Option<Node>,
    pub generated: std::sync::Arc<Generated>,
    nonce: u64,
    /// The identity the connection's client certificate proves (TLS port only): the node
    /// must belong to it.
    pub required_identity: Option<crate::ca::SpiffeId>,
}

impl<Resp> Session<Resp> {
    pub fn open(
        server: XdsServer,
        protocol: &'static str,
        peer: String,
        tx: mpsc::Sender<Result<Resp, Status>>,
    ) -> Self {
        let id = server.status.open(protocol, peer);
        Session {
            server,
            id,
            protocol,
            tx,
            node: None,
            generated: Default::default(),
            nonce: 0,
            required_identity: None,
        }
    }

    /// On the stream's first request: identifies the proxy from its node and generates its
    /// resources. Later requests need not carry the node.
    pub fn identify(&mut self, node: Option<&Node>) -> Result<(), Status> {
        if self.node.is_some() {
            return Ok(());
        }
        let node = node.ok_or_else(|| {
            Status::invalid_argument("the first request of an ADS stream must carry the node")
        })?;
        let (proxy, generated) = self.server.generate_for(node)?;
        if let Some(id) = &self.required_identity {
            let sa_differs = proxy
                .service_account
                .as_ref()
                .is_some_and(|sa| sa != &id.service_account);
            if proxy.namespace != id.namespace || sa_differs {
                tracing::warn!(target: "weftd::audit", proxy = %proxy.id, certificate = %id, "xDS refused: the node is not the certificate's workload");
                return Err(Status::permission_denied(format!(
                    "node {} (namespace {}, service account {}) is not the workload of the client certificate {id}",
                    proxy.id,
                    proxy.namespace,
                    proxy.service_account.as_deref().unwrap_or("unknown"),
                )));
            }
        }
        tracing::info!(
            connection = self.id,
            protocol = self.protocol,
            proxy = %proxy.id,
            workload = ?proxy.workload.as_ref().map(|w| &w.name),
            "proxy connected"
        );
        self.server.status.set_proxy(self.id, &node.id);
        self.node = Some(node.clone());
        self.generated = generated;
        Ok(())
    }

    /// Regenerates from the current mesh; false when the proxy has not identified itself yet.
    pub fn regenerate(&mut self) -> Result<bool, Status> {
        let Some(node) = &self.node else {
            return Ok(false);
        };
        self.generated = self.server.generate_for(node)?.1;
        Ok(true)
    }

    pub fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    pub fn control_plane(&self) -> Option<ControlPlane> {
        Some(ControlPlane {
            identifier: self.server.identifier.clone(),
        })
    }

    pub fn record_nack(&self, type_url: &str, nonce: &str, version: &str, message: &str) {
        let nack = Nack {
            nonce: nonce.into(),
            version: version.into(),
            message: message.into(),
            at_unix_ms: now_ms(),
        };
        self.server
            .status
            .record_nack(self.id, type_url::short_name(type_url), nack);
    }

    pub fn record_ack(&self, type_url: &str, nonce: &str, version: &str) {
        self.server
            .status
            .update(self.id, type_url::short_name(type_url), |t| {
                t.acked_version = version.to_string();
                t.acked_nonce = nonce.to_string();
                t.acks += 1;
            });
    }

    /// Sends a response and records what was sent.
    pub async fn send(
        &self,
        type_url: &str,
        version: String,
        nonce: String,
        resources: usize,
        resp: Resp,
    ) -> Result<(), Status> {
        self.server
            .status
            .update(self.id, type_url::short_name(type_url), |t| {
                t.sent_version = version;
                t.sent_nonce = nonce;
                t.sent_resources = resources;
            });
        self.tx
            .send(Ok(resp))
            .await
            .map_err(|_| Status::cancelled("proxy went away"))
    }
}

/// One ADS stream flavour (state of the world or delta).
pub trait Stream: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    fn session(&self) -> &Session<Self::Response>;
    fn on_request(&mut self, req: Self::Request)
    -> impl Future<Output = Result<(), Status>> + Send;
    fn on_mesh_change(&mut self) -> impl Future<Output = Result<(), Status>> + Send;
}

/// Serves one stream until the proxy or the server ends it.
pub async fn drive<S: Stream>(mut stream: S, mut requests: Streaming<S::Request>) {
    let mut mesh = stream.session().server.mesh.clone();
    mesh.mark_unchanged();
    loop {
        tokio::select! {
            req = requests.message() => match req {
                Ok(Some(req)) => {
                    if let Err(status) = stream.on_request(req).await {
                        let _ = stream.session().tx.send(Err(status)).await;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(connection = stream.session().id, "ADS stream ended: {e}");
                    break;
                }
            },
            changed = mesh.changed() => {
                if changed.is_err() || stream.on_mesh_change().await.is_err() {
                    break;
                }
            }
        }
    }
    let session = stream.session();
    session.server.status.close(session.id);
}
