//! The mesh model derived from config: services with their ports, protocols and endpoints, and
//! the workloads (WorkloadEntries) behind them. Built once per config change, off the xDS path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{
    ConfigSet, EndpointPort, EndpointSliceBody, EndpointsBody, IntOrString, Labels, Location,
    Object, ObjectReference, PodBody, Resolution, ServiceEntrySpec, SidecarSpec, WorkloadEntrySpec,
};

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

/// How a proxy finds a service's endpoints, from the ServiceEntry `resolution` (Kubernetes
/// Services are always EDS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery {
    /// Endpoints known to the control plane, sent over EDS.
    Eds,
    /// `DNS`: each endpoint address (or the host itself) resolved by the proxy, all answers used.
    StrictDns,
    /// `DNS_ROUND_ROBIN`: the proxy connects to the first answer of one DNS name.
    LogicalDns,
    /// `NONE`: the connection goes where the client sent it (original destination).
    Passthrough,
}

/// Where the service was declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A Kubernetes Service (`name.ns.svc.cluster.local`, reachable by its short names).
    Kubernetes,
    /// A ServiceEntry host; `external` is `location: MESH_EXTERNAL`.
    ServiceEntry { entry: String, external: bool },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.cluster.local`, or the ServiceEntry host
    pub hostname: String,
    pub cluster_ip: Option<IpAddr>,
    /// Further addresses clients may use for it (ServiceEntry `addresses`).
    pub addresses: Vec<String>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    pub discovery: Discovery,
    pub origin: Origin,
    /// Namespaces that see it (ServiceEntry `exportTo`, or a Service's
    /// `networking.istio.io/exportTo` annotation); empty: all.
    pub export_to: Vec<String>,
}

impl Service {
    pub fn port(&self, number: u32) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == number)
    }

    /// Equal in everything but the endpoints sent over EDS.
    fn same_structure(&self, o: &Service) -> bool {
        self.name == o.name
            && self.namespace == o.namespace
            && self.hostname == o.hostname
            && self.cluster_ip == o.cluster_ip
            && self.addresses == o.addresses
            && self.ports == o.ports
            && self.discovery == o.discovery
            && self.origin == o.origin
            && self.export_to == o.export_to
            && (self.discovery == Discovery::Eds || self.endpoints == o.endpoints)
            && self.service_accounts() == o.service_accounts()
    }

    /// The service accounts its endpoints run as (mTLS clients expect one of them).
    pub fn service_accounts(&self) -> std::collections::BTreeSet<&str> {
        self.endpoints
            .iter()
            .map(|e| e.service_account.as_str())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// A workload as the mesh knows it: a WorkloadEntry, or a running Pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub address: String,
    pub labels: Labels,
    pub service_account: String,
    pub annotations: Labels,
}

/// Mesh-wide settings from weftd's command line (Istio keeps these in its MeshConfig).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshSettings {
    /// Access logs on every HTTP connection manager (`meshConfig.accessLogFile`).
    pub access_log: Option<AccessLogSettings>,
    /// The trust domain of workload identities (empty: cluster.local).
    pub trust_domain: String,
    /// How proxies normalize request paths (`meshConfig.pathNormalization`).
    pub path_normalization: PathNormalization,
    /// Spans reported to a Zipkin collector (`meshConfig.enableTracing` with
    /// `defaultConfig.tracing.zipkin`).
    pub tracing: Option<TracingSettings>,
}

/// Istio's `meshConfig.defaultConfig.tracing` with a Zipkin collector.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// The collector's host (a name the proxies resolve, or an address) and port
    /// (`tracing.zipkin.address`, e.g. `zipkin.istio-system:9411`).
    pub host: String,
    pub port: u32,
    /// The percentage of requests sampled (`tracing.sampling`, Istio's default 1%).
    pub sampling: f64,
}

impl TracingSettings {
    /// From `host:port` and a percentage; why not, otherwise.
    pub fn parse(address: &str, sampling: f64) -> Result<TracingSettings, String> {
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| format!("zipkin address {address:?}: expected HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u32 = port
            .parse()
            .ok()
            .filter(|p| (1..=65535).contains(p))
            .ok_or_else(|| format!("zipkin address {address:?}: {port:?} is not a port"))?;
        if host.is_empty() {
            return Err(format!("zipkin address {address:?}: the host is empty"));
        }
        if !(0.0..=100.0).contains(&sampling) {
            return Err(format!(
                "trace sampling {sampling}: must be a percentage, 0 to 100"
            ));
        }
        Ok(TracingSettings {
            host: host.to_string(),
            port,
            sampling,
        })
    }
}

/// Istio's `meshConfig.pathNormalization.normalization`: what every HTTP connection manager
/// does to a request's path before authorization and routing look at it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PathNormalization {
    /// Paths pass as the client sent them.
    None,
    /// RFC 3986 normalization: dot segments, backslashes, escaped unreserved characters
    /// (Istio's default, BASE).
    #[default]
    Base,
    /// BASE, and runs of slashes merged.
    MergeSlashes,
    /// MERGE_SLASHES, with `%2F` and `%5C` decoded first.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    /// Istio's name for it (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES).
    pub fn parse(name: &str) -> Option<PathNormalization> {
        Some(match name {
            "NONE" => PathNormalization::None,
            "BASE" | "DEFAULT" => PathNormalization::Base,
            "MERGE_SLASHES" => PathNormalization::MergeSlashes,
            "DECODE_AND_MERGE_SLASHES" => PathNormalization::DecodeAndMergeSlashes,
            _ => return None,
        })
    }
}

impl MeshSettings {
    pub fn trust_domain(&self) -> &str {
        if self.trust_domain.is_empty() {
            "cluster.local"
        } else {
            &self.trust_domain
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogSettings {
    pub path: String,
    /// JSON lines (`accessLogEncoding: JSON`) rather than Envoy's default text line.
    pub json: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mesh {
    pub settings: MeshSettings,
    /// Shared with the next mesh when a change leaves them as they are.
    pub services: Vec<Arc<Service>>,
    /// WorkloadEntries in config order, then Pods with an IP.
    pub workloads: Vec<Arc<Workload>>,
    /// Workloads by (namespace, name) and by (namespace, address): a proxy finds its own in
    /// O(1) on every push.
    workload_index: WorkloadIndex,
    /// The config this was built from, shared with the config source's snapshot.
    pub config: std::sync::Arc<ConfigSet>,
    /// Service hostname -> the DestinationRules (indexes into `config.destination_rules`)
    /// whose host matches it; each proxy picks among those exported to it (see
    /// `destination_rule_for`).
    pub rule_index: HashMap<String, Vec<usize>>,
    /// Service hostname -> the VirtualServices (indexes into `config.virtual_services`, in
    /// config order) one of whose hosts matches it; each proxy then picks the first it can see.
    pub virtual_service_index: HashMap<String, Vec<usize>>,
    /// Proxy-independent xDS resources, encoded once per mesh.
    pub shared: crate::generate::SharedResources,
    /// Service hostname -> index into `services`.
    pub service_index: HashMap<String, usize>,
    /// The addresses DNS gives services without their own (made on first use).
    auto_addresses: AutoAddresses,
}

/// DNS's allocated addresses, computed once per mesh when a captured proxy first needs them.
#[derive(Debug, Clone, Default)]
struct AutoAddresses(std::sync::OnceLock<std::collections::BTreeMap<(String, String), IpAddr>>);

impl PartialEq for AutoAddresses {
    /// Derived from the config, which the meshes' equality already compares.
    fn eq(&self, _: &Self) -> bool {
        true
    }
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

/// Istio's `exportTo` for an object of namespace `object_ns`, seen from `viewer_ns`: empty or
/// `*` is everywhere, `.` its own namespace, otherwise the namespaces listed (`~`: nowhere).
pub fn exported_to(export_to: &[String], object_ns: &str, viewer_ns: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || (e == "." && object_ns == viewer_ns) || e == viewer_ns)
}

pub fn selector_matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Mesh {
    pub fn build(config: &ConfigSet) -> Mesh {
        Mesh::build_shared(std::sync::Arc::new(config.clone()))
    }

    /// Builds from a shared config without copying it.
    pub fn build_shared(shared: std::sync::Arc<ConfigSet>) -> Mesh {
        let config: &ConfigSet = &shared;
        let workloads: Vec<Arc<Workload>> = config
            .workload_entries
            .iter()
            .map(|we| Arc::new(entry_workload(we)))
            .chain(
                config
                    .pods
                    .iter()
                    .filter_map(|p| pod_workload(p).map(Arc::new)),
            )
            .collect();
        let index = Index::new(config, true);
        let services: Vec<Arc<Service>> = service_sources(config)
            .map(|source| Arc::new(source.build(&index)))
            .collect();
        let (rule_index, virtual_service_index) = index_rules(&services, config);
        Mesh::assemble(
            shared.clone(),
            services,
            workloads,
            rule_index,
            virtual_service_index,
        )
    }

    fn assemble(
        config: Arc<ConfigSet>,
        services: Vec<Arc<Service>>,
        workloads: Vec<Arc<Workload>>,
        rule_index: HashMap<String, Vec<usize>>,
        virtual_service_index: HashMap<String, Vec<usize>>,
    ) -> Mesh {
        let service_index = services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.hostname.clone(), i))
            .collect();
        let workload_index = WorkloadIndex::new(&workloads);
        Mesh {
            settings: MeshSettings::default(),
            workload_index,
            services,
            workloads,
            config,
            rule_index,
            virtual_service_index,
            shared: Default::default(),
            service_index,
            auto_addresses: Default::default(),
        }
    }

    /// The destination addresses a client's connection to `svc` has, as CIDRs: its
    /// clusterIP, else the ServiceEntry's `addresses`, else the address weftd's DNS allocates
    /// for it (the name a workload resolves is the address its captured connection carries).
    pub fn service_addresses(&self, svc: &Service) -> Vec<String> {
        let cidr = |ip: IpAddr| match ip {
            IpAddr::V4(_) => format!("{ip}/32"),
            IpAddr::V6(_) => format!("{ip}/128"),
        };
        if let Some(ip) = svc.cluster_ip {
            return vec![cidr(ip)];
        }
        if !svc.addresses.is_empty() {
            return svc
                .addresses
                .iter()
                .filter_map(|a| match a.split_once('/') {
                    Some(_) => Some(a.clone()),
                    None => a.parse().ok().map(cidr),
                })
                .collect();
        }
        let key = match &svc.origin {
            Origin::Kubernetes => (svc.namespace.clone(), svc.name.clone()),
            Origin::ServiceEntry { .. } => (svc.namespace.clone(), format!("se:{}", svc.hostname)),
        };
        let vips = self
            .auto_addresses
            .0
            .get_or_init(|| crate::dns::records::allocate_vips(&self.config));
        vips.get(&key).map(|ip| vec![cidr(*ip)]).unwrap_or_default()
    }

    /// The mesh for `shared`, the config that followed `prev`'s. When the change touched only
    /// WorkloadEntries (a workload moved, came or went: the usual endpoint change), everything
    /// else is shared with `prev` and only the services selecting a changed entry are derived
    /// again; otherwise (or when many entries changed) it is built afresh. Either way the result
    /// equals `Mesh::build_shared(shared)`.
    pub fn build_after(prev: &Mesh, shared: Arc<ConfigSet>) -> Mesh {
        match Mesh::rebuild_endpoints(prev, &shared) {
            Some(mesh) => mesh,
            None => Mesh::build_shared(shared),
        }
    }

    fn rebuild_endpoints(prev: &Mesh, shared: &Arc<ConfigSet>) -> Option<Mesh> {
        /// Beyond this many changed entries a full build is as quick.
        const MOST: usize = 256;
        let (a, b) = (&*prev.config, &**shared);
        let same_but_entries = b.same_but_workload_entries(a);
        if !same_but_entries || prev.workloads.len() < a.workload_entries.len() {
            return None;
        }
        // For each entry now, its position before when it is the very same object (an
        // unchanged file's). Usually the lists line up; otherwise they are matched by pointer.
        let (old, new) = (&a.workload_entries, &b.workload_entries);
        let reused: Vec<Option<usize>> = if old.len() == new.len() {
            (0..new.len())
                .map(|i| Arc::ptr_eq(&old[i], &new[i]).then_some(i))
                .collect()
        } else {
            let before: HashMap<*const Object<WorkloadEntrySpec>, usize> = old
                .iter()
                .enumerate()
                .map(|(i, we)| (Arc::as_ptr(we), i))
                .collect();
            new.iter()
                .map(|we| before.get(&Arc::as_ptr(we)).copied())
                .collect()
        };
        let mut kept = vec![false; old.len()];
        for i in reused.iter().flatten() {
            kept[*i] = true;
        }
        let changed: Vec<&Object<WorkloadEntrySpec>> = old
            .iter()
            .zip(&kept)
            .filter(|(_, kept)| !**kept)
            .map(|(we, _)| &**we)
            .chain(
                new.iter()
                    .zip(&reused)
                    .filter(|(_, r)| r.is_none())
                    .map(|(we, _)| &**we),
            )
            .collect();
        if changed.len() > MOST {
            return None;
        }
        let selects_changed = |ns: &str, selector: &Labels| {
            !selector.is_empty()
                && changed
                    .iter()
                    .any(|we| we.namespace == ns && selector_matches(selector, entry_labels(we)))
        };
        let sources: Vec<ServiceSource<'_>> = service_sources(b).collect();
        if sources.len() != prev.services.len() {
            return None;
        }
        let affected: Vec<bool> = sources
            .iter()
            .map(|source| {
                source
                    .selector()
                    .is_some_and(|(ns, sel)| selects_changed(ns, sel))
            })
            .collect();
        let index = Index::new(b, false);
        let services: Vec<Arc<Service>> = sources
            .iter()
            .zip(&affected)
            .zip(&prev.services)
            .map(|((source, affected), old)| match affected {
                true => Arc::new(source.build(&index)),
                false => old.clone(),
            })
            .collect();
        let workloads: Vec<Arc<Workload>> = new
            .iter()
            .zip(&reused)
            .map(|(we, reused)| match reused {
                Some(i) => prev.workloads[*i].clone(),
                None => Arc::new(entry_workload(we)),
            })
            .chain(prev.workloads[old.len()..].iter().cloned())
            .collect();
        let mesh = Mesh::assemble(
            shared.clone(),
            services,
            workloads,
            prev.rule_index.clone(),
            prev.virtual_service_index.clone(),
        );
        let touched = mesh.services_changed_since(prev);
        // The other services' clusters and load assignments are as they were: keep them
        // encoded (their names are `outbound|port|subset|host`, maybe with a `#` suffix).
        mesh.shared.keep_from(&prev.shared, |key| {
            key.split('|')
                .nth(3)
                .and_then(|host| host.split('#').next())
                .is_some_and(|host| !touched.contains(host))
        });
        Some(mesh)
    }

    /// Hostnames of the services this mesh does not share with `before`, a mesh of the same
    /// services in the same order (see `same_structure`): those whose endpoints may differ.
    pub fn services_changed_since(&self, before: &Mesh) -> HashSet<&str> {
        self.services
            .iter()
            .zip(&before.services)
            .filter(|(now, old)| !Arc::ptr_eq(now, old))
            .map(|(now, _)| now.hostname.as_str())
            .collect()
    }

    /// The workload named `names[0]` or `names[1]` in `namespace` (the first in config order),
    /// else the first there with address `ip`.
    pub fn find_workload(
        &self,
        namespace: &str,
        names: [&str; 2],
        ip: Option<IpAddr>,
    ) -> Option<&Arc<Workload>> {
        let by_name = names
            .iter()
            .filter_map(|n| self.workload_index.named(&self.workloads, namespace, n))
            .min();
        let found = by_name.or_else(|| {
            let ip = ip?;
            self.workload_index.at(&self.workloads, namespace, ip)
        })?;
        Some(&self.workloads[found])
    }

    /// True when everything xDS generation reads, except EDS endpoints, is the same in both:
    /// then clusters, listeners and routes are unchanged and only endpoints need generating.
    pub fn same_structure(&self, other: &Mesh) -> bool {
        use crate::config::same_objects;
        let (a, b) = (&self.config, &other.config);
        same_objects(&a.virtual_services, &b.virtual_services)
            && same_objects(&a.destination_rules, &b.destination_rules)
            && same_objects(&a.sidecars, &b.sidecars)
            && same_objects(&a.service_entries, &b.service_entries)
            && same_objects(&a.gateways, &b.gateways)
            && same_objects(&a.peer_authentications, &b.peer_authentications)
            && same_objects(&a.authorization_policies, &b.authorization_policies)
            && self.services.len() == other.services.len()
            && self
                .services
                .iter()
                .zip(&other.services)
                .all(|(x, y)| Arc::ptr_eq(x, y) || x.same_structure(y))
    }

    pub fn service(&self, hostname: &str) -> Option<&Service> {
        self.service_index
            .get(hostname)
            .map(|i| &*self.services[*i])
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
            .map(|s| &**s)
    }
}

