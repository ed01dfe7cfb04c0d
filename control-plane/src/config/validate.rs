//! Semantic validation, as Istio's validation webhook does it: what the types alone cannot say
//! (ranges, weight sums, regex syntax, address formats). Errors are `(field path, reason)`.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::kinds::*;

type Check = Result<(), (String, String)>;

fn bad(field: impl Into<String>, reason: impl Into<String>) -> Check {
    Err((field.into(), reason.into()))
}

/// A DNS-1123 subdomain, as Kubernetes requires of object names and namespaces.
pub fn name(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{n:?} is not a valid DNS-1123 name (lowercase letters, digits, '-' and '.')"
        ))
    }
}

fn port(field: &str, p: u32) -> Check {
    if (1..=65535).contains(&p) {
        Ok(())
    } else {
        bad(field, format!("port {p} is outside 1-65535"))
    }
}

/// A port written as a string (security.istio.io's ports and port-keyed maps).
fn port_text(field: &str, v: &str) -> Check {
    match v.parse::<u32>() {
        Ok(n) => port(field, n),
        Err(_) => bad(field, format!("{v:?} is not a port number")),
    }
}

pub fn service(s: &ServiceSpec) -> Check {
    let mut names = BTreeSet::new();
    for (i, p) in s.ports.iter().enumerate() {
        port(&format!("spec.ports[{i}].port"), p.port)?;
        if let Some(IntOrString::Int(t)) = p.target_port {
            port(&format!("spec.ports[{i}].targetPort"), t)?;
        }
        if let Some(n) = &p.name {
            if !names.insert(n.clone()) {
                return bad(
                    format!("spec.ports[{i}].name"),
                    format!("duplicate port name {n:?}"),
                );
            }
        } else if s.ports.len() > 1 {
            return bad(
                format!("spec.ports[{i}].name"),
                "a Service with several ports must name each port",
            );
        }
    }
    if s.service_type.as_deref() == Some("ExternalName") {
        match s.external_name.as_deref() {
            None | Some("") => {
                return bad(
                    "spec.externalName",
                    "a Service of type ExternalName needs externalName",
                );
            }
            Some(n) => name(&n.trim_end_matches('.').to_ascii_lowercase())
                .map_err(|r| ("spec.externalName".to_string(), r))?,
        }
    }
    Ok(())
}

pub fn workload_entry(w: &WorkloadEntrySpec) -> Check {
    if w.address.is_empty() {
        return bad(
            "spec.address",
            "address is required in universal mode (this is where the sidecar runs)",
        );
    }
    if w.address.parse::<IpAddr>().is_err() && name(&w.address).is_err() {
        return bad(
            "spec.address",
            format!("{:?} is neither an IP address nor a DNS name", w.address),
        );
    }
    for (n, p) in &w.ports {
        port(&format!("spec.ports.{n}"), *p)?;
    }
    if let Some(sa) = &w.service_account {
        name(sa).map_err(|r| ("spec.serviceAccount".to_string(), r))?;
    }
    Ok(())
}

fn string_match(field: &str, m: &StringMatch) -> Check {
    if let StringMatch::Regex(r) = m
        && let Err(e) = regex::Regex::new(r)
    {
        return bad(
            format!("{field}.regex"),
            format!("invalid regex {r:?}: {e}"),
        );
    }
    Ok(())
}

