//! Listeners and clusters for a captured sidecar (Istio's `INTERCEPTION_MODE: REDIRECT`):
//! iptables sends the workload's outbound TCP to `virtualOutbound` (0.0.0.0:15001), which
//! hands each connection to the listener of its original destination port (`0.0.0.0_PORT`, not
//! bound to the port). There HTTP goes through the connection manager and its route config
//! (by Host), TCP services are told apart by destination address (their clusterIP, the
//! ServiceEntry's addresses, or the address weftd's DNS gave them), VirtualService `tcp` routes
//! with `destinationSubnets` by the subnet, and everything else goes to `PassthroughCluster`
//! (the original destination; ALLOW_ANY) or `BlackHoleCluster` (REGISTRY_ONLY).

use std::collections::{BTreeMap, HashSet};

use weft_xds_proto::envoy::config::cluster::v3::{Cluster, cluster};
use weft_xds_proto::envoy::config::core::v3::{CidrRange, TrafficDirection};
use weft_xds_proto::envoy::config::listener::v3::{FilterChain, FilterChainMatch, Listener};
use weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy;
use weft_xds_proto::type_url;
use weft_xds_proto::wkt::{BoolValue, UInt32Value};

use super::Generated;
use super::build::{
    base_cluster, l4_destinations, l4_match_applies, listener, outbound_cluster_name,
    tcp_proxy_filter, tcp_route, tls_routes, virtual_service_for,
};
use super::scope::Scope;
use crate::model::{Mesh, Protocol, Service};

/// The port iptables redirects outbound TCP to (Istio's).
pub const VIRTUAL_OUTBOUND_PORT: u32 = 15001;
/// The port iptables redirects inbound TCP to (Istio's).
pub const VIRTUAL_INBOUND_PORT: u32 = 15006;
pub const PASSTHROUGH: &str = "PassthroughCluster";
pub const BLACKHOLE: &str = "BlackHoleCluster";
pub const INBOUND_PASSTHROUGH: &str = "InboundPassthroughCluster";

/// An ORIGINAL_DST cluster: connections go where the client addressed them.
pub fn original_dst_cluster(name: &str) -> Cluster {
    Cluster {
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        ..base_cluster(name, Protocol::Tcp)
    }
}

/// A cluster without hosts: connections to it are closed.
fn blackhole_cluster() -> Cluster {
    Cluster {
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        ..base_cluster(BLACKHOLE, Protocol::Tcp)
    }
}

/// The cluster traffic to destinations the mesh does not know goes to: nowhere with
/// REGISTRY_ONLY, else the Sidecar's `egressProxy` (Istio: an egress gateway that decides),
/// else the original destination.
pub(super) fn fallback(mesh: &Mesh, scope: &Scope<'_>) -> String {
    if super::build::registry_only(scope) {
        return BLACKHOLE.into();
    }
    let egress = scope.sidecar.and_then(|s| {
        let d = s
            .spec
            .outbound_traffic_policy
            .as_ref()?
            .egress_proxy
            .as_ref()?;
        Some((s.namespace.as_str(), d))
    });
    match egress {
        Some((ns, d)) => {
            let host = crate::model::resolve_host(&d.host, ns);
            let port = super::build::destination_port(mesh, &host, d, 0);
            outbound_cluster_name(port, d.subset.as_deref().unwrap_or(""), &host)
        }
        None => PASSTHROUGH.into(),
    }
}

/// A `CidrRange` from `a.b.c.d/len` (or a bare address: the host itself).
fn cidr_range(s: &str) -> Option<CidrRange> {
    let (ip, len) = crate::config::validate::parse_cidr(s).ok()?;
    Some(CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(UInt32Value { value: len.into() }),
    })
}

