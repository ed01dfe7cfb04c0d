//! VirtualService delegation: a root VirtualService hands `/reviews` to a host-less delegate,
//! whose routes apply under the root's match; through weft-proxy and through a stock Envoy fed
//! the same config by weftd.

use weft_e2e::{Client, Quickstart};

const CONFIG: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: hello, namespace: default }
spec:
  hosts: [hello]
  http:
  - match: [{ uri: { prefix: /reviews } }]
    timeout: 5s
    delegate: { name: hello-reviews }
  - directResponse: { status: 200, body: { string: root } }
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: hello-reviews, namespace: default }
spec:
  http:
  - match: [{ headers: { end-user: { exact: jason } } }]
    route: [{ destination: { host: hello, subset: v2 } }]
  - match: [{ uri: { prefix: /reviews/v2 } }]
    route: [{ destination: { host: hello, subset: v2 } }]
  - match: [{ uri: { prefix: /elsewhere } }]
    directResponse: { status: 500, body: { string: "outside the root's match" } }
  - route: [{ destination: { host: hello, subset: v1 } }]
"#;

fn scenario(q: &Quickstart) -> Vec<(u16, String)> {
    let mut c = Client::new(q.egress());
    [
        ("/reviews/1", Some("jason")),
        ("/reviews/1", None),
        ("/reviews/v2/x", None),
        ("/elsewhere", None),
        ("/other", None),
    ]
    .iter()
    .map(|(path, user)| {
        let headers: Vec<(&str, &str)> = user.map(|u| vec![("end-user", u)]).unwrap_or_default();
        let r = c.request("GET", "hello", path, &headers).expect("request");
        (
            r.status,
            r.header("x-echo-name")
                .map(str::to_string)
                .unwrap_or(r.body),
        )
    })
    .collect()
}

fn run(name: &str, net: u8, envoy: bool) -> Vec<(u16, String)> {
    let mut q = Quickstart::new(name, net);
    q.write_file("virtual-service.yaml", CONFIG);
    q.start_weftd();
    q.start_hello();
    q.start_client(envoy);
    let seen = scenario(&q);
    q.assert_client_nacked_nothing();
    seen
}

#[test]
fn weft_proxy_and_envoy_follow_delegates_alike() {
    let weft = run("delegate-weft", 60, false);
    let want: Vec<(u16, String)> = [
        (200, "hello-v2"),
        (200, "hello-v1"),
        (200, "hello-v2"),
        (200, "root"),
        (200, "root"),
    ]
    .iter()
    .map(|(s, w)| (*s, w.to_string()))
    .collect();
    assert_eq!(weft, want);
    let envoy = run("delegate-envoy", 61, true);
    assert_eq!(weft, envoy, "weft-proxy and Envoy differ");
}
