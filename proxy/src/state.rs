//! The proxy's live config: an immutable snapshot of clusters and route tables swapped
//! atomically (readers on the request path never block), the listener set, and the raw xDS
//! resources as accepted (for `/config_dump`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use weft_xds_proto::envoy::config::bootstrap::v3::Bootstrap;
use weft_xds_proto::wkt::Any;

use crate::cluster::Cluster;
use crate::http::router::RouteTable;
use crate::listener::Listeners;

/// Clusters and route tables, as the request path sees them.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub clusters: NameMap<Arc<Cluster>>,
    pub routes: NameMap<Arc<RouteTable>>,
}

/// A map looked up by name on every request: FNV, which hashes a short name in a few
/// instructions where the standard library's SipHash takes hundreds. The keys come from
/// configuration, not from requests, so SipHash's flooding resistance buys nothing here.
pub type NameMap<V> = HashMap<String, V, fnv::FnvBuildHasher>;

/// One accepted xDS resource, for `/config_dump`.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub version: String,
    pub resource: Any,
    pub last_updated: SystemTime,
}

/// Accepted resources by type URL, then name.
pub type AcceptedResources = BTreeMap<&'static str, BTreeMap<String, Accepted>>;

/// Envoy's server states, reported on `/ready` and `/server_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Waiting for the first CDS/LDS from the control plane.
    Initializing,
    Live,
}

pub struct Proxy {
    snapshot: ArcSwap<Snapshot>,
    pub listeners: Listeners,
    pub accepted: Mutex<AcceptedResources>,
    pub bootstrap: Bootstrap,
    pub started: SystemTime,
    state: Mutex<ServerState>,
    /// Runtimes of the worker threads; listeners accept on each.
    pub workers: Vec<tokio::runtime::Handle>,
}

impl Proxy {
    /// A proxy whose listeners run on `workers` (empty: on the caller's runtime, for tests).
    pub fn new(bootstrap: Bootstrap, workers: Vec<tokio::runtime::Handle>) -> Arc<Proxy> {
        Arc::new(Proxy {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            listeners: Listeners::default(),
            accepted: Mutex::new(BTreeMap::new()),
            bootstrap,
            started: SystemTime::now(),
            state: Mutex::new(ServerState::Initializing),
            workers,
        })
    }

    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Builds a new snapshot from the current one and swaps it in.
    pub fn update(&self, f: impl FnOnce(&Snapshot) -> Snapshot) {
        let next = f(&self.snapshot.load_full());
        self.snapshot.store(Arc::new(next));
    }

    pub fn state(&self) -> ServerState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_state(&self, s: ServerState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    pub fn record_accepted(
        &self,
        type_url: &'static str,
        version: &str,
        resources: impl IntoIterator<Item = (String, Any)>,
        replace_all: bool,
    ) {
        let now = SystemTime::now();
        let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        let of_type = accepted.entry(type_url).or_default();
        let fresh: BTreeMap<String, Accepted> = resources
            .into_iter()
            .map(|(name, resource)| {
                let unchanged = of_type
                    .get(&name)
                    .filter(|a| a.resource == resource)
                    .map(|a| a.last_updated);
                (
                    name,
                    Accepted {
                        version: version.to_string(),
                        resource,
                        last_updated: unchanged.unwrap_or(now),
                    },
                )
            })
            .collect();
        if replace_all {
            *of_type = fresh;
        } else {
            of_type.extend(fresh);
        }
    }
}
