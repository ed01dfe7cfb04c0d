//! The connection manager's forwarding headers, differentially: one bootstrap with static
//! resources, run by Envoy and by weft-proxy, with listeners for each `forward_client_cert_details`
//! mode (over TLS, with and without a client certificate, and in plaintext), for
//! `use_remote_address` with and without trusted hops, for internal addresses, and an RBAC
//! filter on `remote_ip`. Clients send spoofed `x-forwarded-client-cert`, `x-forwarded-for`,
//! `x-forwarded-proto`, `x-envoy-internal`, `x-envoy-*` controls and their own `x-request-id`;
//! what the backend sees of them, the statuses and the logged remote addresses must be the same.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use weft_e2e::standalone::{Flavor, Standalone};
use weft_e2e::{openssl_ca, openssl_issue, wait_until};

/// The headers compared, as the backend saw them.
const SEEN: [&str; 11] = [
    "x-forwarded-client-cert",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-envoy-internal",
    "x-envoy-retry-on",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-ip-tags",
    "x-envoy-decorator-operation",
    "x-envoy-external-address",
    "x-envoy-downstream-service-node",
    "x-request-id",
];

const BASE: u16 = 18400;

/// (listener name, port offset, TLS, HCM fields at 10 spaces, extra HTTP filters at 10 spaces)
fn listeners() -> Vec<(&'static str, u16, bool, &'static str, &'static str)> {
    vec![
        ("sanitize", 0, true, "", ""),
        (
            "forward-only",
            1,
            true,
            "          forward_client_cert_details: FORWARD_ONLY\n",
            "",
        ),
        (
            // Istio's sidecar inbound.
            "append-forward",
            2,
            true,
            "          forward_client_cert_details: APPEND_FORWARD\n          set_current_client_cert_details: { subject: true, uri: true, dns: true }\n",
            "",
        ),
        (
            "sanitize-set",
            3,
            true,
            "          forward_client_cert_details: SANITIZE_SET\n          set_current_client_cert_details: { subject: true, cert: true, chain: true, uri: true, dns: true }\n",
            "",
        ),
        (
            "always-forward-only",
            4,
            true,
            "          forward_client_cert_details: ALWAYS_FORWARD_ONLY\n",
            "",
        ),
        (
            "append-forward-plaintext",
            5,
            false,
            "          forward_client_cert_details: APPEND_FORWARD\n          set_current_client_cert_details: { uri: true }\n",
            "",
        ),
        (
            "internal-ranges",
            6,
            false,
            "          internal_address_config: { cidr_ranges: [{ address_prefix: 10.0.0.0, prefix_len: 8 }] }\n",
            "",
        ),
        (
            // An Istio gateway.
            "edge",
            7,
            false,
            "          use_remote_address: true\n",
            "",
        ),
        (
            "edge-trusted-hop",
            8,
            false,
            "          use_remote_address: true\n          xff_num_trusted_hops: 1\n          skip_xff_append: true\n          preserve_external_request_id: true\n          internal_address_config: { cidr_ranges: [{ address_prefix: 10.0.0.0, prefix_len: 8 }] }\n",
            "",
        ),
        (
            "remote-ip-rbac",
            9,
            false,
            "",
            r#"          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  xff-10:
                    permissions: [{ any: true }]
                    principals: [{ remote_ip: { address_prefix: 10.0.0.0, prefix_len: 8 } }]
"#,
        ),
    ]
}

fn resources(ip: &str, backend: std::net::SocketAddr, certs: &Path, logs: &Path) -> String {
    let d = certs.display();
    let mut out = String::from("  listeners:\n");
    for (name, offset, tls, hcm, filters) in listeners() {
        let port = BASE + offset;
        let socket = if tls {
            format!(
                r#"      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: false
          common_tls_context:
            tls_certificates: [{{ certificate_chain: {{ filename: {d}/server.pem }}, private_key: {{ filename: {d}/server.key }} }}]
            validation_context: {{ trusted_ca: {{ filename: {d}/ca.pem }} }}
"#
            )
        } else {
            String::new()
        };
        let log = Standalone::access_log(
            &logs.join(format!("access-{name}.log")),
            "%REQ(X-CASE)% %DOWNSTREAM_REMOTE_ADDRESS% %RESPONSE_CODE%",
        );
        let hcm = format!(
            "{hcm}{log}          route_config:\n            virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n              routes: [{{ match: {{ prefix: / }}, route: {{ cluster: echo }} }}]\n"
        );
        out.push_str(&Standalone::hcm_listener(
            name, ip, port, &hcm, filters, &socket,
        ));
    }
    out.push_str(&format!(
        "  clusters:\n  - name: echo\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment: {}\n",
        Standalone::load_assignment("echo", &[backend])
    ));
    out
}

