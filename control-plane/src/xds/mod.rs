//! The ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService`), state of the world
//! and delta. Each stream identifies its proxy from the first request's node, generates that
//! proxy's resources from the current mesh, answers subscriptions, records ACKs/NACKs, and
//! pushes again whenever the mesh changes.

mod delta;
mod framing;
mod session;
mod sotw;
pub mod status;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use weft_xds_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};

use crate::generate::{Generated, ProxyClass, ProxyNode};
use crate::model::Mesh;
pub use status::StatusRegistry;

/// The mesh as the xDS server sees it: rebuilt on each config change.
#[derive(Debug, Default)]
pub struct MeshSnapshot {
    pub mesh: Mesh,
    pub generation: u64,
    /// Objects the config source rejected, with their reasons.
    pub errors: Vec<crate::config::ConfigError>,
    /// Generated xDS per proxy class, filled as proxies ask: every replica of a deployment shares
    /// one generation (and one copy in memory) per snapshot.
    generated: Mutex<HashMap<ProxyClass, Arc<Generated>>>,
    /// Earlier snapshots' generations (with the snapshot generation each was made for), when
    /// only endpoints changed since: a class found here regenerates its EDS only.
    previous: HashMap<ProxyClass, (Arc<Generated>, u64)>,
    /// The services (hostnames) whose endpoints changed since the snapshot of generation `.0`
    /// (the one just before): a class generated for that snapshot updates only their load
    /// assignments (never more work than generating all of them).
    touched: Option<(u64, std::collections::HashSet<String>)>,
}

impl MeshSnapshot {
    pub fn new(
        mesh: Mesh,
        generation: u64,
        errors: Vec<crate::config::ConfigError>,
    ) -> MeshSnapshot {
        MeshSnapshot {
            mesh,
            generation,
            errors,
            generated: Mutex::default(),
            previous: HashMap::new(),
            touched: None,
        }
    }

    /// A snapshot that follows `before`: when the change touched endpoints only, proxies get
    /// their previous clusters, listeners and routes back and only EDS is generated.
    pub fn after(
        before: &MeshSnapshot,
        mesh: Mesh,
        generation: u64,
        errors: Vec<crate::config::ConfigError>,
    ) -> MeshSnapshot {
        let mut next = MeshSnapshot::new(mesh, generation, errors);
        if next.mesh.same_structure(&before.mesh) {
            let mut previous = before.previous.clone();
            previous.extend(
                before
                    .generated
                    .lock()
                    .expect("cache lock")
                    .iter()
                    .map(|(k, v)| (k.clone(), (v.clone(), before.generation))),
            );
            next.previous = previous;
            // A service the new mesh shares with the old one has the same endpoints.
            let touched = next
                .mesh
                .services_changed_since(&before.mesh)
                .into_iter()
                .map(str::to_string)
                .collect();
            next.touched = Some((before.generation, touched));
        }
        next
    }

    /// The xDS for a proxy, generated on first use per class. Concurrent first requests for one
    /// class may both generate; the results are equal and one is kept.
    pub fn generated_for(&self, proxy: &ProxyNode) -> Arc<Generated> {
        let class = proxy.class();
        if let Some(g) = self.generated.lock().expect("cache lock").get(&class) {
            return g.clone();
        }
        let started = std::time::Instant::now();
        let (g, only) = match self.previous.get(&class) {
            Some((before, made_for)) => {
                let touched = self
                    .touched
                    .as_ref()
                    .filter(|(since, _)| since == made_for)
                    .map(|(_, t)| t);
                (
                    crate::generate::regenerate_some_endpoints(&self.mesh, proxy, before, touched),
                    "endpoints",
                )
            }
            None => (crate::generate::generate(&self.mesh, proxy), "all"),
        };
        let g = Arc::new(g);
        tracing::debug!(generation = self.generation, namespace = %class.namespace, labels = ?class.labels, types = only, took_ms = started.elapsed().as_secs_f64() * 1000.0, "xDS generated for a proxy class");
        if only == "all" {
            for w in &g.warnings {
                tracing::warn!(namespace = %class.namespace, labels = ?class.labels, "{w}");
            }
        }
        self.generated
            .lock()
            .expect("cache lock")
            .entry(class)
            .or_insert(g)
            .clone()
    }
}

