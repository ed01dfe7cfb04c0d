//! The `kubernetes` plugin's data: every name the Kubernetes DNS-Based Service Discovery spec
//! (schema 1.1.0) defines for the mesh's services, endpoints and pods, precomputed into a hash
//! map on each config change so that answering is one lookup. Plus ServiceEntry hosts, which
//! answer with the addresses they declare or ones allocated for them, as Istio's DNS proxy does.
//!
//! Universal mode has no Pods or Endpoints objects of its own: WorkloadEntries selected by a
//! Service stand in for its ready endpoints, and count as pods for `pods verified`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::corefile::{Kubernetes, PodsMode, fqdn, in_zone};
use crate::config::{ConfigSet, Labels, Resolution};
use crate::model::selector_matches;

/// One resource record's data, owned by a name in `Records`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Data {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    Ptr(String),
    Txt(String),
}

impl Data {
    pub fn kind(&self) -> RecordKind {
        match self {
            Data::A(_) => RecordKind::A,
            Data::Aaaa(_) => RecordKind::Aaaa,
            Data::Cname(_) => RecordKind::Cname,
            Data::Srv { .. } => RecordKind::Srv,
            Data::Ptr(_) => RecordKind::Ptr,
            Data::Txt(_) => RecordKind::Txt,
        }
    }

    fn ip(ip: IpAddr) -> Data {
        match ip {
            IpAddr::V4(v4) => Data::A(v4),
            IpAddr::V6(v6) => Data::Aaaa(v6),
        }
    }
}

/// Query types as the plugin distinguishes them (None in a lookup means ANY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    A,
    Aaaa,
    Cname,
    Srv,
    Ptr,
    Txt,
    Soa,
    Ns,
    /// Any type the plugin never holds (MX, HINFO, ...): NODATA where the name exists.
    Other,
}

/// What the plugin says about a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Records (answer), additional records (name, data), and whether the answer ends in a
    /// CNAME whose target must be resolved elsewhere (ExternalName to an outside name).
    Answer {
        answers: Vec<(String, Data)>,
        additionals: Vec<(String, Data)>,
        chase: Option<String>,
    },
    /// The name exists with other types.
    NoData {
        zone: String,
    },
    NxDomain {
        zone: String,
    },
    /// SOA or NS at a zone apex.
    Apex {
        zone: String,
        soa: bool,
    },
    /// Not ours: hand to the next plugin (outside our zones, or `fallthrough`).
    Next,
}

/// Istio allocates addresses for ServiceEntries without any from this class-E range.
const AUTO_ALLOCATE_V4: [u8; 2] = [240, 240];

#[derive(Debug, Default)]
pub struct Records {
    pub cfg: Option<Kubernetes>,
    names: HashMap<String, Vec<Data>>,
    /// Names that exist without records of their own (empty non-terminals, namespaces, ...).
    existing: HashSet<String>,
    /// Names outside the zones that ServiceEntries own.
    external: HashMap<String, Vec<Data>>,
    /// (namespace, ip) of every pod (and WorkloadEntry), for `pods verified`.
    pod_ips: HashSet<(String, IpAddr)>,
    pub serial: u32,
}

fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(72);
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s + "ip6.arpa."
        }
    }
}

/// `10.1.2.3` -> `10-1-2-3`; IPv6 `fd00::1` -> `fd00--1` (the spec's dashed form).
pub fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

