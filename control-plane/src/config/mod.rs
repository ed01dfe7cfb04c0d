//! Config objects: parsing YAML documents into typed, validated Kubernetes/Istio objects.
//!
//! One bad object never blocks the others: parsing a file yields the good objects plus a list of
//! [`ConfigError`]s, each naming the file, the object (`Kind/namespace/name`), the field path and
//! the reason. This module knows nothing about xDS; see `generate` for that.

pub mod kinds;
pub mod source;
pub mod validate;

pub use validate::parse_default_endpoint;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

pub use kinds::*;

/// The kinds this weftd version serves. Others (Deployment, ServiceAccount, ...) are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    WorkloadEntry,
    VirtualService,
    DestinationRule,
    Sidecar,
    ServiceEntry,
    Gateway,
    Pod,
    Endpoints,
    EndpointSlice,
    Namespace,
    PeerAuthentication,
    AuthorizationPolicy,
}

impl Kind {
    fn from_type_meta(api_version: &str, kind: &str) -> Option<Kind> {
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        match (group, kind) {
            ("", "Service") => Some(Kind::Service),
            ("networking.istio.io", "WorkloadEntry") => Some(Kind::WorkloadEntry),
            ("networking.istio.io", "VirtualService") => Some(Kind::VirtualService),
            ("networking.istio.io", "DestinationRule") => Some(Kind::DestinationRule),
            ("networking.istio.io", "Sidecar") => Some(Kind::Sidecar),
            ("networking.istio.io", "ServiceEntry") => Some(Kind::ServiceEntry),
            ("networking.istio.io", "Gateway") => Some(Kind::Gateway),
            ("", "Pod") => Some(Kind::Pod),
            ("", "Endpoints") => Some(Kind::Endpoints),
            ("discovery.k8s.io", "EndpointSlice") => Some(Kind::EndpointSlice),
            ("", "Namespace") => Some(Kind::Namespace),
            ("security.istio.io", "PeerAuthentication") => Some(Kind::PeerAuthentication),
            ("security.istio.io", "AuthorizationPolicy") => Some(Kind::AuthorizationPolicy),
            _ => None,
        }
    }

    fn istio_versions_ok(api_version: &str) -> bool {
        match api_version.split_once('/') {
            Some(("networking.istio.io", v)) => matches!(v, "v1" | "v1beta1" | "v1alpha3"),
            Some(("security.istio.io", v)) => matches!(v, "v1" | "v1beta1"),
            Some(("discovery.k8s.io", v)) => v == "v1",
            _ => api_version == "v1",
        }
    }

    /// Kinds whose payload is the whole object body (Pod's spec and status, Endpoints'
    /// subsets, ...) rather than `spec`.
    fn body_is_top_level(self) -> bool {
        matches!(
            self,
            Kind::Pod | Kind::Endpoints | Kind::EndpointSlice | Kind::Namespace
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Where an object came from, for error messages and debug output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// Zero-based index of the YAML document in the file.
    pub document: usize,
}

/// A typed, validated object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object<T> {
    pub meta: ObjectMeta,
    pub namespace: String,
    pub spec: T,
    pub origin: Origin,
}

impl<T> Object<T> {
    pub fn name(&self) -> &str {
        &self.meta.name
    }
}

/// An object shared between the per-file parse cache, the merged config and the mesh model.
pub type Shared<T> = std::sync::Arc<Object<T>>;

/// Every object weftd serves, grouped by kind and sorted by (namespace, name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigSet {
    pub services: Vec<Shared<ServiceSpec>>,
    pub workload_entries: Vec<Shared<WorkloadEntrySpec>>,
    pub virtual_services: Vec<Shared<VirtualServiceSpec>>,
    pub destination_rules: Vec<Shared<DestinationRuleSpec>>,
    pub sidecars: Vec<Shared<SidecarSpec>>,
    pub service_entries: Vec<Shared<ServiceEntrySpec>>,
    pub gateways: Vec<Shared<GatewaySpec>>,
    pub pods: Vec<Shared<PodBody>>,
    pub endpoints: Vec<Shared<EndpointsBody>>,
    pub endpoint_slices: Vec<Shared<EndpointSliceBody>>,
    pub namespaces: Vec<Shared<NamespaceBody>>,
    pub peer_authentications: Vec<Shared<PeerAuthenticationSpec>>,
    pub authorization_policies: Vec<Shared<AuthorizationPolicySpec>>,
}