/// Lookups over the config, built once per mesh build, so that deriving N services costs
/// O(N + objects) rather than O(N x objects).
struct Index<'a> {
    config: &'a ConfigSet,
    /// Whether the label indexes are built (else selection scans).
    by_label: bool,
    /// (namespace, label key, label value) -> WorkloadEntries carrying it, in config order.
    entries_by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
    pods_by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
    pods_by_name: HashMap<(&'a str, &'a str), usize>,
    /// (namespace, service name) -> Endpoints objects / EndpointSlices for it.
    endpoints_by_service: HashMap<(&'a str, &'a str), Vec<usize>>,
    slices_by_service: HashMap<(&'a str, &'a str), Vec<usize>>,
}

type LabelIndex<'a> = HashMap<(&'a str, &'a str, &'a str), Vec<usize>>;

fn label_index<'a>(items: impl Iterator<Item = (&'a str, &'a Labels)>) -> LabelIndex<'a> {
    let mut out: LabelIndex<'a> = HashMap::new();
    for (i, (ns, labels)) in items.enumerate() {
        for (k, v) in labels {
            out.entry((ns, k.as_str(), v.as_str())).or_default().push(i);
        }
    }
    out
}

/// Indexes (in config order) of the items in `ns` whose labels match the non-empty `selector`.
fn select<'a>(
    index: &LabelIndex<'_>,
    ns: &str,
    selector: &Labels,
    labels_of: impl Fn(usize) -> &'a Labels,
) -> Vec<usize> {
    let Some((k, v)) = selector.iter().next() else {
        return Vec::new();
    };
    index
        .get(&(ns, k.as_str(), v.as_str()))
        .into_iter()
        .flatten()
        .copied()
        .filter(|i| selector_matches(selector, labels_of(*i)))
        .collect()
}

