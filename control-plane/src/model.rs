//! The mesh model derived from config: services with their ports, protocols and endpoints, and
//! the workloads (WorkloadEntries) behind them. Built once per config change, off the xDS path.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::config::{ConfigSet, IntOrString, Labels, Object, SidecarSpec};

/// The DNS domain of the mesh (`<svc>.<ns>.svc.<domain>`).
pub const DOMAIN: &str = "cluster.local";
/// Istio's root namespace: a Sidecar here without a selector is the mesh-wide default.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// How a port's traffic is handled, decided as Istio does from the port name prefix or
/// `appProtocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl Protocol {
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }

    /// From a name such as `http`, `http-web`, `grpc`, `tcp-db` or an `appProtocol` value.
    /// Names that say nothing about the protocol are TCP: this weft version does not sniff.
    pub fn from_name(name: &str) -> Protocol {
        let lower = name.to_ascii_lowercase();
        let prefix = lower.split('-').next().unwrap_or("");
        match prefix {
            "http" => Protocol::Http,
            "http2" | "kubernetes.io/h2c" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            _ => Protocol::Tcp,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServicePort {
    pub name: String,
    pub port: u32,
    pub target_port: Option<IntOrString>,
    pub protocol: Protocol,
}

/// One workload instance behind a service.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub workload: String,
    pub address: String,
    pub labels: Labels,
    pub service_account: String,
    pub weight: u32,
    /// Service port number -> the port this endpoint receives it on.
    pub ports: BTreeMap<u32, u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.cluster.local`
    pub hostname: String,
    pub cluster_ip: Option<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    pub fn port(&self, number: u32) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == number)
    }
}

/// A workload as the mesh knows it (a WorkloadEntry in universal mode).
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub address: String,
    pub labels: Labels,
    pub service_account: String,
    pub annotations: Labels,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mesh {
    pub services: Vec<Service>,
    pub workloads: Vec<Workload>,
    pub config: ConfigSet,
}

pub fn fqdn(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.{DOMAIN}")
}

/// Resolves a host as written in an Istio object of namespace `ns`: a short name (no dot) is
/// expanded to `name.ns.svc.cluster.local`; anything else is taken as written (Istio's rule).
pub fn resolve_host(host: &str, ns: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_string()
    } else {
        fqdn(host, ns)
    }
}

pub fn selector_matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Mesh {
    pub fn build(config: &ConfigSet) -> Mesh {
        let workloads: Vec<Workload> = config
            .workload_entries
            .iter()
            .map(|we| Workload {
                name: we.meta.name.clone(),
                namespace: we.namespace.clone(),
                address: we.spec.address.clone(),
                labels: if we.spec.labels.is_empty() {
                    we.meta.labels.clone()
                } else {
                    we.spec.labels.clone()
                },
                service_account: we
                    .spec
                    .service_account
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                annotations: we.meta.annotations.clone(),
            })
            .collect();
        let services = config
            .services
            .iter()
            .map(|s| build_service(s, config))
            .collect();
        Mesh {
            services,
            workloads,
            config: config.clone(),
        }
    }

    pub fn service(&self, hostname: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.hostname == hostname)
    }

    /// The Sidecar that applies to a workload: the namespace's Sidecar whose selector matches,
    /// else the namespace's selector-less one, else the root namespace's default.
    pub fn sidecar_for(&self, namespace: &str, labels: &Labels) -> Option<&Object<SidecarSpec>> {
        let sidecars = &self.config.sidecars;
        sidecars
            .iter()
            .find(|s| {
                s.namespace == namespace
                    && s.spec
                        .workload_selector
                        .as_ref()
                        .is_some_and(|sel| selector_matches(&sel.labels, labels))
            })
            .or_else(|| {
                sidecars
                    .iter()
                    .find(|s| s.namespace == namespace && s.spec.workload_selector.is_none())
            })
            .or_else(|| {
                sidecars
                    .iter()
                    .find(|s| s.namespace == ROOT_NAMESPACE && s.spec.workload_selector.is_none())
            })
    }
}

fn build_service(s: &Object<crate::config::ServiceSpec>, config: &ConfigSet) -> Service {
    let ports: Vec<ServicePort> = s
        .spec
        .ports
        .iter()
        .map(|p| {
            let name = p.name.clone().unwrap_or_default();
            let protocol = match &p.app_protocol {
                Some(a) => Protocol::from_name(a),
                None => Protocol::from_name(&name),
            };
            ServicePort {
                name,
                port: p.port,
                target_port: p.target_port.clone(),
                protocol,
            }
        })
        .collect();
    let mut endpoints = Vec::new();
    if let Some(selector) = &s.spec.selector {
        for we in config
            .workload_entries
            .iter()
            .filter(|w| w.namespace == s.namespace)
        {
            let labels = if we.spec.labels.is_empty() {
                &we.meta.labels
            } else {
                &we.spec.labels
            };
            if selector.is_empty() || !selector_matches(selector, labels) {
                continue;
            }
            let mut by_port = BTreeMap::new();
            for p in &ports {
                // WorkloadEntry.ports maps a service port *name* to the workload's port.
                let target = we
                    .spec
                    .ports
                    .get(&p.name)
                    .copied()
                    .or_else(|| match &p.target_port {
                        Some(IntOrString::Int(t)) => Some(*t),
                        Some(IntOrString::String(n)) => we.spec.ports.get(n).copied(),
                        None => None,
                    })
                    .unwrap_or(p.port);
                by_port.insert(p.port, target);
            }
            endpoints.push(Endpoint {
                workload: we.meta.name.clone(),
                address: we.spec.address.clone(),
                labels: labels.clone(),
                service_account: we
                    .spec
                    .service_account
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                weight: we.spec.weight.unwrap_or(1).max(1),
                ports: by_port,
            });
        }
    }
    Service {
        name: s.meta.name.clone(),
        namespace: s.namespace.clone(),
        hostname: fqdn(&s.meta.name, &s.namespace),
        cluster_ip: s.spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok()),
        ports,
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_from_port_names() {
        assert_eq!(Protocol::from_name("http"), Protocol::Http);
        assert_eq!(Protocol::from_name("http-web"), Protocol::Http);
        assert_eq!(Protocol::from_name("HTTP2"), Protocol::Http2);
        assert_eq!(Protocol::from_name("grpc-api"), Protocol::Grpc);
        assert_eq!(Protocol::from_name("tcp-db"), Protocol::Tcp);
        assert_eq!(Protocol::from_name("mysql"), Protocol::Tcp);
        assert_eq!(Protocol::from_name("kubernetes.io/h2c"), Protocol::Http2);
    }

    #[test]
    fn short_hosts_resolve_in_the_object_namespace() {
        assert_eq!(
            resolve_host("reviews", "bookinfo"),
            "reviews.bookinfo.svc.cluster.local"
        );
        assert_eq!(
            resolve_host("reviews.bookinfo.svc.cluster.local", "x"),
            "reviews.bookinfo.svc.cluster.local"
        );
        assert_eq!(resolve_host("*.example.com", "x"), "*.example.com");
    }
}
