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
use crate::rbac::Cidr;
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

/// One filter chain: what it matches, its TLS termination and its network filter.
#[derive(Debug)]
pub struct FilterChain {
    /// `filter_chain_match.destination_port`: the (original) destination port; None: any.
    pub destination_port: Option<u16>,
    /// `filter_chain_match.prefix_ranges`: CIDRs the (original) destination address must fall
    /// in; empty: any.
    pub prefix_ranges: Vec<Cidr>,
    /// `filter_chain_match.transport_protocol`: "tls" or "raw_buffer" (None: any).
    pub transport_protocol: Option<String>,
    /// `filter_chain_match.server_names`: the SNI names (exact, or `*.suffix`) this chain
    /// serves; empty: any.
    pub server_names: Vec<String>,
    /// TLS termination (the chain's `transport_socket`).
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// Network RBAC filters ahead of the terminal filter (connection-level authorization).
    pub rbac: Vec<crate::rbac::Engine>,
    pub filter: NetworkFilter,
}

#[derive(Debug)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub chains: Vec<FilterChain>,
    /// The TLS inspector listener filter: sniff whether a connection starts with a TLS
    /// ClientHello (PERMISSIVE mTLS serves TLS and plaintext on one port).
    pub inspect_tls: bool,
    /// `default_filter_chain`: serves connections no chain matches.
    pub default_chain: Option<FilterChain>,
    /// The original destination listener filter (`envoy.filters.listener.original_dst`, or
    /// implied by `use_original_dst`): a connection iptables redirected here is matched and
    /// served as addressed to where its client sent it.
    pub original_dst: bool,
    /// `use_original_dst`: hand a redirected connection to the listener of its original
    /// destination (that address and port, else the wildcard address with that port).
    pub use_original_dst: bool,
    /// `bind_to_port` (default true): false makes a listener that only takes connections
    /// handed to it by a `use_original_dst` listener.
    pub bind_to_port: bool,
    /// `per_connection_buffer_limit_bytes`: the most of a request body kept for retries
    /// (None: Envoy's default, 1 MiB).
    pub buffer_limit: Option<u32>,
    pub source: XdsListener,
}

const ORIGINAL_DST: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst";

const TLS_INSPECTOR: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";

impl ListenerConfig {
    pub fn from_xds(l: &XdsListener) -> Result<ListenerConfig, Rejection> {
        let reject =
            |field: &str, reason: String| Rejection::new("Listener", &l.name, field, reason);
        let address = socket_addr(l.address.as_ref()).map_err(|r| reject("address", r))?;
        let mut inspect_tls = false;
        let use_original_dst = l.use_original_dst.is_some_and(|b| b.value);
        let mut original_dst = use_original_dst;
        for (i, lf) in l.listener_filters.iter().enumerate() {
            use weft_xds_proto::envoy::config::listener::v3::listener_filter;
            match &lf.config_type {
                Some(listener_filter::ConfigType::TypedConfig(any))
                    if any.type_url == TLS_INSPECTOR =>
                {
                    inspect_tls = true
                }
                Some(listener_filter::ConfigType::TypedConfig(any))
                    if any.type_url == ORIGINAL_DST =>
                {
                    original_dst = true
                }
                _ => {
                    return Err(reject(
                        &format!("listener_filters[{i}]"),
                        format!(
                            "listener filter {:?} is not supported (the TLS inspector and the original destination filter are)",
                            lf.name
                        ),
                    ));
                }
            }
        }
        if !l.additional_addresses.is_empty() {
            return Err(reject(
                "additional_addresses",
                "not supported by this weft-proxy version".into(),
            ));
        }
        if l.filter_chain_matcher.is_some() {
            return Err(reject(
                "filter_chain_matcher",
                "not supported: use filter_chain_match on the filter chains".into(),
            ));
        }
        if let Some(t) = l.transparent
            && t.value
        {
            return Err(reject(
                "transparent",
                "TPROXY interception is not supported (REDIRECT with use_original_dst is)".into(),
            ));
        }
        let default_chain = match &l.default_filter_chain {
            Some(c) => {
                if c.filter_chain_match.is_some() {
                    return Err(reject(
                        "default_filter_chain.filter_chain_match",
                        "the default filter chain matches nothing of its own".into(),
                    ));
                }
                Some(filter_chain(l, "default_filter_chain", c)?)
            }
            None => None,
        };
        if l.filter_chains.is_empty() && default_chain.is_none() {
            return Err(reject(
                "filter_chains",
                "a listener needs a filter chain".into(),
            ));
        }
        let mut chains = Vec::with_capacity(l.filter_chains.len());
        for (i, chain) in l.filter_chains.iter().enumerate() {
            chains.push(filter_chain(l, &format!("filter_chains[{i}]"), chain)?);
        }
        for (i, c) in chains.iter().enumerate() {
            if chains[..i].iter().any(|o| {
                o.destination_port == c.destination_port
                    && o.prefix_ranges == c.prefix_ranges
                    && o.transport_protocol == c.transport_protocol
                    && o.server_names == c.server_names
            }) {
                return Err(reject(
                    &format!("filter_chains[{i}].filter_chain_match"),
                    "two filter chains have the same match".into(),
                ));
            }
        }
        Ok(ListenerConfig {
            name: l.name.clone(),
            address,
            chains,
            inspect_tls,
            default_chain,
            original_dst,
            use_original_dst,
            bind_to_port: l.bind_to_port.is_none_or(|b| b.value),
            buffer_limit: l.per_connection_buffer_limit_bytes.map(|v| v.value),
            source: l.clone(),
        })
    }

