//! Envoy resource builders: clusters (EDS and static), load assignments, listeners with the HTTP
//! connection manager or the TCP proxy, and route configurations from VirtualServices.

use weft_xds_proto::envoy::config::accesslog::v3::{AccessLog, access_log};
use weft_xds_proto::envoy::config::cluster::v3::{Cluster, cluster};
use weft_xds_proto::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HeaderValue, HeaderValueOption,
    Http2ProtocolOptions, RuntimeFractionalPercent, SocketAddress, TrafficDirection, address,
    config_source, header_value_option, socket_address,
};
use weft_xds_proto::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use weft_xds_proto::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use weft_xds_proto::envoy::config::route::v3::route_action::HashPolicy;
use weft_xds_proto::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction,
    RetryPolicy as EnvoyRetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost, WeightedCluster, header_matcher, query_parameter_matcher,
    redirect_action as envoy_redirect, retry_policy as envoy_retry, route, route_action,
    route_match, weighted_cluster,
};
use weft_xds_proto::envoy::extensions::filters::common::fault::v3::{
    FaultDelay as EnvoyFaultDelay, fault_delay,
};
use weft_xds_proto::envoy::extensions::filters::http::cors::v3::{
    Cors, CorsPolicy as EnvoyCorsPolicy,
};
use weft_xds_proto::envoy::extensions::filters::http::fault::v3::{
    FaultAbort, HttpFault, fault_abort,
};
use weft_xds_proto::envoy::extensions::filters::http::router::v3::Router;
use weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use weft_xds_proto::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use weft_xds_proto::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use weft_xds_proto::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use weft_xds_proto::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use weft_xds_proto::wkt::{BoolValue, Duration, UInt32Value};
use weft_xds_proto::{pack, type_url};

use super::Generated;
use super::scope::Scope;
use crate::config::validate::{grpc_code, parse_duration};
use crate::config::{
    HeaderOperations, HttpDirectResponse, HttpFaultInjection, HttpRedirect, HttpRetry, HttpRoute,
    Object, OutboundMode, Percent, StringMatch, VirtualServiceSpec, parse_default_endpoint,
};
use crate::model::{
    Discovery, Mesh, Origin, Protocol, Service, exported_to, resolve_host, selector_matches,
};

/// Istio's default connect timeout for clusters.
const CONNECT_TIMEOUT_SECS: i64 = 10;

pub fn outbound_cluster_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

pub fn inbound_cluster_name(port: u32) -> String {
    format!("inbound|{port}||")
}

pub(super) fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

pub(super) fn socket(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn lb_endpoint(ip: &str, port: u32, weight: u32) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint {
            address: Some(socket(ip, port)),
            ..Default::default()
        })),
        load_balancing_weight: Some(UInt32Value { value: weight }),
        ..Default::default()
    }
}

pub(super) fn base_cluster(name: &str, protocol: Protocol) -> Cluster {
    let mut c = Cluster {
        name: name.to_string(),
        connect_timeout: Some(Duration {
            seconds: CONNECT_TIMEOUT_SECS,
            nanos: 0,
        }),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    };
    if matches!(protocol, Protocol::Http2 | Protocol::Grpc) {
        // The upstream speaks HTTP/2 (gRPC, h2c): say so as Envoy expects it, per cluster.
        let opts = HttpProtocolOptions {
            upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                        Http2ProtocolOptions::default(),
                    )),
                },
            )),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            pack(&opts),
        );
    }
    c
}

pub(super) fn eds_cluster(name: &str, protocol: Protocol) -> Cluster {
    Cluster {
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.to_string(),
        }),
        ..base_cluster(name, protocol)
    }
}

/// A cluster of fixed addresses.
fn static_cluster(name: &str, protocol: Protocol, lb_endpoints: Vec<LbEndpoint>) -> Cluster {
    Cluster {
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.to_string(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..base_cluster(name, protocol)
    }
}

/// A cluster whose endpoints are DNS names the proxy resolves itself (ServiceEntry `DNS` and
/// `DNS_ROUND_ROBIN`), IPv4 as Istio asks for by default.
fn dns_cluster(
    name: &str,
    protocol: Protocol,
    logical: bool,
    lb_endpoints: Vec<LbEndpoint>,
) -> Cluster {
    let kind = if logical {
        cluster::DiscoveryType::LogicalDns
    } else {
        cluster::DiscoveryType::StrictDns
    };
    Cluster {
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(kind as i32)),
        dns_lookup_family: cluster::DnsLookupFamily::V4Only as i32,
        ..static_cluster(name, protocol, lb_endpoints)
    }
}

/// The service's subsets: the whole service (`""`, no selector), then each DestinationRule subset.
pub(super) fn subsets_of(
    rule: Option<&Object<crate::config::DestinationRuleSpec>>,
) -> Vec<(&str, Option<&crate::config::Labels>)> {
    let mut out = vec![("", None)];
    if let Some(dr) = rule {
        out.extend(
            dr.spec
                .subsets
                .iter()
                .map(|s| (s.name.as_str(), Some(&s.labels))),
        );
    }
    out
}

/// The shared-cache key of a cluster or load assignment: its name and the rule it was made with.
fn shared_key(
    name: &str,
    rule: Option<(usize, &Object<crate::config::DestinationRuleSpec>)>,
) -> String {
    match rule {
        Some((i, _)) => format!("{name}#{i}"),
        None => name.to_string(),
    }
}

/// The endpoints of one service port (and subset) as Envoy load-balancing endpoints.
fn lb_endpoints_for(
    svc: &Service,
    port: u32,
    selector: Option<&crate::config::Labels>,
) -> Vec<LbEndpoint> {
    svc.endpoints
        .iter()
        .filter(|e| selector.is_none_or(|sel| selector_matches(sel, &e.labels)))
        .filter_map(|e| {
            let mut lbe = lb_endpoint(&e.address, *e.ports.get(&port)?, e.weight);
            lbe.metadata = super::security::endpoint_metadata(&e.labels);
            Some(lbe)
        })
        .collect()
}

/// EDS: a load assignment per cluster of every visible service whose endpoints weftd knows.
pub fn endpoints(mesh: &Mesh, scope: &Scope<'_>, out: &mut Generated) {
    for svc in scope
        .services
        .iter()
        .filter(|s| s.discovery == Discovery::Eds)
    {
        service_endpoints(mesh, &scope.proxy.namespace, svc, |name, r| {
            out.add_shared(type_url::CLUSTER_LOAD_ASSIGNMENT, name, r)
        });
    }
}

/// The load assignments of one service's clusters (per port and subset), as a proxy of
/// `proxy_ns` sees them (its DestinationRule decides the subsets).
pub(super) fn service_endpoints(
    mesh: &Mesh,
    proxy_ns: &str,
    svc: &Service,
    mut add: impl FnMut(String, std::sync::Arc<super::Resource>),
) {
    let rule = destination_rule_for(mesh, proxy_ns, svc);
    for port in &svc.ports {
        for (subset, selector) in subsets_of(rule.map(|(_, dr)| dr)) {
            let name = outbound_cluster_name(port.port, subset, &svc.hostname);
            let key = shared_key(&name, rule);
            let r = mesh
                .shared
                .get_or_add(type_url::CLUSTER_LOAD_ASSIGNMENT, &key, || {
                    let lb_endpoints = lb_endpoints_for(svc, port.port, selector);
                    ClusterLoadAssignment {
                        cluster_name: name.clone(),
                        endpoints: if lb_endpoints.is_empty() {
                            vec![]
                        } else {
                            vec![LocalityLbEndpoints {
                                lb_endpoints,
                                ..Default::default()
                            }]
                        },
                        ..Default::default()
                    }
                });
            add(name, r);
        }
    }
}