/// The inverse of `dashed` for pod names (`a-b-c-d`, IPv6 with `-` for `:`).
fn undashed(label: &str) -> Option<IpAddr> {
    if let Ok(v4) = label.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label
        .replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

struct Endpoint {
    ip: IpAddr,
    hostname: Option<String>,
    pod_name: Option<String>,
}

impl Records {
    /// Builds every record from the config, for the kubernetes plugin's zones.
    pub fn build(config: &ConfigSet, cfg: Option<Kubernetes>, serial: u32) -> Records {
        let mut r = Records {
            serial,
            ..Default::default()
        };
        let Some(k) = cfg.clone() else { return r };
        let forward_zones: Vec<&String> = k
            .zones
            .iter()
            .filter(|z| !z.ends_with("in-addr.arpa.") && !z.ends_with("ip6.arpa."))
            .collect();
        let exposed = |ns: &str| k.namespaces.is_empty() || k.namespaces.iter().any(|n| n == ns);

        let mut namespaces: HashSet<String> = config
            .namespaces
            .iter()
            .map(|n| n.meta.name.clone())
            .collect();
        namespaces.extend(config.services.iter().map(|s| s.namespace.clone()));
        namespaces.extend(config.pods.iter().map(|p| p.namespace.clone()));
        for p in &config.pods {
            let ips = p
                .spec
                .status
                .pod_ips
                .iter()
                .map(|i| i.ip.as_str())
                .chain(p.spec.status.pod_ip.as_deref());
            for ip in ips.filter_map(|i| i.parse().ok()) {
                r.pod_ips.insert((p.namespace.clone(), ip));
            }
        }
        for w in &config.workload_entries {
            if let Ok(ip) = w.spec.address.parse() {
                r.pod_ips.insert((w.namespace.clone(), ip));
            }
        }
        let vips = allocate_vips(config);

        for zone in &forward_zones {
            r.existing.insert((*zone).clone());
            r.existing.insert(format!("svc.{zone}"));
            r.existing.insert(format!("pod.{zone}"));
            r.add(format!("dns-version.{zone}"), Data::Txt("1.1.0".into()));
            for ns in namespaces.iter().filter(|ns| exposed(ns)) {
                r.existing.insert(format!("{ns}.svc.{zone}"));
            }
            for svc in config.services.iter().filter(|s| exposed(&s.namespace)) {
                let base = format!("{}.{}.svc.{zone}", svc.meta.name, svc.namespace);
                let ttl_ports: Vec<(String, String, u16)> = svc
                    .spec
                    .ports
                    .iter()
                    .filter_map(|p| {
                        let name = p.name.clone().filter(|n| !n.is_empty())?;
                        let proto = p
                            .protocol
                            .clone()
                            .unwrap_or_else(|| "TCP".into())
                            .to_ascii_lowercase();
                        Some((name, proto, p.port as u16))
                    })
                    .collect();
                if svc.spec.service_type.as_deref() == Some("ExternalName") {
                    if let Some(target) = &svc.spec.external_name {
                        r.add(base.clone(), Data::Cname(fqdn(target)));
                    }
                    continue;
                }
                let headless = svc.spec.cluster_ip.as_deref() == Some("None");
                if headless {
                    // No ready endpoint: the name does not exist (NXDOMAIN), as in CoreDNS.
                    let endpoints = endpoints_of(
                        config,
                        &svc.namespace,
                        &svc.meta.name,
                        svc.spec.selector.as_ref(),
                    );
                    let n = endpoints.len().max(1);
                    for ep in &endpoints {
                        let label = match (&ep.hostname, &ep.pod_name) {
                            (Some(h), _) => h.clone(),
                            (None, Some(p)) if k.endpoint_pod_names => p.clone(),
                            _ => dashed(ep.ip),
                        };
                        let host = format!("{label}.{base}");
                        r.add(base.clone(), Data::ip(ep.ip));
                        r.add(host.clone(), Data::ip(ep.ip));
                        r.add_ptr(&k, ep.ip, &host);
                        for (port_name, proto, port) in &ttl_ports {
                            let srv = Data::Srv {
                                priority: 0,
                                weight: (100 / n) as u16,
                                port: *port,
                                target: host.clone(),
                            };
                            r.add(format!("_{port_name}._{proto}.{base}"), srv.clone());
                            r.add(base.clone(), srv);
                        }
                    }
                } else {
                    let ips: Vec<IpAddr> = match svc
                        .spec
                        .cluster_ip
                        .as_deref()
                        .and_then(|ip| ip.parse().ok())
                    {
                        Some(ip) => vec![ip],
                        None => vips
                            .get(&(svc.namespace.clone(), svc.meta.name.clone()))
                            .copied()
                            .into_iter()
                            .collect(),
                    };
                    for ip in ips {
                        r.add(base.clone(), Data::ip(ip));
                        r.add_ptr(&k, ip, &base);
                    }
                    let n = ttl_ports.len().max(1);
                    for (port_name, proto, port) in &ttl_ports {
                        let srv = Data::Srv {
                            priority: 0,
                            weight: (100 / n) as u16,
                            port: *port,
                            target: base.clone(),
                        };
                        r.add(format!("_{port_name}._{proto}.{base}"), srv.clone());
                        r.add(base.clone(), srv);
                    }
                    r.existing.insert(base.clone());
                }
            }
        }
        // ServiceEntry hosts: answered wherever they are, declared or allocated addresses.
        for se in &config.service_entries {
            let mut addrs: Vec<IpAddr> = se
                .spec
                .addresses
                .iter()
                .filter_map(|a| a.split('/').next()?.parse().ok())
                .collect();
            if addrs.is_empty()
                && se.spec.resolution == Some(Resolution::Static)
                && se.spec.workload_selector.is_none()
            {
                addrs = se
                    .spec
                    .endpoints
                    .iter()
                    .filter_map(|e| e.address.parse().ok())
                    .collect();
            }
            for host in se.spec.hosts.iter().filter(|h| !h.starts_with('*')) {
                let name = fqdn(host);
                let addrs = if addrs.is_empty() {
                    vips.get(&(se.namespace.clone(), format!("se:{host}")))
                        .copied()
                        .into_iter()
                        .collect()
                } else {
                    addrs.clone()
                };
                for ip in addrs {
                    if forward_zones.iter().any(|z| in_zone(&name, z)) {
                        r.add(name.clone(), Data::ip(ip));
                    } else {
                        r.external
                            .entry(name.clone())
                            .or_default()
                            .push(Data::ip(ip));
                    }
                }
            }
        }
        // Every ancestor of an owned name exists (empty non-terminals answer NODATA).
        let owned: Vec<String> = r.names.keys().cloned().collect();
        for name in owned {
            let Some(zone) = k
                .zones
                .iter()
                .filter(|z| in_zone(&name, z))
                .max_by_key(|z| z.len())
            else {
                continue;
            };
            let mut n = name.as_str();
            while n.len() > zone.len() {
                r.existing.insert(n.to_string());
                n = match n.split_once('.') {
                    Some((_, rest)) => rest,
                    None => break,
                };
            }
            r.existing.insert(zone.clone());
        }
        for recs in r.names.values_mut() {
            recs.dedup();
        }
        r.cfg = cfg;
        r
    }

    fn add(&mut self, name: String, data: Data) {
        let recs = self.names.entry(name).or_default();
        if !recs.contains(&data) {
            recs.push(data);
        }
    }

    fn add_ptr(&mut self, k: &Kubernetes, ip: IpAddr, target: &str) {
        let rev = reverse_name(ip);
        if k.zones.iter().any(|z| in_zone(&rev, z)) {
            self.add(rev, Data::Ptr(target.to_string()));
        }
    }

    fn zone_of(&self, name: &str) -> Option<&str> {
        let k = self.cfg.as_ref()?;
        k.zones
            .iter()
            .filter(|z| in_zone(name, z))
            .max_by_key(|z| z.len())
            .map(String::as_str)
    }

    fn falls_through(&self, zone: &str) -> bool {
        match self.cfg.as_ref().and_then(|k| k.fallthrough.as_ref()) {
            None => false,
            Some(zones) if zones.is_empty() => true,
            Some(zones) => zones.iter().any(|z| z == zone),
        }
    }

    /// Answers `name` (lowercase FQDN) for `kind` (None: ANY).
    pub fn lookup(&self, name: &str, kind: Option<RecordKind>) -> Lookup {
        let Some(zone) = self.zone_of(name) else {
            return match self.external.get(name) {
                Some(recs) => self.answer(name, recs, kind, "."),
                None => Lookup::Next,
            };
        };
        let zone = zone.to_string();
        if name == zone {
            return match kind {
                None | Some(RecordKind::Soa) => Lookup::Apex { zone, soa: true },
                Some(RecordKind::Ns) => Lookup::Apex { zone, soa: false },
                Some(_) => Lookup::NoData { zone },
            };
        }
        if let Some(rest) = name.strip_suffix(&format!(".pod.{zone}")) {
            return self.pod(rest, kind, &zone);
        }
        match self.names.get(name) {
            Some(recs) => self.answer(name, recs, kind, &zone),
            None if self.existing.contains(name) => Lookup::NoData { zone },
            None if self.falls_through(&zone) => Lookup::Next,
            None => Lookup::NxDomain { zone },
        }
    }

    fn answer(&self, name: &str, recs: &[Data], kind: Option<RecordKind>, zone: &str) -> Lookup {
        // A CNAME answers every type: the CNAME, then the target's records if we have them.
        if let Some(Data::Cname(target)) = recs.iter().find(|d| d.kind() == RecordKind::Cname) {
            let mut answers = vec![(name.to_string(), Data::Cname(target.clone()))];
            if kind == Some(RecordKind::Cname) {
                return Lookup::Answer {
                    answers,
                    additionals: vec![],
                    chase: None,
                };
            }
            return match self
                .names
                .get(target.as_str())
                .or_else(|| self.external.get(target.as_str()))
            {
                Some(t) => {
                    answers.extend(
                        t.iter()
                            .filter(|d| kind.is_none_or(|k| d.kind() == k))
                            .map(|d| (target.clone(), d.clone())),
                    );
                    Lookup::Answer {
                        answers,
                        additionals: vec![],
                        chase: None,
                    }
                }
                None if self.zone_of(target).is_some() => Lookup::Answer {
                    answers,
                    additionals: vec![],
                    chase: None,
                },
                None => Lookup::Answer {
                    answers,
                    additionals: vec![],
                    chase: Some(target.clone()),
                },
            };
        }
        let answers: Vec<(String, Data)> = recs
            .iter()
            .filter(|d| kind.is_none_or(|k| d.kind() == k))
            .map(|d| (name.to_string(), d.clone()))
            .collect();
        if answers.is_empty() {
            return Lookup::NoData {
                zone: zone.to_string(),
            };
        }
        let mut additionals = Vec::new();
        for (_, d) in &answers {
            if let Data::Srv { target, .. } = d {
                for t in self.names.get(target.as_str()).into_iter().flatten() {
                    if matches!(t, Data::A(_) | Data::Aaaa(_))
                        && !additionals.contains(&(target.clone(), t.clone()))
                    {
                        additionals.push((target.clone(), t.clone()));
                    }
                }
            }
        }
        Lookup::Answer {
            answers,
            additionals,
            chase: None,
        }
    }

    /// `a-b-c-d.<ns>.pod.<zone>`.
    fn pod(&self, rest: &str, kind: Option<RecordKind>, zone: &str) -> Lookup {
        let mode = self
            .cfg
            .as_ref()
            .map(|k| k.pods)
            .unwrap_or(PodsMode::Disabled);
        let nx = || {
            if self.falls_through(zone) {
                Lookup::Next
            } else {
                Lookup::NxDomain {
                    zone: zone.to_string(),
                }
            }
        };
        if mode == PodsMode::Disabled {
            return nx();
        }
        let Some((label, ns)) = rest.split_once('.') else {
            // `<ns>.pod.<zone>`: the namespace exists as a name.
            return if self.existing.contains(&format!("{rest}.svc.{zone}")) {
                Lookup::NoData { zone: zone.into() }
            } else {
                nx()
            };
        };
        if ns.contains('.') {
            return nx();
        }
        let Some(ip) = undashed(label) else {
            return nx();
        };
        if mode == PodsMode::Verified && !self.pod_ips.contains(&(ns.to_string(), ip)) {
            return nx();
        }
        let name = format!("{rest}.pod.{zone}");
        self.answer(&name, &[Data::ip(ip)], kind, zone)
    }

    pub fn ttl(&self) -> u32 {
        self.cfg.as_ref().map(|k| k.ttl).unwrap_or(5)
    }
}

/// Ready endpoints of a headless service: Endpoints or EndpointSlices named after it, else the
/// WorkloadEntries its selector picks (universal mode).
fn endpoints_of(
    config: &ConfigSet,
    ns: &str,
    svc: &str,
    selector: Option<&Labels>,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    let pod_name = |t: &Option<crate::config::ObjectReference>| {
        t.as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.clone())
    };
    for e in config
        .endpoints
        .iter()
        .filter(|e| e.namespace == ns && e.meta.name == svc)
    {
        for s in &e.spec.subsets {
            for a in &s.addresses {
                if let Ok(ip) = a.ip.parse() {
                    out.push(Endpoint {
                        ip,
                        hostname: a.hostname.clone(),
                        pod_name: pod_name(&a.target_ref),
                    });
                }
            }
        }
    }
    for sl in config.endpoint_slices.iter().filter(|e| {
        e.namespace == ns
            && e.meta
                .labels
                .get("kubernetes.io/service-name")
                .map(String::as_str)
                == Some(svc)
    }) {
        for ep in sl
            .spec
            .endpoints
            .iter()
            .filter(|e| e.conditions.ready != Some(false))
        {
            for a in &ep.addresses {
                if let Ok(ip) = a.parse()
                    && !out.iter().any(|o: &Endpoint| o.ip == ip)
                {
                    out.push(Endpoint {
                        ip,
                        hostname: ep.hostname.clone(),
                        pod_name: pod_name(&ep.target_ref),
                    });
                }
            }
        }
    }
    if out.is_empty()
        && let Some(sel) = selector.filter(|s| !s.is_empty())
    {
        for w in config.workload_entries.iter().filter(|w| w.namespace == ns) {
            if selector_matches(sel, crate::model::entry_labels(w))
                && let Ok(ip) = w.spec.address.parse()
            {
                out.push(Endpoint {
                    ip,
                    hostname: None,
                    pod_name: Some(w.meta.name.clone()),
                });
            }
        }
    }
    out.sort_by_key(|e| e.ip);
    out
}

