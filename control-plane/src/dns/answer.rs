//! From a query to a response: validation (FORMERR, NOTIMP, REFUSED), the plugin chain of the
//! server block (cache -> kubernetes -> forward, with loadbalance on the way out), negative
//! answers with the zone's SOA, EDNS0, and truncation for UDP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::cache::{Cache, Class, Key};
use super::corefile::{ServerBlock, fqdn, in_zone};
use super::forward::{ForwardError, Forwarder};
use super::metrics::Metrics;
use super::records::{Data, Lookup, RecordKind, Records};
use crate::config::ConfigSet;

/// The payload size weftd advertises in EDNS0 (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

/// One server block, live.
pub struct Block {
    pub cfg: ServerBlock,
    pub records: ArcSwap<Records>,
    /// False until the config source has been read: kubernetes names answer SERVFAIL.
    pub synced: AtomicBool,
    pub forward: Option<Arc<Forwarder>>,
    pub cache: Option<Cache>,
    pub metrics: Arc<Metrics>,
    /// The `loop` plugin's probe name and how often it came back to us.
    pub loop_probe: Option<(String, AtomicU32)>,
    pub server_label: String,
}

/// What the plugin chain produced.
pub struct Outcome {
    pub msg: Message,
    pub plugin: &'static str,
    pub zone: String,
}

fn kind_of(t: RecordType) -> Option<RecordKind> {
    Some(match t {
        RecordType::A => RecordKind::A,
        RecordType::AAAA => RecordKind::Aaaa,
        RecordType::CNAME => RecordKind::Cname,
        RecordType::SRV => RecordKind::Srv,
        RecordType::PTR => RecordKind::Ptr,
        RecordType::TXT => RecordKind::Txt,
        RecordType::SOA => RecordKind::Soa,
        RecordType::NS => RecordKind::Ns,
        RecordType::ANY => return None,
        _ => RecordKind::Other,
    })
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap_or_else(|_| Name::root())
}

fn rdata(d: &Data) -> RData {
    match d {
        Data::A(ip) => RData::A(A(*ip)),
        Data::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
        Data::Cname(t) => RData::CNAME(CNAME(name(t))),
        Data::Ptr(t) => RData::PTR(PTR(name(t))),
        Data::Srv {
            priority,
            weight,
            port,
            target,
        } => RData::SRV(SRV::new(*priority, *weight, *port, name(target))),
        Data::Txt(t) => RData::TXT(TXT::new(vec![t.clone()])),
    }
}

fn soa(zone: &str, records: &Records) -> Record {
    let ttl = records.ttl();
    let base = if zone == "." {
        String::new()
    } else {
        zone.to_string()
    };
    let data = SOA::new(
        name(&format!("ns.dns.{base}")),
        name(&format!("hostmaster.{base}")),
        records.serial,
        7200,
        1800,
        86400,
        ttl,
    );
    Record::from_rdata(name(zone), ttl.min(300), RData::SOA(data))
}

/// A response skeleton for `req`.
pub fn reply_to(req: &Message, rcode: ResponseCode) -> Message {
    let mut m = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    m.metadata.checking_disabled = req.metadata.checking_disabled;
    m.metadata.response_code = rcode;
    m.queries = req.queries.clone();
    m
}

impl Block {
    /// A block ready to serve, with no records until `update` (kubernetes names answer
    /// SERVFAIL until then).
    pub fn new(cfg: ServerBlock, metrics: Arc<Metrics>) -> Block {
        let loop_probe = cfg.plugins.loop_detect.then(|| {
            let zone = cfg.zones[0].trim_start_matches('.');
            let r = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let probe = format!("{}.{}.{zone}", r % 1_000_000_007, (r / 7) % 1_000_000_009)
                .replace("..", ".");
            (probe, AtomicU32::new(0))
        });
        let synced = cfg.plugins.kubernetes.is_none();
        Block {
            records: ArcSwap::from_pointee(Records::build(
                &ConfigSet::default(),
                cfg.plugins.kubernetes.clone(),
                0,
            )),
            synced: AtomicBool::new(synced),
            forward: cfg.plugins.forward.clone().map(Forwarder::new),
            cache: cfg.plugins.cache.clone().map(Cache::new),
            metrics,
            loop_probe,
            server_label: format!("dns://:{}", cfg.port),
            cfg,
        }
    }