/// Outbound: a cluster (and its load assignment) per visible service port and subset, then the
/// Sidecar's egress listeners with their route configurations.
pub fn outbound(mesh: &Mesh, scope: &Scope<'_>, out: &mut Generated) {
    let captured = scope.proxy.captured();
    if let crate::generate::proxy::Interception::Unsupported(mode) = &scope.proxy.interception {
        out.warnings.push(format!(
            "node {}: INTERCEPTION_MODE {mode:?} is not supported (REDIRECT is); generated as without capture",
            scope.proxy.id
        ));
    }
    for svc in &scope.services {
        if svc.discovery == Discovery::Passthrough && captured {
            // Resolution NONE: connections go where the client sent them.
            for port in &svc.ports {
                let name = outbound_cluster_name(port.port, "", &svc.hostname);
                let cluster = super::capture::original_dst_cluster(&name);
                out.add(type_url::CLUSTER, name, &cluster);
            }
            continue;
        }
        if svc.discovery == Discovery::Passthrough {
            if let Origin::ServiceEntry { entry, .. } = &svc.origin {
                out.warnings.push(format!(
                    "ServiceEntry/{}/{entry}: host {}: resolution NONE forwards to the original destination, which needs traffic capture (INTERCEPTION_MODE REDIRECT); this sidecar is not captured, so no cluster is generated for it (use STATIC or DNS, or capture)",
                    svc.namespace, svc.hostname
                ));
            }
            continue;
        }
        let chosen = destination_rule_for(mesh, &scope.proxy.namespace, svc);
        let rule = chosen.map(|(_, dr)| &dr.spec);
        // A client with a mesh identity speaks mTLS to sidecars (auto mTLS).
        let mesh_client = super::security::has_sidecar(&scope.proxy.labels);
        for port in &svc.ports {
            for (subset, selector) in subsets_of(chosen.map(|(_, dr)| dr)) {
                let name = outbound_cluster_name(port.port, subset, &svc.hostname);
                // A service's clusters are the same for every proxy that sees the same rule
                // (and is, or is not, a mesh client).
                let mut key = shared_key(&name, chosen);
                if mesh_client {
                    key.push_str("#mtls");
                }
                let effective = super::policy::Effective::of(rule, subset, port.port);
                // PASSTHROUGH: Istio's ORIGINAL_DST cluster, where there is an original
                // destination (a captured sidecar); elsewhere the default balancer, said so.
                let original_dst = effective.passthrough() && captured;
                if effective.passthrough() && !captured {
                    if let Some((_, dr)) = chosen {
                        out.warnings.push(format!(
                            "DestinationRule/{}/{}: loadBalancer PASSTHROUGH for {name} needs traffic capture (INTERCEPTION_MODE REDIRECT); this sidecar keeps the default balancer",
                            dr.namespace,
                            dr.name()
                        ));
                    }
                } else if original_dst {
                    key.push_str("#original-dst");
                }
                let r = mesh.shared.get_or_add(type_url::CLUSTER, &key, || {
                    let mut cluster = match svc.discovery {
                        Discovery::StrictDns | Discovery::LogicalDns => {
                            let logical = svc.discovery == Discovery::LogicalDns;
                            let mut lb_endpoints = lb_endpoints_for(svc, port.port, selector);
                            if logical {
                                // Envoy takes exactly one name for a LOGICAL_DNS cluster.
                                lb_endpoints.truncate(1);
                            }
                            dns_cluster(&name, port.protocol, logical, lb_endpoints)
                        }
                        _ if original_dst => super::capture::original_dst_cluster(&name),
                        _ => eds_cluster(&name, port.protocol),
                    };
                    super::policy::apply(&mut cluster, &effective);
                    if original_dst {
                        // The balancer is the cluster's own (Envoy requires it).
                        cluster.lb_policy = cluster::LbPolicy::ClusterProvided as i32;
                        cluster.lb_config = None;
                    }
                    if mesh_client {
                        mesh_tls(mesh, svc, &mut cluster, effective.tls(), port.port, subset);
                    }
                    cluster
                });
                out.add_shared(type_url::CLUSTER, name, r);
            }
        }
    }
    let mut taken = std::collections::HashSet::new();
    let catch_all: Vec<&Service> = match scope.sidecar {
        None => scope.services.clone(),
        Some(sc) => scope
            .services
            .iter()
            .copied()
            .filter(|s| {
                sc.spec.egress.iter().any(|l| {
                    l.port.is_none() && super::scope::egress_admits(l, &scope.proxy.namespace, s)
                })
            })
            .collect(),
    };
    if let Some(sidecar) = scope.sidecar {
        ported_egress(mesh, scope, sidecar, captured, &mut taken, out);
    }
    if captured {
        super::capture::outbound(mesh, scope, &catch_all, &taken, out);
    }
}

/// The Sidecar's egress listeners with a port: bound to it (`bind`, else 0.0.0.0), where a
/// captured proxy's hand-offs for that port also land.
fn ported_egress(
    mesh: &Mesh,
    scope: &Scope<'_>,
    sidecar: &crate::config::Object<crate::config::SidecarSpec>,
    captured: bool,
    taken: &mut std::collections::HashSet<u32>,
    out: &mut Generated,
) {
    for (i, l) in sidecar.spec.egress.iter().enumerate() {
        let Some(port) = &l.port else {
            if captured {
                continue;
            }
            out.warnings.push(format!(
                "Sidecar/{}/{}: spec.egress[{i}] has no port: a catch-all egress listener needs traffic capture (port 15001, INTERCEPTION_MODE REDIRECT); this sidecar is not captured",
                sidecar.namespace,
                sidecar.name()
            ));
            continue;
        };
        taken.insert(port.number);
        let bind = l.bind.clone().unwrap_or_else(|| "0.0.0.0".into());
        let on_port: Vec<&Service> = scope
            .services
            .iter()
            .copied()
            .filter(|s| {
                super::scope::egress_admits(l, &scope.proxy.namespace, s)
                    && s.port(port.number).is_some()
            })
            .collect();
        let protocol = port
            .protocol
            .as_deref()
            .map(Protocol::from_name)
            .or_else(|| {
                on_port
                    .iter()
                    .filter_map(|s| s.port(port.number))
                    .map(|p| p.protocol)
                    .min()
            })
            .unwrap_or(Protocol::Tcp);
        let listener_name = format!("{bind}_{}", port.number);
        let stat_prefix = format!("outbound_{bind}_{}", port.number);
        let network_filter = if protocol.is_http() {
            outbound_http(mesh, scope, port.number, &on_port, &stat_prefix, out)
        } else {
            let Some(svc) = on_port.first() else {
                out.warnings.push(format!(
                    "Sidecar/{}/{}: spec.egress[{i}]: no visible service has TCP port {}; the listener is not generated",
                    sidecar.namespace,
                    sidecar.name(),
                    port.number
                ));
                continue;
            };
            if on_port.len() > 1 {
                out.warnings.push(format!(
                    "Sidecar/{}/{}: spec.egress[{i}]: several services share TCP port {}; {} wins",
                    sidecar.namespace,
                    sidecar.name(),
                    port.number,
                    svc.hostname
                ));
            }
            let idle = super::policy::tcp_idle_timeout(
                destination_rule_for(mesh, scope.proxy.namespace.as_str(), svc)
                    .map(|(_, dr)| &dr.spec),
                port.number,
            );
            tcp_proxy_filter_idle(&stat_prefix, tcp_route(mesh, scope, svc, port.number), idle)
        };
        let mut egress = listener(&listener_name, &bind, port.number, network_filter);
        if !protocol.is_http() {
            let sni = tls_routes(mesh, scope, &on_port, port.number);
            if !sni.is_empty() {
                super::security::add_sni_chains(&mut egress, sni, &stat_prefix);
            }
        }
        out.add(type_url::LISTENER, listener_name.clone(), &egress);
    }
}

/// An outbound HTTP port: its route config (`PORT`, a virtual host per service) and the
/// connection manager that reads it over RDS.
pub(super) fn outbound_http(
    mesh: &Mesh,
    scope: &Scope<'_>,
    port: u32,
    services: &[&Service],
    stat_prefix: &str,
    out: &mut Generated,
) -> Filter {
    let route_name = port.to_string();
    out.add(
        type_url::ROUTE_CONFIGURATION,
        route_name.clone(),
        &route_config(mesh, scope, &route_name, port, services),
    );
    http_connection_manager(
        mesh,
        scope.proxy,
        stat_prefix,
        HcmRole::Outbound,
        http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_name,
        }),
    )
}

