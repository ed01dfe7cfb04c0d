//! Who is asking: an Envoy/weft-proxy node identified the way Istio's sidecars identify
//! themselves, `sidecar~<ip>~<workload-name>.<namespace>~<namespace>.svc.cluster.local`, plus the
//! Istio node metadata (NAMESPACE, LABELS, SERVICE_ACCOUNT, WORKLOAD_NAME).

use std::net::IpAddr;

use weft_xds_proto::envoy::config::core::v3::Node;
use weft_xds_proto::wkt::{Struct, value::Kind as ValueKind};

use crate::config::Labels;
use crate::model::{Mesh, Workload};

#[derive(Debug, Clone, PartialEq)]
pub struct ProxyNode {
    pub id: String,
    /// `router~...`: a gateway (Istio's ingress/egress gateway node type) rather than a sidecar.
    pub router: bool,
    pub ip: Option<IpAddr>,
    pub workload_name: String,
    pub namespace: String,
    pub labels: Labels,
    pub service_account: Option<String>,
    /// The WorkloadEntry this proxy was matched to, if any.
    pub workload: Option<Workload>,
    /// How its workload's traffic reaches it (Istio's `INTERCEPTION_MODE` node metadata).
    pub interception: Interception,
}

/// Istio's `INTERCEPTION_MODE`: without it (universal mode's default) the workload calls the
/// sidecar's bound listeners itself; REDIRECT means iptables sends its outbound TCP to port
/// 15001 (`weft-proxy iptables`), so the proxy gets Istio's captured listeners.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Interception {
    #[default]
    None,
    Redirect,
    /// A mode weft does not set up (TPROXY): generated as None, with a warning.
    Unsupported(String),
}

impl Interception {
    fn from_metadata(mode: Option<String>) -> Interception {
        match mode.as_deref() {
            None | Some("NONE") => Interception::None,
            Some("REDIRECT") => Interception::Redirect,
            Some(other) => Interception::Unsupported(other.to_string()),
        }
    }
}

/// What generation reads of a proxy. Proxies with equal keys (replicas of one deployment) get
/// identical xDS, so a mesh snapshot generates once per key and shares the result. Anything new
/// that `generate` reads from a `ProxyNode` must be added here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxyClass {
    pub router: bool,
    /// A gateway binds its listeners to its own address: part of its class.
    pub ip: Option<IpAddr>,
    pub namespace: String,
    pub labels: Vec<(String, String)>,
    pub service_account: Option<String>,
    pub interception: Interception,
}

impl ProxyNode {
    pub fn class(&self) -> ProxyClass {
        ProxyClass {
            router: self.router,
            ip: if self.router { self.ip } else { None },
            namespace: self.namespace.clone(),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            service_account: self.service_account.clone(),
            interception: self.interception.clone(),
        }
    }

    /// Whether iptables redirects this sidecar's traffic to it (gateways are not captured:
    /// they listen on their own ports).
    pub fn captured(&self) -> bool {
        self.interception == Interception::Redirect && !self.router
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "node id {0:?} is not of the form sidecar~<ip>~<workload>.<namespace>~<namespace>.svc.cluster.local (Istio's sidecar node id; router~... for a gateway)"
    )]
    BadId(String),
    #[error("node id {id:?}: {ip:?} is not an IP address")]
    BadIp { id: String, ip: String },
}

fn metadata_str(md: Option<&Struct>, key: &str) -> Option<String> {
    match md?.fields.get(key)?.kind.as_ref()? {
        ValueKind::StringValue(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn metadata_labels(md: Option<&Struct>) -> Labels {
    let mut labels = Labels::new();
    if let Some(ValueKind::StructValue(s)) = md
        .and_then(|m| m.fields.get("LABELS"))
        .and_then(|v| v.kind.as_ref())
    {
        for (k, v) in &s.fields {
            if let Some(ValueKind::StringValue(v)) = &v.kind {
                labels.insert(k.clone(), v.clone());
            }
        }
    }
    labels
}

impl ProxyNode {
    /// Parses the node and matches it to its workload in `mesh` (by name, then by address).
    pub fn identify(node: &Node, mesh: &Mesh) -> Result<ProxyNode, NodeError> {
        let parts: Vec<&str> = node.id.split('~').collect();
        let [kind, ip, workload, domain] = parts.as_slice() else {
            return Err(NodeError::BadId(node.id.clone()));
        };
        let router = match *kind {
            "sidecar" => false,
            "router" => true,
            _ => return Err(NodeError::BadId(node.id.clone())),
        };
        let ip: Option<IpAddr> = if ip.is_empty() {
            None
        } else {
            Some(ip.parse().map_err(|_| NodeError::BadIp {
                id: node.id.clone(),
                ip: ip.to_string(),
            })?)
        };
        let md = node.metadata.as_ref();
        let (id_name, id_ns) = match workload.split_once('.') {
            Some((n, ns)) => (n.to_string(), ns.to_string()),
            None => (
                workload.to_string(),
                domain.split('.').next().unwrap_or("default").to_string(),
            ),
        };
        let namespace = metadata_str(md, "NAMESPACE").unwrap_or(id_ns);
        let workload_name = metadata_str(md, "WORKLOAD_NAME").unwrap_or(id_name.clone());
        let matched = mesh
            .find_workload(&namespace, [&id_name, &workload_name], ip)
            .map(|w| (**w).clone());
        let mut labels = metadata_labels(md);
        if let Some(w) = &matched {
            for (k, v) in &w.labels {
                labels.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let service_account = metadata_str(md, "SERVICE_ACCOUNT")
            .or_else(|| matched.as_ref().map(|w| w.service_account.clone()));
        Ok(ProxyNode {
            id: node.id.clone(),
            router,
            ip,
            workload_name,
            namespace,
            labels,
            service_account,
            workload: matched,
            interception: Interception::from_metadata(metadata_str(md, "INTERCEPTION_MODE")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_node_ids() {
        let node = Node {
            id: "sidecar~127.0.0.11~hello-v1.default~default.svc.cluster.local".into(),
            ..Default::default()
        };
        let p = ProxyNode::identify(&node, &Mesh::default()).unwrap();
        assert_eq!(p.namespace, "default");
        assert_eq!(p.workload_name, "hello-v1");
        assert_eq!(p.ip, Some("127.0.0.11".parse().unwrap()));
    }

    #[test]
    fn rejects_other_ids_with_the_expected_form() {
        let node = Node {
            id: "my-envoy".into(),
            ..Default::default()
        };
        let err = ProxyNode::identify(&node, &Mesh::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("sidecar~<ip>~"), "{err}");
        let node = Node {
            id: "sidecar~not-ip~a.b~b.svc.cluster.local".into(),
            ..Default::default()
        };
        assert!(ProxyNode::identify(&node, &Mesh::default()).is_err());
    }
}