    /// Rebuilds the records from the config and forgets cached answers: unlike CoreDNS, a
    /// change is visible at once, no cached denial of a name that now exists outlives it.
    pub fn update(&self, config: &ConfigSet) {
        let serial = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(0);
        self.records.store(Arc::new(Records::build(
            config,
            self.cfg.plugins.kubernetes.clone(),
            serial,
        )));
        self.synced.store(true, Ordering::Relaxed);
        if let Some(c) = &self.cache {
            c.clear();
        }
    }

    pub fn handles(&self, qname: &str) -> usize {
        self.cfg
            .zones
            .iter()
            .filter(|z| in_zone(qname, z))
            .map(|z| z.len())
            .max()
            .map(|l| l + 1)
            .unwrap_or(0)
    }

    /// Answers from the kubernetes plugin alone (synchronous); None when the query must go on
    /// to `forward`.
    fn kubernetes(&self, req: &Message, qname: &str, qtype: RecordType) -> Option<Outcome> {
        let records = self.records.load();
        let k = records.cfg.as_ref()?;
        let ours = k.zones.iter().any(|z| in_zone(qname, z));
        if ours && !self.synced.load(Ordering::Relaxed) {
            return Some(Outcome {
                msg: reply_to(req, ResponseCode::ServFail),
                plugin: "kubernetes",
                zone: String::new(),
            });
        }
        let ttl = records.ttl();
        let rr = |n: &str, d: &Data| Record::from_rdata(name(n), ttl, rdata(d));
        match records.lookup(qname, kind_of(qtype)) {
            Lookup::Next => None,
            Lookup::Answer {
                answers,
                additionals,
                chase,
            } => {
                let mut m = reply_to(req, ResponseCode::NoError);
                m.metadata.authoritative = true;
                m.answers = answers.iter().map(|(n, d)| rr(n, d)).collect();
                m.additionals = additionals.iter().map(|(n, d)| rr(n, d)).collect();
                if let Some(target) = chase {
                    // ExternalName to an outside name: resolved by the rest of the chain.
                    return Some(Outcome {
                        msg: m,
                        plugin: "kubernetes",
                        zone: target,
                    });
                }
                Some(Outcome {
                    msg: m,
                    plugin: "kubernetes",
                    zone: String::new(),
                })
            }
            Lookup::NoData { zone } => {
                let mut m = reply_to(req, ResponseCode::NoError);
                m.metadata.authoritative = true;
                if zone != "." {
                    m.authorities.push(soa(&zone, &records));
                }
                Some(Outcome {
                    msg: m,
                    plugin: "kubernetes",
                    zone: String::new(),
                })
            }
            Lookup::NxDomain { zone } => {
                let mut m = reply_to(req, ResponseCode::NXDomain);
                m.metadata.authoritative = true;
                m.authorities.push(soa(&zone, &records));
                Some(Outcome {
                    msg: m,
                    plugin: "kubernetes",
                    zone: String::new(),
                })
            }
            Lookup::Apex { zone, soa: true } => {
                let mut m = reply_to(req, ResponseCode::NoError);
                m.metadata.authoritative = true;
                m.answers.push(soa(&zone, &records));
                Some(Outcome {
                    msg: m,
                    plugin: "kubernetes",
                    zone: String::new(),
                })
            }
            Lookup::Apex { zone, soa: false } => {
                let mut m = reply_to(req, ResponseCode::NoError);
                m.metadata.authoritative = true;
                let ns = format!("ns.dns.{zone}");
                m.answers.push(Record::from_rdata(
                    name(&zone),
                    ttl,
                    RData::NS(NS(name(&ns))),
                ));
                Some(Outcome {
                    msg: m,
                    plugin: "kubernetes",
                    zone: String::new(),
                })
            }
        }
    }

    fn forwards(&self, qname: &str) -> Option<&Arc<Forwarder>> {
        let f = self.forward.as_ref()?;
        let ok = in_zone(qname, &f.cfg.from) && !f.cfg.except.iter().any(|z| in_zone(qname, z));
        ok.then_some(f)
    }

    async fn forward(&self, req: &Message, qname: &str) -> Outcome {
        let Some(f) = self.forwards(qname) else {
            // No plugin wanted it: CoreDNS answers SERVFAIL ("no next plugin found").
            return Outcome {
                msg: reply_to(req, ResponseCode::ServFail),
                plugin: "",
                zone: String::new(),
            };
        };
        match f.forward(req).await {
            Ok(resp) => {
                self.metrics.inc(
                    "coredns_forward_requests_total",
                    vec![("to", f.upstreams[0].addr.to_string())],
                );
                Outcome {
                    msg: resp,
                    plugin: "forward",
                    zone: String::new(),
                }
            }
            Err(ForwardError::Overloaded) => Outcome {
                msg: reply_to(req, ResponseCode::Refused),
                plugin: "forward",
                zone: String::new(),
            },
            Err(e) => {
                tracing::debug!(qname, "forward failed: {e}");
                Outcome {
                    msg: reply_to(req, ResponseCode::ServFail),
                    plugin: "forward",
                    zone: String::new(),
                }
            }
        }
    }