    /// The RDS route configurations this listener's HTTP chains use.
    pub fn route_config_names(&self) -> Vec<&str> {
        self.chains
            .iter()
            .chain(&self.default_chain)
            .filter_map(|c| match &c.filter {
                NetworkFilter::Http(h) => h.route_config_name(),
                NetworkFilter::Tcp(_) => None,
            })
            .collect()
    }

    /// The chain for a connection to `local` (its original destination when redirected)
    /// whose transport protocol is `transport` ("tls" or "raw_buffer") and SNI `sni`, else
    /// the default chain. Envoy's order, the most specific match winning at each step and no
    /// step going back: destination port (a chain naming it before one without), destination
    /// address (the longest prefix containing it, a chain without prefixes last), server
    /// names (an exact name before the longest wildcard, a chain without names last), then
    /// the transport protocol.
    pub fn chain_for(
        &self,
        local: Option<SocketAddr>,
        transport: &str,
        sni: Option<&str>,
    ) -> Option<&FilterChain> {
        self.matching_chain(local, transport, sni)
            .or(self.default_chain.as_ref())
    }

    fn matching_chain(
        &self,
        local: Option<SocketAddr>,
        transport: &str,
        sni: Option<&str>,
    ) -> Option<&FilterChain> {
        let port = local.map(|a| a.port());
        let by_port = |c: &FilterChain| match c.destination_port {
            None => Some(0),
            Some(p) => (Some(p) == port).then_some(1),
        };
        let best_port = self.chains.iter().filter_map(by_port).max()?;
        let by_prefix = |c: &FilterChain| -> Option<i32> {
            if c.prefix_ranges.is_empty() {
                return Some(-1);
            }
            let ip = local?.ip();
            c.prefix_ranges
                .iter()
                .filter(|r| r.contains(ip))
                .map(|r| i32::from(r.len))
                .max()
        };
        let best_prefix = self
            .chains
            .iter()
            .filter(|c| by_port(c) == Some(best_port))
            .filter_map(by_prefix)
            .max()?;
        let candidates = || {
            self.chains
                .iter()
                .filter(move |c| by_port(c) == Some(best_port) && by_prefix(c) == Some(best_prefix))
        };
        let by_name = |c: &FilterChain| -> Option<usize> {
            if c.server_names.is_empty() {
                return Some(0);
            }
            let sni = sni?.to_ascii_lowercase();
            c.server_names
                .iter()
                .filter_map(|n| {
                    let n = n.to_ascii_lowercase();
                    match n.strip_prefix('*') {
                        Some(suffix) if sni.len() > suffix.len() && sni.ends_with(suffix) => {
                            Some(suffix.len())
                        }
                        Some(_) => None,
                        None => (n == sni).then_some(100_000 + n.len()),
                    }
                })
                .max()
        };
        let best = candidates().filter_map(by_name).max()?;
        let named = || candidates().filter(move |c| by_name(c) == Some(best));
        named()
            .find(|c| c.transport_protocol.as_deref() == Some(transport))
            .or_else(|| named().find(|c| c.transport_protocol.is_none()))
    }

