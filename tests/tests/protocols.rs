//! Protocol paths through weft-proxy: the TCP proxy filter, h2c downstream, header-based routing,
//! several workers, and a proxy started from an Envoy-style bootstrap file.

use std::process::Command;

use weft_e2e::{Client, Quickstart};

#[test]
fn tcp_proxy_carries_bytes_end_to_end_and_balances() {
    let mut q = Quickstart::new("tcp", 31);
    q.start_weftd();
    q.start_hello();
    q.start_weft_client_from_bootstrap(2);
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let out = q.tcp_round_trip("/over-tcp");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("path: /over-tcp"), "{out}");
        // The HTTP request crossed two TCP proxies untouched: no header was added.
        assert!(!out.contains("x-request-id"), "{out}");
        let name = out
            .lines()
            .find_map(|l| l.strip_prefix("name: "))
            .unwrap()
            .to_string();
        names.insert(name);
    }
    assert_eq!(names.len(), 2, "round robin over both endpoints: {names:?}");
    let stats = weft_e2e::get(q.admin(10), "/stats").unwrap().body;
    assert!(
        stats.contains("tcp.outbound_127.31.0.10_7070.downstream_cx_total: 10"),
        "{stats}"
    );
}

#[test]
fn h2c_and_header_routing_through_a_bootstrapped_proxy_with_two_workers() {
    let mut q = Quickstart::new("h2c", 32);
    q.write_file(
        "virtual-service.yaml",
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: hello, namespace: default }
spec:
  hosts: [hello]
  http:
  - match: [{ headers: { end-user: { exact: jason } } }]
    route: [{ destination: { host: hello, subset: v2 } }]
  - match: [{ uri: { regex: "/api/v[0-9]+/.*" } }]
    route: [{ destination: { host: hello, subset: v2 } }]
  - route: [{ destination: { host: hello, subset: v1 } }]
"#,
    );
    q.start_weftd();
    q.start_hello();
    q.start_weft_client_from_bootstrap(2);

    let mut c = Client::new(q.egress());
    for _ in 0..20 {
        let jason = c
            .request("GET", "hello", "/", &[("end-user", "jason")])
            .unwrap();
        assert_eq!(jason.header("x-echo-name"), Some("hello-v2"));
        let mary = c
            .request("GET", "hello:8080", "/", &[("end-user", "mary")])
            .unwrap();
        assert_eq!(mary.header("x-echo-name"), Some("hello-v1"));
        assert_eq!(
            c.get("hello.default.svc.cluster.local", "/api/v2/x")
                .unwrap()
                .header("x-echo-name"),
            Some("hello-v2")
        );
        assert_eq!(
            c.get("hello", "/api/v2").unwrap().header("x-echo-name"),
            Some("hello-v1"),
            "safe_regex is a full match"
        );
    }
    let unknown = c.get("nobody", "/").unwrap();
    assert_eq!(unknown.status, 404, "no virtual host: Envoy's NR");
    assert_eq!(unknown.header("x-weft-response-flags"), Some("NR"));

    // h2c with prior knowledge downstream; the upstream cluster speaks HTTP/1.1.
    let url = format!("http://{}/h2", q.egress());
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-H",
            "host: hello",
            "-H",
            "end-user: jason",
            "-w",
            "\nproto=%{http_version} status=%{http_code}\n",
            &url,
        ])
        .output()
        .expect("curl is installed by scripts/test.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("proto=2 status=200"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("name: hello-v2") && text.contains("version: HTTP/1.1"),
        "{text}"
    );

    // Many large answers at once on one HTTP/2 connection (their body chunks are written from
    // the upstream's buffers, several streams' frames in one write): each arrives whole, in
    // order and on its own stream. Each answer ends in its own repeated pattern.
    let answers: Vec<(usize, String)> = (0..24)
        .map(|i| {
            let size = [2_048, 3_001, 10_240, 16_385, 70_000, 250_000][i % 6] + i;
            (
                size,
                format!("s{i}-{}", "0123456789abc".get(..i % 13 + 1).unwrap()),
            )
        })
        .collect();
    let paths: Vec<String> = answers
        .iter()
        .map(|(size, fill)| format!("/big?bytes={size}&fill={fill}"))
        .collect();
    let bodies = h2c_answers(q.egress(), "hello", &paths);
    for (i, ((size, fill), body)) in answers.iter().zip(&bodies).enumerate() {
        let want: Vec<u8> = fill.bytes().cycle().take(*size).collect();
        assert!(
            body.len() > *size && body.ends_with(&want) && body.starts_with(b"name: hello-v"),
            "answer {i} ({size} bytes of {fill:?}): {} bytes arrived",
            body.len()
        );
    }
}

/// GETs every path at once over one h2c connection (prior knowledge) to `addr`; the bodies, in
/// the order of `paths`.
fn h2c_answers(addr: std::net::SocketAddr, host: &str, paths: &[String]) -> Vec<bytes::Bytes> {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let streams: Vec<_> = paths
            .iter()
            .map(|path| {
                let req = hyper::Request::get(format!("http://{host}{path}"))
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let mut send = send.clone();
                tokio::spawn(async move {
                    let resp = send.send_request(req).await.unwrap();
                    assert_eq!(resp.version(), hyper::Version::HTTP_2);
                    resp.into_body().collect().await.unwrap().to_bytes()
                })
            })
            .collect();
        let mut bodies = Vec::new();
        for stream in streams {
            bodies.push(stream.await.unwrap());
        }
        bodies
    })
}