/// `select` without an index: the objects in `ns` whose labels match the non-empty `selector`.
fn scan<'a, T>(
    all: &'a [Arc<Object<T>>],
    ns: &str,
    selector: &Labels,
    labels_of: impl Fn(&Object<T>) -> &Labels,
) -> Vec<&'a Object<T>> {
    if selector.is_empty() {
        return Vec::new();
    }
    all.iter()
        .filter(|o| o.namespace == ns && selector_matches(selector, labels_of(o)))
        .map(|o| &**o)
        .collect()
}

impl<'a> Index<'a> {
    /// Indexes the config. Without `by_label`, selecting WorkloadEntries and Pods scans them
    /// (quicker when only a few services are derived).
    fn new(config: &'a ConfigSet, by_label: bool) -> Index<'a> {
        let labels_of_entries = config
            .workload_entries
            .iter()
            .map(|w| (w.namespace.as_str(), entry_labels(w)));
        let labels_of_pods = config
            .pods
            .iter()
            .map(|p| (p.namespace.as_str(), &p.meta.labels));
        let mut endpoints_by_service: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        for (i, e) in config.endpoints.iter().enumerate() {
            endpoints_by_service
                .entry((e.namespace.as_str(), e.meta.name.as_str()))
                .or_default()
                .push(i);
        }
        let mut slices_by_service: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        for (i, e) in config.endpoint_slices.iter().enumerate() {
            if let Some(svc) = service_of_slice(e) {
                slices_by_service
                    .entry((e.namespace.as_str(), svc))
                    .or_default()
                    .push(i);
            }
        }
        Index {
            config,
            by_label,
            entries_by_label: match by_label {
                true => label_index(labels_of_entries),
                false => HashMap::new(),
            },
            pods_by_label: match by_label {
                true => label_index(labels_of_pods),
                false => HashMap::new(),
            },
            pods_by_name: config
                .pods
                .iter()
                .enumerate()
                .map(|(i, p)| ((p.namespace.as_str(), p.meta.name.as_str()), i))
                .collect(),
            endpoints_by_service,
            slices_by_service,
        }
    }

    fn entries(&self, ns: &str, selector: &Labels) -> Vec<&'a Object<WorkloadEntrySpec>> {
        let all = &self.config.workload_entries;
        if !self.by_label {
            return scan(all, ns, selector, entry_labels);
        }
        select(&self.entries_by_label, ns, selector, |i| {
            entry_labels(&all[i])
        })
        .into_iter()
        .map(|i| &*all[i])
        .collect()
    }