pub fn virtual_service(vs: &VirtualServiceSpec) -> Check {
    // No hosts: a delegate, whose routes another VirtualService's `delegate` pulls in.
    let delegate = vs.hosts.is_empty();
    if delegate && !vs.gateways.is_empty() {
        return bad(
            "spec.gateways",
            "a delegate VirtualService (no hosts) takes its gateways from the VirtualService that delegates to it",
        );
    }
    if delegate && vs.http.is_empty() {
        return bad(
            "spec.hosts",
            "at least one host is required (or http routes, for a delegate VirtualService)",
        );
    }
    for (i, h) in vs.hosts.iter().enumerate() {
        if h.is_empty() || h.contains('/') || (h.contains('*') && !h.starts_with('*')) {
            return bad(
                format!("spec.hosts[{i}]"),
                format!("{h:?} is not a valid host (a DNS name or a leading-wildcard name)"),
            );
        }
    }
    for (i, r) in vs.http.iter().enumerate() {
        let at = format!("spec.http[{i}]");
        if let Some(d) = &r.delegate {
            if delegate {
                return bad(
                    format!("{at}.delegate"),
                    "a delegate VirtualService cannot delegate again (one level only, as in Istio)",
                );
            }
            if !r.route.is_empty() || r.redirect.is_some() || r.direct_response.is_some() {
                return bad(
                    format!("{at}.delegate"),
                    "a delegating route takes its destinations from the delegate: route, redirect and directResponse must be unset",
                );
            }
            name(&d.name).map_err(|r| (format!("{at}.delegate.name"), r))?;
            if let Some(ns) = &d.namespace {
                name(ns).map_err(|r| (format!("{at}.delegate.namespace"), r))?;
            }
            for (j, m) in r.matches.iter().enumerate() {
                if let Some(u) = &m.uri {
                    string_match(&format!("{at}.match[{j}].uri"), u)?;
                }
            }
            continue;
        }
        let answers = usize::from(r.redirect.is_some())
            + usize::from(r.direct_response.is_some())
            + usize::from(!r.route.is_empty());
        if answers != 1 {
            return bad(
                format!("{at}.route"),
                "an HTTP route needs exactly one of destinations (route), a redirect or a directResponse",
            );
        }
        if let Some(d) = &r.direct_response {
            if !(200..=599).contains(&d.status) {
                return bad(
                    format!("{at}.directResponse.status"),
                    format!("{} is outside 200-599", d.status),
                );
            }
            if d.body
                .as_ref()
                .is_some_and(|b| b.string.is_some() == b.bytes.is_some())
            {
                return bad(
                    format!("{at}.directResponse.body"),
                    "exactly one of string or bytes",
                );
            }
        }
        route_rewrites(&at, r)?;
        for (j, m) in r.matches.iter().enumerate() {
            if let Some(u) = &m.uri {
                string_match(&format!("{at}.match[{j}].uri"), u)?;
            }
            for (what, map) in [
                ("headers", &m.headers),
                ("withoutHeaders", &m.without_headers),
            ] {
                for (h, sm) in map {
                    if h.is_empty()
                        || h.chars().any(|c| c.is_ascii_uppercase())
                        || http::HeaderName::from_bytes(h.as_bytes()).is_err()
                    {
                        return bad(
                            format!("{at}.match[{j}].{what}"),
                            format!("header name {h:?} must be a lowercase, valid header name"),
                        );
                    }
                    string_match(&format!("{at}.match[{j}].{what}.{h}"), sm)?;
                }
            }
            for (q, sm) in &m.query_params {
                if q.is_empty() {
                    return bad(
                        format!("{at}.match[{j}].queryParams"),
                        "a query parameter name must not be empty",
                    );
                }
                string_match(&format!("{at}.match[{j}].queryParams.{q}"), sm)?;
            }
            for (f, sm) in [
                ("scheme", &m.scheme),
                ("method", &m.method),
                ("authority", &m.authority),
            ] {
                if let Some(sm) = sm {
                    string_match(&format!("{at}.match[{j}].{f}"), sm)?;
                }
            }
            if let Some(p) = m.port {
                port(&format!("{at}.match[{j}].port"), p)?;
            }
            if let Some(ns) = &m.source_namespace {
                name(ns).map_err(|r| (format!("{at}.match[{j}].sourceNamespace"), r))?;
            }
        }
        route_resilience(&at, r)?;
        destinations(&at, &r.route)?;
    }
    for (i, r) in vs.tls.iter().enumerate() {
        let at = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            return bad(
                format!("{at}.match"),
                "a tls route needs a match with sniHosts",
            );
        }
        if r.route.is_empty() {
            return bad(format!("{at}.route"), "a tls route needs a destination");
        }
        for (j, m) in r.matches.iter().enumerate() {
            let mat = format!("{at}.match[{j}]");
            if m.sni_hosts.is_empty() {
                return bad(
                    format!("{mat}.sniHosts"),
                    "at least one SNI host is required",
                );
            }
            for (k, h) in m.sni_hosts.iter().enumerate() {
                let bare = h.strip_prefix("*.").unwrap_or(h);
                if bare.is_empty() || bare.contains('*') || bare.contains('/') {
                    return bad(
                        format!("{mat}.sniHosts[{k}]"),
                        format!("{h:?} is not a DNS name (a leading \"*.\" is allowed)"),
                    );
                }
            }
            if !m.destination_subnets.is_empty() {
                return bad(
                    format!("{mat}.destinationSubnets"),
                    "not supported on tls routes (TLS routes are told apart by sniHosts); use a tcp route to match on the destination address",
                );
            }
            if let Some(p) = m.port {
                port(&format!("{mat}.port"), p)?;
            }
            if let Some(ns) = &m.source_namespace {
                name(ns).map_err(|r| (format!("{mat}.sourceNamespace"), r))?;
            }
        }
        destinations(&at, &r.route)?;
    }
    for (i, r) in vs.tcp.iter().enumerate() {
        let at = format!("spec.tcp[{i}]");
        if r.route.is_empty() {
            return bad(format!("{at}.route"), "a tcp route needs a destination");
        }
        for (j, m) in r.matches.iter().enumerate() {
            for (k, subnet) in m.destination_subnets.iter().enumerate() {
                parse_cidr(subnet)
                    .map_err(|r| (format!("{at}.match[{j}].destinationSubnets[{k}]"), r))?;
            }
            if let Some(p) = m.port {
                port(&format!("{at}.match[{j}].port"), p)?;
            }
            if let Some(ns) = &m.source_namespace {
                name(ns).map_err(|r| (format!("{at}.match[{j}].sourceNamespace"), r))?;
            }
        }
        destinations(&at, &r.route)?;
    }
    Ok(())
}

/// A route's destinations: hosts, ports, subsets, and weights summing to 100.
fn destinations(at: &str, route: &[HttpRouteDestination]) -> Check {
    {
        let mut sum = 0i64;
        for (j, d) in route.iter().enumerate() {
            let dat = format!("{at}.route[{j}]");
            if d.destination.host.is_empty() {
                return bad(
                    format!("{dat}.destination.host"),
                    "destination host is required",
                );
            }
            if let Some(p) = &d.destination.port {
                port(&format!("{dat}.destination.port.number"), p.number)?;
            }
            if let Some(s) = &d.destination.subset {
                name(s).map_err(|r| (format!("{dat}.destination.subset"), r))?;
            }
            let w = d.weight.unwrap_or(0);
            if !(0..=100).contains(&w) {
                return bad(
                    format!("{dat}.weight"),
                    format!("weight {w} is outside 0-100"),
                );
            }
            sum += w;
        }
        if route.len() > 1 && sum != 100 {
            return bad(
                format!("{at}.route"),
                format!("total destination weight is {sum}, it must be 100"),
            );
        }
    }
    Ok(())
}

fn non_negative(field: String, v: Option<i64>) -> Check {
    match v {
        Some(n) if !(0..=i64::from(u32::MAX)).contains(&n) => {
            bad(field, format!("{n} is outside 0-{}", u32::MAX))
        }
        _ => Ok(()),
    }
}

