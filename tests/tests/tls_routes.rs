//! VirtualService `tls` routes: the client sidecar's TLS egress port passes TLS through
//! unterminated and picks the destination by the ClientHello's SNI. Two TLS servers (openssl
//! s_server, each with its own certificate) behind ServiceEntries; a VirtualService for
//! api.example.com sends its SNI names (and `*.api.example.com`) to the other server; a name no
//! route lists is not served. An ingress gateway with a PASSTHROUGH server does the same for a
//! VirtualService bound to it. Through weft-proxy and through Envoy fed the same xDS.

use std::process::Command;
use std::time::Duration;

use weft_e2e::{Proc, Quickstart, wait_until};

const TLS_PORT: u16 = 9443;
const GATEWAY_PORT: u16 = 18443;
const GATEWAY_HOST: u8 = 30;

fn self_signed(dir: &std::path::Path, host: &str) {
    weft_e2e::openssl_self_signed(
        dir,
        &format!("{host}.key"),
        &format!("{host}.pem"),
        &format!("/CN={host}"),
        &["-addext", &format!("subjectAltName=DNS:{host}")],
    );
}

fn config(q: &Quickstart) -> String {
    let client = q.ip(10);
    let gw = q.ip(GATEWAY_HOST);
    let mut y = String::new();
    for (host, ip) in [("api.example.com", q.ip(40)), ("web.example.com", q.ip(41))] {
        y.push_str(&format!(
            r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: {name}, namespace: default }}
spec:
  hosts: [{host}]
  location: MESH_EXTERNAL
  ports: [{{ number: {TLS_PORT}, name: tls, protocol: TLS }}]
  resolution: STATIC
  endpoints: [{{ address: {ip} }}]
---
"#,
            name = host.split('.').next().unwrap_or(host)
        ));
    }
    y.push_str(&format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: api, namespace: default }}
spec:
  hosts: [api.example.com, "*.api.example.com"]
  tls:
  - match: [{{ sniHosts: [api.example.com, "*.api.example.com"], port: {TLS_PORT} }}]
    route: [{{ destination: {{ host: web.example.com }} }}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{ name: ingress, namespace: default }}
spec: {{ address: {gw}, labels: {{ istio: ingressgateway }} }}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: passthrough, namespace: default }}
spec:
  selector: {{ istio: ingressgateway }}
  servers:
  - port: {{ number: {GATEWAY_PORT}, name: tls, protocol: TLS }}
    hosts: ["*.example.com"]
    tls: {{ mode: PASSTHROUGH }}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: ingress, namespace: default }}
spec:
  hosts: [api.example.com]
  gateways: [passthrough]
  tls:
  - match: [{{ sniHosts: [api.example.com] }}]
    route: [{{ destination: {{ host: web.example.com, port: {{ number: {TLS_PORT} }} }} }}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: client, namespace: default }}
spec:
  workloadSelector: {{ labels: {{ app: client }} }}
  egress:
  - port: {{ number: 8080, protocol: HTTP, name: egress-http }}
    bind: {client}
    captureMode: NONE
    hosts: ["./*"]
  - port: {{ number: {TLS_PORT}, protocol: TLS, name: egress-tls }}
    bind: {client}
    captureMode: NONE
    hosts: ["./*"]
"#
    ));
    y
}

/// The certificate subject a TLS client gets through the client sidecar for `sni`, or None.
fn subject_through(q: &Quickstart, sni: &str) -> Option<String> {
    subject_at(q, 10, TLS_PORT, sni)
}

/// The certificate subject a TLS client gets from `host:port` of the test net for `sni`.
fn subject_at(q: &Quickstart, host: u8, port: u16, sni: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-skv", "--max-time", "3", "-o", "/dev/null", "--resolve"])
        .arg(format!("{sni}:{port}:{}", q.ip(host)))
        .arg(format!("https://{sni}:{port}/"))
        .output()
        .ok()?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    err.lines()
        .find(|l| l.contains("subject:"))
        .map(|l| l.trim().to_string())
}

fn run(name: &str, net: u8, envoy: bool) -> Vec<(String, Option<String>)> {
    let mut q = Quickstart::new(name, net);
    q.write_file("tls-routes.yaml", &config(&q));
    let certs = q.log_dir.with_file_name("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::create_dir_all(&q.log_dir).unwrap();
    let mut servers: Vec<Proc> = Vec::new();
    for (host, ip) in [("api.example.com", q.ip(40)), ("web.example.com", q.ip(41))] {
        self_signed(&certs, host);
        servers.push(Proc::start(
            &format!("s_server-{host}"),
            std::path::Path::new("openssl"),
            &[
                "s_server",
                "-accept",
                &format!("{ip}:{TLS_PORT}"),
                "-cert",
                &certs.join(format!("{host}.pem")).display().to_string(),
                "-key",
                &certs.join(format!("{host}.key")).display().to_string(),
                "-www",
                "-quiet",
            ],
            &q.log_dir,
        ));
    }
    q.start_weftd();
    q.start_client(envoy);
    let cases = [
        "api.example.com",
        "web.example.com",
        "v2.api.example.com",
        "unknown.example.com",
    ];
    wait_until(Duration::from_secs(10), || {
        subject_through(&q, "web.example.com")
    })
    .unwrap_or_else(|| panic!("{name}: TLS passes through the client sidecar"));
    let mut seen: Vec<_> = cases
        .iter()
        .map(|sni| (sni.to_string(), subject_through(&q, sni)))
        .collect();
    q.assert_client_nacked_nothing();
    // The ingress gateway: PASSTHROUGH, api.example.com's SNI routed to the web server.
    let node = format!(
        "router~{}~ingress.default~default.svc.cluster.local",
        q.ip(GATEWAY_HOST)
    );
    if envoy {
        q.start_envoy_as(GATEWAY_HOST, "ingress", &node, "{ istio: ingressgateway }");
    } else {
        q.start_weft_proxy_as(GATEWAY_HOST, "ingress", &node);
    }
    let via_gateway = wait_until(Duration::from_secs(10), || {
        subject_at(&q, GATEWAY_HOST, GATEWAY_PORT, "api.example.com")
    });
    seen.push(("gateway api.example.com".into(), via_gateway));
    seen.push((
        "gateway web.example.com".into(),
        subject_at(&q, GATEWAY_HOST, GATEWAY_PORT, "web.example.com"),
    ));
    drop(servers);
    seen
}

#[test]
fn tls_routes_pass_tls_through_by_sni_on_weft_proxy_and_envoy() {
    let weft = run("tls-routes-weft", 77, false);
    let cn = |s: &Option<String>| {
        s.as_deref()
            .map(|s| s.rsplit("CN=").next().unwrap_or("").to_string())
    };
    assert_eq!(
        cn(&weft[0].1).as_deref(),
        Some("web.example.com"),
        "the VirtualService: {weft:?}"
    );
    assert_eq!(
        cn(&weft[1].1).as_deref(),
        Some("web.example.com"),
        "{weft:?}"
    );
    assert_eq!(
        cn(&weft[2].1).as_deref(),
        Some("web.example.com"),
        "a wildcard SNI: {weft:?}"
    );
    assert_eq!(
        weft[3].1, None,
        "a name no route lists is not served: {weft:?}"
    );
    assert_eq!(
        cn(&weft[4].1).as_deref(),
        Some("web.example.com"),
        "the gateway: {weft:?}"
    );
    assert_eq!(
        weft[5].1, None,
        "the gateway serves only routed names: {weft:?}"
    );
    let envoy = run("tls-routes-envoy", 78, true);
    assert_eq!(weft, envoy, "weft-proxy and Envoy differ");
}