    fn pods(&self, ns: &str, selector: &Labels) -> Vec<&'a Object<PodBody>> {
        let all = &self.config.pods;
        if !self.by_label {
            return scan(all, ns, selector, |p| &p.meta.labels);
        }
        select(&self.pods_by_label, ns, selector, |i| &all[i].meta.labels)
            .into_iter()
            .map(|i| &*all[i])
            .collect()
    }

    fn pod(&self, ns: &str, name: &str) -> Option<&'a Object<PodBody>> {
        self.pods_by_name
            .get(&(ns, name))
            .map(|i| &*self.config.pods[*i])
    }

    fn endpoints_of(&self, ns: &str, svc: &str) -> Vec<&'a Object<EndpointsBody>> {
        self.endpoints_by_service
            .get(&(ns, svc))
            .into_iter()
            .flatten()
            .map(|i| &*self.config.endpoints[*i])
            .collect()
    }

    fn slices_of(&self, ns: &str, svc: &str) -> Vec<&'a Object<EndpointSliceBody>> {
        self.slices_by_service
            .get(&(ns, svc))
            .into_iter()
            .flatten()
            .map(|i| &*self.config.endpoint_slices[*i])
            .collect()
    }
}

/// Which DestinationRule and VirtualServices apply to each service, worked out once per config
/// change instead of once per proxy and service.
fn index_rules(
    services: &[Arc<Service>],
    config: &ConfigSet,
) -> (HashMap<String, Vec<usize>>, HashMap<String, Vec<usize>>) {
    let rule_hosts: Vec<String> = config
        .destination_rules
        .iter()
        .map(|dr| resolve_host(&dr.spec.host, &dr.namespace))
        .collect();
    let vs_hosts: Vec<Vec<String>> = config
        .virtual_services
        .iter()
        .map(|vs| {
            vs.spec
                .hosts
                .iter()
                .map(|h| resolve_host(h, &vs.namespace))
                .collect()
        })
        .collect();
    let mut rules = HashMap::new();
    let mut vss = HashMap::new();
    for svc in services {
        let candidates: Vec<usize> = (0..config.destination_rules.len())
            .filter(|i| crate::generate::host_matches(&rule_hosts[*i], &svc.hostname))
            .collect();
        if !candidates.is_empty() {
            rules.insert(svc.hostname.clone(), candidates);
        }
        let matching: Vec<usize> = vs_hosts
            .iter()
            .enumerate()
            .filter(|(_, hosts)| {
                hosts
                    .iter()
                    .any(|h| crate::generate::host_matches(h, &svc.hostname))
            })
            .map(|(i, _)| i)
            .collect();
        if !matching.is_empty() {
            vss.insert(svc.hostname.clone(), matching);
        }
    }
    (rules, vss)
}

