//! Delta (incremental) ADS: the proxy subscribes and unsubscribes by name; a response carries
//! only resources whose version changed since the proxy last got them, plus the names removed.

use std::collections::{BTreeMap, BTreeSet};

use tonic::Status;
use weft_xds_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use weft_xds_proto::type_url;

use super::is_wildcard_type;
use super::session::{Session, Stream};

#[derive(Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the proxy holds: name -> version.
    sent: BTreeMap<String, String>,
    pending_nonce: String,
    pending_version: String,
    /// The type's resources `sent` was last brought up to date with.
    seen: Option<crate::generate::Resources>,
}

impl Subscription {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

pub struct Delta {
    session: Session<DeltaDiscoveryResponse>,
    subs: BTreeMap<String, Subscription>,
}

impl Delta {
    pub fn new(session: Session<DeltaDiscoveryResponse>) -> Delta {
        Delta {
            session,
            subs: BTreeMap::new(),
        }
    }

    /// Sends what changed for `type_url`; with `always`, sends even an empty response (a proxy
    /// waits for one answer to each new subscription before it finishes initializing).
    async fn send_diff(&mut self, type_url: &str, always: bool) -> Result<(), Status> {
        let Some(sub) = self.subs.get_mut(type_url) else {
            return Ok(());
        };
        let current = self.session.generated.shared_of_type(type_url);
        let to_resource = |name: &str, r: &crate::generate::Resource| Resource {
            name: name.to_string(),
            version: r.version.clone(),
            resource: Some(r.any.clone()),
            ..Default::default()
        };
        // Since the last diff, the same names with a few changed (an endpoint change): only
        // those can differ from what the proxy holds, and nothing was removed.
        let few = match &sub.seen {
            Some(seen) if !always => super::changed(seen, &current),
            _ => None,
        };
        let (resources, removed): (Vec<Resource>, Vec<String>) = match few {
            Some(changed) => (
                changed
                    .into_iter()
                    .filter(|(n, _, r)| sub.wants(n) && sub.sent.get(*n) != Some(&r.version))
                    .map(|(n, _, r)| to_resource(n, r))
                    .collect(),
                Vec::new(),
            ),
            None => (
                current
                    .iter()
                    .filter(|(n, r)| sub.wants(n) && sub.sent.get(*n) != Some(&r.version))
                    .map(|(n, r)| to_resource(n, r))
                    .collect(),
                sub.sent
                    .keys()
                    .filter(|n| !current.contains_key(*n) || !sub.wants(n))
                    .cloned()
                    .collect(),
            ),
        };
        sub.seen = Some(current);
        if resources.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }
        for r in &resources {
            sub.sent.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            sub.sent.remove(n);
        }
        let nonce = self.session.next_nonce();
        let version = self.session.generated.type_version(type_url, None);
        sub.pending_nonce = nonce.clone();
        sub.pending_version = version.clone();
        let count = sub.sent.len();
        let resp = DeltaDiscoveryResponse {
            system_version_info: version.clone(),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce: nonce.clone(),
            control_plane: self.session.control_plane(),
            ..Default::default()
        };
        self.session
            .send(type_url, version, nonce, count, resp)
            .await
    }
}

impl Stream for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn session(&self) -> &Session<DeltaDiscoveryResponse> {
        &self.session
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        self.session.identify(req.node.as_ref())?;
        let type_url = req.type_url.clone();
        let first = !self.subs.contains_key(&type_url);
        let sub = self.subs.entry(type_url.clone()).or_default();
        if let Some(err) = &req.error_detail {
            self.session
                .record_nack(&type_url, &req.response_nonce, "", &err.message);
            return Ok(());
        }
        if !req.response_nonce.is_empty() && req.response_nonce == sub.pending_nonce {
            self.session
                .record_ack(&type_url, &req.response_nonce, &sub.pending_version);
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
        if !self.session.regenerate()? {
            return Ok(());
        }
        for t in type_url::PUSH_ORDER {
            if self.subs.contains_key(t) {
                self.send_diff(t, false).await?;
            }
        }
        Ok(())
    }
}
