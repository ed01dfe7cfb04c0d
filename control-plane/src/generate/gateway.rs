//! Gateways (`router~...` proxies): a listener per Gateway server port on the gateway's address,
//! each with the routes of the VirtualServices bound to that Gateway (`spec.gateways`) whose
//! hosts the server admits; HTTPS servers terminate TLS with the certificate files the server
//! names (universal mode has no Kubernetes secrets). Clusters and endpoints are the same as a
//! sidecar's (every visible service).

use std::collections::BTreeMap;

use weft_xds_proto::envoy::config::core::v3::{TransportSocket, transport_socket};
use weft_xds_proto::envoy::config::listener::v3::{FilterChain, FilterChainMatch};
use weft_xds_proto::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    Rds, http_connection_manager,
};
use weft_xds_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, TlsCertificate,
    TlsParameters, common_tls_context, tls_parameters,
};
use weft_xds_proto::wkt::BoolValue;
use weft_xds_proto::{pack, type_url};

use super::Generated;
use super::build::{
    HcmRole, ads, http_connection_manager, http_routes, listener, qualified_gateway,
};
use super::policy::file;
use super::scope::{Scope, host_matches};
use crate::config::{
    GatewayServer, GatewaySpec, Object, ServerTlsMode, TlsVersion, VirtualServiceSpec,
};
use crate::model::{Mesh, selector_matches};

/// A server and the Gateway it belongs to.
type ServerOf<'a> = (&'a Object<GatewaySpec>, &'a GatewayServer);

/// The Gateways whose selector picks this proxy (an empty selector picks every gateway proxy).
fn gateways_of<'a>(mesh: &'a Mesh, scope: &Scope<'_>) -> Vec<&'a Object<GatewaySpec>> {
    mesh.config
        .gateways
        .iter()
        .filter(|g| selector_matches(&g.spec.selector, &scope.proxy.labels))
        .map(|g| &**g)
        .collect()
}

/// Does a server host (`host`, `ns/host`, `*/host`, `./host`) admit a VirtualService host of
/// namespace `vs_ns` (for a Gateway of namespace `gw_ns`)? Wildcards match either way round.
fn server_admits(server_host: &str, gw_ns: &str, vs_ns: &str, vs_host: &str) -> bool {
    let (ns, host) = server_host.split_once('/').unwrap_or(("*", server_host));
    let ns_ok = match ns {
        "*" => true,
        "." => vs_ns == gw_ns,
        other => vs_ns == other,
    };
    ns_ok && (host_matches(host, vs_host) || host_matches(vs_host, host))
}