/// What a service of the mesh is derived from.
enum ServiceSource<'a> {
    Kubernetes(&'a Object<crate::config::ServiceSpec>),
    /// One host of a ServiceEntry.
    Entry(&'a Object<ServiceEntrySpec>, &'a str),
}

impl ServiceSource<'_> {
    fn build(&self, index: &Index<'_>) -> Service {
        match self {
            ServiceSource::Kubernetes(s) => build_service(s, index),
            ServiceSource::Entry(se, host) => build_service_entry(se, host, index),
        }
    }

    /// The namespace and selector whose WorkloadEntries (and Pods) become its endpoints.
    fn selector(&self) -> Option<(&str, &Labels)> {
        match self {
            ServiceSource::Kubernetes(s) => {
                if s.spec.service_type.as_deref() == Some("ExternalName") {
                    return None;
                }
                let sel = s.spec.selector.as_ref().filter(|sel| !sel.is_empty())?;
                Some((s.namespace.as_str(), sel))
            }
            ServiceSource::Entry(se, _) => se
                .spec
                .workload_selector
                .as_ref()
                .map(|sel| (se.namespace.as_str(), &sel.labels)),
        }
    }
}

/// The mesh's services in order: each Kubernetes Service, then each ServiceEntry host not
/// declared before (a host declared twice keeps the first declaration, as Istio does for
/// conflicting registrations).
fn service_sources(config: &ConfigSet) -> impl Iterator<Item = ServiceSource<'_>> {
    let mut seen: HashSet<String> = match config.service_entries.is_empty() {
        true => HashSet::new(),
        false => config
            .services
            .iter()
            .map(|s| fqdn(&s.meta.name, &s.namespace))
            .collect(),
    };
    let entries: Vec<ServiceSource<'_>> = config
        .service_entries
        .iter()
        .flat_map(|se| se.spec.hosts.iter().map(move |h| (se, h)))
        .filter(|(_, host)| seen.insert(host.to_string()))
        .map(|(se, host)| ServiceSource::Entry(se, host.as_str()))
        .collect();
    config
        .services
        .iter()
        .map(|s| ServiceSource::Kubernetes(s))
        .chain(entries)
}

fn entry_workload(we: &Object<WorkloadEntrySpec>) -> Workload {
    Workload {
        name: we.meta.name.clone(),
        namespace: we.namespace.clone(),
        address: we.spec.address.clone(),
        labels: entry_labels(we).clone(),
        service_account: we
            .spec
            .service_account
            .clone()
            .unwrap_or_else(|| "default".into()),
        annotations: we.meta.annotations.clone(),
    }
}

fn pod_workload(p: &Object<PodBody>) -> Option<Workload> {
    Some(Workload {
        name: p.meta.name.clone(),
        namespace: p.namespace.clone(),
        address: pod_ip(p)?,
        labels: p.meta.labels.clone(),
        service_account: pod_service_account(p),
        annotations: p.meta.annotations.clone(),
    })
}

/// The first workload (in order) by a hash of (namespace, name) and of (namespace, address).
/// A lookup checks what it finds, and scans all workloads when that is another one (a hash
/// collision).
#[derive(Debug, Clone, Default, PartialEq)]
struct WorkloadIndex {
    by_name: HashMap<u64, usize>,
    by_ip: HashMap<u64, usize>,
}

fn key_of(namespace: &str, what: impl std::hash::Hash) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = crate::generate::Fnv::default();
    namespace.hash(&mut h);
    what.hash(&mut h);
    h.finish()
}

fn address_of(w: &Workload) -> Option<IpAddr> {
    w.address.parse().ok()
}

impl WorkloadIndex {
    fn new(workloads: &[Arc<Workload>]) -> WorkloadIndex {
        let mut index = WorkloadIndex {
            by_name: HashMap::with_capacity(workloads.len()),
            by_ip: HashMap::with_capacity(workloads.len()),
        };
        for (i, w) in workloads.iter().enumerate() {
            index
                .by_name
                .entry(key_of(&w.namespace, &w.name))
                .or_insert(i);
            if let Some(ip) = address_of(w) {
                index.by_ip.entry(key_of(&w.namespace, ip)).or_insert(i);
            }
        }
        index
    }

    fn find(
        map: &HashMap<u64, usize>,
        key: u64,
        workloads: &[Arc<Workload>],
        is: impl Fn(&Workload) -> bool,
    ) -> Option<usize> {
        let i = *map.get(&key)?;
        if is(&workloads[i]) {
            Some(i)
        } else {
            workloads.iter().position(|w| is(w))
        }
    }

    fn named(&self, workloads: &[Arc<Workload>], namespace: &str, name: &str) -> Option<usize> {
        let key = key_of(namespace, name);
        Self::find(&self.by_name, key, workloads, |w| {
            w.namespace == namespace && w.name == name
        })
    }