fn policy_parts(
    at: &str,
    lb: &Option<LoadBalancerSettings>,
    pool: &Option<ConnectionPoolSettings>,
    od: &Option<OutlierDetection>,
) -> Check {
    if let Some(l) = lb
        && let Some(ch) = &l.consistent_hash
    {
        let at = format!("{at}.loadBalancer.consistentHash");
        if l.simple.is_some() {
            return bad(at, "simple and consistentHash are alternatives: set one");
        }
        let keys = [
            ch.http_header_name.is_some(),
            ch.http_cookie.is_some(),
            ch.use_source_ip == Some(true),
            ch.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() != 1 {
            return bad(
                at,
                "exactly one hash key is required: httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName",
            );
        }
        if let Some(h) = &ch.http_header_name
            && http::HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            return bad(
                format!("{at}.httpHeaderName"),
                format!("{h:?} is not a valid header name"),
            );
        }
        if let Some(c) = &ch.http_cookie {
            if c.name.is_empty() {
                return bad(format!("{at}.httpCookie.name"), "a cookie name is required");
            }
            if let Some(t) = &c.ttl {
                parse_duration(t).map_err(|r| (format!("{at}.httpCookie.ttl"), r))?;
            }
        }
        if ch.http_query_parameter_name.as_deref() == Some("") {
            return bad(format!("{at}.httpQueryParameterName"), "must not be empty");
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            return bad(at, "ringHash and maglev are alternatives: set one");
        }
        let ring = ch
            .ring_hash
            .as_ref()
            .and_then(|r| r.minimum_ring_size)
            .or(ch.minimum_ring_size);
        if let Some(n) = ring
            && !(1..=8_388_608).contains(&n)
        {
            return bad(
                format!("{at}.ringHash.minimumRingSize"),
                format!("{n} is out of range (1 to 8388608)"),
            );
        }
        if let Some(n) = ch.maglev.as_ref().and_then(|m| m.table_size)
            && (!(2..=5_000_011).contains(&n)
                || (2..)
                    .take_while(|d| d * d <= n)
                    .any(|d| n.is_multiple_of(d)))
        {
            return bad(
                format!("{at}.maglev.tableSize"),
                format!("{n} must be a prime number no larger than 5000011"),
            );
        }
    }
    if let Some(p) = pool {
        if let Some(t) = &p.tcp {
            non_negative(
                format!("{at}.connectionPool.tcp.maxConnections"),
                t.max_connections,
            )?;
            if let Some(d) = &t.connect_timeout {
                duration_at_least_1ms(&format!("{at}.connectionPool.tcp.connectTimeout"), d)?;
            }
            if let Some(d) = &t.idle_timeout {
                duration_at_least_1ms(&format!("{at}.connectionPool.tcp.idleTimeout"), d)?;
            }
            if let Some(d) = &t.max_connection_duration {
                duration_at_least_1ms(
                    &format!("{at}.connectionPool.tcp.maxConnectionDuration"),
                    d,
                )?;
            }
            if let Some(k) = &t.tcp_keepalive {
                keepalive(&format!("{at}.connectionPool.tcp.tcpKeepalive"), k)?;
            }
        }
        if let Some(h) = &p.http {
            non_negative(
                format!("{at}.connectionPool.http.http1MaxPendingRequests"),
                h.http1_max_pending_requests,
            )?;
            non_negative(
                format!("{at}.connectionPool.http.http2MaxRequests"),
                h.http2_max_requests,
            )?;
            non_negative(
                format!("{at}.connectionPool.http.maxRequestsPerConnection"),
                h.max_requests_per_connection,
            )?;
            non_negative(
                format!("{at}.connectionPool.http.maxRetries"),
                h.max_retries,
            )?;
            if let Some(d) = &h.idle_timeout {
                duration_at_least_1ms(&format!("{at}.connectionPool.http.idleTimeout"), d)?;
            }
        }
    }
    if let Some(o) = od {
        non_negative(
            format!("{at}.outlierDetection.consecutiveErrors"),
            o.consecutive_errors,
        )?;
        non_negative(
            format!("{at}.outlierDetection.consecutive5xxErrors"),
            o.consecutive_5xx_errors,
        )?;
        non_negative(
            format!("{at}.outlierDetection.consecutiveGatewayErrors"),
            o.consecutive_gateway_errors,
        )?;
        for (f, v) in [
            ("interval", &o.interval),
            ("baseEjectionTime", &o.base_ejection_time),
        ] {
            if let Some(d) = v {
                duration_at_least_1ms(&format!("{at}.outlierDetection.{f}"), d)?;
            }
        }
        for (f, v) in [
            ("maxEjectionPercent", o.max_ejection_percent),
            ("minHealthPercent", o.min_health_percent),
        ] {
            if v.is_some_and(|p| !(0..=100).contains(&p)) {
                return bad(format!("{at}.outlierDetection.{f}"), "must be within 0-100");
            }
        }
    }
    Ok(())
}

fn client_tls(at: &str, t: &Option<ClientTls>) -> Check {
    let Some(t) = t else { return Ok(()) };
    let at = format!("{at}.tls");
    match t.mode.unwrap_or(ClientTlsMode::Disable) {
        ClientTlsMode::IstioMutual => {
            // The mesh certificates are used; files would contradict that (Istio refuses too).
            for (field, set) in [
                ("clientCertificate", t.client_certificate.is_some()),
                ("privateKey", t.private_key.is_some()),
                ("caCertificates", t.ca_certificates.is_some()),
            ] {
                if set {
                    return bad(
                        format!("{at}.{field}"),
                        "must be empty with ISTIO_MUTUAL (the workload's mesh certificate is used)",
                    );
                }
            }
        }
        ClientTlsMode::Mutual => {
            if t.client_certificate.is_none() || t.private_key.is_none() {
                return bad(
                    at,
                    "MUTUAL needs clientCertificate and privateKey (files in universal mode)",
                );
            }
        }
        ClientTlsMode::Simple | ClientTlsMode::Disable => {}
    }
    if t.credential_name.is_some() {
        return bad(
            format!("{at}.credentialName"),
            "credentials from Kubernetes secrets need Kubernetes mode; in universal mode give the certificate files",
        );
    }
    // A server name: DNS labels, underscores allowed (Istio's own `outbound_.PORT_.SUBSET_.HOST`).
    if let Some(sni) = &t.sni
        && name(&sni.to_ascii_lowercase().replace('_', "x")).is_err()
    {
        return bad(
            format!("{at}.sni"),
            format!("{sni:?} is not a server name (DNS labels, underscores allowed)"),
        );
    }
    Ok(())
}

