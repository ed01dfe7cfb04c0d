//! The DNS server, table-driven: every behaviour of the Kubernetes DNS spec (and weft's
//! ServiceEntry/WorkloadEntry additions) as a `Case`, asked of the real server over UDP and TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::*;
use crate::config::ConfigSet;
use crate::config::source::ConfigSnapshot;

const FIXTURE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: empty-ns }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: default }
spec:
  clusterIP: 10.96.0.10
  ports: [{ name: http, port: 80 }, { name: https, port: 443 }, { name: dns, port: 53, protocol: UDP }]
---
apiVersion: v1
kind: Service
metadata: { name: v6, namespace: default }
spec: { clusterIP: "fd00::10", ports: [{ name: http, port: 80 }] }
---
apiVersion: v1
kind: Service
metadata: { name: ext, namespace: default }
spec: { type: ExternalName, externalName: web.default.svc.cluster.local }
---
apiVersion: v1
kind: Service
metadata: { name: db, namespace: prod }
spec: { clusterIP: None, ports: [{ name: mysql, port: 3306 }] }
---
apiVersion: v1
kind: Endpoints
metadata: { name: db, namespace: prod }
subsets:
- addresses:
  - { ip: 10.1.0.5, hostname: db-0 }
  - { ip: 10.1.0.6 }
  notReadyAddresses: [{ ip: 10.1.0.7 }]
  ports: [{ name: mysql, port: 3306 }]
---
apiVersion: v1
kind: Service
metadata: { name: empty, namespace: prod }
spec: { clusterIP: None, ports: [{ name: http, port: 80 }] }
---
apiVersion: v1
kind: Pod
metadata: { name: p1, namespace: default }
spec: { containers: [{ name: c, image: x }] }
status: { podIP: 10.244.1.5, phase: Running }
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: api, namespace: default }
spec: { hosts: [api.example.com], addresses: [192.0.2.10], ports: [{ number: 443, name: https, protocol: TLS }], resolution: DNS, location: MESH_EXTERNAL }
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: auto, namespace: default }
spec: { hosts: [auto.example.org], ports: [{ number: 80, name: http, protocol: HTTP }], resolution: DNS }
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: vm1, namespace: default }
spec: { address: 10.10.0.1, labels: { app: vmapp } }
---
apiVersion: v1
kind: Service
metadata: { name: vmapp, namespace: default }
spec: { clusterIP: None, selector: { app: vmapp }, ports: [{ name: http, port: 8080 }] }
"#;

fn big_service() -> String {
    let mut y = String::from(
        "---\napiVersion: v1\nkind: Service\nmetadata: { name: big, namespace: prod }\nspec: { clusterIP: None, ports: [{ name: http, port: 80 }] }\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: { name: big-abc, namespace: prod, labels: { kubernetes.io/service-name: big } }\naddressType: IPv4\nports: [{ name: http, port: 80 }]\nendpoints:\n",
    );
    for i in 0..60 {
        y.push_str(&format!(
            "- {{ addresses: [10.2.0.{i}], conditions: {{ ready: true }} }}\n"
        ));
    }
    y.push_str("- { addresses: [10.2.1.1], conditions: { ready: false } }\n");
    y
}

fn snapshot(synced: bool) -> Arc<ConfigSnapshot> {
    let mut config = ConfigSet::default();
    let errors = config.add_file(
        std::path::Path::new("fixture.yaml"),
        &format!("{FIXTURE}{}", big_service()),
    );
    assert!(errors.is_empty(), "{errors:?}");
    config.sort();
    Arc::new(ConfigSnapshot {
        config: config.into(),
        errors: vec![],
        generation: 1,
        synced,
    })
}