/// Auto mTLS, or the DestinationRule's ISTIO_MUTUAL/DISABLE, on a mesh client's cluster.
fn mesh_tls(
    mesh: &Mesh,
    svc: &Service,
    cluster: &mut Cluster,
    tls: Option<&crate::config::ClientTls>,
    port: u32,
    subset: &str,
) {
    use crate::config::ClientTlsMode;
    let forced = match tls.and_then(|t| t.mode) {
        None => false,
        Some(ClientTlsMode::IstioMutual) => true,
        // DISABLE: plaintext; SIMPLE/MUTUAL: the rule's own TLS (policy::apply).
        Some(_) => return,
    };
    // Auto mTLS respects the destination's PeerAuthentication: workloads whose port is
    // DISABLE get plaintext, as Istio's auto mTLS does.
    if !forced {
        let disabled = svc.endpoints.iter().all(|e| {
            let target = e.ports.get(&port).copied().unwrap_or(port);
            super::security::peer_mode(mesh, &svc.namespace, &e.labels, target)
                == crate::config::MtlsMode::Disable
        });
        if disabled && !svc.endpoints.is_empty() {
            return;
        }
    }
    let td = mesh.settings.trust_domain();
    let sans: Vec<String> = match tls.map(|t| &t.subject_alt_names) {
        Some(sans) if !sans.is_empty() => sans.clone(),
        _ => svc
            .service_accounts()
            .into_iter()
            .map(|sa| format!("spiffe://{td}/ns/{}/sa/{sa}", svc.namespace))
            .collect(),
    };
    let sni = match tls.and_then(|t| t.sni.clone()) {
        Some(sni) => sni,
        None => super::security::mesh_sni(port, subset, &svc.hostname),
    };
    super::security::apply_mesh_tls(cluster, forced, &sni, &sans, td);
}

/// One port the sidecar receives its workload's traffic on.
struct InboundPort {
    port: u32,
    protocol: Protocol,
    /// Where a bound listener listens (Sidecar ingress `bind`).
    bind: String,
    /// Where the workload itself listens.
    to_ip: String,
    to_port: u32,
}

/// The inbound ports: the Sidecar's `ingress` listeners; for a captured sidecar without them,
/// the ports the services selecting its workload send to (their target ports), forwarded to
/// the workload on localhost, as Istio does.
fn inbound_ports(mesh: &Mesh, scope: &Scope<'_>, captured: bool) -> Vec<InboundPort> {
    let ingress = scope
        .sidecar
        .map(|s| s.spec.ingress.as_slice())
        .unwrap_or(&[]);
    if !ingress.is_empty() {
        return ingress
            .iter()
            .filter_map(|l| {
                let (ip, to_port) = parse_default_endpoint(l.default_endpoint.as_ref()?).ok()?;
                Some(InboundPort {
                    port: l.port.number,
                    protocol: l
                        .port
                        .protocol
                        .as_deref()
                        .map(Protocol::from_name)
                        .unwrap_or(Protocol::Tcp),
                    bind: l.bind.clone().unwrap_or_else(|| "0.0.0.0".into()),
                    to_ip: if ip.is_unspecified() {
                        "127.0.0.1".to_string()
                    } else {
                        ip.to_string()
                    },
                    to_port,
                })
            })
            .collect();
    }
    let (true, Some(w)) = (captured, &scope.proxy.workload) else {
        return Vec::new();
    };
    let mut out: Vec<InboundPort> = Vec::new();
    for svc in mesh.services.iter().filter(|s| s.namespace == w.namespace) {
        for ep in svc.endpoints.iter().filter(|e| e.workload == w.name) {
            for p in &svc.ports {
                let Some(&target) = ep.ports.get(&p.port) else {
                    continue;
                };
                if out.iter().all(|o| o.port != target) {
                    out.push(InboundPort {
                        port: target,
                        protocol: p.protocol,
                        bind: "0.0.0.0".into(),
                        to_ip: "127.0.0.1".into(),
                        to_port: target,
                    });
                }
            }
        }
    }
    out.sort_by_key(|p| p.port);
    out
}

/// Inbound: each inbound port forwards to the workload through the `inbound|PORT||` cluster,
/// on a listener of its own, or, on a captured sidecar, as chains of `virtualInbound`.
pub fn inbound(mesh: &Mesh, scope: &Scope<'_>, out: &mut Generated) {
    let captured = scope.proxy.captured();
    let mut captured_chains = Vec::new();
    let mut inspect_tls = false;
    for l in inbound_ports(mesh, scope, captured) {
        let InboundPort {
            protocol,
            to_ip: ip,
            to_port: target,
            ..
        } = l;
        let cluster_name = inbound_cluster_name(l.port);
        let cluster = static_cluster(&cluster_name, protocol, vec![lb_endpoint(&ip, target, 1)]);
        out.add(type_url::CLUSTER, cluster_name.clone(), &cluster);
        let bind = &l.bind;
        let listener_name = format!("{bind}_{}", l.port);
        let stat_prefix = format!("inbound_{bind}_{}", l.port);
        let network_filter = if protocol.is_http() {
            let rc = RouteConfiguration {
                name: cluster_name.clone(),
                validate_clusters: Some(BoolValue { value: false }),
                virtual_hosts: vec![VirtualHost {
                    name: format!("inbound|http|{}", l.port),
                    domains: vec!["*".into()],
                    include_request_attempt_count: true,
                    routes: vec![Route {
                        name: "default".into(),
                        r#match: Some(prefix_match("/")),
                        action: Some(route::Action::Route(inbound_action(&cluster_name))),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
            http_connection_manager(
                mesh,
                scope.proxy,
                &stat_prefix,
                HcmRole::Inbound,
                http_connection_manager::RouteSpecifier::RouteConfig(rc),
            )
        } else {
            tcp_proxy_filter(
                &stat_prefix,
                tcp_proxy::ClusterSpecifier::Cluster(cluster_name.clone()),
            )
        };
        let listener = inbound_listener_for(
            mesh,
            scope,
            &listener_name,
            socket(bind, l.port),
            network_filter,
            protocol.is_http(),
            &stat_prefix,
            l.port,
        );
        if !captured {
            out.add(type_url::LISTENER, listener_name.clone(), &listener);
            continue;
        }
        // Captured: the port's chains go into virtualInbound, matched on the port.
        inspect_tls |= !listener.listener_filters.is_empty();
        for mut chain in listener.filter_chains {
            chain.name = super::capture::chain_name(&cluster_name, &chain.name);
            chain
                .filter_chain_match
                .get_or_insert_with(Default::default)
                .destination_port = Some(UInt32Value { value: l.port });
            captured_chains.push(chain);
        }
    }
    if captured {
        super::capture::virtual_inbound(mesh, scope, captured_chains, inspect_tls, out);
    }
}

/// An inbound listener: AuthorizationPolicy's RBAC in front of the connection manager's
/// router or of the TCP proxy, and TLS as PeerAuthentication says (mesh workloads only).
#[allow(clippy::too_many_arguments)]
pub(super) fn inbound_listener_for(
    mesh: &Mesh,
    scope: &Scope<'_>,
    name: &str,
    address: Address,
    mut network_filter: Filter,
    http: bool,
    stat_prefix: &str,
    port: u32,
) -> Listener {
    let rbac = super::authz::rbac_for(mesh, &scope.proxy.namespace, &scope.proxy.labels, http);
    let mut filters = Vec::new();
    if http {
        super::authz::add_http_rbac(&mut network_filter, &rbac);
    } else {
        filters = super::authz::network_rbac(&rbac, stat_prefix);
    }
    filters.push(network_filter);
    let mode = if super::security::has_sidecar(&scope.proxy.labels) {
        super::security::peer_mode(mesh, &scope.proxy.namespace, &scope.proxy.labels, port)
    } else {
        crate::config::MtlsMode::Disable
    };
    super::security::inbound_listener(
        name,
        address,
        filters,
        http,
        mode,
        mesh.settings.trust_domain(),
    )
}

/// A listener for traffic leaving the workload (a sidecar's egress, a gateway's), marked
/// OUTBOUND as Istio marks them: a tracer's spans there are the client side of their hop.
pub(super) fn listener(name: &str, bind: &str, port: u32, network_filter: Filter) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket(bind, port)),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![FilterChain {
            filters: vec![network_filter],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Istio's default access log line (`meshConfig.accessLogEncoding: TEXT`), operator for operator.
const TEXT_LOG_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's default JSON access log (`accessLogEncoding: JSON`): its keys and operators.
const JSON_LOG_FIELDS: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("route_name", "%ROUTE_NAME%"),
];

fn access_log(settings: &crate::model::AccessLogSettings) -> AccessLog {
    use weft_xds_proto::envoy::config::core::v3::{
        DataSource, SubstitutionFormatString, data_source, substitution_format_string,
    };
    use weft_xds_proto::envoy::extensions::access_loggers::file::v3::{
        FileAccessLog, file_access_log,
    };
    use weft_xds_proto::wkt::{Struct, Value, value};
    let format = if settings.json {
        substitution_format_string::Format::JsonFormat(Struct {
            fields: JSON_LOG_FIELDS
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value {
                            kind: Some(value::Kind::StringValue(v.to_string())),
                        },
                    )
                })
                .collect(),
        })
    } else {
        substitution_format_string::Format::TextFormatSource(DataSource {
            specifier: Some(data_source::Specifier::InlineString(TEXT_LOG_FORMAT.into())),
            ..Default::default()
        })
    };
    let file = FileAccessLog {
        path: settings.path.clone(),
        access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(
            SubstitutionFormatString {
                format: Some(format),
                ..Default::default()
            },
        )),
    };
    AccessLog {
        name: "envoy.access_loggers.file".into(),
        config_type: Some(access_log::ConfigType::TypedConfig(pack(&file))),
        ..Default::default()
    }
}

/// The `server` header Istio's inbound listeners and gateways answer with (outbound listeners
/// keep Envoy's default, "envoy", as Istio's do).
const ISTIO_SERVER_NAME: &str = "istio-envoy";

/// Which side of the mesh an HTTP connection manager serves: istiod gives each its own settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HcmRole {
    /// A sidecar's outbound listeners: the CORS and fault filters (empty: routes turn them on
    /// with their per-route config), Envoy's `server` name, client certificate details removed.
    Outbound,
    /// A sidecar's inbound chains: `istio-envoy`, and the client's certificate appended to
    /// `x-forwarded-client-cert` (subject, URI and DNS names).
    Inbound,
    /// A gateway: the CORS and fault filters, `istio-envoy`, the client's address appended to
    /// `x-forwarded-for` (the edge of the mesh), and `x-forwarded-client-cert` replaced by the
    /// client's certificate (subject, the certificate itself, URI and DNS names).
    Gateway,
}