    /// The plugin chain for one valid query.
    pub async fn resolve(&self, req: &Message, qname: &str, qtype: RecordType) -> Outcome {
        let dnssec_ok = req.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
        let key = Key {
            name: qname.to_string(),
            qtype: u16::from(qtype),
            dnssec_ok,
        };
        let cacheable = self
            .cache
            .as_ref()
            .filter(|c| c.cfg.zones.iter().any(|z| in_zone(qname, z)));
        if let Some(c) = cacheable {
            let labels = || {
                vec![
                    ("server", self.server_label.clone()),
                    ("zones", c.cfg.zones.join(" ")),
                ]
            };
            match c.get(&key, req.metadata.id) {
                Some((mut msg, class)) => {
                    msg.queries = req.queries.clone();
                    let t = match class {
                        Class::Success => "success",
                        Class::Denial => "denial",
                    };
                    let mut l = labels();
                    l.push(("type", t.into()));
                    self.metrics.inc("coredns_cache_hits_total", l);
                    return Outcome {
                        msg,
                        plugin: "cache",
                        zone: String::new(),
                    };
                }
                None => self.metrics.inc("coredns_cache_misses_total", labels()),
            }
        }
        let mut out = match self.kubernetes(req, qname, qtype) {
            Some(o) if !o.zone.is_empty() => {
                // Chase an ExternalName's CNAME target through forward.
                let target = o.zone.clone();
                let mut chase = req.clone();
                if let Some(q) = chase.queries.first_mut() {
                    q.name = name(&target);
                }
                let mut m = o.msg;
                let next = self.forward(&chase, &target).await;
                m.answers.extend(next.msg.answers);
                Outcome {
                    msg: m,
                    plugin: "kubernetes",
                    zone: String::new(),
                }
            }
            Some(o) => o,
            None => self.forward(req, qname).await,
        };
        if self.cfg.plugins.loadbalance && out.msg.answers.len() > 1 {
            shuffle_addresses(&mut out.msg.answers);
        }
        if let Some(c) = cacheable {
            c.put(key, &out.msg);
            let (s, d) = c.sizes();
            for (t, n) in [("success", s), ("denial", d)] {
                let l = vec![
                    ("server", self.server_label.clone()),
                    ("type", t.to_string()),
                    ("zones", c.cfg.zones.join(" ")),
                ];
                self.metrics.set("coredns_cache_entries", l, n as i64);
            }
        }
        out
    }
}

/// The `loadbalance` plugin: rotates A and AAAA records (CNAMEs stay first).
fn shuffle_addresses(answers: &mut [Record]) {
    let first_addr = answers
        .iter()
        .position(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA));
    let Some(start) = first_addr else { return };
    let n = answers.len() - start;
    if n > 1 {
        let k =
            (Instant::now().elapsed().subsec_nanos() as usize ^ std::process::id() as usize) % n;
        answers[start..].rotate_left(k.max(1) % n);
    }
}