async fn server(corefile: &str, synced: bool) -> (SocketAddr, watch::Sender<Arc<ConfigSnapshot>>) {
    // Outside the ephemeral range, free for both TCP and UDP: parallel tests' outgoing
    // connections cannot take it between this check and the server's bind.
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let port = loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = 12_000 + (std::process::id() % 4_000) as u16 + n.wrapping_mul(13) % 4_000;
        if std::net::TcpListener::bind(("0.0.0.0", p)).is_ok()
            && std::net::UdpSocket::bind(("0.0.0.0", p)).is_ok()
        {
            break p;
        }
    };
    let dir = std::env::temp_dir().join(format!("weft-dns-test-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("Corefile");
    std::fs::write(&path, corefile).unwrap();
    let (tx, rx) = watch::channel(snapshot(synced));
    let opts = DnsOptions {
        corefile: Some(path),
        port_override: Some(port),
    };
    tokio::spawn(async move {
        if let Err(e) = run(opts, rx).await {
            panic!("dns server: {e:#}");
        }
    });
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // Wait for the listener.
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (addr, tx)
}

fn query(name: &str, t: RecordType, edns: bool) -> Message {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m.metadata.recursion_desired = true;
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.edns = Some(e);
    }
    m
}

async fn ask_udp(addr: SocketAddr, q: &Message) -> Message {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&q.to_vec().unwrap(), addr).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

async fn ask_tcp(addr: SocketAddr, q: &Message) -> Message {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let b = q.to_vec().unwrap();
    s.write_all(&(b.len() as u16).to_be_bytes()).await.unwrap();
    s.write_all(&b).await.unwrap();
    let mut l = [0u8; 2];
    s.read_exact(&mut l).await.unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(l) as usize];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

/// Records of a section as `name TYPE data` strings, sorted.
fn section(records: &[hickory_proto::rr::Record]) -> Vec<String> {
    let mut v: Vec<String> = records
        .iter()
        .map(|r| {
            let data = match &r.data {
                RData::SOA(s) => format!("{} {} {}", s.mname, s.rname, s.minimum),
                RData::SRV(s) => format!("{} {} {} {}", s.priority, s.weight, s.port, s.target),
                RData::TXT(t) => t.to_string(),
                d => d.to_string(),
            };
            format!(
                "{} {} {}",
                r.name.to_ascii().to_ascii_lowercase(),
                r.record_type(),
                data
            )
        })
        .collect();
    v.sort();
    v
}

struct Case {
    qname: &'static str,
    qtype: RecordType,
    expect_rcode: ResponseCode,
    expect_answer: &'static [&'static str],
    expect_authority: &'static [&'static str],
    expect_additional: &'static [&'static str],
}

const NEG_SOA: &str = "cluster.local. SOA ns.dns.cluster.local. hostmaster.cluster.local. 5";
const SOA_REV: &str = "in-addr.arpa. SOA ns.dns.in-addr.arpa. hostmaster.in-addr.arpa. 5";