/// The HTTP connection manager for `role`. The `server` header overwrites the application's
/// either way (Envoy's default transformation, which Istio keeps).
pub(super) fn http_connection_manager(
    mesh: &Mesh,
    proxy: &crate::generate::proxy::ProxyNode,
    stat_prefix: &str,
    role: HcmRole,
    routes: http_connection_manager::RouteSpecifier,
) -> Filter {
    use http_connection_manager::{ForwardClientCertDetails, SetCurrentClientCertDetails};
    let mut http_filters = Vec::new();
    if role != HcmRole::Inbound {
        http_filters.push(HttpFilter {
            name: "envoy.filters.http.cors".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack(&Cors::default()))),
            ..Default::default()
        });
        http_filters.push(HttpFilter {
            name: FAULT_FILTER.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack(
                &HttpFault::default(),
            ))),
            ..Default::default()
        });
    }
    http_filters.push(HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack(
            &Router::default(),
        ))),
        ..Default::default()
    });
    // Istio's meshConfig.pathNormalization, on every connection manager.
    use crate::model::PathNormalization as P;
    use http_connection_manager::PathWithEscapedSlashesAction as Escaped;
    let normalization = mesh.settings.path_normalization;
    let (client_cert, cert) = match role {
        HcmRole::Outbound => (ForwardClientCertDetails::Sanitize, false),
        HcmRole::Inbound => (ForwardClientCertDetails::AppendForward, false),
        HcmRole::Gateway => (ForwardClientCertDetails::SanitizeSet, true),
    };
    let hcm = HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        server_name: match role {
            HcmRole::Outbound => String::new(),
            HcmRole::Inbound | HcmRole::Gateway => ISTIO_SERVER_NAME.into(),
        },
        use_remote_address: (role == HcmRole::Gateway).then_some(BoolValue { value: true }),
        normalize_path: Some(BoolValue {
            value: normalization != P::None,
        }),
        merge_slashes: matches!(normalization, P::MergeSlashes | P::DecodeAndMergeSlashes),
        path_with_escaped_slashes_action: if normalization == P::DecodeAndMergeSlashes {
            Escaped::UnescapeAndForward
        } else {
            Escaped::KeepUnchanged
        } as i32,
        forward_client_cert_details: client_cert as i32,
        set_current_client_cert_details: (role != HcmRole::Outbound).then(|| {
            SetCurrentClientCertDetails {
                subject: Some(BoolValue { value: true }),
                cert,
                uri: true,
                dns: true,
                ..Default::default()
            }
        }),
        route_specifier: Some(routes),
        http_filters,
        access_log: mesh.settings.access_log.iter().map(access_log).collect(),
        tracing: mesh
            .settings
            .tracing
            .as_ref()
            .map(|t| tracing(mesh, proxy, t)),
        // WebSocket upgrades pass through, as on Istio's sidecars and gateways.
        upgrade_configs: vec![http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
    }
}

/// The cluster every connection manager's spans are reported to (Istio's bootstrap names it
/// so).
pub const ZIPKIN_CLUSTER: &str = "zipkin";

/// Istio's tracing on a connection manager with a Zipkin collector: `sampling` percent of
/// requests at random (a client's `x-client-trace-id` and an internal `x-envoy-force-trace`
/// always), spans with 128-bit trace ids and a span of their own on each side (no shared
/// context), tagged with the proxy's canonical service and revision, its namespace and the mesh
/// id, and with Istio's dry-run authorization tags (the RBAC filter's shadow results in the
/// request's metadata), as Istio tags them, in Istio's order (by name).
fn tracing(
    mesh: &Mesh,
    proxy: &crate::generate::proxy::ProxyNode,
    t: &crate::model::TracingSettings,
) -> http_connection_manager::Tracing {
    use weft_xds_proto::envoy::config::trace::v3::zipkin_config::CollectorEndpointVersion;
    use weft_xds_proto::envoy::config::trace::v3::{ZipkinConfig, tracing::Http, tracing::http};
    use weft_xds_proto::envoy::r#type::tracing::v3::{CustomTag, custom_tag};
    use weft_xds_proto::envoy::r#type::v3::Percent;
    let zipkin = ZipkinConfig {
        collector_cluster: ZIPKIN_CLUSTER.into(),
        collector_endpoint: "/api/v2/spans".into(),
        collector_endpoint_version: CollectorEndpointVersion::HttpJson as i32,
        trace_id_128bit: true,
        shared_span_context: Some(BoolValue { value: false }),
        ..Default::default()
    };
    use weft_xds_proto::envoy::r#type::metadata::v3::{
        MetadataKey, MetadataKind, metadata_key, metadata_kind,
    };
    let dry_run = [
        (
            "allow_policy.name",
            "istio_dry_run_allow_shadow_effective_policy_id",
        ),
        (
            "allow_policy.result",
            "istio_dry_run_allow_shadow_engine_result",
        ),
        (
            "deny_policy.name",
            "istio_dry_run_deny_shadow_effective_policy_id",
        ),
        (
            "deny_policy.result",
            "istio_dry_run_deny_shadow_engine_result",
        ),
    ]
    .into_iter()
    .map(|(tag, key)| CustomTag {
        tag: format!("istio.authorization.dry_run.{tag}"),
        r#type: Some(custom_tag::Type::Metadata(custom_tag::Metadata {
            kind: Some(MetadataKind {
                kind: Some(metadata_kind::Kind::Request(Default::default())),
            }),
            metadata_key: Some(MetadataKey {
                key: "envoy.filters.http.rbac".into(),
                path: vec![metadata_key::PathSegment {
                    segment: Some(metadata_key::path_segment::Segment::Key(key.into())),
                }],
            }),
            default_value: String::new(),
        })),
    });
    let literal = [
        ("istio.canonical_revision", canonical_revision(proxy)),
        ("istio.canonical_service", canonical_service(proxy)),
        ("istio.mesh_id", mesh.settings.trust_domain()),
        ("istio.namespace", proxy.namespace.as_str()),
    ]
    .into_iter()
    .map(|(tag, value)| CustomTag {
        tag: tag.into(),
        r#type: Some(custom_tag::Type::Literal(custom_tag::Literal {
            value: value.to_string(),
        })),
    });
    http_connection_manager::Tracing {
        client_sampling: Some(Percent { value: 100.0 }),
        random_sampling: Some(Percent { value: t.sampling }),
        overall_sampling: Some(Percent { value: 100.0 }),
        max_path_tag_length: Some(UInt32Value { value: 256 }),
        custom_tags: dry_run.chain(literal).collect(),
        provider: Some(Http {
            name: "envoy.tracers.zipkin".into(),
            config_type: Some(http::ConfigType::TypedConfig(pack(&zipkin))),
        }),
        ..Default::default()
    }
}

