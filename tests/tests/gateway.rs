//! An ingress gateway (a `router~` proxy selected by a Gateway's selector), through weft-proxy
//! and through a stock Envoy fed the same config by weftd: VirtualServices bound to the Gateway
//! route by path and host, unbound hosts get 404. Then an HTTPS server with certificate files:
//! both terminate TLS with the certificate files, two HTTPS servers share a port (the SNI picks
//! the certificate), checked with curl and with a client sidecar of the same kind originating
//! TLS to the gateway per a DestinationRule `tls: SIMPLE`. Last, a TCP server and a TLS server
//! that terminates TLS, both sending their bytes where a VirtualService `tcp` route says.

use std::process::Command;
use std::time::Duration;

use weft_e2e::{Client, Quickstart, wait_until};

const GATEWAY_IP_HOST: u8 = 30;
const HTTP_PORT: u16 = 18080;
const HTTPS_PORT: u16 = 18443;
const TCP_PORT: u16 = 18090;
const TLS_PORT: u16 = 18091;

fn tcp_config(dir: &std::path::Path) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: tcp-gateway, namespace: default }}
spec:
  selector: {{ istio: ingressgateway }}
  servers:
  - port: {{ number: {TCP_PORT}, name: tcp, protocol: TCP }}
    hosts: ["*"]
  - port: {{ number: {TLS_PORT}, name: tls, protocol: TLS }}
    hosts: [secure.example.com]
    tls: {{ mode: SIMPLE, serverCertificate: {d}/cert.pem, privateKey: {d}/key.pem }}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: hello-tcp-ingress, namespace: default }}
spec:
  hosts: ["*"]
  gateways: [tcp-gateway]
  tcp:
  - match: [{{ port: {TCP_PORT} }}]
    route: [{{ destination: {{ host: hello-tcp, port: {{ number: 7070 }} }} }}]
  - match: [{{ port: {TLS_PORT} }}]
    route: [{{ destination: {{ host: hello-tcp, port: {{ number: 7070 }} }} }}]
"#,
        d = dir.display()
    )
}

/// An HTTP/1.1 request written raw into the gateway's TCP server; what came back before the
/// backend closed.
fn raw_tcp(q: &Quickstart) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((q.ip(GATEWAY_IP_HOST).as_str(), TCP_PORT)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET /raw HTTP/1.1\r\nhost: raw\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.contains("x-echo-name").then_some(out)
}

fn http_config(q: &Quickstart) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{ name: ingress, namespace: default }}
spec: {{ address: {ip}, labels: {{ istio: ingressgateway }} }}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: hello-gateway, namespace: default }}
spec:
  selector: {{ istio: ingressgateway }}
  servers:
  - port: {{ number: {HTTP_PORT}, name: http, protocol: HTTP }}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: hello-ingress, namespace: default }}
spec:
  hosts: ["*"]
  gateways: [hello-gateway]
  http:
  - match: [{{ uri: {{ prefix: /hello }} }}]
    rewrite: {{ uri: / }}
    route: [{{ destination: {{ host: hello, subset: v2 }} }}]
  - match: [{{ uri: {{ prefix: /v1 }} }}]
    route: [{{ destination: {{ host: hello, subset: v1, port: {{ number: 8080 }} }} }}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: shop, namespace: default }}
spec:
  hosts: [shop.example.com]
  gateways: [default/hello-gateway]
  http:
  - directResponse: {{ status: 200, body: {{ string: shop }} }}
"#,
        ip = q.ip(GATEWAY_IP_HOST)
    )
}

fn https_config(dir: &std::path::Path) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{ name: secure, namespace: default }}
spec:
  selector: {{ istio: ingressgateway }}
  servers:
  - port: {{ number: {HTTPS_PORT}, name: https, protocol: HTTPS }}
    hosts: [secure.example.com]
    tls: {{ mode: SIMPLE, serverCertificate: {d}/cert.pem, privateKey: {d}/key.pem, minProtocolVersion: TLSV1_2 }}
  - port: {{ number: {HTTPS_PORT}, name: https-other, protocol: HTTPS }}
    hosts: [other.example.com]
    tls: {{ mode: SIMPLE, serverCertificate: {d}/other-cert.pem, privateKey: {d}/other-key.pem }}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: other, namespace: default }}