    /// Whether every route configuration its HTTP chains use has arrived (until then the
    /// listener is warming, as in Envoy).
    pub fn warmed(&self, snapshot: &crate::state::Snapshot) -> bool {
        self.route_config_names()
            .iter()
            .all(|n| snapshot.routes.contains_key(*n))
    }

    /// Whether choosing a chain needs to look at the connection's first bytes.
    fn needs_sniffing(&self) -> bool {
        self.inspect_tls
            && self
                .chains
                .iter()
                .any(|c| c.transport_protocol.is_some() || !c.server_names.is_empty())
    }

    /// Whether a TLS connection's chain depends on its SNI.
    fn matches_server_names(&self) -> bool {
        self.chains.iter().any(|c| !c.server_names.is_empty())
    }
}

fn filter_chain(
    l: &XdsListener,
    path: &str,
    chain: &weft_xds_proto::envoy::config::listener::v3::FilterChain,
) -> Result<FilterChain, Rejection> {
    let at = |f: &str| format!("{path}.{f}");
    let reject = |field: String, reason: String| Rejection::new("Listener", &l.name, field, reason);
    let mut destination_port = None;
    let mut prefix_ranges = Vec::new();
    let transport_protocol = match &chain.filter_chain_match {
        None => None,
        Some(m) => {
            let mut rest = m.clone();
            rest.transport_protocol.clear();
            rest.server_names.clear();
            rest.destination_port = None;
            rest.prefix_ranges.clear();
            if rest != Default::default() {
                return Err(reject(
                    at("filter_chain_match"),
                    "only destination_port, prefix_ranges, transport_protocol and server_names can be matched on".into(),
                ));
            }
            if let Some(p) = m.destination_port {
                destination_port = Some(
                    u16::try_from(p.value)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| {
                            reject(
                                at("filter_chain_match.destination_port"),
                                format!("{} is not a port (1-65535)", p.value),
                            )
                        })?,
                );
            }
            for (k, r) in m.prefix_ranges.iter().enumerate() {
                prefix_ranges.push(Cidr::from_xds(r).map_err(|reason| {
                    reject(
                        at(&format!("filter_chain_match.prefix_ranges[{k}]")),
                        reason,
                    )
                })?);
            }
            match m.transport_protocol.as_str() {
                "" => None,
                p @ ("tls" | "raw_buffer") => Some(p.to_string()),
                other => {
                    return Err(reject(
                        at("filter_chain_match.transport_protocol"),
                        format!("{other:?} is not a transport protocol (tls, raw_buffer)"),
                    ));
                }
            }
        }
    };
    let tls = match &chain.transport_socket {
        None => None,
        Some(ts) => crate::tls::server_tls(ts)
            .map_err(|(f, r)| reject(at(&format!("transport_socket.{f}")), r))?,
    };
    let Some((f, before)) = chain.filters.split_last() else {
        return Err(reject(
            at("filters"),
            "a filter chain needs a network filter".into(),
        ));
    };
    let mut rbac = Vec::new();
    for (i, nf) in before.iter().enumerate() {
        let field = at(&format!("filters[{i}]"));
        match &nf.config_type {
            Some(filter::ConfigType::TypedConfig(any))
                if any.type_url == crate::rbac::NETWORK_FILTER =>
            {
                let cfg = weft_xds_proto::unpack(any)
                    .map_err(|e| reject(field.clone(), e.to_string()))?;
                rbac.push(
                    crate::rbac::network_filter(&cfg)
                        .map_err(|(f2, r)| reject(format!("{field}.{f2}"), r))?,
                );
            }
            _ => {
                return Err(reject(
                    field,
                    format!(
                        "network filter {:?} is not supported before the last filter (RBAC is)",
                        nf.name
                    ),
                ));
            }
        }
    }
    let last = format!("filters[{}]", chain.filters.len() - 1);
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        return Err(reject(at(&last), "a typed_config is required".into()));
    };
    let filter = match any.type_url.as_str() {
        type_url::HTTP_CONNECTION_MANAGER => {
            let hcm: HttpConnectionManager =
                weft_xds_proto::unpack(any).map_err(|e| reject(at(&last), e.to_string()))?;
            let mut cm = ConnectionManager::from_xds(&l.name, &hcm)?;
            if let Some(t) = &mut cm.tracing {
                t.egress = l.traffic_direction
                    == weft_xds_proto::envoy::config::core::v3::TrafficDirection::Outbound as i32;
            }
            NetworkFilter::Http(Arc::new(cm))
        }
        type_url::TCP_PROXY => {
            let tcp: XdsTcpProxy =
                weft_xds_proto::unpack(any).map_err(|e| reject(at(&last), e.to_string()))?;
            NetworkFilter::Tcp(Arc::new(TcpProxy::from_xds(&l.name, &tcp)?))
        }
        other => {
            return Err(reject(
                at(&last),
                format!("network filter {other} is not supported"),
            ));
        }
    };
    let server_names = chain
        .filter_chain_match
        .as_ref()
        .map(|m| m.server_names.clone())
        .unwrap_or_default();
    Ok(FilterChain {
        destination_port,
        prefix_ranges,
        transport_protocol,
        server_names,
        tls,
        rbac,
        filter,
    })
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
    /// The listeners by address, for `use_original_dst` hand-offs.
    by_address: ArcSwap<HashMap<SocketAddr, Arc<ArcSwap<ListenerConfig>>>>,
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
        let mut fresh = std::collections::HashSet::new();
        {
            let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            for c in &configs {
                let keeps_socket = active.get(&c.name).is_some_and(|a| {
                    let old = a.config.load();
                    old.address == c.address && old.bind_to_port == c.bind_to_port
                });
                if !keeps_socket {
                    fresh.insert(c.name.clone());
                    if c.bind_to_port {
                        bound.insert(c.name.clone(), c.address);
                    }
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
                None if fresh.contains(&name) => {
                    // Not bound to its port: served only through hand-offs.
                    if let Some(old) = active.remove(&name) {
                        old.stop();
                    }
                    tracing::info!(listener = %name, address = %c.address, "listener added (not bound to its port)");
                    let config = Arc::new(ArcSwap::from_pointee(c));
                    active.insert(
                        name,
                        Active {
                            config,
                            tasks: Vec::new(),
                        },
                    );
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
        let mut by_address = HashMap::new();
        for a in active.values() {
            by_address
                .entry(a.config.load().address)
                .or_insert_with(|| a.config.clone());
        }
        self.by_address.store(Arc::new(by_address));
        Ok(())
    }

    /// The listener a connection redirected from `original` is handed to: the one on that
    /// address and port, else the one on the wildcard address with that port.
    pub fn for_original_destination(&self, original: SocketAddr) -> Option<Arc<ListenerConfig>> {
        let map = self.by_address.load();
        let wildcard = match original {
            SocketAddr::V4(_) => {
                SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, original.port()))
            }
            SocketAddr::V6(_) => {
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, original.port()))
            }
        };
        map.get(&original)
            .or_else(|| map.get(&wildcard))
            .map(|c| c.load_full())
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
    let warming = config.load_full();
    let deadline = tokio::time::Instant::now() + WARMING_TIMEOUT;
    while !warming.warmed(&proxy.snapshot()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
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
        tokio::spawn(serve(proxy.clone(), current, stream));
    }
}