fn cases() -> Vec<Case> {
    use RecordType::*;
    use ResponseCode::*;
    let c = |qname, qtype, expect_rcode, expect_answer, expect_authority, expect_additional| Case {
        qname,
        qtype,
        expect_rcode,
        expect_answer,
        expect_authority,
        expect_additional,
    };
    vec![
        // ClusterIP services
        c(
            "web.default.svc.cluster.local.",
            A,
            NoError,
            &["web.default.svc.cluster.local. A 10.96.0.10"],
            &[],
            &[],
        ),
        c(
            "WEB.Default.SVC.cluster.local.",
            A,
            NoError,
            &["web.default.svc.cluster.local. A 10.96.0.10"],
            &[],
            &[],
        ),
        c(
            "web.default.svc.cluster.local.",
            AAAA,
            NoError,
            &[],
            &[NEG_SOA],
            &[],
        ),
        c(
            "v6.default.svc.cluster.local.",
            AAAA,
            NoError,
            &["v6.default.svc.cluster.local. AAAA fd00::10"],
            &[],
            &[],
        ),
        c(
            "v6.default.svc.cluster.local.",
            A,
            NoError,
            &[],
            &[NEG_SOA],
            &[],
        ),
        c(
            "_http._tcp.web.default.svc.cluster.local.",
            SRV,
            NoError,
            &[
                "_http._tcp.web.default.svc.cluster.local. SRV 0 33 80 web.default.svc.cluster.local.",
            ],
            &[],
            &["web.default.svc.cluster.local. A 10.96.0.10"],
        ),
        c(
            "_dns._udp.web.default.svc.cluster.local.",
            SRV,
            NoError,
            &[
                "_dns._udp.web.default.svc.cluster.local. SRV 0 33 53 web.default.svc.cluster.local.",
            ],
            &[],
            &["web.default.svc.cluster.local. A 10.96.0.10"],
        ),
        c(
            "_http._udp.web.default.svc.cluster.local.",
            SRV,
            NXDomain,
            &[],
            &[NEG_SOA],
            &[],
        ),
        c(
            "10.0.96.10.in-addr.arpa.",
            PTR,
            NoError,
            &["10.0.96.10.in-addr.arpa. PTR web.default.svc.cluster.local."],
            &[],
            &[],
        ),
        // Headless services
        c(
            "db.prod.svc.cluster.local.",
            A,
            NoError,
            &[
                "db.prod.svc.cluster.local. A 10.1.0.5",
                "db.prod.svc.cluster.local. A 10.1.0.6",
            ],
            &[],
            &[],
        ),
        c(
            "db-0.db.prod.svc.cluster.local.",
            A,
            NoError,
            &["db-0.db.prod.svc.cluster.local. A 10.1.0.5"],
            &[],
            &[],
        ),
        c(
            "10-1-0-6.db.prod.svc.cluster.local.",
            A,
            NoError,
            &["10-1-0-6.db.prod.svc.cluster.local. A 10.1.0.6"],
            &[],
            &[],
        ),
        c(
            "10-1-0-7.db.prod.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            &[NEG_SOA],
            &[],
        ),
        c(
            "_mysql._tcp.db.prod.svc.cluster.local.",
            SRV,
            NoError,
            &[
                "_mysql._tcp.db.prod.svc.cluster.local. SRV 0 50 3306 10-1-0-6.db.prod.svc.cluster.local.",
                "_mysql._tcp.db.prod.svc.cluster.local. SRV 0 50 3306 db-0.db.prod.svc.cluster.local.",
            ],
            &[],
            &[
                "10-1-0-6.db.prod.svc.cluster.local. A 10.1.0.6",
                "db-0.db.prod.svc.cluster.local. A 10.1.0.5",
            ],
        ),
        c(
            "5.0.1.10.in-addr.arpa.",
            PTR,
            NoError,
            &["5.0.1.10.in-addr.arpa. PTR db-0.db.prod.svc.cluster.local."],
            &[],
            &[],
        ),
        c(
            "9.9.9.10.in-addr.arpa.",
            PTR,
            NXDomain,
            &[],
            &[SOA_REV],
            &[],
        ),
        c(
            "empty.prod.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            &[NEG_SOA],
            &[],
        ),
        c(
            "vmapp.default.svc.cluster.local.",
            A,
            NoError,
            &["vmapp.default.svc.cluster.local. A 10.10.0.1"],
            &[],
            &[],
        ),
        // ExternalName
        c(
            "ext.default.svc.cluster.local.",
            A,
            NoError,
            &[
                "ext.default.svc.cluster.local. CNAME web.default.svc.cluster.local.",
                "web.default.svc.cluster.local. A 10.96.0.10",
            ],
            &[],
            &[],
        ),
        // Schema version, pods
        c(
            "dns-version.cluster.local.",
            TXT,
            NoError,
            &["dns-version.cluster.local. TXT 1.1.0"],
            &[],
            &[],
        ),
        c(
            "10-244-1-5.default.pod.cluster.local.",
            A,
            NoError,
            &["10-244-1-5.default.pod.cluster.local. A 10.244.1.5"],
            &[],
            &[],
        ),
        c(
            "10-244-1-6.default.pod.cluster.local.",
            A,
            NXDomain,
            &[],
            &[NEG_SOA],
            &[],
        ),
        c(
            "10-244-1-5.prod.pod.cluster.local.",
            A,
            NXDomain,
            &[],
            &[NEG_SOA],
            &[],
        ),
        // Negative answers: names that exist answer NODATA, others NXDOMAIN, each with the SOA
        c(
            "nope.default.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            &[NEG_SOA],
            &[],
        ),
        c(
            "default.svc.cluster.local.",
            A,
            NoError,
            &[],
            &[NEG_SOA],
            &[],
        ),
        c(
            "empty-ns.svc.cluster.local.",
            A,
            NoError,
            &[],
            &[NEG_SOA],
            &[],
        ),
        c(
            "no-such-ns.svc.cluster.local.",
            A,
            NXDomain,
            &[],
            &[NEG_SOA],
            &[],
        ),
        c("svc.cluster.local.", A, NoError, &[], &[NEG_SOA], &[]),
        c(
            "web.default.svc.cluster.local.",
            MX,
            NoError,
            &[],
            &[NEG_SOA],
            &[],
        ),
        c("cluster.local.", SOA, NoError, &[NEG_SOA], &[], &[]),
        c(
            "cluster.local.",
            NS,
            NoError,
            &["cluster.local. NS ns.dns.cluster.local."],
            &[],
            &[],
        ),
        c("cluster.local.", AXFR, Refused, &[], &[], &[]),
        // ServiceEntry hosts: declared and allocated addresses
        c(
            "api.example.com.",
            A,
            NoError,
            &["api.example.com. A 192.0.2.10"],
            &[],
            &[],
        ),
        c("api.example.com.", AAAA, NoError, &[], &[], &[]),
    ]
}

