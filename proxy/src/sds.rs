//! The agent's SDS server: hands the workload certificate (`default`) and the trust bundle
//! (`ROOTCA`) to a proxy next to it over a Unix socket, as Istio's agent does for Envoy
//! (`sds-grpc` in the bootstrap). weft-proxy reads these secrets in-process; this server is for
//! a stock Envoy run with `weft-proxy --agent-only --sds-socket PATH`. Renewed certificates are
//! pushed on the open streams.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_xds_proto::envoy::config::core::v3::{DataSource, data_source};
use weft_xds_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use weft_xds_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use weft_xds_proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};

use crate::identity::{Identity, Issued};
use crate::tls::{SDS_DEFAULT, SDS_ROOTCA};

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(s.as_bytes().to_vec())),
        ..Default::default()
    })
}

/// The secret called `name`, from the current certificate.
pub fn secret(name: &str, issued: &Issued) -> Option<Secret> {
    let r#type = match name {
        SDS_DEFAULT => secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&issued.chain_pem),
            private_key: inline(&issued.key.serialize_pem()),
            ..Default::default()
        }),
        SDS_ROOTCA => secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: inline(&issued.roots_pem),
            ..Default::default()
        }),
        _ => return None,
    };
    Some(Secret {
        name: name.to_string(),
        r#type: Some(r#type),
    })
}

pub struct Sds {
    identity: Arc<Identity>,
}

impl Sds {
    pub fn new(identity: Arc<Identity>) -> SecretDiscoveryServiceServer<Sds> {
        SecretDiscoveryServiceServer::new(Sds { identity })
    }
}

type Responses =
    Pin<Box<dyn futures::Stream<Item = Result<DiscoveryResponse, tonic::Status>> + Send>>;
type DeltaResponses =
    Pin<Box<dyn futures::Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = Responses;
    type DeltaSecretsStream = DeltaResponses;

    async fn stream_secrets(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Responses>, tonic::Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let identity = self.identity.clone();
        tokio::spawn(async move {
            let mut changed = identity.subscribe();
            let mut names: BTreeSet<String> = BTreeSet::new();
            let mut sent_generation = None;
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    req = requests.message() => {
                        let Ok(Some(req)) = req else { return };
                        if let Some(e) = &req.error_detail {
                            tracing::warn!(names = ?req.resource_names, "the proxy rejected a secret: {}", e.message);
                            continue;
                        }
                        let wanted: BTreeSet<String> = req.resource_names.iter().cloned().collect();
                        if wanted == names && !req.response_nonce.is_empty() {
                            continue; // an ACK
                        }
                        names = wanted;
                        sent_generation = None;
                    }
                    r = changed.changed() => {
                        if r.is_err() { return; }
                    }
                }
                let generation = *changed.borrow_and_update();
                let Some(issued) = identity.current() else {
                    continue; // nothing to send until the CA has answered
                };
                if sent_generation == Some(generation) || names.is_empty() {
                    continue;
                }
                let resources = names
                    .iter()
                    .filter_map(|n| secret(n, &issued))
                    .map(|s| weft_xds_proto::pack(&s))
                    .collect();
                nonce += 1;
                let response = DiscoveryResponse {
                    version_info: generation.to_string(),
                    resources,
                    type_url: SECRET_TYPE.into(),
                    nonce: nonce.to_string(),
                    ..Default::default()
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
                sent_generation = Some(generation);
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_secrets(
        &self,
        _request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<DeltaResponses>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "delta SDS is not served; use api_type GRPC",
        ))
    }

    async fn fetch_secrets(
        &self,
        request: tonic::Request<DiscoveryRequest>,
    ) -> Result<tonic::Response<DiscoveryResponse>, tonic::Status> {
        let req = request.into_inner();
        let Some(issued) = self.identity.current() else {
            return Err(tonic::Status::unavailable(
                "the workload certificate has not been issued yet",
            ));
        };
        let resources = req
            .resource_names
            .iter()
            .filter_map(|n| secret(n, &issued))
            .map(|s| weft_xds_proto::pack(&s))
            .collect();
        Ok(tonic::Response::new(DiscoveryResponse {
            version_info: self
                .identity
                .generation
                .load(std::sync::atomic::Ordering::Relaxed)
                .to_string(),
            resources,
            type_url: SECRET_TYPE.into(),
            ..Default::default()
        }))
    }
}

/// Serves SDS on a Unix socket at `path` (replacing a stale socket file).
pub async fn serve(path: std::path::PathBuf, identity: Arc<Identity>) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| anyhow::anyhow!("binding the SDS socket {}: {e}", path.display()))?;
    tracing::info!(socket = %path.display(), "SDS server listening");
    tonic::transport::Server::builder()
        .add_service(Sds::new(identity))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await?;
    Ok(())
}