/// How long the TLS inspector waits for a client's first bytes (Envoy's
/// listener_filters_timeout); a client that says nothing is then treated as plaintext.
const INSPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Whether the connection starts with a TLS handshake record (the TLS inspector).
async fn starts_with_tls(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 3];
    let deadline = tokio::time::Instant::now() + INSPECT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            // A TLS record: content type handshake (22), version 3.x.
            Ok(Ok(n)) if n >= 2 => return buf[0] == 0x16 && buf[1] == 0x03,
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return false,
            // One byte so far: wait for the next.
            Ok(Ok(_)) => {
                if buf[0] != 0x16 {
                    return false;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    }
}

/// The SNI of the ClientHello waiting on `stream`, read with `peek` (nothing is consumed).
async fn peek_sni(stream: &tokio::net::TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 5 + 16 * 1024];
    let deadline = tokio::time::Instant::now() + INSPECT_TIMEOUT;
    let mut last = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        match crate::tls::client_hello_sni(&buf[..n]) {
            crate::tls::Sni::Found(name) => return Some(name),
            crate::tls::Sni::Absent => return None,
            crate::tls::Sni::NeedMore if n > last && n < buf.len() => {
                last = n;
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            crate::tls::Sni::NeedMore if n == last => {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            crate::tls::Sni::NeedMore => return None,
        }
    }
}

