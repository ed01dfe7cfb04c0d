//! Listeners from LDS: each binds its address once and serves connections with the filter chain
//! of its current config. An update that keeps the address swaps the config in place (open
//! connections finish on the old one); a removed listener stops accepting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use weft_xds_proto::envoy::config::listener::v3::{Listener as XdsListener, filter};
use weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy as XdsTcpProxy;
use weft_xds_proto::type_url;

use crate::Rejection;
use crate::cluster::socket_addr;
use crate::http::ConnectionManager;
use crate::state::Proxy;
use crate::tcp::TcpProxy;

/// How long a new listener waits for its route configuration before accepting anyway.
const WARMING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// What a listener does with a connection: its one network filter.
#[derive(Debug)]
pub enum NetworkFilter {
    Http(Arc<ConnectionManager>),
    Tcp(Arc<TcpProxy>),
}

#[derive(Debug)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub filter: NetworkFilter,
    /// TLS termination (the filter chain's `transport_socket`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub source: XdsListener,
}

impl ListenerConfig {
    pub fn from_xds(l: &XdsListener) -> Result<ListenerConfig, Rejection> {
        let reject =
            |field: &str, reason: String| Rejection::new("Listener", &l.name, field, reason);
        let address = socket_addr(l.address.as_ref()).map_err(|r| reject("address", r))?;
        if !l.listener_filters.is_empty() {
            return Err(reject(
                "listener_filters",
                "listener filters (TLS/HTTP inspectors, original_dst) are not supported yet".into(),
            ));
        }
        if !l.additional_addresses.is_empty() {
            return Err(reject(
                "additional_addresses",
                "not supported by this weft-proxy version".into(),
            ));
        }
        if l.default_filter_chain.is_some() || l.filter_chain_matcher.is_some() {
            return Err(reject(
                "default_filter_chain",
                "filter chain matching is not supported yet".into(),
            ));
        }
        let [chain] = l.filter_chains.as_slice() else {
            return Err(reject(
                "filter_chains",
                format!(
                    "exactly one filter chain is supported, got {}",
                    l.filter_chains.len()
                ),
            ));
        };
        if chain.filter_chain_match.is_some() {
            return Err(reject(
                "filter_chains[0].filter_chain_match",
                "filter chain matching is not supported yet".into(),
            ));
        }
        let tls = chain
            .transport_socket
            .as_ref()
            .map(crate::tls::server_config)
            .transpose()
            .map_err(|(f, r)| reject(&format!("filter_chains[0].transport_socket.{f}"), r))?;
        let [f] = chain.filters.as_slice() else {
            return Err(reject(
                "filter_chains[0].filters",
                format!(
                    "exactly one network filter is supported, got {}",
                    chain.filters.len()
                ),
            ));
        };
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            return Err(reject(
                "filter_chains[0].filters[0]",
                "a typed_config is required".into(),
            ));
        };
        let filter = match any.type_url.as_str() {
            type_url::HTTP_CONNECTION_MANAGER => {
                let hcm: HttpConnectionManager = weft_xds_proto::unpack(any)
                    .map_err(|e| reject("filter_chains[0].filters[0]", e.to_string()))?;
                NetworkFilter::Http(Arc::new(ConnectionManager::from_xds(&l.name, &hcm)?))
            }
            type_url::TCP_PROXY if tls.is_some() => {
                return Err(reject(
                    "filter_chains[0].transport_socket",
                    "TLS termination in front of the TCP proxy is not supported yet".into(),
                ));
            }
            type_url::TCP_PROXY => {
                let tcp: XdsTcpProxy = weft_xds_proto::unpack(any)
                    .map_err(|e| reject("filter_chains[0].filters[0]", e.to_string()))?;
                NetworkFilter::Tcp(Arc::new(TcpProxy::from_xds(&l.name, &tcp)?))
            }
            other => {
                return Err(reject(
                    "filter_chains[0].filters[0]",
                    format!("network filter {other} is not supported"),
                ));
            }
        };
        Ok(ListenerConfig {
            name: l.name.clone(),
            address,
            filter,
            tls,
            source: l.clone(),
        })
    }

    pub fn route_config_name(&self) -> Option<&str> {
        match &self.filter {
            NetworkFilter::Http(h) => h.route_config_name(),
            NetworkFilter::Tcp(_) => None,
        }
    }
}