/// The route configuration of one server (or the plain-HTTP servers of one port).
fn route_config(
    mesh: &Mesh,
    scope: &Scope<'_>,
    name: &str,
    port: u32,
    servers: &[ServerOf<'_>],
) -> RouteConfiguration {
    let (via, bound) = bound_to(mesh, scope, servers);
    // Virtual hosts by domain, in VirtualService order; several VirtualServices for one host
    // merge their routes, first one first (as Istio merges them).
    let mut hosts: BTreeMap<String, (usize, VirtualHost)> = BTreeMap::new();
    for vs in bound {
        for host in &vs.spec.hosts {
            let admitted = servers.iter().any(|(g, srv)| {
                srv.hosts
                    .iter()
                    .any(|h| server_admits(h, &g.namespace, &vs.namespace, host))
            });
            if !admitted {
                continue;
            }
            let routes: Vec<_> = vs
                .spec
                .http
                .iter()
                .enumerate()
                .flat_map(|(i, r)| http_routes(mesh, scope, &via, vs, i, r, port))
                .collect();
            let order = hosts.len();
            let entry = hosts.entry(host.clone()).or_insert_with(|| {
                let domains = if host == "*" {
                    vec!["*".to_string()]
                } else {
                    vec![host.clone(), format!("{host}:{port}")]
                };
                (
                    order,
                    VirtualHost {
                        name: format!("{host}:{port}"),
                        domains,
                        include_request_attempt_count: true,
                        ..Default::default()
                    },
                )
            });
            entry.1.routes.extend(routes);
        }
    }
    let mut virtual_hosts: Vec<(usize, VirtualHost)> = hosts.into_values().collect();
    virtual_hosts.sort_by_key(|(order, _)| *order);
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: virtual_hosts.into_iter().map(|(_, vh)| vh).collect(),
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// The servers' Gateways as `namespace/name`, and the VirtualServices bound to them that this
/// proxy sees, in config order.
fn bound_to<'a>(
    mesh: &'a Mesh,
    scope: &Scope<'_>,
    servers: &[ServerOf<'_>],
) -> (Vec<String>, Vec<&'a Object<VirtualServiceSpec>>) {
    let via: Vec<String> = servers
        .iter()
        .map(|(g, _)| format!("{}/{}", g.namespace, g.name()))
        .collect();
    let bound = mesh
        .config
        .virtual_services
        .iter()
        .filter(|vs| {
            vs.spec
                .gateways
                .iter()
                .any(|g| via.contains(&qualified_gateway(g, &vs.namespace)))
                && exported(vs, scope)
        })
        .map(|vs| &**vs)
        .collect();
    (via, bound)
}

fn exported(vs: &Object<VirtualServiceSpec>, scope: &Scope<'_>) -> bool {
    crate::model::exported_to(&vs.spec.export_to, &vs.namespace, &scope.proxy.namespace)
}

fn tls_version(v: Option<TlsVersion>) -> i32 {
    use tls_parameters::TlsProtocol as P;
    (match v {
        None | Some(TlsVersion::Auto) => P::TlsAuto,
        Some(TlsVersion::V1_0) => P::TlSv10,
        Some(TlsVersion::V1_1) => P::TlSv11,
        Some(TlsVersion::V1_2) => P::TlSv12,
        Some(TlsVersion::V1_3) => P::TlSv13,
    }) as i32
}

/// A server that carries plain TCP, or TLS it terminates (not PASSTHROUGH): its bytes follow
/// VirtualService `tcp` routes.
fn is_l4(srv: &GatewayServer) -> bool {
    let proto = srv
        .port
        .protocol
        .as_deref()
        .unwrap_or("")
        .to_ascii_uppercase();
    let terminates = srv
        .tls
        .as_ref()
        .and_then(|t| t.mode)
        .is_some_and(|m| m != ServerTlsMode::Passthrough);
    matches!(proto.as_str(), "TCP" | "MONGO" | "REDIS" | "MYSQL") || (proto == "TLS" && terminates)
}

/// Where the first `tcp` route of a VirtualService bound to these servers' Gateways sends a
/// port's connections (a match on another port or another gateway does not apply).
fn tcp_destination(
    mesh: &Mesh,
    scope: &Scope<'_>,
    port: u32,
    servers: &[ServerOf<'_>],
) -> Option<
    weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier,
> {
    let (via, bound) = bound_to(mesh, scope, servers);
    bound.into_iter().find_map(|vs| {
        let route = vs.spec.tcp.iter().find(|r| {
            r.matches.is_empty()
                || r.matches.iter().any(|m| {
                    m.port.is_none_or(|p| p == port)
                        && super::build::match_applies_via(&m.gateways, &vs.namespace, &via)
                })
        })?;
        Some(super::build::l4_destinations(
            mesh,
            &vs.namespace,
            &route.route,
            port,
        ))
    })
}

/// TLS termination for a SIMPLE, MUTUAL or OPTIONAL_MUTUAL server (validation guarantees the
/// files are named),
/// or an ISTIO_MUTUAL one (the gateway's workload certificate, mesh clients only). `http`:
/// the server speaks HTTP inside (ALPN h2 and http/1.1).
fn downstream_tls(srv: &GatewayServer, http: bool) -> Option<TransportSocket> {
    let tls = srv.tls.as_ref()?;
    let mode = tls.mode?;
    let alpn: &[&str] = if http { &["h2", "http/1.1"] } else { &[] };
    if mode == ServerTlsMode::IstioMutual {
        let ctx = DownstreamTlsContext {
            common_tls_context: Some(super::security::mesh_tls_context(alpn, Vec::new())),
            require_client_certificate: Some(BoolValue { value: true }),
            ..Default::default()
        };
        return Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&ctx))),
        });
    }
    if !matches!(
        mode,
        ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual
    ) {
        return None;
    }
    let mut common = CommonTlsContext {
        tls_certificates: vec![TlsCertificate {
            certificate_chain: file(tls.server_certificate.as_deref()?),
            private_key: file(tls.private_key.as_deref()?),
            ..Default::default()
        }],
        // A gateway serves both HTTP versions, as Istio's do.
        alpn_protocols: alpn.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    if tls.min_protocol_version.is_some()
        || tls.max_protocol_version.is_some()
        || !tls.cipher_suites.is_empty()
    {
        common.tls_params = Some(TlsParameters {
            tls_minimum_protocol_version: tls_version(tls.min_protocol_version),
            tls_maximum_protocol_version: tls_version(tls.max_protocol_version),
            cipher_suites: tls.cipher_suites.clone(),
            ..Default::default()
        });
    }
    // OPTIONAL_MUTUAL: a client certificate is checked when one is sent, and not required.
    if matches!(mode, ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual) {
        common.validation_context_type = Some(
            common_tls_context::ValidationContextType::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: file(tls.ca_certificates.as_deref()?),
                    ..Default::default()
                },
            ),
        );
    }
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(common),
        require_client_certificate: (mode == ServerTlsMode::Mutual)
            .then_some(BoolValue { value: true }),
        ..Default::default()
    };
    Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&ctx))),
    })
}