/// Stable addresses from 240.240.0.0/16 for Services without a clusterIP (universal mode) and
/// for ServiceEntry hosts without addresses: a hash of the name picks the slot, collisions move
/// to the next free one, in name order, so the same config always gets the same addresses.
pub fn allocate_vips(config: &ConfigSet) -> BTreeMap<(String, String), IpAddr> {
    let mut wanted: Vec<(String, String)> = Vec::new();
    for s in &config.services {
        let needs =
            s.spec.cluster_ip.is_none() && s.spec.service_type.as_deref() != Some("ExternalName");
        if needs {
            wanted.push((s.namespace.clone(), s.meta.name.clone()));
        }
    }
    for se in &config.service_entries {
        let static_eps =
            se.spec.resolution == Some(Resolution::Static) && !se.spec.endpoints.is_empty();
        if se.spec.addresses.is_empty() && !static_eps {
            for h in se.spec.hosts.iter().filter(|h| !h.starts_with('*')) {
                wanted.push((se.namespace.clone(), format!("se:{h}")));
            }
        }
    }
    wanted.sort();
    wanted.dedup();
    let mut taken = HashSet::new();
    let mut out = BTreeMap::new();
    for key in wanted {
        let mut slot = (fnv(&format!("{}/{}", key.0, key.1)) % 65534) as u16 + 1;
        while !taken.insert(slot) {
            slot = slot % 65534 + 1;
        }
        let ip = Ipv4Addr::new(
            AUTO_ALLOCATE_V4[0],
            AUTO_ALLOCATE_V4[1],
            (slot >> 8) as u8,
            slot as u8,
        );
        out.insert(key, IpAddr::V4(ip));
    }
    out
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