struct Active {
    config: Arc<ArcSwap<ListenerConfig>>,
    /// One accept loop per worker.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Active {
    fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The set of running listeners.
#[derive(Default)]
pub struct Listeners {
    active: Mutex<HashMap<String, Active>>,
}

impl Listeners {
    /// Makes the running set equal to `configs`. Binding happens first for every new address,
    /// so a bind failure rejects the whole update and leaves the running set untouched.
    pub async fn apply(
        &self,
        proxy: &Arc<Proxy>,
        configs: Vec<ListenerConfig>,
    ) -> Result<(), Rejection> {
        let mut bound = HashMap::new();
        {
            let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            for c in &configs {
                let keeps_socket = active
                    .get(&c.name)
                    .is_some_and(|a| a.config.load().address == c.address);
                if !keeps_socket {
                    bound.insert(c.name.clone(), c.address);
                }
            }
        }
        let per_listener = proxy.workers.len().max(1);
        let mut sockets = HashMap::new();
        for (name, addr) in bound {
            // One SO_REUSEPORT socket per worker: the kernel spreads connections across them.
            let mut group = Vec::with_capacity(per_listener);
            for _ in 0..per_listener {
                let socket = bind(addr).map_err(|e| {
                    Rejection::new(
                        "Listener",
                        &name,
                        "address",
                        format!("cannot bind {addr}: {e}"),
                    )
                })?;
                group.push(socket);
            }
            sockets.insert(name, group);
        }
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: std::collections::HashSet<String> =
            configs.iter().map(|c| c.name.clone()).collect();
        active.retain(|name, a| {
            let keep = wanted.contains(name);
            if !keep {
                tracing::info!(listener = %name, "listener removed");
                a.stop();
            }
            keep
        });
        for c in configs {
            let name = c.name.clone();
            match sockets.remove(&name) {
                Some(group) => {
                    if let Some(old) = active.remove(&name) {
                        old.stop();
                    }
                    tracing::info!(listener = %name, address = %c.address, "listener added");
                    let config = Arc::new(ArcSwap::from_pointee(c));
                    let mut tasks = Vec::with_capacity(group.len());
                    for (i, socket) in group.into_iter().enumerate() {
                        let run = accept_loop(proxy.clone(), socket, config.clone());
                        tasks.push(match proxy.workers.get(i) {
                            Some(worker) => worker.spawn(run),
                            None => tokio::spawn(run),
                        });
                    }
                    active.insert(name, Active { config, tasks });
                }
                None => {
                    if let Some(a) = active.get(&name) {
                        let unchanged = a.config.load().source == c.source;
                        if !unchanged {
                            tracing::info!(listener = %name, "listener updated in place");
                            a.config.store(Arc::new(c));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Names and addresses of the running listeners.
    pub fn list(&self) -> Vec<(String, SocketAddr)> {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = active
            .iter()
            .map(|(n, a)| (n.clone(), a.config.load().address))
            .collect();
        v.sort();
        v
    }

    /// The running listener configs (for stats).
    pub fn configs(&self) -> Vec<Arc<ListenerConfig>> {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        active.values().map(|a| a.config.load_full()).collect()
    }
}

/// A listening socket, not yet registered with a runtime (the worker that accepts on it does).
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

async fn accept_loop(
    proxy: Arc<Proxy>,
    socket: std::net::TcpListener,
    config: Arc<ArcSwap<ListenerConfig>>,
) {
    let socket = match TcpListener::from_std(socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot register a listening socket: {e}");
            return;
        }
    };
    // Warming, as Envoy: an HTTP listener whose routes come from RDS accepts only once its
    // route configuration has arrived (at most Envoy's 15 s initial fetch timeout), so no early
    // request is answered 404. The socket is already listening: connections made meanwhile
    // wait in the backlog.
    let rds = config.load().route_config_name().map(str::to_string);
    if let Some(name) = rds {
        let deadline = tokio::time::Instant::now() + WARMING_TIMEOUT;
        while !proxy.snapshot().routes.contains_key(&name) && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    loop {
        let (stream, _peer) = match socket.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let current = config.load_full();
        let proxy = proxy.clone();
        match &current.filter {
            NetworkFilter::Http(hcm) => {
                let hcm = hcm.clone();
                let _ = stream.set_nodelay(true);
                let (peer, local) = (stream.peer_addr().ok(), stream.local_addr().ok());
                match &current.tls {
                    None => {
                        tokio::spawn(crate::http::serve_connection(
                            proxy, hcm, stream, peer, local, false,
                        ));
                    }
                    Some(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                        tokio::spawn(async move {
                            match acceptor.accept(stream).await {
                                Ok(s) => {
                                    crate::http::serve_connection(proxy, hcm, s, peer, local, true)
                                        .await
                                }
                                Err(e) => tracing::debug!("TLS handshake failed: {e}"),
                            }
                        });
                    }
                }
            }
            NetworkFilter::Tcp(tcp) => {
                let tcp = tcp.clone();
                tokio::spawn(async move { tcp.serve(&proxy, stream).await });
            }
        }
    }
}