    fn at(&self, workloads: &[Arc<Workload>], namespace: &str, ip: IpAddr) -> Option<usize> {
        let key = key_of(namespace, ip);
        Self::find(&self.by_ip, key, workloads, |w| {
            w.namespace == namespace && address_of(w) == Some(ip)
        })
    }
}

fn build_service(s: &Object<crate::config::ServiceSpec>, index: &Index<'_>) -> Service {
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
    if s.spec.service_type.as_deref() == Some("ExternalName") {
        // Istio routes an ExternalName Service's ports to its external name, resolved by DNS.
        let target = s.spec.external_name.clone().unwrap_or_default();
        return Service {
            name: s.meta.name.clone(),
            namespace: s.namespace.clone(),
            hostname: fqdn(&s.meta.name, &s.namespace),
            cluster_ip: None,
            addresses: Vec::new(),
            endpoints: vec![Endpoint {
                workload: target.clone(),
                address: target,
                labels: Labels::new(),
                service_account: "default".into(),
                weight: 1,
                ports: ports.iter().map(|p| (p.port, p.port)).collect(),
            }],
            ports,
            discovery: Discovery::StrictDns,
            origin: Origin::Kubernetes,
            export_to: annotation_export_to(s),
        };
    }
    let mut endpoints = kubernetes_endpoints(s, &ports, index);
    if let Some(selector) = s.spec.selector.as_ref().filter(|sel| !sel.is_empty()) {
        let have_endpoint_objects = !index.endpoints_of(&s.namespace, &s.meta.name).is_empty()
            || !index.slices_of(&s.namespace, &s.meta.name).is_empty();
        if !have_endpoint_objects {
            // No endpoints controller recorded anything: select running Pods as it would.
            for pod in index.pods(&s.namespace, selector) {
                let Some(ip) = pod_ip(pod) else { continue };
                let by_port = ports
                    .iter()
                    .map(|p| {
                        let target = match &p.target_port {
                            Some(IntOrString::Int(t)) => *t,
                            Some(IntOrString::String(n)) => {
                                container_port(pod, n).unwrap_or(p.port)
                            }
                            None => p.port,
                        };
                        (p.port, target)
                    })
                    .collect();
                endpoints.push(Endpoint {
                    workload: pod.meta.name.clone(),
                    address: ip,
                    labels: pod.meta.labels.clone(),
                    service_account: pod_service_account(pod),
                    weight: 1,
                    ports: by_port,
                });
            }
        }
        for we in index.entries(&s.namespace, selector) {
            endpoints.push(entry_endpoint(&we.meta.name, &we.spec, &ports));
        }
    }
    Service {
        name: s.meta.name.clone(),
        namespace: s.namespace.clone(),
        hostname: fqdn(&s.meta.name, &s.namespace),
        cluster_ip: s.spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok()),
        addresses: Vec::new(),
        ports,
        endpoints,
        discovery: Discovery::Eds,
        origin: Origin::Kubernetes,
        export_to: annotation_export_to(s),
    }
}

/// Istio's `networking.istio.io/exportTo` Service annotation (comma-separated namespaces).
fn annotation_export_to(s: &Object<crate::config::ServiceSpec>) -> Vec<String> {
    s.meta
        .annotations
        .get("networking.istio.io/exportTo")
        .map(|v| {
            v.split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// A WorkloadEntry's labels: `spec.labels`, else `metadata.labels`.
pub(crate) fn entry_labels(we: &Object<WorkloadEntrySpec>) -> &Labels {
    if we.spec.labels.is_empty() {
        &we.meta.labels
    } else {
        &we.spec.labels
    }
}

/// A WorkloadEntry (or a ServiceEntry's inline endpoint) as an endpoint of a service's ports.
fn entry_endpoint(name: &str, we: &WorkloadEntrySpec, ports: &[ServicePort]) -> Endpoint {
    let by_port = ports
        .iter()
        .map(|p| {
            // WorkloadEntry.ports maps a service port *name* to the workload's port.
            let target = we
                .ports
                .get(&p.name)
                .copied()
                .or_else(|| match &p.target_port {
                    Some(IntOrString::Int(t)) => Some(*t),
                    Some(IntOrString::String(n)) => we.ports.get(n).copied(),
                    None => None,
                })
                .unwrap_or(p.port);
            (p.port, target)
        })
        .collect();
    Endpoint {
        workload: name.to_string(),
        address: we.address.clone(),
        labels: we.labels.clone(),
        // As Istio: an endpoint that names no service account adds no SAN to the identities
        // its clients expect (a service whose endpoints name none accepts any mesh identity).
        service_account: we.service_account.clone().unwrap_or_default(),
        weight: we.weight.unwrap_or(1).max(1),
        ports: by_port,
    }
}

fn service_of_slice(e: &Object<EndpointSliceBody>) -> Option<&str> {
    e.meta
        .labels
        .get("kubernetes.io/service-name")
        .map(String::as_str)
}

fn pod_ip(pod: &Object<PodBody>) -> Option<String> {
    let running = pod
        .spec
        .status
        .phase
        .as_deref()
        .is_none_or(|p| p == "Running");
    let ready = pod
        .spec
        .status
        .other
        .get("conditions")
        .and_then(|c| c.as_array())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(|t| t.as_str()) == Some("Ready"))
        })
        .is_none_or(|c| c.get("status").and_then(|s| s.as_str()) == Some("True"));
    if !running || !ready || pod.meta.other.contains_key("deletionTimestamp") {
        return None;
    }
    pod.spec
        .status
        .pod_ip
        .clone()
        .or_else(|| pod.spec.status.pod_ips.first().map(|p| p.ip.clone()))
        .filter(|ip| ip.parse::<IpAddr>().is_ok())
}

fn pod_service_account(pod: &Object<PodBody>) -> String {
    pod.spec
        .spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into())
}

