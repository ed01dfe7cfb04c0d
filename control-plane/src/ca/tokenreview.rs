//! Kubernetes mode: a workload proves its identity with its projected service-account token,
//! which the CA checks with the API server's TokenReview (`authentication.k8s.io/v1`), as istiod
//! does. This module builds the review and reads the API server's answer; the transport (an
//! HTTPS POST to `/apis/authentication.k8s.io/v1/tokenreviews`) is a [`ReviewApi`].
//!
//! There is no API server on the machines weft is tested on, so the answers are tested with
//! TokenReview responses in the API's documented shape (control-plane/tests/tokenreview/).

use std::future::Future;
use std::pin::Pin;

use serde_json::{Value, json};

use super::SpiffeId;

/// The audience Istio's agents request for CA tokens.
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    #[error("the API server rejected the token: {0}")]
    NotAuthenticated(String),
    #[error(
        "the token is for audiences {got:?}, not {want:?}; mount a token projected for {want:?}"
    )]
    WrongAudience { got: Vec<String>, want: Vec<String> },
    #[error(
        "the token belongs to {0:?}, not to a service account (system:serviceaccount:<ns>:<sa>)"
    )]
    NotServiceAccount(String),
    #[error("the TokenReview answer is not understood: {0}")]
    BadResponse(String),
    #[error("the TokenReview call failed: {0}")]
    Transport(String),
}

/// How the review reaches the API server.
pub trait ReviewApi: Send + Sync {
    fn review(
        &self,
        body: Value,
    ) -> Pin<Box<dyn Future<Output = Result<Value, String>> + Send + '_>>;
}

/// The TokenReview object to create.
pub fn review_request(token: &str, audiences: &[String]) -> Value {
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": audiences},
    })
}

/// Reads the API server's answer to [`review_request`].
pub fn identity_from_review(
    response: &Value,
    trust_domain: &str,
    audiences: &[String],
) -> Result<SpiffeId, ReviewError> {
    let kind = response.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind == "Status" {
        let msg = response
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("no message");
        return Err(ReviewError::Transport(format!(
            "API server answered Status: {msg}"
        )));
    }
    let status = response
        .get("status")
        .ok_or_else(|| ReviewError::BadResponse("no status".into()))?;
    if !status
        .get("authenticated")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        let reason = status
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("not authenticated");
        return Err(ReviewError::NotAuthenticated(reason.to_string()));
    }
    if !audiences.is_empty() {
        let got: Vec<String> = status
            .get("audiences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if !got.iter().any(|g| audiences.contains(g)) {
            return Err(ReviewError::WrongAudience {
                got,
                want: audiences.to_vec(),
            });
        }
    }
    let username = status
        .pointer("/user/username")
        .and_then(Value::as_str)
        .ok_or_else(|| ReviewError::BadResponse("status.user.username is missing".into()))?;
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| ReviewError::NotServiceAccount(username.to_string()))?;
    match rest.split_once(':') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains(':') => Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        }),
        _ => Err(ReviewError::NotServiceAccount(username.to_string())),
    }
}

/// Reviews `token` through `api`.
pub async fn review(
    api: &dyn ReviewApi,
    token: &str,
    trust_domain: &str,
    audiences: &[String],
) -> Result<SpiffeId, ReviewError> {
    let response = api
        .review(review_request(token, audiences))
        .await
        .map_err(ReviewError::Transport)?;
    identity_from_review(&response, trust_domain, audiences)
}