/// A TCP proxy chain for connections to `ranges` (those not already taken by an earlier chain:
/// Envoy refuses two chains with the same match, and the first route wins, as in Istio).
fn prefix_chain(
    name: String,
    ranges: &[String],
    taken: &mut HashSet<(String, u32)>,
    filter: weft_xds_proto::envoy::config::listener::v3::Filter,
) -> Option<FilterChain> {
    let prefix_ranges: Vec<CidrRange> = ranges
        .iter()
        .filter_map(|r| cidr_range(r))
        .filter(|r| {
            taken.insert((
                r.address_prefix.clone(),
                r.prefix_len.map(|l| l.value).unwrap_or(0),
            ))
        })
        .collect();
    (!prefix_ranges.is_empty()).then(|| FilterChain {
        name,
        filter_chain_match: Some(FilterChainMatch {
            prefix_ranges,
            ..Default::default()
        }),
        filters: vec![filter],
        ..Default::default()
    })
}

/// The captured sidecar's clusters, virtualOutbound and one listener per port of the services
/// its catch-all egress admits (ports in `taken` already have an explicit egress listener,
/// which receives their hand-offs).
pub fn outbound(
    mesh: &Mesh,
    scope: &Scope<'_>,
    catch_all: &[&Service],
    taken: &HashSet<u32>,
    out: &mut Generated,
) {
    out.add(
        type_url::CLUSTER,
        PASSTHROUGH.into(),
        &original_dst_cluster(PASSTHROUGH),
    );
    out.add(type_url::CLUSTER, BLACKHOLE.into(), &blackhole_cluster());
    let fallback = fallback(mesh, scope);
    let mut virtual_outbound = listener(
        "virtualOutbound",
        "0.0.0.0",
        VIRTUAL_OUTBOUND_PORT,
        tcp_proxy_filter(
            &fallback,
            tcp_proxy::ClusterSpecifier::Cluster(fallback.clone()),
        ),
    );
    virtual_outbound.use_original_dst = Some(BoolValue { value: true });
    virtual_outbound.filter_chains[0].name = "virtualOutbound-catchall-tcp".into();
    virtual_outbound
        .filter_chains
        .insert(0, blackhole_chain("virtualOutbound", VIRTUAL_OUTBOUND_PORT));
    out.add(
        type_url::LISTENER,
        "virtualOutbound".into(),
        &virtual_outbound,
    );

    let mut by_port: BTreeMap<u32, Vec<&Service>> = BTreeMap::new();
    for svc in catch_all {
        for p in &svc.ports {
            if !taken.contains(&p.port) && p.port != VIRTUAL_OUTBOUND_PORT {
                by_port.entry(p.port).or_default().push(svc);
            }
        }
    }
    for (port, services) in by_port {
        if let Some(l) = port_listener(mesh, scope, port, &services, &fallback, out) {
            out.add(type_url::LISTENER, l.name.clone(), &l);
        }
    }
}

/// `virtualInbound` (0.0.0.0:15006): iptables sends the workload's inbound TCP here; the
/// original destination filter restores the port it was sent to, and `chains` (each inbound
/// port's, matched on `destination_port`) serve it as that port's inbound listener would. A
/// port the workload declares nothing for is passed through to where it was sent
/// (`InboundPassthroughCluster`), under the workload's PeerAuthentication and its
/// connection-level authorization.
pub fn virtual_inbound(
    mesh: &Mesh,
    scope: &Scope<'_>,
    mut chains: Vec<FilterChain>,
    mut inspect_tls: bool,
    out: &mut Generated,
) {
    use weft_xds_proto::envoy::config::listener::v3::{ListenerFilter, listener_filter};
    use weft_xds_proto::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
    out.add(
        type_url::CLUSTER,
        INBOUND_PASSTHROUGH.into(),
        &original_dst_cluster(INBOUND_PASSTHROUGH),
    );
    let passthrough = super::build::inbound_listener_for(
        mesh,
        scope,
        "virtualInbound",
        super::build::socket("0.0.0.0", VIRTUAL_INBOUND_PORT),
        tcp_proxy_filter(
            INBOUND_PASSTHROUGH,
            tcp_proxy::ClusterSpecifier::Cluster(INBOUND_PASSTHROUGH.into()),
        ),
        false,
        INBOUND_PASSTHROUGH,
        0,
    );
    inspect_tls |= !passthrough.listener_filters.is_empty();
    for mut c in passthrough.filter_chains {
        c.name = chain_name(INBOUND_PASSTHROUGH, &c.name);
        chains.push(c);
    }
    chains.push(blackhole_chain("virtualInbound", VIRTUAL_INBOUND_PORT));
    let mut l = bare_listener(
        "virtualInbound",
        VIRTUAL_INBOUND_PORT,
        TrafficDirection::Inbound,
    );
    l.filter_chains = chains;
    l.listener_filters = vec![ListenerFilter {
        name: "envoy.filters.listener.original_dst".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(
            weft_xds_proto::pack(&OriginalDst::default()),
        )),
        ..Default::default()
    }];
    if inspect_tls {
        l.listener_filters.push(super::security::tls_inspector());
    }
    out.add(type_url::LISTENER, "virtualInbound".into(), &l);
}