/// A rejected object or document: file, object, field path and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub document: usize,
    /// `Kind/namespace/name`, or empty when the document could not be identified.
    pub object: String,
    /// Dotted field path, such as `spec.http[0].route[1].weight`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (document {})",
            self.file.display(),
            self.document + 1
        )?;
        if !self.object.is_empty() {
            write!(f, ": {}", self.object)?;
        }
        if !self.field.is_empty() {
            write!(f, ": field {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigSet {
    /// Parses one file's text (any number of YAML documents) into this set, returning the
    /// errors of the documents that were rejected.
    pub fn add_file(&mut self, file: &Path, text: &str) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        for (document, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let err = |object: String, field: &str, reason: String| ConfigError {
                file: file.to_path_buf(),
                document,
                object,
                field: field.to_string(),
                reason,
            };
            let value: serde_json::Value = match serde::Deserialize::deserialize(de) {
                Ok(v) => v,
                Err(e) => {
                    errors.push(err(String::new(), "", format!("invalid YAML: {e}")));
                    // A syntax error ends the stream: serde_yaml cannot resynchronise.
                    break;
                }
            };
            if value.is_null() {
                continue; // empty document, e.g. a trailing `---`
            }
            if let Err(e) = self.add_value(file, document, value) {
                errors.push(e);
            }
        }
        errors
    }

    fn add_value(
        &mut self,
        file: &Path,
        document: usize,
        value: serde_json::Value,
    ) -> Result<(), ConfigError> {
        let mk = |object: String, field: &str, reason: String| ConfigError {
            file: file.to_path_buf(),
            document,
            object,
            field: field.to_string(),
            reason,
        };
        let serde_json::Value::Object(mut map) = value else {
            return Err(mk(
                String::new(),
                "",
                "a document must be a mapping with apiVersion and kind".into(),
            ));
        };
        let api_version = map
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let kind_name = map
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        if api_version.is_empty() || kind_name.is_empty() {
            return Err(mk(String::new(), "", "missing apiVersion or kind".into()));
        }
        if kind_name == "List" {
            let items = map.remove("items").unwrap_or_default();
            let items = items.as_array().cloned().unwrap_or_default();
            for item in items {
                self.add_value(file, document, item)?;
            }
            return Ok(());
        }
        let Some(kind) = Kind::from_type_meta(&api_version, &kind_name) else {
            tracing::debug!(file = %file.display(), kind = %kind_name, "skipping a kind weftd does not serve");
            return Ok(());
        };
        let meta_value = map.remove("metadata").unwrap_or_default();
        let meta: ObjectMeta = parse_at(meta_value, "metadata")
            .map_err(|(field, reason)| mk(format!("{kind}/?"), &field, reason))?;
        let namespace = meta
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let object = format!("{kind}/{namespace}/{}", meta.name);
        if !Kind::istio_versions_ok(&api_version) {
            return Err(mk(
                object,
                "apiVersion",
                format!("unsupported apiVersion {api_version:?}"),
            ));
        }
        validate::name(&meta.name).map_err(|r| mk(object.clone(), "metadata.name", r))?;
        validate::name(&namespace).map_err(|r| mk(object.clone(), "metadata.namespace", r))?;
        let (spec, root) = if kind.body_is_top_level() {
            map.remove("apiVersion");
            map.remove("kind");
            (serde_json::Value::Object(map), "")
        } else {
            let spec = map.remove("spec");
            (
                spec.unwrap_or(serde_json::Value::Object(Default::default())),
                "spec",
            )
        };
        // A Namespace is cluster-scoped: it is its own namespace.
        let namespace = if kind == Kind::Namespace {
            meta.name.clone()
        } else {
            namespace
        };
        let origin = Origin {
            file: file.to_path_buf(),
            document,
        };
        let fail = |(field, reason): (String, String)| mk(object.clone(), &field, reason);
        macro_rules! push {
            ($vec:ident, $check:path) => {{
                let spec = parse_at(spec, root).map_err(fail)?;
                $check(&spec).map_err(fail)?;
                let obj = Object {
                    meta,
                    namespace,
                    spec,
                    origin,
                };
                // A later object of the same kind, namespace and name replaces an earlier one;
                // `sort` removes the earlier copies.
                self.$vec.push(std::sync::Arc::new(obj));
            }};
        }
        match kind {
            Kind::Service => push!(services, validate::service),
            Kind::WorkloadEntry => push!(workload_entries, validate::workload_entry),
            Kind::VirtualService => push!(virtual_services, validate::virtual_service),
            Kind::DestinationRule => push!(destination_rules, validate::destination_rule),
            Kind::Sidecar => push!(sidecars, validate::sidecar),
            Kind::ServiceEntry => push!(service_entries, validate::service_entry),
            Kind::Gateway => push!(gateways, validate::gateway),
            Kind::Pod => push!(pods, validate::pod),
            Kind::Endpoints => push!(endpoints, validate::endpoints),
            Kind::EndpointSlice => push!(endpoint_slices, validate::endpoint_slice),
            Kind::Namespace => push!(namespaces, validate::accept),
            Kind::PeerAuthentication => push!(peer_authentications, validate::peer_authentication),
            Kind::AuthorizationPolicy => {
                push!(authorization_policies, validate::authorization_policy)
            }
        }
        Ok(())
    }

    /// Sorts every kind by (namespace, name) so generation is deterministic, keeping only the
    /// last-added object of each name (a later definition replaces an earlier one).
    pub fn sort(&mut self) {
        fn by_key<T>(v: &mut Vec<Shared<T>>) {
            // Stable: copies of one name stay in the order they were added.
            v.sort_by(|a, b| (&a.namespace, &a.meta.name).cmp(&(&b.namespace, &b.meta.name)));
            let mut keep = vec![true; v.len()];
            for i in 0..v.len().saturating_sub(1) {
                keep[i] = (&v[i].namespace, &v[i].meta.name)
                    != (&v[i + 1].namespace, &v[i + 1].meta.name);
            }
            let mut i = 0;
            v.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        }
        by_key(&mut self.services);
        by_key(&mut self.workload_entries);
        by_key(&mut self.virtual_services);
        by_key(&mut self.destination_rules);
        by_key(&mut self.sidecars);
        by_key(&mut self.service_entries);
        by_key(&mut self.gateways);
        by_key(&mut self.pods);
        by_key(&mut self.endpoints);
        by_key(&mut self.endpoint_slices);
        by_key(&mut self.namespaces);
        by_key(&mut self.peer_authentications);
        by_key(&mut self.authorization_policies);
    }

    /// `Kind/namespace/name` of every object (as errors name them).
    pub fn ids(&self) -> std::collections::HashSet<String> {
        let mut out = std::collections::HashSet::new();
        self.each_id(|id| {
            out.insert(id);
        });
        out
    }

    fn each_id(&self, mut f: impl FnMut(String)) {
        macro_rules! ids {
            ($($field:ident => $kind:expr),*) => {
                $( for o in &self.$field { f(format!("{}/{}/{}", $kind, o.namespace, o.meta.name)); } )*
            };
        }
        ids!(services => Kind::Service, workload_entries => Kind::WorkloadEntry,
            virtual_services => Kind::VirtualService, destination_rules => Kind::DestinationRule,
            sidecars => Kind::Sidecar, service_entries => Kind::ServiceEntry,
            gateways => Kind::Gateway, pods => Kind::Pod, endpoints => Kind::Endpoints,
            endpoint_slices => Kind::EndpointSlice, namespaces => Kind::Namespace,
            peer_authentications => Kind::PeerAuthentication,
            authorization_policies => Kind::AuthorizationPolicy);
    }

    /// Copies the objects of `previous` whose `Kind/namespace/name` `keep` selects; returns
    /// their ids.
    pub fn carry_over(&mut self, previous: &ConfigSet, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let mut carried = Vec::new();
        macro_rules! carry {
            ($($field:ident => $kind:expr),*) => {
                $( for o in &previous.$field {
                    let id = format!("{}/{}/{}", $kind, o.namespace, o.meta.name);
                    if keep(&id) {
                        self.$field.push(o.clone());
                        carried.push(id);
                    }
                } )*
            };
        }
        carry!(services => Kind::Service, workload_entries => Kind::WorkloadEntry,
            virtual_services => Kind::VirtualService, destination_rules => Kind::DestinationRule,
            sidecars => Kind::Sidecar, service_entries => Kind::ServiceEntry,
            gateways => Kind::Gateway, pods => Kind::Pod, endpoints => Kind::Endpoints,
            endpoint_slices => Kind::EndpointSlice, namespaces => Kind::Namespace,
            peer_authentications => Kind::PeerAuthentication,
            authorization_policies => Kind::AuthorizationPolicy);
        carried
    }

    /// Equal to `other`; objects shared with it (unchanged files) compare by pointer.
    pub fn same_as(&self, other: &ConfigSet) -> bool {
        same_objects(&self.workload_entries, &other.workload_entries)
            && self.same_but_workload_entries(other)
    }

    /// `same_as`, leaving WorkloadEntries out (an endpoint change).
    pub fn same_but_workload_entries(&self, other: &ConfigSet) -> bool {
        same_objects(&self.services, &other.services)
            && same_objects(&self.virtual_services, &other.virtual_services)
            && same_objects(&self.destination_rules, &other.destination_rules)
            && same_objects(&self.sidecars, &other.sidecars)
            && same_objects(&self.service_entries, &other.service_entries)
            && same_objects(&self.gateways, &other.gateways)
            && same_objects(&self.pods, &other.pods)
            && same_objects(&self.endpoints, &other.endpoints)
            && same_objects(&self.endpoint_slices, &other.endpoint_slices)
            && same_objects(&self.namespaces, &other.namespaces)
            && same_objects(&self.peer_authentications, &other.peer_authentications)
            && same_objects(&self.authorization_policies, &other.authorization_policies)
    }

    /// Appends every object of `other` (later files win on equal names once sorted).
    pub fn extend_from(&mut self, other: &ConfigSet) {
        self.services.extend_from_slice(&other.services);
        self.workload_entries
            .extend_from_slice(&other.workload_entries);
        self.virtual_services
            .extend_from_slice(&other.virtual_services);
        self.destination_rules
            .extend_from_slice(&other.destination_rules);
        self.sidecars.extend_from_slice(&other.sidecars);
        self.service_entries
            .extend_from_slice(&other.service_entries);
        self.gateways.extend_from_slice(&other.gateways);
        self.pods.extend_from_slice(&other.pods);
        self.endpoints.extend_from_slice(&other.endpoints);
        self.endpoint_slices
            .extend_from_slice(&other.endpoint_slices);
        self.namespaces.extend_from_slice(&other.namespaces);
        self.peer_authentications
            .extend_from_slice(&other.peer_authentications);
        self.authorization_policies
            .extend_from_slice(&other.authorization_policies);
    }

    /// Object counts per kind, for logs and debug output.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        BTreeMap::from([
            ("Service", self.services.len()),
            ("WorkloadEntry", self.workload_entries.len()),
            ("VirtualService", self.virtual_services.len()),
            ("DestinationRule", self.destination_rules.len()),
            ("Sidecar", self.sidecars.len()),
            ("ServiceEntry", self.service_entries.len()),
            ("Gateway", self.gateways.len()),
            ("Pod", self.pods.len()),
            ("Endpoints", self.endpoints.len()),
            ("EndpointSlice", self.endpoint_slices.len()),
            ("Namespace", self.namespaces.len()),
            ("PeerAuthentication", self.peer_authentications.len()),
            ("AuthorizationPolicy", self.authorization_policies.len()),
        ])
    }
}

/// Deserializes `value` as `T`, reporting failures with the field path under `root`.
fn parse_at<T: DeserializeOwned>(
    value: serde_json::Value,
    root: &str,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = match (path.as_str(), root) {
            (".", _) => root.to_string(),
            (_, "") => path,
            _ => format!("{root}.{path}"),
        };
        (field, e.into_inner().to_string())
    })
}

/// Whether two lists hold the same objects: an unchanged file's objects are shared between
/// config snapshots (compared by pointer), those of a changed file are compared by value.
pub fn same_objects<T: PartialEq>(a: &[Shared<T>], b: &[Shared<T>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| std::sync::Arc::ptr_eq(x, y) || x == y)
}

#[cfg(test)]
mod tests;