#[derive(Clone)]
pub struct XdsServer {
    mesh: watch::Receiver<Arc<MeshSnapshot>>,
    status: Arc<StatusRegistry>,
    identifier: String,
}

impl XdsServer {
    pub fn new(mesh: watch::Receiver<Arc<MeshSnapshot>>, status: Arc<StatusRegistry>) -> XdsServer {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        XdsServer {
            mesh,
            status,
            identifier: format!("weftd-{}", host.trim()),
        }
    }

    /// The ADS service for tonic's router (see `framing` for why not the generated one).
    pub fn into_service(self) -> framing::AdsService {
        framing::AdsService(self)
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn peer_of<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .or_else(|| secure_info(req).and_then(|s| s.remote))
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn secure_info<T>(req: &Request<T>) -> Option<&crate::ca::secure::SecureConnInfo> {
    req.extensions().get::<crate::ca::secure::SecureConnInfo>()
}

/// On the TLS port a proxy must present its workload certificate; the identity it proves is
/// then held against the node it claims (see `Session::identify`). None: the plaintext port.
fn required_identity<T>(req: &Request<T>) -> Result<Option<crate::ca::SpiffeId>, Status> {
    match secure_info(req) {
        None => Ok(None),
        Some(info) => match &info.peer_identity {
            Some(id) => Ok(Some(id.clone())),
            None => Err(Status::unauthenticated(
                "the TLS xDS port needs the proxy's workload certificate (a client certificate from the mesh CA with a SPIFFE identity)",
            )),
        },
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = peer_of(&request);
        let required = required_identity(&request)?;
        let (tx, rx) = mpsc::channel(16);
        let mut session = session::Session::open(self.clone(), "sotw", peer, tx);
        session.required_identity = required;
        tokio::spawn(session::drive(
            sotw::Sotw::new(session),
            request.into_inner(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = peer_of(&request);
        let required = required_identity(&request)?;
        let (tx, rx) = mpsc::channel(16);
        let mut session = session::Session::open(self.clone(), "delta", peer, tx);
        session.required_identity = required;
        tokio::spawn(session::drive(
            delta::Delta::new(session),
            request.into_inner(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl XdsServer {
    /// Identifies the proxy and generates its resources from the current mesh.
    fn generate_for(
        &self,
        node: &weft_xds_proto::envoy::config::core::v3::Node,
    ) -> Result<(ProxyNode, Arc<Generated>), Status> {
        let snapshot = self.mesh.borrow().clone();
        let proxy = ProxyNode::identify(node, &snapshot.mesh)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let generated = snapshot.generated_for(&proxy);
        Ok((proxy, generated))
    }
}

/// The resources of `now` whose content differs from `before`: (name, before, now). One pass
/// over both maps comparing pointers (an unchanged resource is usually the very same shared
/// `Resource`); names and content keys are compared only where the pointers differ. None when
/// the two maps do not hold the same names.
fn changed<'a>(
    before: &'a crate::generate::Resources,
    now: &'a crate::generate::Resources,
) -> Option<
    Vec<(
        &'a str,
        &'a crate::generate::Resource,
        &'a crate::generate::Resource,
    )>,
> {
    if Arc::ptr_eq(before, now) {
        return Some(Vec::new());
    }
    if before.len() != now.len() {
        return None;
    }
    let mut out = Vec::new();
    for ((old_name, old), (name, new)) in before.iter().zip(now.iter()) {
        if Arc::ptr_eq(old, new) {
            continue;
        }
        if old_name != name {
            return None;
        }
        if old.key() != new.key() {
            out.push((name.as_str(), &**old, &**new));
        }
    }
    Some(out)
}

/// Types whose subscription is a wildcard when no names are given (Envoy's LDS and CDS).
fn is_wildcard_type(type_url: &str) -> bool {
    type_url == weft_xds_proto::type_url::LISTENER || type_url == weft_xds_proto::type_url::CLUSTER
}

#[cfg(test)]
mod tests;