/// A named container port of a Pod (for a Service `targetPort` given by name).
fn container_port(pod: &Object<PodBody>, name: &str) -> Option<u32> {
    let containers = pod.spec.spec.other.get("containers")?.as_array()?;
    containers
        .iter()
        .filter_map(|c| c.get("ports")?.as_array())
        .flatten()
        .find(|p| p.get("name").and_then(|n| n.as_str()) == Some(name))
        .and_then(|p| p.get("containerPort")?.as_u64())
        .and_then(|p| u32::try_from(p).ok())
}

/// Endpoints as the Kubernetes endpoints controller recorded them: EndpointSlices labelled with
/// the service's name (ready endpoints only), else the Endpoints object of the same name. Each
/// address's labels and service account come from the Pod it targets, when that Pod is known.
fn kubernetes_endpoints(
    s: &Object<crate::config::ServiceSpec>,
    ports: &[ServicePort],
    index: &Index<'_>,
) -> Vec<Endpoint> {
    let single = ports.len() == 1;
    // Service port -> endpoint port: by port name (the one unnamed port matches the one
    // unnamed endpoint port).
    let map_ports = |eps: &[EndpointPort]| -> BTreeMap<u32, u32> {
        ports
            .iter()
            .filter_map(|p| {
                let found = eps
                    .iter()
                    .find(|e| e.name.as_deref().unwrap_or("") == p.name)
                    .or_else(|| (single && eps.len() == 1).then(|| &eps[0]))?;
                Some((p.port, found.port))
            })
            .collect()
    };
    let target = |r: &Option<ObjectReference>, ip: &str| -> (String, Labels, String) {
        let pod = r
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| {
                let ns = r.namespace.as_deref().unwrap_or(&s.namespace);
                index.pod(ns, r.name.as_deref()?)
            });
        match pod {
            Some(p) => (
                p.meta.name.clone(),
                p.meta.labels.clone(),
                pod_service_account(p),
            ),
            None => (
                r.as_ref()
                    .and_then(|r| r.name.clone())
                    .unwrap_or_else(|| ip.to_string()),
                Labels::new(),
                "default".into(),
            ),
        }
    };
    let mut out: Vec<Endpoint> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for sl in index.slices_of(&s.namespace, &s.meta.name) {
        let by_port = map_ports(&sl.spec.ports);
        for ep in sl
            .spec
            .endpoints
            .iter()
            .filter(|e| e.conditions.ready != Some(false))
        {
            for a in &ep.addresses {
                // One address may appear in several slices (during a slice split): once only.
                if !seen.insert(a.as_str()) {
                    continue;
                }
                let (workload, labels, service_account) = target(&ep.target_ref, a);
                out.push(Endpoint {
                    workload,
                    address: a.clone(),
                    labels,
                    service_account,
                    weight: 1,
                    ports: by_port.clone(),
                });
            }
        }
    }
    if !out.is_empty() {
        return out;
    }
    for e in index.endpoints_of(&s.namespace, &s.meta.name) {
        for subset in &e.spec.subsets {
            let by_port = map_ports(&subset.ports);
            for a in &subset.addresses {
                let (workload, labels, service_account) = target(&a.target_ref, &a.ip);
                out.push(Endpoint {
                    workload,
                    address: a.ip.clone(),
                    labels,
                    service_account,
                    weight: 1,
                    ports: by_port.clone(),
                });
            }
        }
    }
    out
}

/// One ServiceEntry host as a service: its ports, and its endpoints from `endpoints` or the
/// WorkloadEntries its `workloadSelector` picks; DNS resolutions leave resolving to the proxy.
fn build_service_entry(se: &Object<ServiceEntrySpec>, host: &str, index: &Index<'_>) -> Service {
    let ports: Vec<ServicePort> = se
        .spec
        .ports
        .iter()
        .map(|p| {
            let name = p.name.clone().unwrap_or_default();
            ServicePort {
                protocol: Protocol::from_name(p.protocol.as_deref().unwrap_or(&name)),
                name,
                port: p.number,
                target_port: p.target_port.map(IntOrString::Int),
            }
        })
        .collect();
    let resolution = se.spec.resolution.unwrap_or(Resolution::None);
    let discovery = match resolution {
        Resolution::Static => Discovery::Eds,
        Resolution::Dns => Discovery::StrictDns,
        Resolution::DnsRoundRobin => Discovery::LogicalDns,
        Resolution::None => Discovery::Passthrough,
    };
    let mut endpoints: Vec<Endpoint> = se
        .spec
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| entry_endpoint(&format!("{}[{i}]", se.meta.name), e, &ports))
        .collect();
    if let Some(sel) = &se.spec.workload_selector {
        for we in index.entries(&se.namespace, &sel.labels) {
            endpoints.push(entry_endpoint(&we.meta.name, &we.spec, &ports));
        }
    }
    if endpoints.is_empty() && matches!(discovery, Discovery::StrictDns | Discovery::LogicalDns) {
        // DNS resolution without endpoints: the host itself is the name to resolve.
        endpoints.push(Endpoint {
            workload: host.to_string(),
            address: host.to_string(),
            labels: Labels::new(),
            service_account: "default".into(),
            weight: 1,
            ports: ports.iter().map(|p| (p.port, p.port)).collect(),
        });
    }
    Service {
        name: host.to_string(),
        namespace: se.namespace.clone(),
        hostname: host.to_string(),
        cluster_ip: None,
        addresses: se.spec.addresses.clone(),
        ports,
        endpoints,
        discovery,
        origin: Origin::ServiceEntry {
            entry: se.meta.name.clone(),
            external: se.spec.location != Some(Location::MeshInternal),
        },
        export_to: se.spec.export_to.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::tests::config;

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

    const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: a, namespace: default }
