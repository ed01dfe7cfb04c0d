//! Per-proxy xDS generation: from the mesh model and one proxy's identity to the LDS, RDS, CDS
//! and EDS resources that proxy needs, named as Istio names them (`outbound|PORT|SUBSET|HOST`,
//! `inbound|PORT||`, route configs per port, virtual hosts per service).
//!
//! The output is plain data (`Generated`); pushing it and tracking ACKs is the `xds` module's job.

mod authz;
mod build;
mod capture;
mod delegate;
mod gateway;
mod policy;
pub mod proxy;
mod scope;
pub mod security;

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::{Message, Name};
use weft_xds_proto::type_url;
use weft_xds_proto::wkt::Any;

pub use build::{inbound_cluster_name, outbound_cluster_name};
pub use proxy::{NodeError, ProxyClass, ProxyNode};
pub use scope::host_matches;

use crate::model::Mesh;

/// One xDS resource, encoded, with a content version (a hash of its bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub any: Any,
    pub version: String,
    /// Hash of the name and the content, summed into type versions.
    key: u64,
}

impl Resource {
    /// A hash of the name and the content: equal keys, same resource and same bytes.
    pub fn key(&self) -> u64 {
        self.key
    }

    fn new<M: Message + Name>(name: &str, msg: &M) -> Resource {
        let any = weft_xds_proto::pack(msg);
        let content = fnv1a(&any.value);
        let version = format!("{content:016x}");
        let key = fnv1a_continue(fnv1a(name.as_bytes()), &content.to_le_bytes());
        Resource { any, version, key }
    }
}

/// Resources of one type by name; shared between generations that did not change them, and
/// each resource shared between the proxies that get the same one.
pub type Resources = Arc<BTreeMap<String, Arc<Resource>>>;

/// Resources that do not depend on which proxy asks (a service's clusters and load
/// assignments), encoded once per mesh snapshot and shared by every proxy's generation.
#[derive(Default)]
pub struct SharedResources(
    std::sync::Mutex<std::collections::HashMap<(&'static str, String), Arc<Resource>>>,
);

impl SharedResources {
    /// The cached resource, or `make`'s result encoded, cached and returned.
    fn get_or_add<M: Message + Name>(
        &self,
        type_url: &'static str,
        name: &str,
        make: impl FnOnce() -> M,
    ) -> Arc<Resource> {
        let key = (type_url, name.to_string());
        if let Some(r) = self.0.lock().expect("resource cache lock").get(&key) {
            return r.clone();
        }
        let r = Arc::new(Resource::new(name, &make()));
        self.0
            .lock()
            .expect("resource cache lock")
            .entry(key)
            .or_insert(r)
            .clone()
    }

    /// Takes over `other`'s resources whose cache key `keep` accepts.
    pub fn keep_from(&self, other: &SharedResources, keep: impl Fn(&str) -> bool) {
        let theirs = other.0.lock().expect("resource cache lock");
        let mut ours = self.0.lock().expect("resource cache lock");
        for (key, r) in theirs.iter() {
            if keep(&key.1) {
                ours.insert(key.clone(), r.clone());
            }
        }
    }
}

impl std::fmt::Debug for SharedResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedResources")
    }
}

/// A new mesh starts with an empty cache; caches never make two meshes differ.
impl Clone for SharedResources {
    fn clone(&self) -> Self {
        SharedResources::default()
    }
}

impl PartialEq for SharedResources {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Everything one proxy gets: resources by type URL, then by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generated {
    pub resources: BTreeMap<&'static str, Resources>,
    /// Problems worth telling the operator about (config that could not take effect).
    pub warnings: Vec<String>,
}

impl Generated {
    fn add<M: Message + Name>(&mut self, type_url: &'static str, name: String, msg: &M) {
        let r = Arc::new(Resource::new(&name, msg));
        self.add_shared(type_url, name, r);
    }

    fn add_shared(&mut self, type_url: &'static str, name: String, r: Arc<Resource>) {
        Arc::make_mut(self.resources.entry(type_url).or_default()).insert(name, r);
    }

    pub fn of_type(&self, type_url: &str) -> Option<&BTreeMap<String, Arc<Resource>>> {
        self.resources.get(type_url).map(|m| &**m)
    }

    /// The type's resources as the shared map (empty when there are none): a stream keeps it
    /// to tell, by pointer, whether a later generation changed them.
    pub fn shared_of_type(&self, type_url: &str) -> Resources {
        self.resources.get(type_url).cloned().unwrap_or_default()
    }