fn traffic_policy(at: &str, p: &TrafficPolicy) -> Check {
    client_tls(at, &p.tls)?;
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        client_tls(&format!("{at}.portLevelSettings[{i}]"), &pl.tls)?;
    }
    policy_parts(
        at,
        &p.load_balancer,
        &p.connection_pool,
        &p.outlier_detection,
    )?;
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        let pat = format!("{at}.portLevelSettings[{i}]");
        match &pl.port {
            Some(port_sel) => port(&format!("{pat}.port.number"), port_sel.number)?,
            None => return bad(format!("{pat}.port"), "port is required"),
        }
        policy_parts(
            &pat,
            &pl.load_balancer,
            &pl.connection_pool,
            &pl.outlier_detection,
        )?;
    }
    Ok(())
}

pub fn destination_rule(dr: &DestinationRuleSpec) -> Check {
    if dr.host.is_empty() {
        return bad("spec.host", "host is required");
    }
    if let Some(p) = &dr.traffic_policy {
        traffic_policy("spec.trafficPolicy", p)?;
    }
    for (i, s) in dr.subsets.iter().enumerate() {
        if let Some(p) = &s.traffic_policy {
            traffic_policy(&format!("spec.subsets[{i}].trafficPolicy"), p)?;
        }
    }
    let mut names = BTreeSet::new();
    for (i, s) in dr.subsets.iter().enumerate() {
        name(&s.name).map_err(|r| (format!("spec.subsets[{i}].name"), r))?;
        if !names.insert(&s.name) {
            return bad(
                format!("spec.subsets[{i}].name"),
                format!("duplicate subset {:?}", s.name),
            );
        }
    }
    Ok(())
}

fn bind(field: &str, b: &Option<String>) -> Check {
    match b {
        Some(b) if b.parse::<IpAddr>().is_err() => {
            bad(field, format!("bind {b:?} is not an IP address"))
        }
        _ => Ok(()),
    }
}

