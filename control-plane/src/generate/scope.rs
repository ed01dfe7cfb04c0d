//! What one proxy can see: the Sidecar that applies to it and the services its egress hosts
//! admit (`./*`, `*/*`, `ns/host`, `ns/*.suffix`), as Istio scopes a sidecar's config.

use crate::config::{IstioEgressListener, Object, SidecarSpec};
use crate::generate::ProxyNode;
use crate::model::{Mesh, Service};

pub struct Scope<'a> {
    pub proxy: &'a ProxyNode,
    pub sidecar: Option<&'a Object<SidecarSpec>>,
    /// Services this proxy may reach (all of them when no Sidecar applies).
    pub services: Vec<&'a Service>,
}

impl<'a> Scope<'a> {
    pub fn new(mesh: &'a Mesh, proxy: &'a ProxyNode) -> Scope<'a> {
        // Gateways take their listeners from Gateway objects, not from Sidecars.
        let sidecar = if proxy.router {
            None
        } else {
            mesh.sidecar_for(&proxy.namespace, &proxy.labels)
        };
        let exported =
            |s: &&Service| crate::model::exported_to(&s.export_to, &s.namespace, &proxy.namespace);
        let services = match sidecar {
            Some(sc) => mesh
                .services
                .iter()
                .map(|s| &**s)
                .filter(exported)
                .filter(|s| {
                    sc.spec
                        .egress
                        .iter()
                        .any(|l| egress_admits(l, &proxy.namespace, s))
                })
                .collect(),
            None => mesh
                .services
                .iter()
                .map(|s| &**s)
                .filter(exported)
                .collect(),
        };
        Scope {
            proxy,
            sidecar,
            services,
        }
    }
}

/// Does this egress listener's `hosts` list admit the service?
pub fn egress_admits(l: &IstioEgressListener, proxy_ns: &str, s: &Service) -> bool {
    l.hosts.iter().any(|h| {
        let Some((ns, host)) = h.split_once('/') else {
            return false;
        };
        let ns_ok = match ns {
            "*" => true,
            "." => s.namespace == proxy_ns,
            "~" => false,
            other => s.namespace == other,
        };
        ns_ok && host_matches(host, &s.hostname)
    })
}

/// Istio host matching: `*` matches all, `*.suffix` matches by suffix, otherwise exact.
pub fn host_matches(pattern: &str, hostname: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return hostname.ends_with(suffix);
    }
    pattern.eq_ignore_ascii_case(hostname)
}