const COREFILE: &str = ".:53 {\n  errors\n  kubernetes cluster.local in-addr.arpa ip6.arpa {\n    pods verified\n  }\n  loadbalance\n}\n";

#[tokio::test]
async fn every_case_over_udp_and_tcp() {
    let (addr, _config) = server(COREFILE, true).await;
    for case in cases() {
        for tcp in [false, true] {
            let q = query(case.qname, case.qtype, true);
            let r = if tcp {
                ask_tcp(addr, &q).await
            } else {
                ask_udp(addr, &q).await
            };
            let what = format!(
                "{} {} over {}",
                case.qname,
                case.qtype,
                if tcp { "tcp" } else { "udp" }
            );
            assert_eq!(r.metadata.id, q.metadata.id, "{what}");
            assert_eq!(r.metadata.response_code, case.expect_rcode, "{what}: {r:?}");
            let mut want: Vec<String> = case.expect_answer.iter().map(|s| s.to_string()).collect();
            want.sort();
            assert_eq!(section(&r.answers), want, "{what}: answer");
            let mut want: Vec<String> = case
                .expect_authority
                .iter()
                .map(|s| s.to_string())
                .collect();
            want.sort();
            assert_eq!(section(&r.authorities), want, "{what}: authority");
            let mut want: Vec<String> = case
                .expect_additional
                .iter()
                .map(|s| s.to_string())
                .collect();
            want.sort();
            assert_eq!(section(&r.additionals), want, "{what}: additional");
            assert!(r.edns.is_some(), "{what}: EDNS answered with EDNS");
            if case.expect_rcode != ResponseCode::Refused {
                assert!(
                    r.metadata.authoritative || case.qname.ends_with("example.com."),
                    "{what}: aa"
                );
            }
        }
    }
}