/// Istio's canonical service of a workload: its `service.istio.io/canonical-name` label, else
/// `app.kubernetes.io/name`, else `app`, else the workload's name.
fn canonical_service(proxy: &crate::generate::proxy::ProxyNode) -> &str {
    first_label(
        proxy,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    )
    .unwrap_or(&proxy.workload_name)
}

/// Istio's canonical revision: `service.istio.io/canonical-revision`, else
/// `app.kubernetes.io/version`, else `version`, else `latest`.
fn canonical_revision(proxy: &crate::generate::proxy::ProxyNode) -> &str {
    first_label(
        proxy,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or("latest")
}

/// The value of the first of `names` among the proxy's labels.
fn first_label<'a>(
    proxy: &'a crate::generate::proxy::ProxyNode,
    names: &[&str],
) -> Option<&'a str> {
    names
        .iter()
        .find_map(|l| proxy.labels.get(*l))
        .map(String::as_str)
}

/// The Zipkin collector's cluster: the proxies resolve its host themselves (STRICT_DNS), or it
/// is an address (STATIC).
pub fn zipkin_cluster(t: &crate::model::TracingSettings) -> Cluster {
    let endpoints = vec![lb_endpoint(&t.host, t.port, 1)];
    if t.host.parse::<std::net::IpAddr>().is_ok() {
        static_cluster(ZIPKIN_CLUSTER, Protocol::Http, endpoints)
    } else {
        dns_cluster(ZIPKIN_CLUSTER, Protocol::Http, false, endpoints)
    }
}

/// Where the service's TCP traffic on `port` goes for this proxy: the destinations of the first
/// VirtualService `tcp` route that applies whatever the destination address (matches on
/// `destinationSubnets` are chains of their own on a captured proxy's listener, see
/// `capture`), else the service's own cluster.
pub(super) fn tcp_route(
    mesh: &Mesh,
    scope: &Scope<'_>,
    svc: &Service,
    port: u32,
) -> tcp_proxy::ClusterSpecifier {
    let routed = virtual_service_for(mesh, scope, svc).and_then(|vs| {
        let route = vs.spec.tcp.iter().find(|r| {
            r.matches.is_empty()
                || r.matches.iter().any(|m| {
                    m.destination_subnets.is_empty()
                        && l4_match_applies(m, &vs.namespace, scope, port)
                })
        })?;
        Some(l4_destinations(mesh, &vs.namespace, &route.route, port))
    });
    routed.unwrap_or_else(|| {
        tcp_proxy::ClusterSpecifier::Cluster(outbound_cluster_name(port, "", &svc.hostname))
    })
}

/// Whether an L4 match's port, gateways, source namespace and source labels admit this proxy
/// on `port`.
pub(super) fn l4_match_applies(
    m: &crate::config::L4MatchAttributes,
    vs_namespace: &str,
    scope: &Scope<'_>,
    port: u32,
) -> bool {
    m.port.is_none_or(|p| p == port)
        && match_applies_via(&m.gateways, vs_namespace, &[])
        && m.source_namespace
            .as_ref()
            .is_none_or(|ns| *ns == scope.proxy.namespace)
        && selector_matches(&m.source_labels, &scope.proxy.labels)
}

/// Whether the proxy's Sidecar says REGISTRY_ONLY (hosts the mesh does not know are refused).
pub(super) fn registry_only(scope: &Scope<'_>) -> bool {
    scope.sidecar.is_some_and(|s| {
        s.spec.outbound_traffic_policy.as_ref().and_then(|p| p.mode)
            == Some(OutboundMode::RegistryOnly)
    })
}

/// A TCP proxy's cluster(s) for an L4 route's destinations (weighted when several).
pub(super) fn l4_destinations(
    mesh: &Mesh,
    vs_namespace: &str,
    route: &[crate::config::HttpRouteDestination],
    port: u32,
) -> tcp_proxy::ClusterSpecifier {
    let cluster_of = |d: &crate::config::Destination| {
        let host = resolve_host(&d.host, vs_namespace);
        let p = destination_port(mesh, &host, d, port);
        outbound_cluster_name(p, d.subset.as_deref().unwrap_or(""), &host)
    };
    let weighted: Vec<_> = route
        .iter()
        .filter(|d| route.len() == 1 || d.weight.unwrap_or(0) > 0)
        .collect();
    match weighted.as_slice() {
        [only] => tcp_proxy::ClusterSpecifier::Cluster(cluster_of(&only.destination)),
        many => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: many
                .iter()
                .map(|d| tcp_proxy::weighted_cluster::ClusterWeight {
                    name: cluster_of(&d.destination),
                    weight: d.weight.unwrap_or(0) as u32,
                    ..Default::default()
                })
                .collect(),
        }),
    }
}

/// VirtualService `tls` routes for the services on an egress port: (SNI names, destinations),
/// first route first; a name already taken by an earlier route is not repeated. When there are
/// any, every other service on the port is reached by its own host name as the SNI (Istio's
/// outbound TLS chains); other names match nothing.
pub(super) fn tls_routes(
    mesh: &Mesh,
    scope: &Scope<'_>,
    on_port: &[&Service],
    port: u32,
) -> Vec<(Vec<String>, tcp_proxy::ClusterSpecifier)> {
    let mut out: Vec<(Vec<String>, tcp_proxy::ClusterSpecifier)> = Vec::new();
    let mut seen_vs = std::collections::HashSet::new();
    let mut taken = std::collections::HashSet::new();
    for svc in on_port {
        let Some(vs) = virtual_service_for(mesh, scope, svc) else {
            continue;
        };
        if !seen_vs.insert((vs.namespace.clone(), vs.name().to_string())) {
            continue;
        }
        for r in &vs.spec.tls {
            for m in &r.matches {
                let applies = m.port.is_none_or(|p| p == port)
                    && match_applies_via(&m.gateways, &vs.namespace, &[])
                    && m.source_namespace
                        .as_ref()
                        .is_none_or(|ns| *ns == scope.proxy.namespace)
                    && selector_matches(&m.source_labels, &scope.proxy.labels);
                if !applies {
                    continue;
                }
                let names: Vec<String> = m
                    .sni_hosts
                    .iter()
                    .filter(|h| taken.insert(h.to_ascii_lowercase()))
                    .cloned()
                    .collect();
                if !names.is_empty() {
                    out.push((names, l4_destinations(mesh, &vs.namespace, &r.route, port)));
                }
            }
        }
    }
    if !out.is_empty() {
        for svc in on_port {
            if taken.insert(svc.hostname.to_ascii_lowercase()) {
                out.push((
                    vec![svc.hostname.clone()],
                    tcp_proxy::ClusterSpecifier::Cluster(outbound_cluster_name(
                        port,
                        "",
                        &svc.hostname,
                    )),
                ));
            }
        }
    }
    out
}

/// A TCP proxy to one cluster or weighted clusters.
pub(super) fn tcp_proxy_filter(stat_prefix: &str, to: tcp_proxy::ClusterSpecifier) -> Filter {
    tcp_proxy_filter_idle(stat_prefix, to, None)
}

/// A TCP proxy with the destination rule's idle timeout (`connectionPool.tcp.idleTimeout`).
pub(super) fn tcp_proxy_filter_idle(
    stat_prefix: &str,
    to: tcp_proxy::ClusterSpecifier,
    idle_timeout: Option<weft_xds_proto::wkt::Duration>,
) -> Filter {
    let tcp = TcpProxy {
        stat_prefix: stat_prefix.to_string(),
        cluster_specifier: Some(to),
        idle_timeout,
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack(&tcp))),
    }
}