/// What the downstream connection proved about itself.
#[derive(Debug, Clone, Default)]
pub struct Downstream {
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    /// TLS was terminated here.
    pub tls: bool,
    /// The client certificate's SPIFFE ID (mTLS), e.g. spiffe://cluster.local/ns/a/sa/b.
    pub principal: Option<Arc<str>>,
    /// The SNI the client sent.
    pub sni: Option<Arc<str>>,
    /// The certificates of an mTLS connection (None without a client certificate).
    pub tls_peer: Option<Arc<TlsPeer>>,
    /// The listener's `per_connection_buffer_limit_bytes` (None: Envoy's default, 1 MiB).
    pub buffer_limit: Option<u32>,
    /// The connection's own local rate limit buckets
    /// (`local_rate_limit_per_downstream_connection`).
    pub rate_limit: crate::http::local_ratelimit::ConnectionBuckets,
}

/// What an mTLS handshake showed: the client's chain and our own certificate, for
/// `x-forwarded-client-cert`.
#[derive(Debug)]
pub struct TlsPeer {
    /// The chain the client presented, its own certificate first.
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The certificate this listener presented.
    pub local: Option<rustls::pki_types::CertificateDer<'static>>,
}

/// Where a connection iptables redirected (REDIRECT, `SO_ORIGINAL_DST`) was addressed to;
/// None when it was not redirected.
fn original_destination(stream: &tokio::net::TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let orig = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (orig != local).then_some(orig)
}

