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
use weft_xds_proto::envoy::config::core::v3::CidrRange;
use weft_xds_proto::envoy::config::listener::v3::{FilterChain, FilterChainMatch, Listener};
use weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    Rds, http_connection_manager,
};
use weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy;
use weft_xds_proto::type_url;
use weft_xds_proto::wkt::{BoolValue, Duration, UInt32Value};

use super::Generated;
use super::build::{
    ads, http_connection_manager, l4_destinations, l4_match_applies, listener,
    outbound_cluster_name, route_config, tcp_proxy_filter, tcp_route, tls_routes,
    virtual_service_for,
};
use super::scope::Scope;
use crate::model::{Mesh, Service};

/// The port iptables redirects outbound TCP to (Istio's).
pub const VIRTUAL_OUTBOUND_PORT: u32 = 15001;
pub const PASSTHROUGH: &str = "PassthroughCluster";
pub const BLACKHOLE: &str = "BlackHoleCluster";

/// An ORIGINAL_DST cluster: connections go where the client addressed them.
pub fn original_dst_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(Duration {
            seconds: super::build::CONNECT_TIMEOUT_SECS,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn blackhole_cluster() -> Cluster {
    Cluster {
        name: BLACKHOLE.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(Duration {
            seconds: super::build::CONNECT_TIMEOUT_SECS,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// Where traffic to destinations the mesh does not know goes.
fn fallback(scope: &Scope<'_>) -> &'static str {
    if super::build::registry_only(scope) {
        BLACKHOLE
    } else {
        PASSTHROUGH
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
    let fallback = fallback(scope);
    let mut virtual_outbound = listener(
        "virtualOutbound",
        "0.0.0.0",
        VIRTUAL_OUTBOUND_PORT,
        tcp_proxy_filter(
            fallback,
            tcp_proxy::ClusterSpecifier::Cluster(fallback.into()),
        ),
    );
    virtual_outbound.use_original_dst = Some(BoolValue { value: true });
    virtual_outbound.filter_chains[0].name = "virtualOutbound-catchall-tcp".into();
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
        if let Some(l) = port_listener(mesh, scope, port, &services, fallback, out) {
            out.add(type_url::LISTENER, l.name.clone(), &l);
        }
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
    fallback: &'static str,
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
        let to = tcp_route(mesh, scope, svc, port).unwrap_or_else(|| {
            tcp_proxy::ClusterSpecifier::Cluster(outbound_cluster_name(port, "", &svc.hostname))
        });
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
    let default = if http.is_empty() {
        tcp_proxy_filter(
            &stat_prefix,
            tcp_proxy::ClusterSpecifier::Cluster(fallback.into()),
        )
    } else {
        let route_name = port.to_string();
        out.add(
            type_url::ROUTE_CONFIGURATION,
            route_name.clone(),
            &route_config(mesh, scope, &route_name, port, &http),
        );
        http_connection_manager(
            mesh,
            &stat_prefix,
            true,
            http_connection_manager::RouteSpecifier::Rds(Rds {
                config_source: Some(ads()),
                route_config_name: route_name,
            }),
        )
    };
    let mut l = listener(&name, "0.0.0.0", port, default);
    l.bind_to_port = Some(BoolValue { value: false });
    let default_chain = l.filter_chains.pop().map(|mut c| {
        c.name = format!("{name}/default");
        c
    });
    if http.is_empty() {
        // TCP only: whatever no chain matches goes to the fallback.
        l.default_filter_chain = default_chain;
    } else {
        // The connection manager takes every destination no TCP chain claims.
        l.filter_chains.extend(default_chain);
    }
    if http.is_empty() && chains.is_empty() {
        // Nothing to tell apart: virtualOutbound's own fallback serves the port.
        return None;
    }
    l.filter_chains.splice(0..0, chains);
    if has_sni {
        l.listener_filters = vec![super::security::tls_inspector()];
    }
    Some(l)
}