spec:
  hosts: [other.example.com]
  gateways: [secure]
  http:
  - directResponse: {{ status: 200, body: {{ string: other }} }}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: secure, namespace: default }}
spec:
  hosts: [secure.example.com]
  gateways: [secure]
  http:
  - route: [{{ destination: {{ host: hello, subset: v1 }} }}]
"#,
        d = dir.display()
    )
}

fn gateway_node(q: &Quickstart) -> String {
    format!(
        "router~{}~ingress.default~default.svc.cluster.local",
        q.ip(GATEWAY_IP_HOST)
    )
}

fn http_scenario(q: &Quickstart) -> Vec<(String, u16, String)> {
    let addr = format!("{}:{HTTP_PORT}", q.ip(GATEWAY_IP_HOST))
        .parse()
        .expect("addr");
    let mut c = Client::new(addr);
    [
        ("anything.example", "/hello"),
        ("anything.example", "/v1/x"),
        ("shop.example.com", "/"),
        ("anything.example", "/nowhere"),
    ]
    .iter()
    .map(|(host, path)| {
        let r = c.get(host, path).expect("request through the gateway");
        let who = r
            .header("x-echo-name")
            .map(str::to_string)
            .unwrap_or(r.body.clone());
        (format!("{host}{path}"), r.status, who)
    })
    .collect()
}

/// A self-signed certificate for `host` in `dir`: `<prefix>cert.pem` and `<prefix>key.pem`.
fn self_signed(dir: &std::path::Path, host: &str, prefix: &str) {
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", &format!("/CN={host}")])
        .args(["-addext", &format!("subjectAltName=DNS:{host}")])
        .arg("-keyout")
        .arg(dir.join(format!("{prefix}key.pem")))
        .arg("-out")
        .arg(dir.join(format!("{prefix}cert.pem")))
        .output()
        .expect("openssl runs");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

/// An HTTPS request to `host` on the gateway, verified against `ca`: the headers, and the
/// body after them.
fn curl_https(q: &Quickstart, host: &str, ca: &std::path::Path) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "3", "-D", "-"])
        .arg("--resolve")
        .arg(format!("{host}:{HTTPS_PORT}:{}", q.ip(GATEWAY_IP_HOST)))
        .arg("--cacert")
        .arg(ca)
        .arg(format!("https://{host}:{HTTPS_PORT}/"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_lowercase())
}

