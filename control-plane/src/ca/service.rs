//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: authenticate the caller from its
//! `authorization: Bearer <token>` metadata, then sign its CSR for exactly the identity that
//! credential proves. Every decision is written to the audit log (target `weftd::audit`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tonic::{Request, Response, Status};
use weft_xds_proto::ca::{CertificateService, IstioCertificateRequest, IstioCertificateResponse};

use super::token::TokenKey;
use super::tokenreview::{ReviewApi, review};
use super::{Authority, CaError, SpiffeId};

/// The CA service: the authority plus the ways a caller can prove who it is.
pub struct CaService {
    pub authority: Arc<RwLock<Authority>>,
    /// Universal mode: join tokens signed with this key.
    pub tokens: Option<TokenKey>,
    /// Kubernetes mode: service-account tokens reviewed by the API server.
    pub reviewer: Option<Arc<dyn ReviewApi>>,
    /// Audiences a reviewed token must carry.
    pub audiences: Vec<String>,
    pub signed: AtomicU64,
    pub refused: AtomicU64,
}

impl CaService {
    pub fn new(authority: Arc<RwLock<Authority>>, tokens: Option<TokenKey>) -> CaService {
        CaService {
            authority,
            tokens,
            reviewer: None,
            audiences: vec![super::tokenreview::ISTIO_CA_AUDIENCE.to_string()],
            signed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn trust_domain(&self) -> String {
        self.authority
            .read()
            .map(|a| a.options.trust_domain.clone())
            .unwrap_or_default()
    }

    async fn authenticate(&self, token: &str) -> Result<SpiffeId, Status> {
        let td = self.trust_domain();
        if TokenKey::is_join_token(token) {
            let Some(key) = &self.tokens else {
                return Err(Status::unauthenticated(
                    "join tokens are not accepted by this control plane",
                ));
            };
            return key
                .verify(token, &td)
                .map_err(|e| Status::unauthenticated(e.to_string()));
        }
        if let Some(api) = &self.reviewer {
            return review(api.as_ref(), token, &td, &self.audiences)
                .await
                .map_err(|e| Status::unauthenticated(e.to_string()));
        }
        Err(Status::unauthenticated(
            "the bearer token is not a weft join token (weft1.…), and this control plane does not review Kubernetes tokens",
        ))
    }

    fn refuse(&self, peer: &str, identity: Option<&SpiffeId>, status: Status) -> Status {
        self.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            target: "weftd::audit",
            peer,
            identity = identity.map(|i| i.to_string()).unwrap_or_default(),
            code = ?status.code(),
            reason = status.message(),
            "certificate request refused"
        );
        status
    }
}

fn bearer(req: &Request<IstioCertificateRequest>) -> Result<String, Status> {
    let Some(value) = req.metadata().get("authorization") else {
        return Err(Status::unauthenticated(
            "no credential: send `authorization: Bearer <token>` (a join token from `weftctl token create`, or a Kubernetes service-account token)",
        ));
    };
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization metadata is not ASCII"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated("the authorization metadata is not `Bearer <token>`")
        })?;
    Ok(token.to_string())
}

impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let token = bearer(&request).map_err(|s| self.refuse(&peer, None, s))?;
        let identity = self
            .authenticate(&token)
            .await
            .map_err(|s| self.refuse(&peer, None, s))?;
        let req = request.into_inner();
        let result = match self.authority.read() {
            Ok(ca) => ca.sign(&req.csr, &identity, req.validity_duration),
            Err(_) => Err(CaError::Signing("the CA state is poisoned".into())),
        };
        match result {
            Ok(cert_chain) => {
                self.signed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(target: "weftd::audit", peer, identity = %identity, ttl_s = req.validity_duration, "workload certificate signed");
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(e) => {
                let status = match &e {
                    CaError::WrongIdentity { .. } => Status::permission_denied(e.to_string()),
                    CaError::MalformedCsr(_)
                    | CaError::TtlTooLong { .. }
                    | CaError::NegativeTtl(_) => Status::invalid_argument(e.to_string()),
                    _ => Status::internal(e.to_string()),
                };
                Err(self.refuse(&peer, Some(&identity), status))
            }
        }
    }
}