spec: { selector: { app: a }, ports: [{ name: http, port: 80, targetPort: 8080 }] }
---
apiVersion: v1
kind: Service
metadata: { name: b, namespace: default }
spec: { selector: { app: b }, ports: [{ name: http, port: 80 }] }
---
apiVersion: v1
kind: Service
metadata: { name: a, namespace: other }
spec: { selector: { app: a }, ports: [{ name: http, port: 80 }] }
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: vms, namespace: default }
spec:
  hosts: [vms.example.internal, a.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{ name: http, number: 80, protocol: HTTP }]
  workloadSelector: { labels: { tier: vm } }
---
apiVersion: v1
kind: Pod
metadata: { name: b-pod, namespace: default, labels: { app: b } }
spec: { containers: [{ name: app }] }
status: { podIP: 10.0.0.9 }
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: a-1, namespace: default }
spec: { address: 10.0.0.1, labels: { app: a } }
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: a-2, namespace: default }
spec: { address: 10.0.0.2, labels: { app: a, tier: vm } }
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: b-1, namespace: default }
spec: { address: 10.0.0.3, labels: { app: b } }
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: a-1, namespace: other }
spec: { address: 10.0.1.1, labels: { app: a } }
"#;

    fn entry(yaml: &str) -> Arc<Object<WorkloadEntrySpec>> {
        let mut set = config(&format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n{yaml}"
        ));
        set.workload_entries.remove(0)
    }

    /// An endpoint change (WorkloadEntries moved, added, removed, relabelled) gives the same
    /// mesh as a full build, and shares what it did not touch with the mesh before.
    #[test]
    fn endpoint_changes_rebuild_only_the_services_they_touch() {
        let before = Mesh::build(&config(MESH));
        let service = |m: &Mesh, host: &str| m.services[m.service_index[host]].clone();
        type Change = Box<dyn Fn(&mut ConfigSet)>;
        let cases: Vec<(&str, Change, Vec<&str>)> = vec![
            (
                "address change",
                Box::new(|c: &mut ConfigSet| {
                    c.workload_entries[2] = entry(
                        "metadata: { name: b-1, namespace: default }\nspec: { address: 10.0.0.30, labels: { app: b } }",
                    )
                }),
                vec!["b.default.svc.cluster.local"],
            ),
            (
                "relabelled into another service and the ServiceEntry",
                Box::new(|c: &mut ConfigSet| {
                    c.workload_entries[2] = entry(
                        "metadata: { name: b-1, namespace: default }\nspec: { address: 10.0.0.3, labels: { app: a, tier: vm } }",
                    )
                }),
                vec![
                    "a.default.svc.cluster.local",
                    "b.default.svc.cluster.local",
                    "vms.example.internal",
                ],
            ),
            (
                "file re-read: the Service equal but parsed again",
                Box::new(|c: &mut ConfigSet| {
                    c.services[1] = config(MESH).services.remove(1);
                    c.workload_entries[2] = entry(
                        "metadata: { name: b-1, namespace: default }\nspec: { address: 10.0.0.31, labels: { app: b } }",
                    )
                }),
                vec!["b.default.svc.cluster.local"],
            ),
            (
                "removed",
                Box::new(|c: &mut ConfigSet| {
                    c.workload_entries.remove(1);
                }),
                vec!["a.default.svc.cluster.local", "vms.example.internal"],
            ),
            (
                "added in another namespace",
                Box::new(|c: &mut ConfigSet| {
                    c.workload_entries.push(entry(
                        "metadata: { name: a-2, namespace: other }\nspec: { address: 10.0.1.2, labels: { app: a } }",
                    ));
                    c.sort();
                }),
                vec!["a.other.svc.cluster.local"],
            ),
        ];
        let node = weft_xds_proto::envoy::config::core::v3::Node {
            id: "sidecar~10.0.0.1~a-1.default~default.svc.cluster.local".into(),
            ..Default::default()
        };
        let proxy = crate::generate::ProxyNode::identify(&node, &before).unwrap();
        // Fills `before`'s cache of encoded clusters and load assignments.
        crate::generate::generate(&before, &proxy);
        for (what, change, touched) in cases {
            let mut next = (*before.config).clone();
            change(&mut next);
            let next = Arc::new(next);
            let after = Mesh::build_after(&before, next.clone());
            let fresh = Mesh::build_shared(next);
            assert_eq!(after, fresh, "{what}");
            // What was kept encoded is what the new mesh would encode.
            assert_eq!(
                crate::generate::generate(&after, &proxy),
                crate::generate::generate(&fresh, &proxy),
                "{what}"
            );
            for s in &before.services {
                let shared = Arc::ptr_eq(s, &service(&after, &s.hostname));
                assert_eq!(
                    !shared,
                    touched.contains(&s.hostname.as_str()),
                    "{what}: {}",
                    s.hostname
                );
            }
            let found = after.find_workload("default", ["b-1", "x"], None).unwrap();
            assert_eq!(found.name, "b-1", "{what}");
        }
    }

    /// Any other change builds the whole mesh again.
    #[test]
    fn other_changes_build_afresh() {
        let before = Mesh::build(&config(MESH));
        let mut next = (*before.config).clone();
        next.services.pop();
        let next = Arc::new(next);
        let after = Mesh::build_after(&before, next.clone());
        assert_eq!(after, Mesh::build_shared(next));
        assert!(!Arc::ptr_eq(&before.services[0], &after.services[0]));
    }

    #[test]
    fn workloads_are_found_by_name_then_address() {
        let mesh = Mesh::build(&config(MESH));
        let by_name = mesh.find_workload("other", ["nope", "a-1"], None).unwrap();
        assert_eq!(by_name.address, "10.0.1.1");
        let ip = Some("10.0.0.9".parse().unwrap());
        assert_eq!(
            mesh.find_workload("default", ["x", "y"], ip).unwrap().name,
            "b-pod"
        );
        assert!(mesh.find_workload("other", ["x", "y"], ip).is_none());
        assert!(
            mesh.find_workload("default", ["b-1", "a-1"], None)
                .unwrap()
                .name
                == "a-1"
        );
    }
}
