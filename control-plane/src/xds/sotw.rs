//! State-of-the-world ADS. A response is sent on a proxy's first request for a type, when its
//! subscription changes, and when the type's content changes; ACKs and NACKs are recorded,
//! never answered. Listener and Cluster responses always carry the full set (the protocol
//! requires it); EDS and RDS pushes caused by a change of their own carry only the resources that
//! changed, as the protocol allows for those types (a proxy keeps the others), so an endpoint
//! change costs one load assignment per proxy rather than all of them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tonic::Status;
use weft_xds_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use weft_xds_proto::type_url;

use super::is_wildcard_type;
use super::session::{Session, Stream};
use crate::generate::Resources;

#[derive(Default)]
struct Subscription {
    /// None: wildcard (everything of the type).
    names: Option<BTreeSet<String>>,
    sent_version: String,
    sent_nonce: String,
    /// The type's resources as of the last response: the proxy holds these (those of them it
    /// subscribed to). None when it may hold something else (nothing sent yet, or a NACK), so
    /// that the next response is complete.
    seen: Option<Resources>,
    /// The version (`Generated::type_version`) of `seen` for `names`, as a number: a change of
    /// a few resources updates it without a pass over all of them.
    sum: u64,
}

/// What a push of one type carries.
enum Push {
    /// Every subscribed resource, with the type's version computed afresh.
    Complete,
    /// Only these (changed) resources, and the version that results.
    Changed(Vec<weft_xds_proto::wkt::Any>, u64),
}

pub struct Sotw {
    session: Session<DiscoveryResponse>,
    subs: BTreeMap<String, Subscription>,
}

/// The resources of `now` that differ from `before` among the subscribed `names` (EDS and
/// RDS), and the version sum that results from `sum`. None when the two maps do not hold the
/// same names: the caller then sends a complete response.
fn changed_resources(
    before: &Resources,
    now: &Resources,
    names: &BTreeSet<String>,
    mut sum: u64,
) -> Option<(Vec<weft_xds_proto::wkt::Any>, u64)> {
    let mut out = Vec::new();
    for (name, old, new) in super::changed(before, now)? {
        if names.contains(name) {
            sum = sum.wrapping_sub(old.key()).wrapping_add(new.key());
            out.push(new.any.clone());
        }
    }
    Some((out, sum))
}

impl Sotw {
    pub fn new(session: Session<DiscoveryResponse>) -> Sotw {
        Sotw {
            session,
            subs: BTreeMap::new(),
        }
    }

    /// Whether the type's version for this subscription differs from the one last sent.
    fn changed_version(&self, type_url: &str) -> bool {
        self.subs.get(type_url).is_some_and(|sub| {
            let sum = self
                .session
                .generated
                .type_sum(type_url, sub.names.as_ref());
            format!("{sum:016x}") != sub.sent_version
        })
    }

    /// Sends the type's subscribed resources, or with `Push::Changed` only those given.
    async fn send(&mut self, type_url: &str, push: Push) -> Result<(), Status> {
        let Some(sub) = self.subs.get_mut(type_url) else {
            return Ok(());
        };
        let generated = &self.session.generated;
        let current = generated.shared_of_type(type_url);
        let (resources, sum) = match push {
            Push::Changed(resources, sum) => (resources, sum),
            Push::Complete => {
                let resources = current
                    .iter()
                    .filter(|(name, _)| sub.names.as_ref().is_none_or(|n| n.contains(*name)))
                    .map(|(_, r)| r.any.clone())
                    .collect();
                (resources, generated.type_sum(type_url, sub.names.as_ref()))
            }
        };
        let version = format!("{sum:016x}");
        sub.seen = Some(current);
        sub.sum = sum;
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
            sub.seen = None;
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
            self.send(&type_url, Push::Complete).await?;
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
            let dependent = force_next
                && (t == type_url::CLUSTER_LOAD_ASSIGNMENT || t == type_url::ROUTE_CONFIGURATION);
            let now = self.session.generated.shared_of_type(t);
            let push = match &sub.seen {
                // Same resources as last sent (shared between generations): nothing changed.
                Some(seen) if Arc::ptr_eq(seen, &now) && !dependent => None,
                // A change of its own (EDS, RDS): only what changed.
                Some(seen) if !dependent && !is_wildcard_type(t) => {
                    let names = sub
                        .names
                        .as_ref()
                        .expect("EDS and RDS name their resources");
                    match changed_resources(seen, &now, names, sub.sum) {
                        // Same subscribed content: what changed is not subscribed (or was
                        // re-encoded to the same bytes).
                        Some((_, sum)) if sum == sub.sum => None,
                        Some((changed, sum)) => Some(Push::Changed(changed, sum)),
                        None => self.changed_version(t).then_some(Push::Complete),
                    }
                }
                _ if dependent => Some(Push::Complete),
                _ => self.changed_version(t).then_some(Push::Complete),
            };
            let pushed = push.is_some();
            if let Some(push) = push {
                self.send(t, push).await?;
            }
            force_next = pushed && (t == type_url::CLUSTER || t == type_url::LISTENER);
        }
        Ok(())
    }
}
