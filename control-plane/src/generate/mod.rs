//! Per-proxy xDS generation: from the mesh model and one proxy's identity to the LDS, RDS, CDS
//! and EDS resources that proxy needs, named as Istio names them (`outbound|PORT|SUBSET|HOST`,
//! `inbound|PORT||`, route configs per port, virtual hosts per service).
//!
//! The output is plain data (`Generated`); pushing it and tracking ACKs is the `xds` module's job.

mod build;
mod policy;
pub mod proxy;
mod scope;

use std::collections::BTreeMap;

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
    fn new<M: Message + Name>(name: &str, msg: &M) -> Resource {
        let any = weft_xds_proto::pack(msg);
        let content = fnv1a(&any.value);
        let version = format!("{content:016x}");
        let key = fnv1a_continue(fnv1a(name.as_bytes()), &content.to_le_bytes());
        Resource { any, version, key }
    }
}

/// Everything one proxy gets: resources by type URL, then by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generated {
    pub resources: BTreeMap<&'static str, BTreeMap<String, Resource>>,
    /// Problems worth telling the operator about (config that could not take effect).
    pub warnings: Vec<String>,
}

impl Generated {
    fn add<M: Message + Name>(&mut self, type_url: &'static str, name: String, msg: &M) {
        let r = Resource::new(&name, msg);
        self.resources.entry(type_url).or_default().insert(name, r);
    }

    pub fn of_type(&self, type_url: &str) -> Option<&BTreeMap<String, Resource>> {
        self.resources.get(type_url)
    }

    /// A version for a whole set of resources of one type (state-of-the-world responses): the
    /// sum of each resource's (name, content) hash, so it is independent of order and cheap to
    /// compute for a subscribed subset (one merge pass over two sorted sequences).
    pub fn type_version(
        &self,
        type_url: &str,
        names: Option<&std::collections::BTreeSet<String>>,
    ) -> String {
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
        format!("{sum:016x}")
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
        out.resources.insert(kind, BTreeMap::new());
    }
    let scope = scope::Scope::new(mesh, proxy);
    build::outbound(mesh, &scope, &mut out);
    build::inbound(&scope, &mut out);
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

#[cfg(test)]
pub(crate) mod tests;