async fn serve(proxy: Arc<Proxy>, config: Arc<ListenerConfig>, stream: tokio::net::TcpStream) {
    let mut config = config;
    let mut local = stream.local_addr().ok();
    if config.original_dst
        && let Some(orig) = local.and_then(|l| original_destination(&stream, l))
    {
        local = Some(orig);
        // As Envoy, a listener still warming (its route configurations not all here yet) is
        // not handed connections: the receiving listener serves them meanwhile.
        if config.use_original_dst
            && let Some(to) = proxy.listeners.for_original_destination(orig)
            && to.warmed(&proxy.snapshot())
        {
            tracing::trace!(from = %config.name, to = %to.name, original = %orig, "handing off");
            config = to;
        }
    }
    let transport = if config.needs_sniffing() && starts_with_tls(&stream).await {
        "tls"
    } else {
        "raw_buffer"
    };
    let _ = stream.set_nodelay(true);
    let down = Downstream {
        peer: stream.peer_addr().ok(),
        local,
        buffer_limit: config.buffer_limit,
        ..Default::default()
    };
    // The chain may depend on the SNI: read it from the ClientHello without consuming it, so
    // a chain that terminates TLS can still handshake and one that passes TLS through (a TCP
    // proxy) forwards the ClientHello untouched.
    let sni = if transport == "tls" && config.matches_server_names() {
        peek_sni(&stream).await
    } else {
        None
    };
    let Some(chain) = config.chain_for(local, transport, sni.as_deref()) else {
        tracing::debug!(listener = %config.name, transport, "no filter chain matches; closing");
        return;
    };
    match &chain.tls {
        None => serve_filter(&proxy, chain, stream, down).await,
        Some(tls) => match tokio::time::timeout(INSPECT_TIMEOUT, tls.accept(stream)).await {
            Ok(Ok(s)) => serve_tls(&proxy, chain, s, down).await,
            Ok(Err(e)) => {
                tracing::debug!(listener = %config.name, peer = ?down.peer, "TLS handshake failed: {e}")
            }
            Err(_) => tracing::debug!(listener = %config.name, "TLS handshake timed out"),
        },
    }
}

/// Serves a terminated TLS connection: what it proved (client certificate, SNI) goes with it.
async fn serve_tls(
    proxy: &Arc<Proxy>,
    chain: &FilterChain,
    s: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    mut down: Downstream,
) {
    let conn = s.get_ref().1;
    down.tls = true;
    let peer = conn.peer_certificates().filter(|c| !c.is_empty());
    down.principal = peer
        .and_then(|c| c.first())
        .and_then(|c| crate::tls::spiffe_id(c))
        .map(Arc::from);
    down.tls_peer = peer.map(|c| {
        Arc::new(TlsPeer {
            chain: c.iter().map(|c| c.clone().into_owned()).collect(),
            local: chain.tls.as_ref().and_then(|t| t.local_certificate()),
        })
    });
    down.sni = conn.server_name().map(Arc::from);
    serve_filter(proxy, chain, s, down).await
}