fn run(name: &str, net: u8, envoy: bool) -> Vec<(String, u16, String)> {
    let mut q = Quickstart::new(name, net);
    q.write_file("gateway.yaml", &http_config(&q));
    q.start_weftd();
    q.start_hello();
    let node = gateway_node(&q);
    if envoy {
        q.start_envoy_as(
            GATEWAY_IP_HOST,
            "ingress",
            &node,
            "{ istio: ingressgateway }",
        );
    } else {
        q.start_weft_proxy_as(GATEWAY_IP_HOST, "ingress", &node);
    }
    let seen = http_scenario(&q);
    eprintln!("{name}: {seen:?}");

    let certs = q.dir.parent().expect("test root").join("certs");
    std::fs::create_dir_all(&certs).expect("cert dir");
    self_signed(&certs, "secure.example.com", "");
    self_signed(&certs, "other.example.com", "other-");
    q.write_file("secure.yaml", &https_config(&certs));
    let sync = |q: &Quickstart| q.sync_of(&node).unwrap_or_default();
    let headers = wait_until(Duration::from_secs(10), || {
        curl_https(&q, "secure.example.com", &certs.join("cert.pem"))
    })
    .unwrap_or_else(|| panic!("{name}: the HTTPS server answers with the certificate files"));
    // Two HTTPS servers on one port: the SNI picks the certificate and the routes.
    let other = curl_https(&q, "other.example.com", &certs.join("other-cert.pem"))
        .unwrap_or_else(|| panic!("{name}: other.example.com is served with its own certificate"));
    assert!(
        other.contains("200") && other.trim_end().ends_with("other"),
        "{other}"
    );
    assert!(
        curl_https(&q, "other.example.com", &certs.join("cert.pem")).is_none(),
        "{name}: other.example.com must not get secure.example.com's certificate"
    );
    assert!(
        headers.starts_with("http/2 200") || headers.starts_with("http/1.1 200"),
        "{headers}"
    );
    assert!(headers.contains("x-echo-name: hello-v1"), "{headers}");
    assert_eq!(
        http_scenario(&q),
        seen,
        "the HTTP listener keeps serving beside the HTTPS one"
    );
    let s = sync(&q);
    for (t, st) in s["types"].as_object().into_iter().flatten() {
        assert_eq!(
            st["nacks"], 0,
            "{name}: the gateway NACKed {t}: {}",
            st["last_nack"]
        );
    }
    {
        // TLS origination: a client sidecar of the same kind speaks plain HTTP to its egress
        // listener and TLS (DestinationRule tls SIMPLE, checked against the CA file, with SNI)
        // to the gateway under test.
        q.start_client(envoy);
        q.write_file(
            "origination.yaml",
            &format!(
                r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: secure-origin, namespace: default }}
spec:
  hosts: [secure.example.com]
  location: MESH_EXTERNAL
  ports: [{{ number: 8080, name: http, protocol: HTTP, targetPort: {HTTPS_PORT} }}]
  resolution: STATIC
  endpoints: [{{ address: {ip} }}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: secure-origin, namespace: default }}
spec:
  host: secure.example.com
  trafficPolicy:
    tls: {{ mode: SIMPLE, caCertificates: {ca}, sni: secure.example.com }}
"#,
                ip = q.ip(GATEWAY_IP_HOST),
                ca = certs.join("cert.pem").display()
            ),
        );
        let r = wait_until(Duration::from_secs(10), || {
            let r = Client::new(q.egress())
                .get("secure.example.com", "/")
                .ok()?;
            (r.status == 200).then_some(r)
        })
        .expect("the client sidecar originates TLS to the gateway");
        assert_eq!(r.header("x-echo-name"), Some("hello-v1"));
        q.assert_client_nacked_nothing();
    }
    {
        // A TCP server and a TLS server that terminates TLS, both routed by `tcp` routes to
        // the TCP service behind the hello sidecars.
        q.write_file("tcp-gateway.yaml", &tcp_config(&certs));
        let raw = wait_until(Duration::from_secs(10), || raw_tcp(&q))
            .unwrap_or_else(|| panic!("{name}: the gateway's TCP server reaches hello-tcp"));
        assert!(raw.contains("path: /raw"), "{raw}");
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "3", "--http1.1"])
            .arg("--resolve")
            .arg(format!(
                "secure.example.com:{TLS_PORT}:{}",
                q.ip(GATEWAY_IP_HOST)
            ))
            .arg("--cacert")
            .arg(certs.join("cert.pem"))
            .arg(format!("https://secure.example.com:{TLS_PORT}/through-tls"))
            .output()
            .expect("curl runs");
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && body.contains("path: /through-tls"),
            "{name}: the TLS server terminates TLS and passes the bytes on: {body} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = sync(&q);
        for (t, st) in s["types"].as_object().into_iter().flatten() {
            assert_eq!(st["nacks"], 0, "{name}: {t}: {}", st["last_nack"]);
        }
    }
    seen
}

#[test]
fn weft_proxy_and_envoy_serve_a_gateway_alike() {
    let weft = run("gateway-weft", 56, false);
    assert_eq!(
        weft.iter()
            .map(|(_, s, w)| (*s, w.as_str()))
            .collect::<Vec<_>>(),
        [
            (200, "hello-v2"),
            (200, "hello-v1"),
            (200, "shop"),
            (404, "")
        ]
    );
    let envoy = run("gateway-envoy", 57, true);
    assert_eq!(weft, envoy, "weft-proxy and Envoy differ");
}