    /// A version for a whole set of resources of one type (state-of-the-world responses): the
    /// sum of each resource's (name, content) hash, so it is independent of order and cheap to
    /// compute for a subscribed subset (one merge pass over two sorted sequences).
    pub fn type_version(
        &self,
        type_url: &str,
        names: Option<&std::collections::BTreeSet<String>>,
    ) -> String {
        format!("{:016x}", self.type_sum(type_url, names))
    }

    /// `type_version` as a number: a change of some resources moves it by the difference of
    /// their keys, so a push of a few of them can keep it without a pass over all.
    pub fn type_sum(
        &self,
        type_url: &str,
        names: Option<&std::collections::BTreeSet<String>>,
    ) -> u64 {
        let mut sum = 0u64;
        if let Some(all) = self.of_type(type_url) {
            match names {
                None => {
                    for r in all.values() {
                        sum = sum.wrapping_add(r.key);
                    }
                }
                Some(names) => {
                    let mut wanted = names.iter().peekable();
                    for (name, r) in all {
                        while wanted.next_if(|w| w.as_str() < name.as_str()).is_some() {}
                        if wanted.next_if(|w| *w == name).is_some() {
                            sum = sum.wrapping_add(r.key);
                        }
                    }
                }
            }
        }
        sum
    }
}

/// Generates the full xDS state for one proxy.
pub fn generate(mesh: &Mesh, proxy: &ProxyNode) -> Generated {
    let mut out = Generated::default();
    for kind in [
        type_url::CLUSTER,
        type_url::CLUSTER_LOAD_ASSIGNMENT,
        type_url::LISTENER,
        type_url::ROUTE_CONFIGURATION,
    ] {
        out.resources.insert(kind, Resources::default());
    }
    let scope = scope::Scope::new(mesh, proxy);
    build::outbound(mesh, &scope, &mut out);
    build::endpoints(mesh, &scope, &mut out);
    build::inbound(mesh, &scope, &mut out);
    gateway::listeners(mesh, &scope, &mut out);
    if let Some(t) = &mesh.settings.tracing {
        out.add(
            type_url::CLUSTER,
            build::ZIPKIN_CLUSTER.into(),
            &build::zipkin_cluster(t),
        );
    }
    out
}

/// Regenerates only the endpoints (EDS) of `previous`, for a mesh whose structure (everything
/// but EDS endpoints, see `Mesh::same_structure`) is unchanged since `previous` was generated.
/// The other types are shared with `previous`, not copied.
pub fn regenerate_endpoints(mesh: &Mesh, proxy: &ProxyNode, previous: &Generated) -> Generated {
    regenerate_some_endpoints(mesh, proxy, previous, None)
}

/// `regenerate_endpoints` when only the endpoints of the services named in `touched` (by
/// hostname) changed since `previous` was generated: the other load assignments are kept.
/// Visibility and subsets cannot have changed (same structure), so the clusters `previous`
/// holds are exactly those to update.
pub fn regenerate_some_endpoints(
    mesh: &Mesh,
    proxy: &ProxyNode,
    previous: &Generated,
    touched: Option<&std::collections::HashSet<String>>,
) -> Generated {
    let Some(touched) = touched else {
        return regenerate_all_endpoints(mesh, proxy, previous);
    };
    let mut out = previous.clone();
    let eds = Arc::make_mut(
        out.resources
            .entry(type_url::CLUSTER_LOAD_ASSIGNMENT)
            .or_default(),
    );
    for svc in touched.iter().filter_map(|host| mesh.service(host)) {
        if svc.discovery != crate::model::Discovery::Eds {
            continue;
        }
        build::service_endpoints(mesh, &proxy.namespace, svc, |name, r| {
            if let Some(slot) = eds.get_mut(&name) {
                *slot = r;
            }
        });
    }
    out
}

fn regenerate_all_endpoints(mesh: &Mesh, proxy: &ProxyNode, previous: &Generated) -> Generated {
    let mut out = previous.clone();
    out.resources
        .insert(type_url::CLUSTER_LOAD_ASSIGNMENT, Resources::default());
    let scope = scope::Scope::new(mesh, proxy);
    build::endpoints(mesh, &scope, &mut out);
    out
}

const FNV_OFFSET: u64 = 0xcbf29ce484222325;

fn fnv1a_continue(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_continue(FNV_OFFSET, bytes)
}

/// FNV-1a as a `Hasher`: quick for the short keys of the model's indexes.
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(FNV_OFFSET)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = fnv1a_continue(self.0, bytes);
    }
}

#[cfg(test)]
pub(crate) mod tests;