/// The DestinationRule for a service as a proxy of namespace `proxy_ns` sees it, in Istio's
/// order: a rule in the proxy's namespace, else in the service's, else in the root namespace,
/// else any other; only rules exported to the proxy count. Returns its index too (clusters are
/// shared per rule).
pub(super) fn destination_rule_for<'a>(
    mesh: &'a Mesh,
    proxy_ns: &str,
    svc: &Service,
) -> Option<(usize, &'a Object<crate::config::DestinationRuleSpec>)> {
    mesh.rule_index
        .get(&svc.hostname)?
        .iter()
        .map(|i| (*i, &*mesh.config.destination_rules[*i]))
        .filter(|(_, dr)| exported_to(&dr.spec.export_to, &dr.namespace, proxy_ns))
        .min_by_key(|(_, dr)| {
            (
                dr.namespace != proxy_ns,
                dr.namespace != svc.namespace,
                dr.namespace != crate::model::ROOT_NAMESPACE,
            )
        })
}

pub(super) fn virtual_service_for<'a>(
    mesh: &'a Mesh,
    scope: &Scope<'_>,
    svc: &Service,
) -> Option<&'a Object<VirtualServiceSpec>> {
    mesh.virtual_service_index
        .get(&svc.hostname)?
        .iter()
        .map(|i| &*mesh.config.virtual_services[*i])
        .filter(|vs| vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh"))
        .find(|vs| exported_to(&vs.spec.export_to, &vs.namespace, &scope.proxy.namespace))
}