/// A virtualInbound chain's name: what it serves, and the transport when PeerAuthentication
/// split it (`inbound|8080||/tls`).
pub(super) fn chain_name(serves: &str, inbound_chain: &str) -> String {
    match inbound_chain.rsplit_once('/') {
        Some((_, transport)) => format!("{serves}/{transport}"),
        None => serves.to_string(),
    }
}

/// A connection made to the capture port itself (not redirected there) has that port as its
/// original destination: passing it through would connect the proxy to itself, so it is
/// closed, as Istio's `*-blackhole` chains do.
fn blackhole_chain(listener: &str, port: u32) -> FilterChain {
    FilterChain {
        name: format!("{listener}-blackhole"),
        filter_chain_match: Some(FilterChainMatch {
            destination_port: Some(UInt32Value { value: port }),
            ..Default::default()
        }),
        filters: vec![tcp_proxy_filter(
            BLACKHOLE,
            tcp_proxy::ClusterSpecifier::Cluster(BLACKHOLE.into()),
        )],
        ..Default::default()
    }
}

/// A listener on 0.0.0.0:`port` without filter chains yet, for traffic in `direction`.
fn bare_listener(name: &str, port: u32, direction: TrafficDirection) -> Listener {
    Listener {
        name: name.into(),
        address: Some(super::build::socket("0.0.0.0", port)),
        traffic_direction: direction as i32,
        ..Default::default()
    }
}

