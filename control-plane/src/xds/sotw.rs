//! State-of-the-world ADS. A response is sent on a proxy's first request for a type, when its
//! subscription changes, and when the type's content changes; ACKs and NACKs are recorded,
//! never answered. Listener and Cluster responses always carry the full set (the protocol
//! requires it); EDS and RDS pushes caused by a change of their own carry only the resources that
//! changed, as the protocol allows for those types (a proxy keeps the others), so an endpoint
//! change costs one load assignment per proxy rather than all of them.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use tonic::Status;
use weft_xds_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use weft_xds_proto::type_url;

use super::is_wildcard_type;
use super::session::{Session, Stream};

#[derive(Default)]
struct Subscription {
    /// None: wildcard (everything of the type).
    names: Option<BTreeSet<String>>,
    sent_version: String,
    sent_nonce: String,
    /// (name, content) keys of the resources last sent, for EDS and RDS partial pushes.
    sent: HashSet<u64>,
}

pub struct Sotw {
    session: Session<DiscoveryResponse>,
    subs: BTreeMap<String, Subscription>,
}

impl Sotw {
    pub fn new(session: Session<DiscoveryResponse>) -> Sotw {
        Sotw {
            session,
            subs: BTreeMap::new(),
        }
    }

    /// Sends the type's subscribed resources; with `partial` (EDS and RDS only), just those
    /// whose version differs from what this proxy was last sent.
    async fn send(&mut self, type_url: &str, partial: bool) -> Result<(), Status> {
        let Some(sub) = self.subs.get_mut(type_url) else {
            return Ok(());
        };
        let track = !is_wildcard_type(type_url);
        let partial = partial && track;
        let generated = &self.session.generated;
        let mut resources = Vec::new();
        let mut sent = HashSet::new();
        for (name, r) in generated.of_type(type_url).into_iter().flatten() {
            if sub.names.as_ref().is_some_and(|n| !n.contains(name)) {
                continue;
            }
            if !(partial && sub.sent.contains(&r.key())) {
                resources.push(r.any.clone());
            }
            if track {
                sent.insert(r.key());
            }
        }
        sub.sent = sent;
        let version = generated.type_version(type_url, sub.names.as_ref());
        let nonce = self.session.next_nonce();
        sub.sent_version = version.clone();
        sub.sent_nonce = nonce.clone();
        let count = resources.len();
        let resp = DiscoveryResponse {
            version_info: version.clone(),
            resources,
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            control_plane: self.session.control_plane(),
            ..Default::default()
        };
        self.session
            .send(type_url, version, nonce, count, resp)
            .await
    }
}

impl Stream for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn session(&self) -> &Session<DiscoveryResponse> {
        &self.session
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        self.session.identify(req.node.as_ref())?;
        let type_url = req.type_url.clone();
        let sub = self.subs.entry(type_url.clone()).or_default();
        if let Some(err) = &req.error_detail {
            // The proxy kept its previous resources: the next push of this type is complete.
            sub.sent.clear();
            self.session.record_nack(
                &type_url,
                &req.response_nonce,
                &req.version_info,
                &err.message,
            );
            return Ok(());
        }
        if !req.response_nonce.is_empty() && req.response_nonce != sub.sent_nonce {
            // An answer to a response we have since superseded: ignore it (xDS protocol rule).
            return Ok(());
        }
        if !req.response_nonce.is_empty() {
            self.session
                .record_ack(&type_url, &req.response_nonce, &req.version_info);
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
            self.send(&type_url, false).await?;
        }
        Ok(())
    }

    async fn on_mesh_change(&mut self) -> Result<(), Status> {
        if !self.session.regenerate()? {
            return Ok(());
        }
        // Push in Envoy's warming order. A pushed CDS makes clusters re-warm and wait for EDS,
        // and a pushed LDS waits for RDS, so the dependent type follows even if unchanged.
        let mut force_next = false;
        for t in type_url::PUSH_ORDER {
            let Some(sub) = self.subs.get(t) else {
                continue;
            };
            let current = self.session.generated.type_version(t, sub.names.as_ref());
            let dependent = force_next
                && (t == type_url::CLUSTER_LOAD_ASSIGNMENT || t == type_url::ROUTE_CONFIGURATION);
            let pushed = current != sub.sent_version || dependent;
            if pushed {
                // A re-warming dependent gets everything; a change of its own, what changed.
                self.send(t, !dependent).await?;
            }
            force_next = pushed && (t == type_url::CLUSTER || t == type_url::LISTENER);
        }
        Ok(())
    }
}