/// Listeners and routes of a gateway proxy.
pub fn listeners(mesh: &Mesh, scope: &Scope<'_>, out: &mut Generated) {
    if !scope.proxy.router {
        return;
    }
    let own_ip = scope.proxy.ip.map(|ip| ip.to_string());
    // (bind, port) -> servers on it, in Gateway order.
    let mut ports: BTreeMap<(String, u32), Vec<ServerOf<'_>>> = BTreeMap::new();
    for g in gateways_of(mesh, scope) {
        for srv in &g.spec.servers {
            let bind = srv
                .bind
                .clone()
                .or_else(|| own_ip.clone())
                .unwrap_or_else(|| "0.0.0.0".into());
            ports
                .entry((bind, srv.port.number))
                .or_default()
                .push((g, srv));
        }
    }
    for ((bind, port), servers) in ports {
        let listener_name = format!("{bind}_{port}");
        let stat_prefix = format!("gateway_{bind}_{port}");
        // Servers that pass TLS through, picked by SNI: PASSTHROUGH (to the destinations of
        // the `tls` routes bound to the Gateway) and AUTO_PASSTHROUGH (Istio's east-west
        // gateways: mesh mTLS passed untouched to the service, port and subset its SNI names,
        // `outbound_.PORT_.SUBSET_.HOST`, over a plaintext cluster of that name).
        let with_mode = |mode: ServerTlsMode| -> Vec<ServerOf<'_>> {
            servers
                .iter()
                .filter(|(_, s)| {
                    s.tls
                        .as_ref()
                        .is_some_and(|t| t.mode.unwrap_or(ServerTlsMode::Passthrough) == mode)
                })
                .copied()
                .collect()
        };
        let sni_only = [ServerTlsMode::AutoPassthrough, ServerTlsMode::Passthrough]
            .into_iter()
            .map(|mode| (mode, with_mode(mode)))
            .find(|(_, chosen)| !chosen.is_empty());
        if let Some((mode, chosen)) = sni_only {
            let (label, chains, missing) = if mode == ServerTlsMode::AutoPassthrough {
                (
                    "AUTO_PASSTHROUGH",
                    auto_passthrough(mesh, scope, &chosen, out),
                    "no service matches its AUTO_PASSTHROUGH servers' hosts",
                )
            } else {
                (
                    "PASSTHROUGH",
                    passthrough_chains(mesh, scope, port, &chosen),
                    "no VirtualService tls route is bound to its PASSTHROUGH servers",
                )
            };
            if chosen.len() < servers.len() {
                out.warnings.push(format!(
                    "port {port}: other servers next to {label} servers on one port are not served; only the {label} servers are"
                ));
            }
            if chains.is_empty() {
                out.warnings
                    .push(format!("port {port}: {missing}; the port is not served"));
                continue;
            }
            let mut l = listener(
                &listener_name,
                &bind,
                port,
                super::build::tcp_proxy_filter(&stat_prefix, chains[0].1.clone()),
            );
            super::security::add_sni_chains(&mut l, chains, &stat_prefix);
            out.add(type_url::LISTENER, listener_name, &l);
            continue;
        }
        // TCP servers, and TLS servers that terminate TLS: the bytes (decrypted) go where the
        // first VirtualService `tcp` route bound to the Gateway sends them.
        let l4: Vec<_> = servers.iter().filter(|(_, s)| is_l4(s)).copied().collect();
        if let Some(&(g, srv)) = l4.first() {
            if l4.len() < servers.len() {
                out.warnings.push(format!(
                    "port {port}: HTTP servers next to TCP or TLS servers on one port are not served; only the first TCP or TLS server is"
                ));
            } else if l4.len() > 1 {
                out.warnings.push(format!(
                    "Gateway/{}/{}: port {port} has {} TCP or TLS servers; only the first is served",
                    g.namespace,
                    g.name(),
                    l4.len()
                ));
            }
            let Some(to) = tcp_destination(mesh, scope, port, &l4[..1]) else {
                out.warnings.push(format!(
                    "port {port}: no VirtualService tcp route is bound to its {} server; the port is not served",
                    srv.port.protocol.as_deref().unwrap_or("TCP").to_ascii_uppercase()
                ));
                continue;
            };
            let mut l = listener(
                &listener_name,
                &bind,
                port,
                super::build::tcp_proxy_filter(&stat_prefix, to),
            );
            l.filter_chains[0].transport_socket = downstream_tls(srv, false);
            out.add(type_url::LISTENER, listener_name, &l);
            continue;
        }
        let secure: Vec<_> = servers
            .iter()
            .filter(|(_, s)| s.tls.as_ref().is_some_and(|t| t.mode.is_some()))
            .copied()
            .collect();
        if secure.len() > 1 {
            // Several TLS servers on one port: a filter chain per server, picked by SNI
            // (`server_names` from the server's hosts), each with its own certificate and
            // routes, and the TLS inspector to read the SNI.
            if secure.len() < servers.len() {
                out.warnings.push(format!(
                    "port {port}: plaintext servers next to TLS servers on one port are not served; only the TLS servers are"
                ));
            }
            let mut chains = Vec::new();
            for (g, srv) in &secure {
                let name = https_route_name(port, g, srv);
                let rc = route_config(mesh, scope, &name, port, &[(*g, *srv)]);
                out.add(type_url::ROUTE_CONFIGURATION, name.clone(), &rc);
                let names: Vec<String> = srv
                    .hosts
                    .iter()
                    .map(|h| h.split_once('/').map(|(_, host)| host).unwrap_or(h))
                    .filter(|h| *h != "*")
                    .map(str::to_string)
                    .collect();
                chains.push(FilterChain {
                    name: name.clone(),
                    filter_chain_match: Some(FilterChainMatch {
                        server_names: names,
                        ..Default::default()
                    }),
                    transport_socket: downstream_tls(srv, true),
                    filters: vec![http_connection_manager(
                        mesh,
                        scope.proxy,
                        &stat_prefix,
                        HcmRole::Gateway,
                        http_connection_manager::RouteSpecifier::Rds(Rds {
                            config_source: Some(ads()),
                            route_config_name: name,
                        }),
                    )],
                    ..Default::default()
                });
            }
            let mut l = listener(
                &listener_name,
                &bind,
                port,
                http_connection_manager(
                    mesh,
                    scope.proxy,
                    &stat_prefix,
                    HcmRole::Gateway,
                    http_connection_manager::RouteSpecifier::Rds(Rds::default()),
                ),
            );
            l.filter_chains = chains;
            l.listener_filters = vec![super::security::tls_inspector()];
            out.add(type_url::LISTENER, listener_name, &l);
            continue;
        }
        let (chosen, route_name, transport) = if secure.is_empty() {
            (servers.clone(), format!("http.{port}"), None)
        } else {
            let (g, srv) = secure[0];
            if servers.len() > 1 {
                out.warnings.push(format!(
                    "Gateway/{}/{}: port {port} has {} servers; with TLS only the first TLS server is served on it",
                    g.namespace,
                    g.name(),
                    servers.len()
                ));
            }
            (
                vec![(g, srv)],
                https_route_name(port, g, srv),
                downstream_tls(srv, true),
            )
        };
        let rc = route_config(mesh, scope, &route_name, port, &chosen);
        out.add(type_url::ROUTE_CONFIGURATION, route_name.clone(), &rc);
        let hcm = http_connection_manager(
            mesh,
            scope.proxy,
            &stat_prefix,
            HcmRole::Gateway,
            http_connection_manager::RouteSpecifier::Rds(Rds {
                config_source: Some(ads()),
                route_config_name: route_name,
            }),
        );
        let mut l = listener(&listener_name, &bind, port, hcm);
        if let Some(ts) = transport {
            l.filter_chains = vec![FilterChain {
                transport_socket: Some(ts),
                ..l.filter_chains.remove(0)
            }];
        }
        out.add(type_url::LISTENER, listener_name, &l);
    }
}