/// `0.0.0.0_PORT`: the HTTP connection manager for the port's HTTP services (by Host), a chain
/// per TCP service matched on its addresses (and per `destinationSubnets` route on the
/// subnet), TLS routes by SNI, and the fallback for the rest.
fn port_listener(
    mesh: &Mesh,
    scope: &Scope<'_>,
    port: u32,
    services: &[&Service],
    fallback: &str,
    out: &mut Generated,
) -> Option<Listener> {
    let name = format!("0.0.0.0_{port}");
    let stat_prefix = format!("outbound_0.0.0.0_{port}");
    let (http, tcp): (Vec<&Service>, Vec<&Service>) = services
        .iter()
        .partition(|s| s.port(port).is_some_and(|p| p.protocol.is_http()));
    let mut chains = Vec::new();
    let mut taken = HashSet::new();
    for svc in &tcp {
        if let Some(vs) = virtual_service_for(mesh, scope, svc) {
            for (i, r) in vs.spec.tcp.iter().enumerate() {
                for m in &r.matches {
                    if m.destination_subnets.is_empty()
                        || !l4_match_applies(m, &vs.namespace, scope, port)
                    {
                        continue;
                    }
                    let to = l4_destinations(mesh, &vs.namespace, &r.route, port);
                    chains.extend(prefix_chain(
                        format!("{name}/{}/tcp-{i}", svc.hostname),
                        &m.destination_subnets,
                        &mut taken,
                        tcp_proxy_filter(&stat_prefix, to),
                    ));
                }
            }
        }
        let addresses = mesh.service_addresses(svc);
        if addresses.is_empty() {
            out.warnings.push(format!(
                "service {}: TCP port {port} has no address to tell its captured connections apart (no clusterIP or addresses); they go to {fallback}",
                svc.hostname
            ));
            continue;
        }
        let to = tcp_route(mesh, scope, svc, port);
        chains.extend(prefix_chain(
            format!("{name}/{}", svc.hostname),
            &addresses,
            &mut taken,
            tcp_proxy_filter(&stat_prefix, to),
        ));
    }
    let sni = if http.is_empty() {
        tls_routes(mesh, scope, &tcp, port)
    } else {
        Vec::new()
    };
    let has_sni = !sni.is_empty();
    chains.extend(super::security::sni_chains(&name, sni, &stat_prefix));
    if http.is_empty() && chains.is_empty() {
        // Nothing to tell apart: virtualOutbound's own fallback serves the port.
        return None;
    }
    let mut l = bare_listener(&name, port, TrafficDirection::Outbound);
    l.bind_to_port = Some(BoolValue { value: false });
    l.filter_chains = chains;
    if has_sni {
        l.listener_filters = vec![super::security::tls_inspector()];
    }
    let default = |filter| FilterChain {
        name: format!("{name}/default"),
        filters: vec![filter],
        ..Default::default()
    };
    if http.is_empty() {
        // TCP only: whatever no chain matches goes to the fallback.
        let to = tcp_proxy::ClusterSpecifier::Cluster(fallback.into());
        l.default_filter_chain = Some(default(tcp_proxy_filter(&stat_prefix, to)));
    } else {
        // The connection manager takes every destination no TCP chain claims.
        let hcm = super::build::outbound_http(mesh, scope, port, &http, &stat_prefix, out);
        l.filter_chains.push(default(hcm));
    }
    Some(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{ProxyNode, generate, tests::config};
    use weft_xds_proto::envoy::config::core::v3::Node;
    use weft_xds_proto::envoy::config::listener::v3::filter;
    use weft_xds_proto::envoy::config::route::v3::{RouteConfiguration, route, route_action};
    use weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
    use weft_xds_proto::unpack;
    use weft_xds_proto::wkt::{Struct, Value, value::Kind};

    const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: hello, namespace: default }
spec:
  clusterIP: 10.96.0.10
  selector: { app: hello }
  ports: [{ name: http, port: 80 }]
---
apiVersion: v1
kind: Service
metadata: { name: db, namespace: default }
spec:
  clusterIP: 10.96.0.20
  selector: { app: db }
  ports: [{ name: tcp, port: 7070 }]
---
apiVersion: v1
kind: Service
metadata: { name: cache, namespace: default }
spec:
  selector: { app: cache }
  ports: [{ name: tcp, port: 6379 }]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: client, namespace: default }
spec: { address: 10.255.0.1, labels: { app: client } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: db, namespace: default }
spec:
  host: db
  subsets: [{ name: v2, labels: { version: v2 } }]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: legacy, namespace: default }
spec:
  hosts: [legacy.internal]
  addresses: [10.200.0.0/16]
  ports: [{ number: 7070, name: tcp, protocol: TCP }]
  resolution: STATIC
  endpoints: [{ address: 127.0.0.1 }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: legacy, namespace: default }
spec:
  hosts: [legacy.internal]
  tcp:
  - match: [{ destinationSubnets: [10.200.5.0/24] }]
    route: [{ destination: { host: db.default.svc.cluster.local, subset: v2 } }]
  - route: [{ destination: { host: legacy.internal } }]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: direct, namespace: default }
spec:
  hosts: [direct.example]
  addresses: [192.0.2.7]
  ports: [{ number: 9998, name: tcp, protocol: TCP }]
  resolution: NONE
"#;

    const REGISTRY_ONLY: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default, namespace: default }
spec:
  egress: [{ hosts: ["./*"] }]
  outboundTrafficPolicy: { mode: REGISTRY_ONLY }