#[tokio::test]
async fn allocated_service_entry_addresses_are_stable_class_e() {
    let (addr, _config) = server(COREFILE, true).await;
    let a = ask_udp(addr, &query("auto.example.org.", RecordType::A, false)).await;
    let b = ask_udp(addr, &query("auto.example.org.", RecordType::A, false)).await;
    let ips = section(&a.answers);
    assert_eq!(ips.len(), 1, "{a:?}");
    assert!(
        ips[0].starts_with("auto.example.org. A 240.240."),
        "{ips:?}"
    );
    assert_eq!(section(&b.answers), ips);
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_come_whole_over_tcp() {
    let (addr, _config) = server(COREFILE, true).await;
    let q = query("big.prod.svc.cluster.local.", RecordType::A, false);
    let udp = ask_udp(addr, &q).await;
    assert!(udp.metadata.truncation, "60 A records exceed 512 bytes");
    assert!(udp.answers.is_empty());
    let tcp = ask_tcp(addr, &q).await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 60, "only ready endpoints");
    let with_edns = ask_udp(
        addr,
        &query("big.prod.svc.cluster.local.", RecordType::A, true),
    )
    .await;
    assert!(
        !with_edns.metadata.truncation,
        "4096-byte EDNS buffer holds them"
    );
    assert_eq!(with_edns.answers.len(), 60);
}

#[tokio::test]
async fn servfail_until_synced_refused_outside_zones_formerr_for_garbage() {
    let corefile = "cluster.local:53 {\n  kubernetes cluster.local\n}\n";
    let (addr, config) = server(corefile, false).await;
    let r = ask_udp(
        addr,
        &query("web.default.svc.cluster.local.", RecordType::A, false),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    config.send_replace(snapshot(true));
    let mut ok = false;
    for _ in 0..50 {
        let r = ask_udp(
            addr,
            &query("web.default.svc.cluster.local.", RecordType::A, false),
        )
        .await;
        if r.metadata.response_code == ResponseCode::NoError {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "answers once the config is synced");
    let r = ask_udp(addr, &query("example.net.", RecordType::A, false)).await;
    assert_eq!(
        r.metadata.response_code,
        ResponseCode::Refused,
        "no server block for the zone"
    );

    // A header followed by garbage: FORMERR with the same id.
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut junk = vec![
        0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    junk.extend_from_slice(&[0xff; 9]);
    s.send_to(&junk, addr).await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(
        (r.metadata.id, r.metadata.response_code),
        (0x1234, ResponseCode::FormErr)
    );
    // Shorter than a header: dropped, and the server keeps serving.
    s.send_to(&[1, 2, 3], addr).await.unwrap();
    let r = ask_udp(
        addr,
        &query("web.default.svc.cluster.local.", RecordType::A, false),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    // Two questions: FORMERR. Class CH: REFUSED.
    let mut two = query("web.default.svc.cluster.local.", RecordType::A, false);
    two.add_query(Query::query(
        Name::from_ascii("db.prod.svc.cluster.local.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        ask_udp(addr, &two).await.metadata.response_code,
        ResponseCode::FormErr
    );
    let mut ch = query("version.bind.", RecordType::TXT, false);
    ch.queries[0].query_class = DNSClass::CH;
    assert_eq!(
        ask_udp(addr, &ch).await.metadata.response_code,
        ResponseCode::Refused
    );
}

/// Inputs the fuzzer found (fuzz/regressions/dns_query) and hand-made hostile packets: each
/// gets a parseable reply or is dropped, never a panic.
#[test]
fn hostile_packets_and_fuzz_regressions() {
    let blocks = fuzzing::fixture();
    let mut inputs: Vec<Vec<u8>> = vec![
        vec![],
        vec![0; 11],
        vec![0; 12],
        // A compression pointer to itself.
        vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1],
        // A label longer than the packet.
        vec![0, 2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 63, b'a', 0, 1, 0, 1],
        // 65535 questions announced, none present.
        vec![0, 3, 1, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0],
        // A response (QR set): dropped.
        vec![0, 4, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0],
    ];
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/dns_query");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            inputs.push(std::fs::read(e.path()).unwrap());
        }
    }
    for input in &inputs {
        for tcp in [false, true] {
            fuzzing::query(&blocks, input, tcp);
        }
    }
    let qr = fuzzing::query(&blocks, &inputs[6], false);
    assert!(qr.is_none(), "responses are never answered");
    let formerr = fuzzing::query(&blocks, &inputs[3], false).expect("a FORMERR reply");
    assert_eq!(
        Message::from_vec(&formerr).unwrap().metadata.response_code,
        ResponseCode::FormErr
    );
}