/// The SNI chains of AUTO_PASSTHROUGH servers: for every port and subset of every service the
/// servers' hosts admit, `outbound_.PORT_.SUBSET_.HOST` to a plaintext EDS cluster of that
/// name (added to `out`) over the subset's load assignment (`outbound|PORT|SUBSET|HOST`).
fn auto_passthrough(
    mesh: &Mesh,
    scope: &Scope<'_>,
    servers: &[ServerOf<'_>],
    out: &mut Generated,
) -> Vec<(
    Vec<String>,
    weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier,
)> {
    use weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier;
    let mut chains = Vec::new();
    for svc in &scope.services {
        if svc.discovery == crate::model::Discovery::Passthrough
            || !servers.iter().any(|(g, srv)| {
                srv.hosts
                    .iter()
                    .any(|h| server_admits(h, &g.namespace, &svc.namespace, &svc.hostname))
            })
        {
            continue;
        }
        let rule = super::build::destination_rule_for(mesh, &scope.proxy.namespace, svc);
        for port in &svc.ports {
            for (subset, _) in super::build::subsets_of(rule.map(|(_, dr)| dr)) {
                let sni = super::security::mesh_sni(port.port, subset, &svc.hostname);
                let mut cluster = super::build::eds_cluster(&sni, crate::model::Protocol::Tcp);
                if let Some(eds) = cluster.eds_cluster_config.as_mut() {
                    eds.service_name =
                        super::build::outbound_cluster_name(port.port, subset, &svc.hostname);
                }
                out.add(type_url::CLUSTER, sni.clone(), &cluster);
                chains.push((vec![sni.clone()], ClusterSpecifier::Cluster(sni)));
            }
        }
    }
    chains
}

/// The RDS name of an HTTPS server's routes (one per server: each has its own hosts).
fn https_route_name(
    port: u32,
    g: &Object<crate::config::GatewaySpec>,
    srv: &GatewayServer,
) -> String {
    format!(
        "https.{port}.{}.{}.{}",
        srv.port.name.as_deref().unwrap_or("server"),
        g.name(),
        g.namespace
    )
}

/// The SNI chains of a port's PASSTHROUGH servers: the `tls` routes of the VirtualServices
/// bound to their Gateways whose SNI hosts the servers admit, first route first.
fn passthrough_chains(
    mesh: &Mesh,
    scope: &Scope<'_>,
    port: u32,
    servers: &[ServerOf<'_>],
) -> Vec<(
    Vec<String>,
    weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier,
)> {
    let (via, bound) = bound_to(mesh, scope, servers);
    let mut taken = std::collections::HashSet::new();
    let mut out = Vec::new();
    for vs in bound {
        for r in &vs.spec.tls {
            for m in &r.matches {
                if m.port.is_some_and(|p| p != port)
                    || !super::build::match_applies_via(&m.gateways, &vs.namespace, &via)
                {
                    continue;
                }
                let names: Vec<String> = m
                    .sni_hosts
                    .iter()
                    .filter(|sni| {
                        servers.iter().any(|(g, srv)| {
                            srv.hosts
                                .iter()
                                .any(|h| server_admits(h, &g.namespace, &vs.namespace, sni))
                        })
                    })
                    .filter(|sni| taken.insert(sni.to_ascii_lowercase()))
                    .cloned()
                    .collect();
                if !names.is_empty() {
                    out.push((
                        names,
                        super::build::l4_destinations(mesh, &vs.namespace, &r.route, port),
                    ));
                }
            }
        }
    }
    out
}
