//! The Istio-compatible certificate service, `istio.v1.auth.IstioCertificateService`: a workload
//! sends a PEM CSR (and proves who it is in the `authorization` metadata), the CA answers with a
//! PEM chain, leaf first and root last. Istio's agents, and weft-proxy, speak it to weftd.
//!
//! The two messages are declared here by hand with prost's derive (field numbers as Istio's API
//! defines them); the gRPC plumbing is tonic's generic unary client and server.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::{Body, BoxFuture, StdError, http};

/// The full gRPC path of `CreateCertificate`.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The gRPC service name.
pub const SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";

/// A certificate signing request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10 certificate request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds (the CA may shorten it).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Optional request metadata (Istio uses it for impersonation by trusted nodes).
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<crate::wkt::Struct>,
}

/// The signed chain: the workload certificate first, the root last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// What a CA implements. The request keeps its metadata (the caller's credential) and, when the
/// transport knows them, the peer's address and TLS certificates.
pub trait CertificateService: Send + Sync + 'static {
    fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> impl Future<Output = Result<tonic::Response<IstioCertificateResponse>, tonic::Status>> + Send;
}

/// The tonic service wrapping a [`CertificateService`], to add to a `tonic` router.
pub struct CertificateServer<T> {
    inner: Arc<T>,
}

impl<T> CertificateServer<T> {
    pub fn new(inner: Arc<T>) -> Self {
        CertificateServer { inner }
    }
}

impl<T> Clone for CertificateServer<T> {
    fn clone(&self) -> Self {
        CertificateServer {
            inner: self.inner.clone(),
        }
    }
}

impl<T> tonic::server::NamedService for CertificateServer<T> {
    const NAME: &'static str = SERVICE_NAME;
}

struct Unary<T>(Arc<T>);

impl<T: CertificateService> tonic::server::UnaryService<IstioCertificateRequest> for Unary<T> {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<tonic::Response<IstioCertificateResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.create_certificate(request).await })
    }
}

impl<T, B> tonic::codegen::Service<http::Request<B>> for CertificateServer<T>
where
    T: CertificateService,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CREATE_CERTIFICATE_PATH {
            return Box::pin(async {
                Ok(
                    tonic::Status::unimplemented("no such method on the certificate service")
                        .into_http(),
                )
            });
        }
        let method = Unary(self.inner.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                // A CSR is a few hundred bytes; nothing legitimate comes near this.
                .apply_max_message_size_config(Some(64 * 1024), None);
            Ok(grpc.unary(method, req).await)
        })
    }
}

/// Sends one `CreateCertificate` call on `channel`.
pub async fn create_certificate(
    channel: tonic::transport::Channel,
    request: tonic::Request<IstioCertificateRequest>,
) -> Result<IstioCertificateResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("certificate service: {e}")))?;
    let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE_PATH);
    let codec: tonic_prost::ProstCodec<IstioCertificateRequest, IstioCertificateResponse> =
        tonic_prost::ProstCodec::default();
    let response = grpc.unary(request, path, codec).await?;
    Ok(response.into_inner())
}