pub fn sidecar(s: &SidecarSpec) -> Check {
    if let Some(p) = &s.outbound_traffic_policy
        && let Some(d) = &p.egress_proxy
    {
        let at = "spec.outboundTrafficPolicy.egressProxy";
        if p.mode == Some(OutboundMode::RegistryOnly) {
            return bad(at, "an egress proxy is only valid with mode ALLOW_ANY");
        }
        if d.host.is_empty() || d.host.contains('*') {
            return bad(
                format!("{at}.host"),
                "the egress proxy needs a host without wildcards",
            );
        }
        if let Some(pn) = &d.port {
            port(&format!("{at}.port.number"), pn.number)?;
        }
    }
    for (i, l) in s.ingress.iter().enumerate() {
        let at = format!("spec.ingress[{i}]");
        port(&format!("{at}.port.number"), l.port.number)?;
        bind(&format!("{at}.bind"), &l.bind)?;
        if let Some(ep) = &l.default_endpoint {
            parse_default_endpoint(ep).map_err(|r| (format!("{at}.defaultEndpoint"), r))?;
        }
    }
    for (i, l) in s.egress.iter().enumerate() {
        let at = format!("spec.egress[{i}]");
        if let Some(p) = &l.port {
            port(&format!("{at}.port.number"), p.number)?;
        }
        bind(&format!("{at}.bind"), &l.bind)?;
        if l.hosts.is_empty() {
            return bad(
                format!("{at}.hosts"),
                "at least one host (namespace/dnsName) is required",
            );
        }
        for (j, h) in l.hosts.iter().enumerate() {
            match h.split_once('/') {
                Some((ns, host)) if !ns.is_empty() && !host.is_empty() => {}
                _ => {
                    return bad(
                        format!("{at}.hosts[{j}]"),
                        format!(
                            "{h:?} must be of the form namespace/dnsName (e.g. \"./*\" or \"istio-system/*\")"
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

/// Parses a Sidecar ingress `defaultEndpoint` (`127.0.0.1:PORT` or `0.0.0.0:PORT`).
pub fn parse_default_endpoint(ep: &str) -> Result<(IpAddr, u32), String> {
    let (host, p) = ep
        .rsplit_once(':')
        .ok_or_else(|| format!("{ep:?} must be 127.0.0.1:PORT or 0.0.0.0:PORT"))?;
    let ip: IpAddr = host
        .parse()
        .map_err(|_| format!("{ep:?}: {host:?} is not an IP address"))?;
    if !(ip.is_loopback() || ip.is_unspecified()) {
        return Err(format!("{ep:?}: the host must be 127.0.0.1 or 0.0.0.0"));
    }
    let p: u32 = p
        .parse()
        .map_err(|_| format!("{ep:?}: {p:?} is not a port number"))?;
    if !(1..=65535).contains(&p) {
        return Err(format!("{ep:?}: port {p} is outside 1-65535"));
    }
    Ok((ip, p))
}

fn ip(field: String, v: &str) -> Check {
    if v.parse::<IpAddr>().is_ok() {
        Ok(())
    } else {
        bad(field, format!("{v:?} is not an IP address"))
    }
}

/// Kinds with nothing to check beyond their types.
pub fn accept<T>(_: &T) -> Check {
    Ok(())
}

pub fn pod(p: &PodBody) -> Check {
    if let Some(v) = &p.status.pod_ip {
        ip("status.podIP".into(), v)?;
    }
    for (i, a) in p.status.pod_ips.iter().enumerate() {
        ip(format!("status.podIPs[{i}].ip"), &a.ip)?;
    }
    Ok(())
}

pub fn endpoints(e: &EndpointsBody) -> Check {
    for (i, s) in e.subsets.iter().enumerate() {
        for (field, list) in [
            ("addresses", &s.addresses),
            ("notReadyAddresses", &s.not_ready_addresses),
        ] {
            for (j, a) in list.iter().enumerate() {
                ip(format!("subsets[{i}].{field}[{j}].ip"), &a.ip)?;
            }
        }
        for (j, p) in s.ports.iter().enumerate() {
            port(&format!("subsets[{i}].ports[{j}].port"), p.port)?;
        }
    }
    Ok(())
}

pub fn endpoint_slice(e: &EndpointSliceBody) -> Check {
    for (i, ep) in e.endpoints.iter().enumerate() {
        if e.address_type.as_deref() != Some("FQDN") {
            for (j, a) in ep.addresses.iter().enumerate() {
                ip(format!("endpoints[{i}].addresses[{j}]"), a)?;
            }
        }
    }
    for (j, p) in e.ports.iter().enumerate() {
        port(&format!("ports[{j}].port"), p.port)?;
    }
    Ok(())
}

pub fn gateway(g: &GatewaySpec) -> Check {
    if g.servers.is_empty() {
        return bad("spec.servers", "a Gateway needs at least one server");
    }
    for (i, srv) in g.servers.iter().enumerate() {
        let at = format!("spec.servers[{i}]");
        port(&format!("{at}.port.number"), srv.port.number)?;
        let proto = srv
            .port
            .protocol
            .as_deref()
            .unwrap_or("")
            .to_ascii_uppercase();
        if !SERVICE_ENTRY_PROTOCOLS.contains(&proto.as_str()) {
            return bad(
                format!("{at}.port.protocol"),
                format!(
                    "{:?} is not a protocol (one of {})",
                    srv.port.protocol.as_deref().unwrap_or(""),
                    SERVICE_ENTRY_PROTOCOLS.join(", ")
                ),
            );
        }
        if srv.hosts.is_empty() {
            return bad(format!("{at}.hosts"), "at least one host is required");
        }
        for (j, h) in srv.hosts.iter().enumerate() {
            let host = h.split_once('/').map(|(_, h)| h).unwrap_or(h);
            let plain = host.strip_prefix("*.").unwrap_or(host);
            if host != "*" && (plain.contains('*') || name(&plain.to_ascii_lowercase()).is_err()) {
                return bad(
                    format!("{at}.hosts[{j}]"),
                    format!(
                        "{h:?} is not a host (\"*\", a DNS name or \"*.suffix\", optionally after \"namespace/\")"
                    ),
                );
            }
        }
        if let Some(b) = &srv.bind {
            ip(format!("{at}.bind"), b)?;
        }
        let https = matches!(proto.as_str(), "HTTPS" | "TLS");
        match (&srv.tls, https) {
            (None, true) => {
                return bad(
                    format!("{at}.tls"),
                    format!("a {proto} server needs tls settings"),
                );
            }
            (Some(t), false) if t.mode.is_some() => {
                return bad(
                    format!("{at}.tls.mode"),
                    format!("TLS modes apply to HTTPS and TLS servers, not {proto}"),
                );
            }
            (Some(t), true) => {
                let mode = t.mode.unwrap_or(ServerTlsMode::Passthrough);
                match mode {
                    ServerTlsMode::Simple
                    | ServerTlsMode::Mutual
                    | ServerTlsMode::OptionalMutual => {
                        if t.credential_name.is_some() {
                            return bad(
                                format!("{at}.tls.credentialName"),
                                "credentials from Kubernetes secrets need Kubernetes mode; in universal mode give serverCertificate and privateKey file paths",
                            );
                        }
                        if t.server_certificate.is_none() || t.private_key.is_none() {
                            return bad(
                                format!("{at}.tls"),
                                "SIMPLE, MUTUAL and OPTIONAL_MUTUAL need serverCertificate and privateKey",
                            );
                        }
                        if mode != ServerTlsMode::Simple && t.ca_certificates.is_none() {
                            return bad(
                                format!("{at}.tls.caCertificates"),
                                "MUTUAL and OPTIONAL_MUTUAL need caCertificates to verify clients with",
                            );
                        }
                    }
                    // TLS passed through to the destination, picked by SNI (VirtualService
                    // tls routes bound to the Gateway).
                    ServerTlsMode::Passthrough => {}
                    // Mesh mTLS passed through by its SNI (east-west gateways).
                    ServerTlsMode::AutoPassthrough => {
                        if proto != "TLS" {
                            return bad(
                                format!("{at}.tls.mode"),
                                "AUTO_PASSTHROUGH needs a TLS server (port protocol TLS)",
                            );
                        }
                    }
                    // The gateway's own workload certificate; mesh clients only.
                    ServerTlsMode::IstioMutual => {
                        if t.server_certificate.is_some()
                            || t.private_key.is_some()
                            || t.ca_certificates.is_some()
                            || t.credential_name.is_some()
                        {
                            return bad(
                                format!("{at}.tls"),
                                "ISTIO_MUTUAL uses the gateway's workload certificate: serverCertificate, privateKey, caCertificates and credentialName must not be set",
                            );
                        }
                    }
                }
            }
            _ => {}
        }
        if proto == "UDP" {
            return bad(
                format!("{at}.port.protocol"),
                "UDP is not proxied (gateways carry HTTP, HTTPS, TLS and TCP)",
            );
        }
    }
    Ok(())
}

/// The protocols Istio's port validation accepts.
const SERVICE_ENTRY_PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "MONGO", "REDIS", "MYSQL", "TCP", "TLS", "UDP",
];

pub fn service_entry(se: &ServiceEntrySpec) -> Check {
    if se.hosts.is_empty() {
        return bad("spec.hosts", "at least one host is required");
    }
    for (i, h) in se.hosts.iter().enumerate() {
        let plain = h.strip_prefix("*.").unwrap_or(h);
        if h == "*"
            || plain.is_empty()
            || plain.contains('*')
            || name(&plain.to_ascii_lowercase()).is_err()
        {
            return bad(
                format!("spec.hosts[{i}]"),
                format!("{h:?} is not a valid host (a DNS name, optionally with a leading \"*.\")"),
            );
        }
        if h.chars().any(|c| c.is_ascii_uppercase()) {
            return bad(
                format!("spec.hosts[{i}]"),
                format!("{h:?} must be lowercase"),
            );
        }
    }
    for (i, a) in se.addresses.iter().enumerate() {
        let addr = a.split_once('/').map(|(a, _)| a).unwrap_or(a);
        ip(format!("spec.addresses[{i}]"), addr)?;
    }
    for (i, p) in se.ports.iter().enumerate() {
        port(&format!("spec.ports[{i}].number"), p.number)?;
    }
    for (i, e) in se.endpoints.iter().enumerate() {
        workload_entry(e).map_err(|(f, r)| {
            (
                format!("spec.endpoints[{i}].{}", f.trim_start_matches("spec.")),
                r,
            )
        })?;
    }
    if se.resolution == Some(Resolution::Static)
        && se.endpoints.is_empty()
        && se.workload_selector.is_none()
    {
        return bad(
            "spec.endpoints",
            "resolution STATIC needs endpoints or a workloadSelector",
        );
    }
    if matches!(
        se.resolution,
        Some(Resolution::Dns | Resolution::DnsRoundRobin)
    ) && se.hosts.iter().any(|h| h.starts_with('*'))
        && se.endpoints.is_empty()
    {
        return bad(
            "spec.resolution",
            "DNS resolution of a wildcard host needs endpoints",
        );
    }
    if se.resolution == Some(Resolution::DnsRoundRobin) && se.endpoints.len() > 1 {
        return bad(
            "spec.endpoints",
            format!(
                "resolution DNS_ROUND_ROBIN takes at most one endpoint ({} given); use DNS to spread over several",
                se.endpoints.len()
            ),
        );
    }
    for (i, p) in se.ports.iter().enumerate() {
        if let Some(proto) = &p.protocol
            && !SERVICE_ENTRY_PROTOCOLS.contains(&proto.to_ascii_uppercase().as_str())
        {
            return bad(
                format!("spec.ports[{i}].protocol"),
                format!(
                    "unknown protocol {proto:?} (one of {})",
                    SERVICE_ENTRY_PROTOCOLS.join(", ")
                ),
            );
        }
    }
    Ok(())
}

/// A duration as Istio's API writes it (`10s`, `1.5s`, `500ms`, `1m`, `1h`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| format!("{s:?} has no unit (e.g. 10s, 500ms)"))?;
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 10s, 500ms)"))?;
    let secs = match unit {
        "ns" => v / 1e9,
        "us" | "µs" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (ns, us, ms, s, m, h)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a valid duration"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Linux's limits on `TCP_KEEPIDLE` and `TCP_KEEPINTVL` (seconds) and `TCP_KEEPCNT`: a proxy
/// asked for more cannot set the option (Envoy then fails every upstream connection: 503 `UF`).
const KEEPALIVE_MAX_SECONDS: u64 = 32767;
const KEEPALIVE_MAX_PROBES: i64 = 127;

fn keepalive(at: &str, k: &TcpKeepalive) -> Check {
    if let Some(n) = k.probes
        && !(0..=KEEPALIVE_MAX_PROBES).contains(&n)
    {
        return bad(
            format!("{at}.probes"),
            format!("{n} is outside 0-{KEEPALIVE_MAX_PROBES} (Linux's limit)"),
        );
    }
    for (name, value) in [("time", &k.time), ("interval", &k.interval)] {
        let Some(s) = value else { continue };
        let field = format!("{at}.{name}");
        duration_at_least_1ms(&field, s)?;
        if parse_duration(s).is_ok_and(|d| d.as_secs() > KEEPALIVE_MAX_SECONDS) {
            return bad(
                field,
                format!("{s:?} is longer than {KEEPALIVE_MAX_SECONDS}s (Linux's limit)"),
            );
        }
    }
    Ok(())
}

fn duration_at_least_1ms(field: &str, s: &str) -> Check {
    match parse_duration(s) {
        Ok(d) if d >= std::time::Duration::from_millis(1) => Ok(()),
        Ok(_) => bad(field, format!("{s:?} must be at least 1ms")),
        Err(e) => bad(field, e),
    }
}

/// Istio's retryOn: Envoy's HTTP and gRPC retry conditions, or HTTP status codes.
const RETRY_ON: [&str; 12] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// gRPC status names Istio accepts for `fault.abort.grpcStatus`, with their codes.
pub fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as u32)
}

fn percent(field: &str, p: &Option<Percent>) -> Check {
    match p {
        Some(p) if !(0.0..=100.0).contains(&p.value) => bad(
            format!("{field}.value"),
            format!("{} is outside 0-100", p.value),
        ),
        _ => Ok(()),
    }
}

/// The resilience fields of one HTTPRoute: timeout, retries, fault.
pub fn route_resilience(at: &str, r: &HttpRoute) -> Check {
    if let Some(t) = &r.timeout {
        duration_at_least_1ms(&format!("{at}.timeout"), t)?;
    }
    if let Some(retries) = &r.retries {
        if retries.attempts.is_some_and(|a| a < 0) {
            return bad(
                format!("{at}.retries.attempts"),
                "attempts cannot be negative",
            );
        }
        if let Some(t) = &retries.per_try_timeout {
            duration_at_least_1ms(&format!("{at}.retries.perTryTimeout"), t)?;
        }
        if let Some(on) = &retries.retry_on {
            for token in on.split(',').map(str::trim) {
                let code_ok = token.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
                if !code_ok && !RETRY_ON.contains(&token) {
                    return bad(
                        format!("{at}.retries.retryOn"),
                        format!(
                            "{token:?} is not a retry condition ({}) or an HTTP status",
                            RETRY_ON.join(", ")
                        ),
                    );
                }
            }
        }
    }
    if let Some(f) = &r.fault {
        if f.delay.is_none() && f.abort.is_none() {
            return bad(format!("{at}.fault"), "a fault needs a delay or an abort");
        }
        if let Some(d) = &f.delay {
            percent(&format!("{at}.fault.delay.percentage"), &d.percentage)?;
            if d.exponential_delay.is_some() {
                return bad(
                    format!("{at}.fault.delay.exponentialDelay"),
                    "exponentialDelay is not supported (Istio does not support it either)",
                );
            }
            match &d.fixed_delay {
                Some(t) => duration_at_least_1ms(&format!("{at}.fault.delay.fixedDelay"), t)?,
                None => {
                    return bad(
                        format!("{at}.fault.delay.fixedDelay"),
                        "fixedDelay is required",
                    );
                }
            }
        }
        if let Some(a) = &f.abort {
            percent(&format!("{at}.fault.abort.percentage"), &a.percentage)?;
            match (a.http_status, &a.grpc_status, &a.http2_error) {
                (Some(s), None, None) if (200..=599).contains(&s) => {}
                (Some(s), None, None) => {
                    return bad(
                        format!("{at}.fault.abort.httpStatus"),
                        format!("{s} is outside 200-599"),
                    );
                }
                (None, Some(g), None) if grpc_code(g).is_some() => {}
                (None, Some(g), None) => {
                    return bad(
                        format!("{at}.fault.abort.grpcStatus"),
                        format!("{g:?} is not a gRPC status name (e.g. UNAVAILABLE)"),
                    );
                }
                (None, None, Some(_)) => {
                    return bad(
                        format!("{at}.fault.abort.http2Error"),
                        "http2Error aborts are not supported",
                    );
                }
                _ => {
                    return bad(
                        format!("{at}.fault.abort"),
                        "exactly one of httpStatus or grpcStatus is required",
                    );
                }
            }
        }
    }
    Ok(())
}

fn header_ops(field: &str, ops: &Option<HeaderOperations>) -> Check {
    let Some(ops) = ops else { return Ok(()) };
    for (k, v) in ops.set.iter().chain(ops.add.iter()) {
        if k.is_empty()
            || k.bytes()
                .any(|b| !(b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        {
            return bad(
                format!("{field}.{k}"),
                format!("{k:?} is not a valid header name"),
            );
        }
        if v.bytes().any(|b| b == b'\r' || b == b'\n') || v.contains('%') {
            return bad(
                format!("{field}.{k}"),
                "header values cannot hold line breaks or %-substitutions (not supported yet)",
            );
        }
    }
    Ok(())
}

/// Redirect, rewrite and header edits of one HTTPRoute.
fn route_rewrites(at: &str, r: &HttpRoute) -> Check {
    if let Some(rd) = &r.redirect {
        if r.rewrite.is_some() {
            return bad(format!("{at}.rewrite"), "a redirect route cannot rewrite");
        }
        if let Some(code) = rd.redirect_code
            && !matches!(code, 301 | 302 | 303 | 307 | 308)
        {
            return bad(
                format!("{at}.redirect.redirectCode"),
                format!("{code} is not a redirect status (301, 302, 303, 307, 308)"),
            );
        }
        if let Some(p) = rd.port {
            port(&format!("{at}.redirect.port"), p)?;
        }
        if rd
            .scheme
            .as_deref()
            .is_some_and(|s| s != "http" && s != "https")
        {
            return bad(
                format!("{at}.redirect.scheme"),
                "scheme must be http or https",
            );
        }
    }
    if let Some(rw) = &r.rewrite {
        if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
            return bad(
                format!("{at}.rewrite"),
                "uri and uriRegexRewrite cannot both be set",
            );
        }
        if rw.uri.is_some()
            && r.matches
                .iter()
                .any(|m| matches!(m.uri, Some(StringMatch::Regex(_))))
        {
            return bad(
                format!("{at}.rewrite.uri"),
                "a uri rewrite needs prefix or exact matches; use uriRegexRewrite with regex matches",
            );
        }
        if let Some(rr) = &rw.uri_regex_rewrite
            && let Err(e) = regex::Regex::new(&rr.pattern)
        {
            return bad(
                format!("{at}.rewrite.uriRegexRewrite.match"),
                format!("invalid regex {:?}: {e}", rr.pattern),
            );
        }
    }
    if let Some(c) = &r.cors_policy {
        for (i, m) in c.allow_origins.iter().enumerate() {
            string_match(&format!("{at}.corsPolicy.allowOrigins[{i}]"), m)?;
        }
        if let Some(d) = &c.max_age {
            parse_duration(d).map_err(|e| (format!("{at}.corsPolicy.maxAge"), e))?;
        }
        match c.unmatched_preflights.as_deref() {
            None | Some("FORWARD") | Some("UNSPECIFIED") => {}
            Some(other) => {
                return bad(
                    format!("{at}.corsPolicy.unmatchedPreflights"),
                    format!("{other:?} is not supported (FORWARD is)"),
                );
            }
        }
        for (f, list) in [
            ("allowMethods", &c.allow_methods),
            ("allowHeaders", &c.allow_headers),
            ("exposeHeaders", &c.expose_headers),
        ] {
            if list
                .iter()
                .any(|v| v.is_empty() || v.contains(['\r', '\n', ',']))
            {
                return bad(
                    format!("{at}.corsPolicy.{f}"),
                    "entries must be non-empty single tokens",
                );
            }
        }
    }
    if r.mirror.is_some() && !r.mirrors.is_empty() {
        return bad(format!("{at}.mirrors"), "use mirror or mirrors, not both");
    }
    if let Some(m) = &r.mirror
        && m.host.is_empty()
    {
        return bad(format!("{at}.mirror.host"), "host is required");
    }
    percent(&format!("{at}.mirrorPercentage"), &r.mirror_percentage)?;
    for (i, m) in r.mirrors.iter().enumerate() {
        if m.destination.host.is_empty() {
            return bad(
                format!("{at}.mirrors[{i}].destination.host"),
                "host is required",
            );
        }
        percent(&format!("{at}.mirrors[{i}].percentage"), &m.percentage)?;
    }
    if let Some(h) = &r.headers {
        header_ops(&format!("{at}.headers.request"), &h.request)?;
        header_ops(&format!("{at}.headers.response"), &h.response)?;
    }
    Ok(())
}

pub fn peer_authentication(p: &PeerAuthenticationSpec) -> Check {
    if !p.port_level_mtls.is_empty()
        && p.selector
            .as_ref()
            .is_none_or(|s| s.match_labels.is_empty())
    {
        return bad(
            "spec.portLevelMtls",
            "port-level mTLS needs a workload selector (Istio applies it to selected workloads only)",
        );
    }
    for key in p.port_level_mtls.keys() {
        port_text(&format!("spec.portLevelMtls[{key}]"), key)?;
    }
    Ok(())
}

/// An IP address or CIDR block as AuthorizationPolicy `ipBlocks` write them.
pub fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
    };
    Ok((ip, len))
}

/// The `when` keys weft enforces (Istio's names).
pub const AUTHZ_CONDITION_KEYS: &[&str] = &[
    "request.headers[<name>]",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

pub fn authorization_policy(p: &AuthorizationPolicySpec) -> Check {
    if p.target_ref.is_some() || !p.target_refs.is_empty() {
        return bad(
            "spec.targetRef",
            "policies attached to gateways or waypoints by targetRef are not supported; use spec.selector",
        );
    }
    match p.action {
        Some(AuthzAction::Custom) => {
            return bad(
                "spec.action",
                "CUSTOM needs an external authorization provider (meshConfig.extensionProviders), which weft does not have",
            );
        }
        _ if p.provider.is_some() => {
            return bad(
                "spec.provider",
                "a provider is only valid with action CUSTOM",
            );
        }
        _ => {}
    }
    for (i, rule) in p.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            let s = &from.source;
            let f = format!("{at}.from[{j}].source");
            for (field, list) in [
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                for (k, v) in list.iter().enumerate() {
                    parse_cidr(v).map_err(|r| (format!("{f}.{field}[{k}]"), r))?;
                }
            }
            for (field, list) in [
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
                ("serviceAccounts", &s.service_accounts),
                ("notServiceAccounts", &s.not_service_accounts),
            ] {
                for (k, v) in list.iter().enumerate() {
                    wildcard(&format!("{f}.{field}[{k}]"), v)?;
                }
            }
            let empty = [
                &s.principals,
                &s.not_principals,
                &s.request_principals,
                &s.not_request_principals,
                &s.namespaces,
                &s.not_namespaces,
                &s.ip_blocks,
                &s.not_ip_blocks,
                &s.remote_ip_blocks,
                &s.not_remote_ip_blocks,
                &s.service_accounts,
                &s.not_service_accounts,
            ]
            .iter()
            .all(|l| l.is_empty());
            if empty {
                return bad(&f, "a source needs at least one field");
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            let o = &to.operation;
            let f = format!("{at}.to[{j}].operation");
            for (field, list) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
                for (k, v) in list.iter().enumerate() {
                    port_text(&format!("{f}.{field}[{k}]"), v)?;
                }
            }
            for (field, list) in [
                ("hosts", &o.hosts),
                ("notHosts", &o.not_hosts),
                ("methods", &o.methods),
                ("notMethods", &o.not_methods),
                ("paths", &o.paths),
                ("notPaths", &o.not_paths),
            ] {
                for (k, v) in list.iter().enumerate() {
                    wildcard(&format!("{f}.{field}[{k}]"), v)?;
                }
            }
            let empty = [
                &o.hosts,
                &o.not_hosts,
                &o.ports,
                &o.not_ports,
                &o.methods,
                &o.not_methods,
                &o.paths,
                &o.not_paths,
            ]
            .iter()
            .all(|l| l.is_empty());
            if empty {
                return bad(&f, "an operation needs at least one field");
            }
        }
        for (j, c) in rule.when.iter().enumerate() {
            let f = format!("{at}.when[{j}]");
            condition_key(&format!("{f}.key"), &c.key)?;
            if c.values.is_empty() && c.not_values.is_empty() {
                return bad(&f, "a condition needs values or notValues");
            }
            let ip_key = matches!(c.key.as_str(), "source.ip" | "remote.ip" | "destination.ip");
            for (field, list) in [("values", &c.values), ("notValues", &c.not_values)] {
                for (k, v) in list.iter().enumerate() {
                    if ip_key {
                        parse_cidr(v).map_err(|r| (format!("{f}.{field}[{k}]"), r))?;
                    } else if c.key == "destination.port" {
                        port_text(&format!("{f}.{field}[{k}]"), v)?;
                    } else {
                        wildcard(&format!("{f}.{field}[{k}]"), v)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Istio's string match in authorization: exact, `prefix*`, `*suffix` or `*`.
fn wildcard(field: &str, v: &str) -> Check {
    if v.is_empty() {
        return bad(
            field,
            "an empty string matches nothing; remove it or use \"*\"",
        );
    }
    let inner = v.trim_start_matches('*').trim_end_matches('*');
    if inner.contains('*') || (v.len() > 1 && v.starts_with('*') && v.ends_with('*')) {
        return bad(
            field,
            format!("{v:?}: \"*\" is only allowed at the start or the end (prefix*, *suffix or *)"),
        );
    }
    Ok(())
}

fn condition_key(field: &str, key: &str) -> Check {
    if let Some(rest) = key.strip_prefix("request.headers[") {
        return match rest.strip_suffix(']') {
            Some(name) if !name.is_empty() => Ok(()),
            _ => bad(
                field,
                format!("{key:?}: write request.headers[<header name>]"),
            ),
        };
    }
    if key.starts_with("request.auth.") || key.starts_with("experimental.envoy.filters") {
        return bad(
            field,
            format!("{key:?} needs request authentication (JWT), which weft does not have"),
        );
    }
    if AUTHZ_CONDITION_KEYS.contains(&key) {
        return Ok(());
    }
    bad(
        field,
        format!(
            "unknown condition key {key:?}; supported: {}",
            AUTHZ_CONDITION_KEYS.join(", ")
        ),
    )
}