/// The route configuration for one outbound port: a virtual host per service on that port.
fn route_config(
    mesh: &Mesh,
    scope: &Scope<'_>,
    name: &str,
    port: u32,
    services: &[&Service],
) -> RouteConfiguration {
    let mut virtual_hosts = Vec::new();
    for svc in services {
        let routes = match virtual_service_for(mesh, scope, svc) {
            Some(vs) => vs
                .spec
                .http
                .iter()
                .enumerate()
                .flat_map(|(i, r)| http_routes(mesh, scope, &[], vs, i, r, port))
                .collect(),
            None => vec![Route {
                name: "default".into(),
                r#match: Some(prefix_match("/")),
                action: Some(route::Action::Route(RouteAction {
                    retry_policy: Some(retry_policy(None)),
                    hash_policy: super::policy::hash_policy(
                        destination_rule_for(mesh, &scope.proxy.namespace, svc)
                            .map(|(_, dr)| &dr.spec),
                        "",
                        port,
                    ),
                    ..cluster_action(&outbound_cluster_name(port, "", &svc.hostname))
                })),
                ..Default::default()
            }],
        };
        virtual_hosts.push(VirtualHost {
            name: format!("{}:{port}", svc.hostname),
            domains: domains(svc, port, &scope.proxy.namespace),
            routes,
            include_request_attempt_count: true,
            ..Default::default()
        });
    }
    if registry_only(scope) {
        // Istio's REGISTRY_ONLY: hosts the mesh does not know get a 502 from the sidecar.
        virtual_hosts.push(VirtualHost {
            name: "block_all".into(),
            domains: vec!["*".into()],
            include_request_attempt_count: true,
            routes: vec![Route {
                name: "block_all".into(),
                r#match: Some(prefix_match("/")),
                action: Some(route::Action::DirectResponse(DirectResponseAction {
                    status: 502,
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        });
    } else if scope.proxy.captured() {
        // Istio's ALLOW_ANY on a captured sidecar: other hosts go where the client sent them.
        virtual_hosts.push(VirtualHost {
            name: "allow_any".into(),
            domains: vec!["*".into()],
            include_request_attempt_count: true,
            routes: vec![Route {
                name: "allow_any".into(),
                r#match: Some(prefix_match("/")),
                action: Some(route::Action::Route(cluster_action(
                    &super::capture::fallback(mesh, scope),
                ))),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// The names a client may use for a service, with and without the port, as Istio generates them.
fn domains(svc: &Service, port: u32, client_ns: &str) -> Vec<String> {
    let mut names = vec![svc.hostname.clone()];
    if let Origin::ServiceEntry { .. } = svc.origin {
        // A ServiceEntry host is known by that name and its declared addresses only.
        names.extend(
            svc.addresses
                .iter()
                .filter_map(|a| {
                    a.strip_suffix("/32")
                        .or(Some(a))
                        .filter(|a| !a.contains('/'))
                })
                .map(str::to_string),
        );
        return names
            .into_iter()
            .flat_map(|n| [format!("{n}:{port}"), n])
            .collect();
    }
    if svc.namespace == client_ns {
        names.push(svc.name.clone());
    }
    names.push(format!("{}.{}", svc.name, svc.namespace));
    names.push(format!("{}.{}.svc", svc.name, svc.namespace));
    if let Some(ip) = svc.cluster_ip {
        names.push(ip.to_string());
    }
    let mut out = Vec::new();
    for n in names {
        out.push(format!("{n}:{port}"));
        out.push(n);
    }
    out
}

fn prefix_match(prefix: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(prefix.into())),
        ..Default::default()
    }
}

/// An inbound route's action, as istiod's: no timeout, and a gRPC client's `grpc-timeout` as
/// the stream's limit (`max_stream_duration` with `grpc_timeout_header_max` zero, no cap).
#[allow(deprecated)] // `max_grpc_timeout`, see `cluster_action`.
fn inbound_action(cluster: &str) -> RouteAction {
    let zero = Duration {
        seconds: 0,
        nanos: 0,
    };
    RouteAction {
        max_grpc_timeout: None,
        max_stream_duration: Some(route_action::MaxStreamDuration {
            max_stream_duration: Some(zero),
            grpc_timeout_header_max: Some(zero),
            grpc_timeout_header_offset: None,
        }),
        ..cluster_action(cluster)
    }
}

// `max_grpc_timeout` is deprecated in Envoy's API, and still what istiod sets on its routes.
#[allow(deprecated)]
fn cluster_action(cluster: &str) -> RouteAction {
    RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_string())),
        // Istio disables Envoy's 15 s default route timeout unless a VirtualService sets one.
        timeout: Some(Duration {
            seconds: 0,
            nanos: 0,
        }),
        // As istiod: a gRPC request's `grpc-timeout` is its timeout, capped by the route's
        // (zero here: no cap). Inbound routes say it with `max_stream_duration` instead.
        max_grpc_timeout: Some(Duration {
            seconds: 0,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn string_matcher(m: &StringMatch) -> StringMatcher {
    let pattern = match m {
        StringMatch::Exact(s) => string_matcher::MatchPattern::Exact(s.clone()),
        StringMatch::Prefix(s) => string_matcher::MatchPattern::Prefix(s.clone()),
        StringMatch::Regex(r) => string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: r.clone(),
            ..Default::default()
        }),
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    }
}

/// One Istio HTTPRoute becomes one Envoy route per `match` entry (or one catch-all route).
/// One Istio match as an Envoy route match.
fn route_match(m: &crate::config::HttpMatchRequest) -> RouteMatch {
    let path_specifier = Some(match &m.uri {
        None => route_match::PathSpecifier::Prefix("/".into()),
        Some(StringMatch::Exact(p)) => route_match::PathSpecifier::Path(p.clone()),
        Some(StringMatch::Prefix(p)) => route_match::PathSpecifier::Prefix(p.clone()),
        Some(StringMatch::Regex(re)) => route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: re.clone(),
            ..Default::default()
        }),
    });
    let header = |name: &str, sm: &StringMatch, invert: bool| HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            string_matcher(sm),
        )),
        invert_match: invert,
        ..Default::default()
    };
    let mut headers: Vec<HeaderMatcher> = m
        .headers
        .iter()
        .map(|(h, sm)| header(h, sm, false))
        .collect();
    for (name, sm) in [
        (":method", &m.method),
        (":authority", &m.authority),
        (":scheme", &m.scheme),
    ] {
        if let Some(sm) = sm {
            headers.push(header(name, sm, false));
        }
    }
    headers.extend(m.without_headers.iter().map(|(h, sm)| header(h, sm, true)));
    let query_parameters = m
        .query_params
        .iter()
        .map(|(q, sm)| QueryParameterMatcher {
            name: q.clone(),
            query_parameter_match_specifier: Some(
                query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(string_matcher(
                    sm,
                )),
            ),
        })
        .collect();
    RouteMatch {
        path_specifier,
        headers,
        query_parameters,
        case_sensitive: m.ignore_uri_case.then_some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// A destination's port: as written, else the service's only port, else the port the request
/// came in on (Istio's defaulting).
pub(super) fn destination_port(
    mesh: &Mesh,
    host: &str,
    d: &crate::config::Destination,
    port: u32,
) -> u32 {
    d.port.as_ref().map(|p| p.number).unwrap_or_else(|| {
        match mesh.service(host).map(|s| s.ports.as_slice()) {
            Some([only]) => only.port,
            _ => port,
        }
    })
}

/// Is `m` (a VirtualService match) in force where the routes are generated: on the sidecars
/// (`via` empty: `gateways` empty or naming `mesh`) or on a gateway named in `via`
/// (`namespace/name`)?
pub(super) fn match_applies_via(gateways: &[String], vs_namespace: &str, via: &[String]) -> bool {
    if gateways.is_empty() {
        return true;
    }
    gateways.iter().any(|g| {
        if via.is_empty() {
            g == "mesh"
        } else {
            via.contains(&qualified_gateway(g, vs_namespace))
        }
    })
}

/// A gateway reference as `namespace/name` (a bare name is in the referring object's namespace).
pub(super) fn qualified_gateway(name: &str, namespace: &str) -> String {
    if name.contains('/') {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

/// A delegating route's routes: each route of the delegate VirtualService under the root
/// route's match (Istio's merge: matches combined, conflicting combinations dropped, unset
/// fields inherited from the root route).
fn delegated_routes(
    mesh: &Mesh,
    scope: &Scope<'_>,
    via: &[String],
    root: &Object<VirtualServiceSpec>,
    r: &HttpRoute,
    port: u32,
) -> Vec<Route> {
    let Some(d) = &r.delegate else {
        return Vec::new();
    };
    let ns = d.namespace.as_deref().unwrap_or(&root.namespace);
    let Some(child) = mesh
        .config
        .virtual_services
        .iter()
        .find(|v| v.namespace == ns && v.name() == d.name && v.spec.hosts.is_empty())
    else {
        return Vec::new();
    };
    if !exported_to(&child.spec.export_to, &child.namespace, &root.namespace) {
        return Vec::new();
    }
    child
        .spec
        .http
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some((i, super::delegate::merge_route(r, c)?)))
        .flat_map(|(i, merged)| http_routes(mesh, scope, via, child, i, &merged, port))
        .collect()
}

pub(super) fn http_routes(
    mesh: &Mesh,
    scope: &Scope<'_>,
    via: &[String],
    vs: &Object<VirtualServiceSpec>,
    index: usize,
    r: &HttpRoute,
    port: u32,
) -> Vec<Route> {
    if r.delegate.is_some() {
        return delegated_routes(mesh, scope, via, vs, r, port);
    }
    let cluster_of = |d: &crate::config::Destination| {
        let host = resolve_host(&d.host, &vs.namespace);
        let p = destination_port(mesh, &host, d, port);
        outbound_cluster_name(p, d.subset.as_deref().unwrap_or(""), &host)
    };
    // The destinations' consistent-hash keys (DestinationRule loadBalancer.consistentHash):
    // applied when every destination of the route hashes the same way.
    let hashes: Vec<Vec<HashPolicy>> = r
        .route
        .iter()
        .map(|d| {
            let host = resolve_host(&d.destination.host, &vs.namespace);
            let p = destination_port(mesh, &host, &d.destination, port);
            let rule = mesh
                .service(&host)
                .and_then(|svc| destination_rule_for(mesh, &scope.proxy.namespace, svc))
                .map(|(_, dr)| &dr.spec);
            super::policy::hash_policy(rule, d.destination.subset.as_deref().unwrap_or(""), p)
        })
        .collect();
    let hash_policy = match hashes.split_first() {
        Some((first, rest)) if rest.iter().all(|h| h == first) => first.clone(),
        _ => Vec::new(),
    };
    let mut action = if r.route.len() == 1 {
        cluster_action(&cluster_of(&r.route[0].destination))
    } else {
        RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
                WeightedCluster {
                    clusters: r
                        .route
                        .iter()
                        .filter(|d| d.weight.unwrap_or(0) > 0)
                        .map(|d| weighted_cluster::ClusterWeight {
                            name: cluster_of(&d.destination),
                            weight: Some(UInt32Value {
                                value: d.weight.unwrap_or(0) as u32,
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            )),
            ..cluster_action("")
        }
    };
    if let Some(route_action::ClusterSpecifier::WeightedClusters(wc)) = &action.cluster_specifier
        && wc.clusters.len() == 1
    {
        // Envoy rejects a weighted_clusters whose weights are all zero; a single remaining
        // destination is a plain cluster route.
        let only = wc.clusters[0].name.clone();
        action = cluster_action(&only);
    }
    action.hash_policy = hash_policy;
    let name = r
        .name
        .clone()
        .unwrap_or_else(|| format!("{}.{}.{index}", vs.name(), vs.namespace));
    // Matches that cannot apply to this proxy or port (sourceLabels, sourceNamespace, port,
    // gateways) are dropped; a route whose matches all drop is not generated here, as in Istio.
    let applies = |m: &&crate::config::HttpMatchRequest| {
        m.port.is_none_or(|p| p == port)
            && match_applies_via(&m.gateways, &vs.namespace, via)
            && m.source_namespace
                .as_ref()
                .is_none_or(|ns| *ns == scope.proxy.namespace)
            && selector_matches(&m.source_labels, &scope.proxy.labels)
    };
    let matches: Vec<RouteMatch> = if r.matches.is_empty() {
        vec![prefix_match("/")]
    } else {
        r.matches.iter().filter(applies).map(route_match).collect()
    };
    if matches.is_empty() {
        return Vec::new();
    }
    if let Some(t) = r.timeout.as_deref().and_then(|t| parse_duration(t).ok()) {
        action.timeout = Some(pb_duration(t));
        #[allow(deprecated)] // As in `cluster_action`.
        {
            action.max_grpc_timeout = Some(pb_duration(t));
        }
    }
    action.retry_policy = match &r.retries {
        Some(HttpRetry {
            attempts: Some(0), ..
        }) => None,
        retries => Some(retry_policy(retries.as_ref())),
    };
    let mut typed_per_filter_config: std::collections::HashMap<String, weft_xds_proto::wkt::Any> =
        Default::default();
    if let Some(f) = &r.fault {
        typed_per_filter_config.insert(FAULT_FILTER.to_string(), pack(&http_fault(f)));
    }
    if let Some(c) = &r.cors_policy {
        typed_per_filter_config
            .insert("envoy.filters.http.cors".to_string(), pack(&cors_policy(c)));
    }
    // Mirrors: Istio's mirror + mirrorPercentage (default 100%), or the mirrors list.
    let mirror_targets: Vec<(&crate::config::Destination, Option<f64>)> = match &r.mirror {
        Some(d) => vec![(
            d,
            r.mirror_percentage
                .as_ref()
                .map(|p| p.value)
                .or(r.mirror_percent.map(|p| p as f64)),
        )],
        None => r
            .mirrors
            .iter()
            .map(|m| (&m.destination, m.percentage.as_ref().map(|p| p.value)))
            .collect(),
    };
    action.request_mirror_policies = mirror_targets
        .into_iter()
        .map(|(d, pct)| route_action::RequestMirrorPolicy {
            cluster: cluster_of(d),
            runtime_fraction: Some(RuntimeFractionalPercent {
                default_value: Some(fraction(pct.map(|value| Percent { value }).as_ref(), None)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    if let Some(rw) = &r.rewrite {
        if let Some(uri) = &rw.uri {
            action.prefix_rewrite = uri.clone();
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            action.regex_rewrite = Some(RegexMatchAndSubstitute {
                pattern: Some(RegexMatcher {
                    regex: rr.pattern.clone(),
                    ..Default::default()
                }),
                substitution: rr.rewrite.clone(),
            });
        }
        if let Some(a) = &rw.authority {
            action.host_rewrite_specifier = Some(
                route_action::HostRewriteSpecifier::HostRewriteLiteral(a.clone()),
            );
        }
    }
    // A redirect answers instead of forwarding.
    let route_action = match (&r.redirect, &r.direct_response) {
        (Some(rd), _) => route::Action::Redirect(redirect_action(rd)),
        (None, Some(d)) => route::Action::DirectResponse(direct_response(d)),
        (None, None) => route::Action::Route(action),
    };
    let (request_add, request_remove) =
        header_ops(r.headers.as_ref().and_then(|h| h.request.as_ref()));
    let (response_add, response_remove) =
        header_ops(r.headers.as_ref().and_then(|h| h.response.as_ref()));
    matches
        .into_iter()
        .map(|m| Route {
            name: name.clone(),
            r#match: Some(m),
            action: Some(route_action.clone()),
            typed_per_filter_config: typed_per_filter_config.clone(),
            request_headers_to_add: request_add.clone(),
            request_headers_to_remove: request_remove.clone(),
            response_headers_to_add: response_add.clone(),
            response_headers_to_remove: response_remove.clone(),
            ..Default::default()
        })
        .collect()
}

fn direct_response(d: &HttpDirectResponse) -> DirectResponseAction {
    use weft_xds_proto::envoy::config::core::v3::{DataSource, data_source::Specifier};
    let body = d.body.as_ref().and_then(|b| match (&b.string, &b.bytes) {
        (Some(s), _) => Some(Specifier::InlineString(s.clone())),
        (None, Some(b64)) => decode_base64(b64).map(Specifier::InlineBytes),
        _ => None,
    });
    DirectResponseAction {
        status: d.status,
        body: body.map(|s| DataSource {
            specifier: Some(s),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Standard base64 (Istio's `bytes` body), or None if it is not valid.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let clean: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let v: Vec<u8> = chunk.iter().map(|c| val(*c)).collect::<Option<_>>()?;
        let n = v.iter().fold(0u32, |acc, x| acc << 6 | u32::from(*x)) << (6 * (4 - v.len()));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..v.len()]);
    }
    Some(out)
}

/// Istio's CorsPolicy as Envoy's per-route CORS policy.
fn cors_policy(c: &crate::config::CorsPolicy) -> EnvoyCorsPolicy {
    let mut origins: Vec<StringMatcher> = c.allow_origins.iter().map(string_matcher).collect();
    origins.extend(
        c.allow_origin
            .iter()
            .map(|o| string_matcher(&StringMatch::Exact(o.clone()))),
    );
    EnvoyCorsPolicy {
        allow_origin_string_match: origins,
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age: c
            .max_age
            .as_deref()
            .and_then(|d| parse_duration(d).ok())
            .map(|d| d.as_secs().to_string())
            .unwrap_or_default(),
        allow_credentials: c.allow_credentials.map(|value| BoolValue { value }),
        forward_not_matching_preflights: Some(BoolValue { value: true }),
        ..Default::default()
    }
}

fn redirect_action(rd: &HttpRedirect) -> RedirectAction {
    use envoy_redirect::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier};
    let code = match rd.redirect_code.unwrap_or(301) {
        302 => RedirectResponseCode::Found,
        303 => RedirectResponseCode::SeeOther,
        307 => RedirectResponseCode::TemporaryRedirect,
        308 => RedirectResponseCode::PermanentRedirect,
        _ => RedirectResponseCode::MovedPermanently,
    };
    RedirectAction {
        host_redirect: rd.authority.clone().unwrap_or_default(),
        port_redirect: rd.port.unwrap_or(0),
        response_code: code as i32,
        scheme_rewrite_specifier: rd
            .scheme
            .clone()
            .map(SchemeRewriteSpecifier::SchemeRedirect),
        path_rewrite_specifier: rd.uri.clone().map(PathRewriteSpecifier::PathRedirect),
        ..Default::default()
    }
}

/// Istio's header operations: `set` overwrites, `add` appends, `remove` removes.
fn header_ops(ops: Option<&HeaderOperations>) -> (Vec<HeaderValueOption>, Vec<String>) {
    let Some(ops) = ops else {
        return (Vec::new(), Vec::new());
    };
    let opt = |k: &String, v: &String, action: header_value_option::HeaderAppendAction| {
        HeaderValueOption {
            header: Some(HeaderValue {
                key: k.to_ascii_lowercase(),
                value: v.clone(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        }
    };
    let mut add: Vec<HeaderValueOption> = ops
        .set
        .iter()
        .map(|(k, v)| {
            opt(
                k,
                v,
                header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd,
            )
        })
        .collect();
    add.extend(ops.add.iter().map(|(k, v)| {
        opt(
            k,
            v,
            header_value_option::HeaderAppendAction::AppendIfExistsOrAdd,
        )
    }));
    (
        add,
        ops.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    )
}

const FAULT_FILTER: &str = "envoy.filters.http.fault";
/// What Istio retries when a VirtualService says nothing (or no retryOn).
const ISTIO_DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

fn pb_duration(d: std::time::Duration) -> Duration {
    Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Istio's translation of HTTPRetry (None: its default policy, 2 attempts): status codes in
/// retryOn become retriable_status_codes, and retries go to another host when there is one.
fn retry_policy(r: Option<&HttpRetry>) -> EnvoyRetryPolicy {
    let retry_on = r
        .and_then(|r| r.retry_on.clone())
        .unwrap_or_else(|| ISTIO_DEFAULT_RETRY_ON.to_string());
    let mut conditions = Vec::new();
    let mut codes: Vec<u32> = Vec::new();
    for token in retry_on.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match token.parse::<u32>() {
            Ok(code) => codes.push(code),
            Err(_) => conditions.push(token.to_string()),
        }
    }
    if r.and_then(|r| r.retry_on.as_ref()).is_none() {
        codes.push(503);
    }
    if !codes.is_empty() && !conditions.iter().any(|c| c == "retriable-status-codes") {
        conditions.push("retriable-status-codes".into());
    }
    EnvoyRetryPolicy {
        retry_on: conditions.join(","),
        num_retries: Some(UInt32Value {
            value: r.and_then(|r| r.attempts).unwrap_or(2).max(0) as u32,
        }),
        per_try_timeout: r
            .and_then(|r| r.per_try_timeout.as_deref())
            .and_then(|t| parse_duration(t).ok())
            .map(pb_duration),
        retriable_status_codes: codes,
        retry_host_predicate: vec![envoy_retry::RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(envoy_retry::retry_host_predicate::ConfigType::TypedConfig(
                pack(&PreviousHostsPredicate::default()),
            )),
        }],
        host_selection_retry_max_attempts: 5,
        ..Default::default()
    }
}

/// Istio's percentage (0-100, a double) as Envoy's per-million fraction; unset means 100%.
fn fraction(p: Option<&Percent>, legacy: Option<i64>) -> FractionalPercent {
    let value = p
        .map(|p| p.value)
        .or(legacy.map(|v| v as f64))
        .unwrap_or(100.0);
    FractionalPercent {
        numerator: (value * 10_000.0).round() as u32,
        denominator: fractional_percent::DenominatorType::Million as i32,
    }
}

fn http_fault(f: &HttpFaultInjection) -> HttpFault {
    let delay = f.delay.as_ref().and_then(|d| {
        let fixed = parse_duration(d.fixed_delay.as_deref()?).ok()?;
        Some(EnvoyFaultDelay {
            percentage: Some(fraction(d.percentage.as_ref(), d.percent)),
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(pb_duration(
                fixed,
            ))),
        })
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let error_type = match (a.http_status, a.grpc_status.as_deref()) {
            (Some(s), _) => fault_abort::ErrorType::HttpStatus(s as u32),
            (None, Some(g)) => fault_abort::ErrorType::GrpcStatus(grpc_code(g)?),
            _ => return None,
        };
        Some(FaultAbort {
            percentage: Some(fraction(a.percentage.as_ref(), None)),
            error_type: Some(error_type),
            ..Default::default()
        })
    });
    HttpFault {
        delay,
        abort,
        ..Default::default()
    }
}