/// Serves one query's bytes: None means drop (not a DNS query at all).
pub async fn handle(
    blocks: &[Arc<Block>],
    bytes: &[u8],
    tcp: bool,
    peer: SocketAddr,
) -> Option<Vec<u8>> {
    let started = Instant::now();
    if bytes.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    if bytes[2] & 0x80 != 0 {
        return None; // a response, not a query: never answer (reflection)
    }
    let req = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => {
            return encode(
                &Message::error_msg(id, OpCode::Query, ResponseCode::FormErr),
                None,
                tcp,
            );
        }
    };
    let udp_limit = req
        .edns
        .as_ref()
        .map(|e| e.max_payload().max(512))
        .unwrap_or(512);
    let finish = |msg: Message| {
        encode(
            &msg,
            Some(&req).filter(|r| r.edns.is_some()).map(|_| udp_limit),
            tcp,
        )
    };
    if req.metadata.op_code != OpCode::Query {
        return finish(reply_to(&req, ResponseCode::NotImp));
    }
    let [query] = req.queries.as_slice() else {
        return finish(reply_to(&req, ResponseCode::FormErr));
    };
    let qname = fqdn(&query.name().to_ascii());
    let qtype = query.query_type();
    let Some(block) = blocks
        .iter()
        .max_by_key(|b| b.handles(&qname))
        .filter(|b| b.handles(&qname) > 0)
    else {
        return finish(reply_to(&req, ResponseCode::Refused));
    };
    let zone = block
        .cfg
        .zones
        .iter()
        .filter(|z| in_zone(&qname, z))
        .max_by_key(|z| z.len())
        .cloned()
        .unwrap_or_default();
    let family = if peer.is_ipv6() { "2" } else { "1" };
    let proto = if tcp { "tcp" } else { "udp" };
    block.metrics.inc(
        "coredns_dns_requests_total",
        vec![
            ("server", block.server_label.clone()),
            ("zone", zone.clone()),
            ("view", String::new()),
            ("proto", proto.into()),
            ("family", family.into()),
            ("type", type_label(qtype)),
        ],
    );
    if let Some((probe, seen)) = &block.loop_probe
        && qtype == RecordType::HINFO
        && qname == *probe
    {
        let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
        if n > 2 {
            tracing::error!(zone = %zone, "Loop ({peer} -> {}) detected for zone {zone:?}: the forward plugin sends queries back to this server; fix the upstream (e.g. /etc/resolv.conf pointing at a loopback address)", block.server_label);
            std::process::exit(1);
        }
    }
    // Zone transfers are not served; neither are classes other than IN (CHAOS and friends).
    let transfer = matches!(qtype, RecordType::AXFR | RecordType::IXFR);
    let other_class = query.query_class() != DNSClass::IN && query.query_class() != DNSClass::ANY;
    let out = if transfer || other_class {
        Outcome {
            msg: reply_to(&req, ResponseCode::Refused),
            plugin: "",
            zone: String::new(),
        }
    } else {
        block.resolve(&req, &qname, qtype).await
    };
    let rcode = out.msg.metadata.response_code;
    block.metrics.inc(
        "coredns_dns_responses_total",
        vec![
            ("server", block.server_label.clone()),
            ("zone", zone.clone()),
            ("view", String::new()),
            ("rcode", rcode_name(rcode).to_string()),
            ("plugin", out.plugin.into()),
        ],
    );
    block.metrics.observe(
        vec![
            ("server", block.server_label.clone()),
            ("zone", zone),
            ("view", String::new()),
            ("type", type_label(qtype)),
        ],
        started.elapsed(),
    );
    if block.cfg.plugins.log {
        tracing::info!(
            "{peer} - {} \"{} IN {qname} {proto} {} {} {udp_limit}\" {} {:.6}s",
            req.metadata.id,
            qtype,
            bytes.len(),
            req.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
            rcode_name(rcode),
            started.elapsed().as_secs_f64()
        );
    }
    let is_probe = block.loop_probe.as_ref().is_some_and(|(p, _)| *p == qname);
    if block.cfg.plugins.errors && rcode == ResponseCode::ServFail && !is_probe {
        tracing::error!(
            "{qname} {qtype}: SERVFAIL ({})",
            if out.plugin.is_empty() {
                "no plugin answered"
            } else {
                out.plugin
            }
        );
    }
    finish(out.msg)
}

/// Rcode names as DNS tools and CoreDNS's metrics spell them.
pub fn rcode_name(r: ResponseCode) -> &'static str {
    match r {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        _ => "OTHER",
    }
}

fn type_label(t: RecordType) -> String {
    match t {
        RecordType::A
        | RecordType::AAAA
        | RecordType::CNAME
        | RecordType::SRV
        | RecordType::PTR
        | RecordType::TXT
        | RecordType::SOA
        | RecordType::NS
        | RecordType::MX
        | RecordType::ANY
        | RecordType::HINFO => t.to_string(),
        _ => "other".into(),
    }
}

/// Encodes a response; over UDP, one larger than the client accepts goes out truncated (TC,
/// empty sections) so the client retries over TCP.
fn encode(msg: &Message, edns_limit: Option<u16>, tcp: bool) -> Option<Vec<u8>> {
    let mut msg = msg.clone();
    if let Some(_limit) = edns_limit {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        msg.edns = Some(e);
    }
    let bytes = msg.to_vec().ok()?;
    let limit = usize::from(edns_limit.unwrap_or(512));
    if tcp || bytes.len() <= limit {
        return Some(bytes);
    }
    msg.metadata.truncation = true;
    msg.answers.clear();
    msg.authorities.clear();
    msg.additionals.clear();
    msg.to_vec().ok()
}