"#;

    fn generated(yaml: &str, mode: Option<&str>) -> Generated {
        let mesh = Mesh::build(&config(yaml));
        let mut node = Node {
            id: "sidecar~10.255.0.1~client.default~default.svc.cluster.local".into(),
            ..Default::default()
        };
        if let Some(m) = mode {
            let mut md = Struct::default();
            md.fields.insert(
                "INTERCEPTION_MODE".into(),
                Value {
                    kind: Some(Kind::StringValue(m.into())),
                },
            );
            node.metadata = Some(md);
        }
        generate(&mesh, &ProxyNode::identify(&node, &mesh).unwrap())
    }

    fn listener_of(g: &Generated, name: &str) -> Listener {
        unpack(&g.of_type(type_url::LISTENER).unwrap()[name].any).unwrap()
    }

    /// The cluster a chain's TCP proxy goes to (or the connection manager's marker).
    fn target(c: &FilterChain) -> String {
        let Some(filter::ConfigType::TypedConfig(any)) = &c.filters.last().unwrap().config_type
        else {
            panic!("untyped filter")
        };
        if any.type_url != type_url::TCP_PROXY {
            return "http".into();
        }
        let t: TcpProxy = unpack(any).unwrap();
        match t.cluster_specifier.unwrap() {
            tcp_proxy::ClusterSpecifier::Cluster(c) => c,
            other => panic!("{other:?}"),
        }
    }

    fn prefixes(c: &FilterChain) -> Vec<String> {
        c.filter_chain_match
            .as_ref()
            .map(|m| {
                m.prefix_ranges
                    .iter()
                    .map(|r| format!("{}/{}", r.address_prefix, r.prefix_len.unwrap().value))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn allow_or_block(g: &Generated, port: &str) -> Vec<String> {
        let rc: RouteConfiguration =
            unpack(&g.of_type(type_url::ROUTE_CONFIGURATION).unwrap()[port].any).unwrap();
        rc.virtual_hosts
            .iter()
            .filter(|v| v.domains == ["*"])
            .map(|v| match &v.routes[0].action {
                Some(route::Action::Route(a)) => match &a.cluster_specifier {
                    Some(route_action::ClusterSpecifier::Cluster(c)) => format!("{}->{c}", v.name),
                    other => panic!("{other:?}"),
                },
                Some(route::Action::DirectResponse(d)) => format!("{}->{}", v.name, d.status),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_captured_sidecar_gets_virtual_outbound_and_a_listener_per_port() {
        let g = generated(MESH, Some("REDIRECT"));
        let names: Vec<&String> = g.of_type(type_url::LISTENER).unwrap().keys().collect();
        assert_eq!(
            names,
            [
                "0.0.0.0_6379",
                "0.0.0.0_7070",
                "0.0.0.0_80",
                "0.0.0.0_9998",
                "virtualInbound",
                "virtualOutbound"
            ]
        );
        let vo = listener_of(&g, "virtualOutbound");
        assert_eq!(vo.use_original_dst, Some(BoolValue { value: true }));
        assert_eq!(vo.bind_to_port, None, "virtualOutbound is bound to 15001");
        assert_eq!(
            target(&vo.filter_chains[0]),
            BLACKHOLE,
            "direct connections to 15001"
        );
        assert_eq!(target(&vo.filter_chains[1]), PASSTHROUGH);

        // TCP: a chain per destination, the destinationSubnets route first for its subnet,
        // the rest to the original destination.
        let tcp = listener_of(&g, "0.0.0.0_7070");
        assert_eq!(tcp.bind_to_port, Some(BoolValue { value: false }));
        let chains: Vec<(Vec<String>, String)> = tcp
            .filter_chains
            .iter()
            .map(|c| (prefixes(c), target(c)))
            .collect();
        assert_eq!(
            chains,
            [
                (
                    vec!["10.96.0.20/32".to_string()],
                    "outbound|7070||db.default.svc.cluster.local".to_string()
                ),
                (
                    vec!["10.200.5.0/24".to_string()],
                    "outbound|7070|v2|db.default.svc.cluster.local".to_string()
                ),
                (
                    vec!["10.200.0.0/16".to_string()],
                    "outbound|7070||legacy.internal".to_string()
                ),
            ]
        );
        assert_eq!(
            target(tcp.default_filter_chain.as_ref().unwrap()),
            PASSTHROUGH
        );
        // A Service without a clusterIP is matched on the address weftd's DNS gives it.
        let cache = listener_of(&g, "0.0.0.0_6379");
        let vip = prefixes(&cache.filter_chains[0]);
        assert!(vip[0].starts_with("240.240."), "{vip:?}");

        // HTTP: the connection manager, with ALLOW_ANY's pass-through virtual host.
        let http = listener_of(&g, "0.0.0.0_80");
        assert_eq!(target(http.filter_chains.last().unwrap()), "http");
        assert_eq!(
            allow_or_block(&g, "80"),
            [format!("allow_any->{PASSTHROUGH}")]
        );

        let clusters = g.of_type(type_url::CLUSTER).unwrap();
        for name in [PASSTHROUGH, "outbound|9998||direct.example"] {
            let c: Cluster = unpack(&clusters[name].any).unwrap();
            assert_eq!(
                c.cluster_discovery_type,
                Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::OriginalDst as i32
                )),
                "{name}"
            );
            assert_eq!(c.lb_policy, cluster::LbPolicy::ClusterProvided as i32);
        }
        assert!(clusters.contains_key(BLACKHOLE));
    }

    #[test]
    fn registry_only_sends_unknown_destinations_to_the_black_hole() {
        let g = generated(&format!("{MESH}{REGISTRY_ONLY}"), Some("REDIRECT"));
        assert_eq!(
            target(&listener_of(&g, "virtualOutbound").filter_chains[1]),
            BLACKHOLE
        );
        let tcp = listener_of(&g, "0.0.0.0_7070");
        assert_eq!(
            target(tcp.default_filter_chain.as_ref().unwrap()),
            BLACKHOLE
        );
        assert_eq!(allow_or_block(&g, "80"), ["block_all->502"]);
    }

    /// ALLOW_ANY with an `egressProxy`: unknown destinations go to that service's cluster
    /// (its only port when the destination names none), TCP and HTTP alike.
    #[test]
    fn an_egress_proxy_takes_the_unknown_destinations() {
        let sidecar = r#"
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default, namespace: default }
spec:
  egress: [{ hosts: ["./*"] }]
  outboundTrafficPolicy: { mode: ALLOW_ANY, egressProxy: { host: db, subset: v2 } }
"#;
        let g = generated(&format!("{MESH}{sidecar}"), Some("REDIRECT"));
        let egress = "outbound|7070|v2|db.default.svc.cluster.local";
        assert_eq!(
            target(&listener_of(&g, "virtualOutbound").filter_chains[1]),
            egress
        );
        let tcp = listener_of(&g, "0.0.0.0_7070");
        assert_eq!(target(tcp.default_filter_chain.as_ref().unwrap()), egress);
        assert_eq!(allow_or_block(&g, "80"), [format!("allow_any->{egress}")]);
        assert!(g.of_type(type_url::CLUSTER).unwrap().contains_key(egress));
    }

    #[test]
    fn an_egress_proxy_needs_allow_any_and_a_host() {
        let mut c = crate::config::ConfigSet::default();
        let errors = c.add_file(
            std::path::Path::new("t.yaml"),
            r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: a, namespace: default }
spec:
  outboundTrafficPolicy: { mode: REGISTRY_ONLY, egressProxy: { host: egress } }
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: b, namespace: other }
spec:
  outboundTrafficPolicy: { egressProxy: { host: "*.example" } }
"#,
        );
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.outboundTrafficPolicy.egressProxy",
                "spec.outboundTrafficPolicy.egressProxy.host"
            ],
            "{errors:?}"
        );
    }

    /// Inbound: the ports the services selecting the workload send to become virtualInbound
    /// chains matched on the port (forwarded to the workload on localhost); other ports pass
    /// through; nothing is bound to the workload's own ports.
    #[test]
    fn a_captured_sidecar_gets_virtual_inbound_for_its_service_ports() {
        let server = r#"
---
apiVersion: v1
kind: Service
metadata: { name: api, namespace: default }
spec:
  selector: { app: client }
  ports: [{ name: http, port: 80, targetPort: 8080 }, { name: tcp-db, port: 5432 }]
"#;
        let g = generated(&format!("{MESH}{server}"), Some("REDIRECT"));
        let vi = listener_of(&g, "virtualInbound");
        assert_eq!(vi.bind_to_port, None);
        assert_eq!(
            vi.listener_filters[0].name,
            "envoy.filters.listener.original_dst"
        );
        let chains: Vec<(Option<u32>, String)> = vi
            .filter_chains
            .iter()
            .map(|c| {
                let port = c
                    .filter_chain_match
                    .as_ref()
                    .and_then(|m| m.destination_port)
                    .map(|p| p.value);
                (port, target(c))
            })
            .collect();
        assert_eq!(
            chains,
            [
                (Some(5432), "inbound|5432||".to_string()),
                (Some(8080), "http".to_string()),
                (None, INBOUND_PASSTHROUGH.to_string()),
                (Some(VIRTUAL_INBOUND_PORT), BLACKHOLE.to_string()),
            ]
        );
        // The only listeners bound to a port are the two virtual ones (0.0.0.0_5432 is the
        // outbound listener for the api service, not bound).
        let bound: Vec<String> = g
            .of_type(type_url::LISTENER)
            .unwrap()
            .values()
            .map(|r| unpack::<Listener>(&r.any).unwrap())
            .filter(|l| l.bind_to_port.is_none_or(|b| b.value))
            .map(|l| l.name)
            .collect();
        assert_eq!(bound, ["virtualInbound", "virtualOutbound"]);
        let clusters = g.of_type(type_url::CLUSTER).unwrap();
        let inbound: Cluster = unpack(&clusters["inbound|8080||"].any).unwrap();
        let ep = &inbound.load_assignment.unwrap().endpoints[0].lb_endpoints[0];
        assert!(format!("{ep:?}").contains("127.0.0.1") && format!("{ep:?}").contains("8080"));
        assert!(clusters.contains_key(INBOUND_PASSTHROUGH));
    }

    /// DestinationRule `loadBalancer: PASSTHROUGH`: an ORIGINAL_DST cluster on a captured
    /// sidecar (the subset without it keeps EDS); without capture the default balancer, with a
    /// warning naming the rule.
    #[test]
    fn a_passthrough_load_balancer_is_an_original_dst_cluster_when_captured() {
        let rule = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: db-direct, namespace: default }
