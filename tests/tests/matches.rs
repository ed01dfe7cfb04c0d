//! VirtualService match conditions beyond path and headers (queryParams, method, authority,
//! withoutHeaders, sourceLabels, sourceNamespace, port), through weft-proxy and through a stock
//! Envoy fed the same config by weftd: every request must land on the same route in both.

use weft_e2e::{Client, Quickstart};

const VS: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: hello, namespace: default }
spec:
  hosts: [hello]
  http:
  - match: [{ sourceLabels: { app: someone-else } }]
    directResponse: { status: 403, body: { string: "not for you" } }
  - match: [{ port: 9999 }]
    directResponse: { status: 500, body: { string: "wrong port" } }
  - match: [{ sourceNamespace: elsewhere, uri: { prefix: /ns } }, { sourceLabels: { app: client }, uri: { prefix: /mine } }]
    directResponse: { status: 200, body: { string: "for the client" } }
  - match: [{ method: { exact: POST }, uri: { prefix: /orders } }]
    directResponse: { status: 201, body: { string: "posted" } }
  - match: [{ queryParams: { version: { exact: v2 } } }, { queryParams: { track: { regex: "beta-[0-9]+" } } }]
    route: [{ destination: { host: hello, subset: v2 } }]
  - match: [{ authority: { prefix: "hello.default" } }]
    directResponse: { status: 200, body: { string: "long name" } }
  - match: [{ uri: { prefix: /stable }, withoutHeaders: { x-canary: { exact: "1" } } }]
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /stable } }]
    route: [{ destination: { host: hello, subset: v2 } }]
  - route: [{ destination: { host: hello, subset: v1 } }]
"#;

/// Method, host, path and an optional extra header.
type Request<'a> = (&'a str, &'a str, &'a str, Option<(&'a str, &'a str)>);

/// Each request's (description, status, backend or body).
fn scenario(q: &Quickstart) -> Vec<(String, u16, String)> {
    let mut c = Client::new(q.egress());
    let requests: [Request; 12] = [
        ("GET", "hello", "/", None),
        ("GET", "hello", "/mine/x", None),
        ("GET", "hello", "/ns/x", None),
        ("POST", "hello", "/orders", None),
        ("GET", "hello", "/orders", None),
        ("GET", "hello", "/x?version=v2", None),
        ("GET", "hello", "/x?a=1&track=beta-12", None),
        ("GET", "hello", "/x?track=beta-x", None),
        ("GET", "hello.default.svc.cluster.local", "/", None),
        ("GET", "hello", "/stable", None),
        ("GET", "hello", "/stable", Some(("x-canary", "1"))),
        ("GET", "hello", "/stable", Some(("x-canary", "0"))),
    ];
    requests
        .iter()
        .map(|(method, host, path, header)| {
            let headers: Vec<(&str, &str)> = header.iter().copied().collect();
            let r = c.request(method, host, path, &headers).expect("request");
            let what = r
                .header("x-echo-name")
                .map(str::to_string)
                .unwrap_or_else(|| r.body.clone());
            (format!("{method} {host}{path} {header:?}"), r.status, what)
        })
        .collect()
}

fn run(name: &str, net: u8, envoy: bool) -> Vec<(String, u16, String)> {
    let mut q = Quickstart::new(name, net);
    q.write_file("virtual-service.yaml", VS);
    q.start_weftd();
    q.start_hello();
    q.start_client(envoy);
    let seen = scenario(&q);
    eprintln!("{name}: {seen:#?}");
    q.assert_client_nacked_nothing();
    seen
}

#[test]
fn weft_proxy_and_envoy_agree_on_every_match_condition() {
    let weft = run("matches-weft", 52, false);
    let outcomes: Vec<(u16, &str)> = weft.iter().map(|(_, s, w)| (*s, w.as_str())).collect();
    assert_eq!(
        outcomes,
        [
            (200, "hello-v1"),
            (200, "for the client"),
            (200, "hello-v1"),
            (201, "posted"),
            (200, "hello-v1"),
            (200, "hello-v2"),
            (200, "hello-v2"),
            (200, "hello-v1"),
            (200, "long name"),
            (200, "hello-v2"),
            (200, "hello-v2"),
            (200, "hello-v1"),
        ],
        "withoutHeaders needs the header present with another value (Envoy's invert_match)"
    );
    let envoy = run("matches-envoy", 53, true);
    assert_eq!(weft, envoy, "weft-proxy and Envoy differ");
}