async fn serve_filter<S>(proxy: &Arc<Proxy>, chain: &FilterChain, stream: S, down: Downstream)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if !chain.rbac.is_empty() {
        let input = crate::rbac::Input {
            down: &down,
            request: None,
            remote: None,
        };
        if !chain.rbac.iter().all(|e| e.allows(&input)) {
            tracing::debug!(peer = ?down.peer, principal = ?down.principal, "RBAC: connection denied");
            return; // dropping the stream closes it
        }
    }
    match &chain.filter {
        NetworkFilter::Http(hcm) => {
            crate::http::serve_connection(proxy.clone(), hcm.clone(), stream, down).await
        }
        NetworkFilter::Tcp(tcp) => tcp.serve(proxy, stream, &down).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_xds_proto::envoy::config::core::v3::{
        Address, SocketAddress, TransportSocket, address, socket_address, transport_socket,
    };
    use weft_xds_proto::envoy::config::listener::v3::{
        Filter, FilterChain as XdsChain, FilterChainMatch,
    };
    use weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy;
    use weft_xds_proto::envoy::extensions::transport_sockets::tls::v3::{
        CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    };

    fn chain(name: &str, names: &[&str], transport: &str) -> XdsChain {
        let tls = DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                    name: "default".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        XdsChain {
            name: name.into(),
            filter_chain_match: Some(FilterChainMatch {
                server_names: names.iter().map(|s| s.to_string()).collect(),
                transport_protocol: transport.into(),
                ..Default::default()
            }),
            transport_socket: Some(TransportSocket {
                name: "tls".into(),
                config_type: Some(transport_socket::ConfigType::TypedConfig(
                    weft_xds_proto::pack(&tls),
                )),
            }),
            filters: vec![Filter {
                name: "tcp".into(),
                config_type: Some(filter::ConfigType::TypedConfig(weft_xds_proto::pack(
                    &XdsTcpProxy {
                        stat_prefix: name.into(),
                        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster("c".into())),
                        ..Default::default()
                    },
                ))),
            }],
            ..Default::default()
        }
    }

    fn listener(chains: Vec<XdsChain>) -> XdsListener {
        XdsListener {
            name: "l".into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(8443)),
                    ..Default::default()
                })),
            }),
            filter_chains: chains,
            ..Default::default()
        }
    }

    fn picked(l: &ListenerConfig, sni: Option<&str>) -> Option<String> {
        l.chain_for(None, "tls", sni).map(|c| match &c.filter {
            NetworkFilter::Tcp(t) => t.stat_prefix.clone(),
            NetworkFilter::Http(_) => "http".into(),
        })
    }

    #[test]
    fn server_names_pick_the_chain_exact_before_wildcard_before_none() {
        let l = ListenerConfig::from_xds(&listener(vec![
            chain("wild", &["*.example.com"], ""),
            chain("exact", &["api.example.com"], ""),
            chain("deeper", &["*.eu.example.com"], ""),
            chain("any", &[], ""),
        ]))
        .unwrap();
        assert_eq!(
            picked(&l, Some("api.example.com")).as_deref(),
            Some("exact")
        );
        assert_eq!(
            picked(&l, Some("API.Example.com")).as_deref(),
            Some("exact")
        );
        assert_eq!(
            picked(&l, Some("shop.example.com")).as_deref(),
            Some("wild")
        );
        assert_eq!(
            picked(&l, Some("a.eu.example.com")).as_deref(),
            Some("deeper")
        );
        assert_eq!(picked(&l, Some("example.com")).as_deref(), Some("any"));
        assert_eq!(picked(&l, None).as_deref(), Some("any"));
        // Without a catch-all, an unknown name gets no chain.
        let l = ListenerConfig::from_xds(&listener(vec![chain("exact", &["a.example"], "tls")]))
            .unwrap();
        assert_eq!(picked(&l, Some("b.example")), None);
        // A match on anything else is refused by field.
        let mut bad = chain("x", &[], "");
        bad.filter_chain_match.as_mut().unwrap().source_type = 1;
        let e = ListenerConfig::from_xds(&listener(vec![bad])).unwrap_err();
        assert_eq!(e.field, "filter_chains[0].filter_chain_match");
    }

    /// A plaintext TCP chain matching a destination port and prefixes.
    fn addressed(name: &str, port: Option<u32>, prefixes: &[(&str, u32)]) -> XdsChain {
        use weft_xds_proto::envoy::config::core::v3::CidrRange;
        let mut c = chain(name, &[], "");
        c.transport_socket = None;
        let m = c.filter_chain_match.as_mut().unwrap();
        m.destination_port = port.map(|value| weft_xds_proto::wkt::UInt32Value { value });
        m.prefix_ranges = prefixes
            .iter()
            .map(|(a, l)| CidrRange {
                address_prefix: a.to_string(),
                prefix_len: Some(weft_xds_proto::wkt::UInt32Value { value: *l }),
            })
            .collect();
        c
    }

    fn picked_for(l: &ListenerConfig, to: &str) -> Option<String> {
        l.chain_for(Some(to.parse().unwrap()), "raw_buffer", None)
            .map(|c| match &c.filter {
                NetworkFilter::Tcp(t) => t.stat_prefix.clone(),
                NetworkFilter::Http(_) => "http".into(),
            })
    }

    /// Envoy's order: the destination port first (a chain naming it wins over one that does
    /// not, even when the other has a longer prefix), then the longest prefix containing the
    /// address, a chain without prefixes last; nothing matching falls to the default chain.
    #[test]
    fn destination_port_then_longest_prefix_then_the_default_chain() {
        let mut l = listener(vec![
            addressed("vip", None, &[("10.96.0.20", 32)]),
            addressed("cidr", None, &[("10.200.0.0", 16)]),
            addressed("subnet", None, &[("10.200.5.0", 24), ("10.201.0.0", 16)]),
            addressed("port", Some(9000), &[]),
        ]);
        let mut default = chain("default", &[], "");
        default.filter_chain_match = None;
        default.transport_socket = None;
        l.default_filter_chain = Some(default);
        let l = ListenerConfig::from_xds(&l).unwrap();
        assert_eq!(picked_for(&l, "10.96.0.20:7070").as_deref(), Some("vip"));
        assert_eq!(picked_for(&l, "10.200.1.1:7070").as_deref(), Some("cidr"));
        assert_eq!(picked_for(&l, "10.200.5.9:7070").as_deref(), Some("subnet"));
        assert_eq!(picked_for(&l, "10.201.3.3:7070").as_deref(), Some("subnet"));
        assert_eq!(picked_for(&l, "10.96.0.20:9000").as_deref(), Some("port"));
        assert_eq!(picked_for(&l, "192.0.2.1:7070").as_deref(), Some("default"));
        // Without a default chain an unmatched connection gets none.
        let l = ListenerConfig::from_xds(&listener(vec![addressed(
            "vip",
            None,
            &[("10.96.0.20", 32)],
        )]))
        .unwrap();
        assert_eq!(picked_for(&l, "10.96.0.21:7070"), None);
    }

    #[test]
    fn bad_addresses_and_duplicate_matches_are_refused_by_field() {
        let e =
            ListenerConfig::from_xds(&listener(vec![addressed("a", None, &[("10.0.0.0", 33)])]))
                .unwrap_err();
        assert_eq!(
            e.field,
            "filter_chains[0].filter_chain_match.prefix_ranges[0]"
        );
        let e = ListenerConfig::from_xds(&listener(vec![addressed("a", Some(70000), &[])]))
            .unwrap_err();
        assert_eq!(
            e.field,
            "filter_chains[0].filter_chain_match.destination_port"
        );
        let e = ListenerConfig::from_xds(&listener(vec![
            addressed("a", None, &[("10.0.0.0", 8)]),
            addressed("b", None, &[("10.0.0.0", 8)]),
        ]))
        .unwrap_err();
        assert_eq!(e.field, "filter_chains[1].filter_chain_match");
        let mut tproxy = listener(vec![addressed("a", None, &[])]);
        tproxy.transparent = Some(weft_xds_proto::wkt::BoolValue { value: true });
        assert_eq!(
            ListenerConfig::from_xds(&tproxy).unwrap_err().field,
            "transparent"
        );
    }

    #[test]
    fn use_original_dst_implies_the_original_destination_filter() {
        let mut l = listener(vec![addressed("a", None, &[])]);
        l.use_original_dst = Some(weft_xds_proto::wkt::BoolValue { value: true });
        l.bind_to_port = Some(weft_xds_proto::wkt::BoolValue { value: false });
        let c = ListenerConfig::from_xds(&l).unwrap();
        assert!(c.original_dst && c.use_original_dst && !c.bind_to_port);
        let c = ListenerConfig::from_xds(&listener(vec![addressed("a", None, &[])])).unwrap();
        assert!(!c.original_dst && !c.use_original_dst && c.bind_to_port);
    }

    #[test]
    fn cidrs_contain_their_addresses_only() {
        let c = |a: &str, len| Cidr {
            ip: a.parse().unwrap(),
            len,
        };
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(c("10.200.0.0", 16).contains(ip("10.200.255.1")));
        assert!(!c("10.200.0.0", 16).contains(ip("10.201.0.1")));
        assert!(c("0.0.0.0", 0).contains(ip("192.0.2.1")));
        assert!(!c("0.0.0.0", 0).contains(ip("::1")));
        assert!(c("fd00::", 8).contains(ip("fd12::1")));
        assert!(c("10.0.0.1", 32).contains(ip("10.0.0.1")));
        assert!(!c("10.0.0.1", 32).contains(ip("10.0.0.2")));
    }
}