spec:
  host: db
  trafficPolicy: { loadBalancer: { simple: PASSTHROUGH } }
  subsets: [{ name: v2, labels: { version: v2 }, trafficPolicy: { loadBalancer: { simple: ROUND_ROBIN } } }]
"#;
        // The rule replaces MESH's own rule for db.
        let mesh_yaml = MESH.replace(
            "name: db, namespace: default }\nspec:\n  host: db",
            "name: db-old, namespace: other }\nspec:\n  host: nothing",
        );
        let kind = |g: &Generated, name: &str| {
            let c: Cluster = unpack(&g.of_type(type_url::CLUSTER).unwrap()[name].any).unwrap();
            (c.cluster_discovery_type, c.lb_policy)
        };
        let original = (
            Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::OriginalDst as i32,
            )),
            cluster::LbPolicy::ClusterProvided as i32,
        );
        let eds = Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        ));
        let g = generated(&format!("{mesh_yaml}{rule}"), Some("REDIRECT"));
        assert_eq!(
            kind(&g, "outbound|7070||db.default.svc.cluster.local"),
            original
        );
        assert_eq!(
            kind(&g, "outbound|7070|v2|db.default.svc.cluster.local").0,
            eds
        );
        let g = generated(&format!("{mesh_yaml}{rule}"), None);
        assert_eq!(
            kind(&g, "outbound|7070||db.default.svc.cluster.local").0,
            eds
        );
        assert!(
            g.warnings
                .iter()
                .any(|w| w.contains("DestinationRule/default/db-direct")
                    && w.contains("PASSTHROUGH")),
            "{:?}",
            g.warnings
        );
    }

    /// Without capture (universal mode's default) nothing of this is generated, and a mode
    /// weft does not set up is said so.
    #[test]
    fn only_redirect_capture_gets_captured_listeners() {
        for mode in [None, Some("NONE"), Some("TPROXY")] {
            let g = generated(MESH, mode);
            assert!(
                g.of_type(type_url::LISTENER).unwrap().is_empty(),
                "{mode:?}"
            );
            let clusters = g.of_type(type_url::CLUSTER).unwrap();
            assert!(!clusters.contains_key(PASSTHROUGH));
            assert!(!clusters.contains_key("outbound|9998||direct.example"));
            let tproxy = g
                .warnings
                .iter()
                .any(|w| w.contains("\"TPROXY\" is not supported"));
            assert_eq!(tproxy, mode == Some("TPROXY"), "{:?}", g.warnings);
        }
    }
}