/// A CA, the proxy's certificate and a client's (a subject with characters RFC 2253 escapes, a
/// URI and two DNS names), in `dir`.
fn certificates(dir: &Path) {
    openssl_ca(dir, "/CN=forwarding test CA");
    openssl_issue(
        dir,
        "server.key",
        "server.pem",
        "/CN=proxy",
        "subjectAltName=URI:spiffe://cluster.local/ns/default/sa/proxy,DNS:proxy.example",
    );
    openssl_issue(
        dir,
        "client.key",
        "client.pem",
        "/C=US/O=Acme, Inc./CN=client\\+one",
        "subjectAltName=URI:spiffe://cluster.local/ns/default/sa/client,DNS:client.example,DNS:alt.example",
    );
}

/// One request through `curl` (TLS with or without the client certificate, or plaintext):
/// the status and the compared headers the backend saw.
fn request(
    s: &Standalone,
    certs: &Path,
    port: u16,
    scheme: &str,
    with_cert: bool,
    case: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<String>) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-k", "--http1.1", "-w", "\n%{http_code}"])
        .args([
            "-H",
            "accept: application/json",
            "-H",
            &format!("x-case: {case}"),
        ]);
    if with_cert {
        cmd.args(["--cert", &certs.join("client.pem").display().to_string()])
            .args(["--key", &certs.join("client.key").display().to_string()]);
    }
    for (k, v) in headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    cmd.arg(format!("{scheme}://{}:{port}/{case}", s.ip()));
    let out = cmd.output().expect("curl (apt install curl)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let status: u16 = status.trim().parse().unwrap_or(0);
    let seen = serde_json::from_str::<serde_json::Value>(body.trim())
        .ok()
        .map(|v| {
            SEEN.iter()
                .map(|h| {
                    let value = v["headers"][h].as_str().unwrap_or("-");
                    // A generated id differs run to run: only whether the client's was kept.
                    if *h == "x-request-id" && value != "client-id" && value != "-" {
                        format!("{h}: <generated>")
                    } else {
                        format!("{h}: {value}")
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    (status, seen)
}

/// A request's name, whether it shows the client certificate, and its headers.
type Variant = (&'static str, bool, Vec<(&'static str, &'static str)>);

struct Run {
    cases: Vec<(String, u16, Vec<String>)>,
    remote_addresses: Vec<String>,
}

fn run(flavor: Flavor, net: u8, certs: &Path) -> Run {
    let mut s = Standalone::new("forwarding", net, flavor);
    let backend = s.backend("echo");
    let dir = s.dir.clone();
    s.start(&resources(&s.ip(), backend, certs, &dir));
    let spoofed: [(&str, &str); 9] = [
        (
            "x-forwarded-client-cert",
            "By=spiffe://evil;URI=spiffe://evil",
        ),
        ("x-forwarded-proto", "https"),
        ("x-envoy-internal", "true"),
        ("x-envoy-retry-on", "5xx"),
        ("x-envoy-upstream-rq-timeout-ms", "5000"),
        ("x-envoy-ip-tags", "spoofed-tag"),
        ("x-envoy-decorator-operation", "spoofed-op"),
        ("x-envoy-external-address", "6.6.6.6"),
        ("x-request-id", "client-id"),
    ];
    let with_xff = |xff: &'static str| {
        let mut h = spoofed.to_vec();
        h.push(("x-forwarded-for", xff));
        h
    };
    let mut cases = Vec::new();
    for (name, offset, tls, _, _) in listeners() {
        let port = BASE + offset;
        let variants: Vec<Variant> = if tls {
            vec![
                ("mtls", true, spoofed.to_vec()),
                ("tls-no-cert", false, spoofed.to_vec()),
            ]
        } else {
            vec![
                ("no-xff", false, spoofed.to_vec()),
                ("xff-internal", false, with_xff("10.1.2.3")),
                ("xff-external", false, with_xff("203.0.113.5")),
                ("xff-two", false, with_xff("203.0.113.5, 10.1.2.3")),
                ("xff-garbage", false, with_xff("not-an-address")),
                // The client's own address: still taken from the header (port 0 in the log).
                ("xff-peer", false, with_xff("127.0.0.1")),
            ]
        };
        for (variant, cert, headers) in variants {
            let case = format!("{name}.{variant}");
            let scheme = if tls { "https" } else { "http" };
            let (status, seen) = request(&s, certs, port, scheme, cert, &case, &headers);
            assert_ne!(
                status,
                0,
                "{}: {case}: no answer\n{}",
                flavor.name(),
                s.logs()
            );
            cases.push((case, status, seen));
        }
    }
    // The remote address each listener logged (Envoy writes its logs every second).
    let remote_addresses = wait_until(Duration::from_secs(10), || {
        let mut lines = Vec::new();
        for (name, ..) in listeners() {
            let text = std::fs::read_to_string(s.dir.join(format!("access-{name}.log"))).ok()?;
            lines.extend(text.lines().map(|l| {
                // The connection's port differs from run to run; an address from
                // `x-forwarded-for` is logged with port 0.
                let mut f: Vec<String> = l.split(' ').map(str::to_string).collect();
                if let Some(addr) = f.get_mut(1)
                    && !addr.ends_with(":0")
                    && let Some((ip, _)) = addr.rsplit_once(':')
                {
                    *addr = format!("{ip}:<port>");
                }
                f.join(" ")
            }));
        }
        (lines.len() >= cases.len()).then_some(lines)
    })
    .unwrap_or_else(|| panic!("{}: access log lines\n{}", flavor.name(), s.logs()));
    Run {
        cases,
        remote_addresses,
    }
}

#[test]
fn forwarding_headers_client_certificates_and_remote_addresses_match_envoy() {
    let certs =
        std::env::temp_dir().join(format!("weft-e2e-forwarding-certs-{}", std::process::id()));
    certificates(&certs);
    let weft = run(Flavor::Weft, 98, &certs);
    let envoy = run(Flavor::Envoy, 99, &certs);
    let mut differ = Vec::new();
    for ((case, ws, wseen), (_, es, eseen)) in weft.cases.iter().zip(&envoy.cases) {
        println!("{case}: weft {ws} / envoy {es}");
        if wseen == eseen {
            continue;
        }
        for (w, e) in wseen.iter().zip(eseen) {
            let mark = if w == e { " " } else { "!" };
            println!("  {mark} weft  {w}");
            if w != e {
                println!("  {mark} envoy {e}");
            }
        }
        if ws != es || wseen != eseen {
            differ.push(case.clone());
        }
    }
    let mut wl = weft.remote_addresses.clone();
    let mut el = envoy.remote_addresses.clone();
    wl.sort();
    el.sort();
    for (w, e) in wl.iter().zip(&el) {
        println!("log: weft {w:<50} envoy {e}");
    }
    assert!(
        differ.is_empty(),
        "weft-proxy and Envoy differ on {differ:?}"
    );
    assert_eq!(wl, el, "logged remote addresses");
    // What the comparison rests on, spelled out for the cases that matter most.
    let seen = |case: &str, header: &str| {
        let (_, _, s) = weft.cases.iter().find(|(c, ..)| c == case).expect("case");
        s.iter()
            .find_map(|l| l.strip_prefix(&format!("{header}: ")))
            .unwrap_or_default()
            .to_string()
    };
    // Spoofed client certificate details never pass a sanitizing or plaintext hop.
    for case in [
        "sanitize.mtls",
        "append-forward.tls-no-cert",
        "append-forward-plaintext.no-xff",
    ] {
        assert_eq!(seen(case, "x-forwarded-client-cert"), "-", "{case}");
    }
    let appended = seen("append-forward.mtls", "x-forwarded-client-cert");
    assert!(
        appended.starts_with(
            "By=spiffe://evil;URI=spiffe://evil,By=spiffe://cluster.local/ns/default/sa/proxy;Hash="
        ),
        "{appended}"
    );
    assert!(
        appended.ends_with(
            ";URI=spiffe://cluster.local/ns/default/sa/client;DNS=client.example;DNS=alt.example"
        ),
        "{appended}"
    );
    // A client's control headers survive only as an internal request, and the router's own
    // never.
    assert_eq!(
        seen("internal-ranges.xff-internal", "x-envoy-ip-tags"),
        "spoofed-tag"
    );
    assert_eq!(seen("internal-ranges.xff-external", "x-envoy-ip-tags"), "-");
    assert_eq!(
        seen("internal-ranges.xff-internal", "x-envoy-retry-on"),
        "-"
    );
    let _ = std::fs::remove_dir_all(&certs);
}
