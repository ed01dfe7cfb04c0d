//! ServiceEntries as the client sidecar's destinations, through weft-proxy and through a stock
//! Envoy fed the same config by weftd: STATIC endpoints, DNS (STRICT_DNS, the proxy resolves
//! `localhost` itself) and DNS_ROUND_ROBIN (LOGICAL_DNS), plus a LEAST_REQUEST policy on one of
//! them. Both must accept every resource and send each host's traffic to the same backend, and,
//! once the client's Sidecar says REGISTRY_ONLY, answer hosts the mesh does not know with 502.

use weft_e2e::{Client, Quickstart};

fn entries(q: &Quickstart) -> String {
    let (v1, v2) = (q.echo_addr(0).port(), q.echo_addr(1).port());
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: legacy, namespace: default }}
spec:
  hosts: [legacy.internal]
  location: MESH_EXTERNAL
  ports: [{{ number: 8080, name: http, protocol: HTTP }}]
  resolution: STATIC
  endpoints: [{{ address: 127.0.0.1, ports: {{ http: {v1} }} }}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: legacy, namespace: default }}
spec:
  host: legacy.internal
  trafficPolicy: {{ loadBalancer: {{ simple: LEAST_REQUEST }} }}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: api, namespace: default }}
spec:
  hosts: [api.external.test]
  ports: [{{ number: 8080, name: http, protocol: HTTP }}]
  resolution: DNS
  endpoints: [{{ address: localhost, ports: {{ http: {v2} }} }}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: single, namespace: default }}
spec:
  hosts: [single.external.test]
  ports: [{{ number: 8080, name: http, protocol: HTTP }}]
  resolution: DNS_ROUND_ROBIN
  endpoints: [{{ address: localhost, ports: {{ http: {v1} }} }}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: api, namespace: default }}
spec:
  hosts: [api.external.test]
  http:
  - match: [{{ uri: {{ prefix: /legacy }} }}]
    route: [{{ destination: {{ host: legacy.internal }} }}]
  - route: [{{ destination: {{ host: api.external.test }} }}]
"#
    )
}

/// (host, path) -> (status, which backend answered), for each request in order.
fn scenario(q: &Quickstart) -> Vec<(String, u16, String)> {
    let mut c = Client::new(q.egress());
    let mut seen = Vec::new();
    for (host, path) in [
        ("legacy.internal", "/"),
        ("api.external.test", "/"),
        ("api.external.test:8080", "/"),
        ("api.external.test", "/legacy/x"),
        ("single.external.test", "/"),
        ("unknown.external.test", "/"),
    ] {
        for _ in 0..3 {
            let r = c.get(host, path).expect("request");
            seen.push((
                format!("{host}{path}"),
                r.status,
                r.header("x-echo-name").unwrap_or("-").to_string(),
            ));
        }
    }
    seen
}

fn run(name: &str, net: u8, envoy: bool) -> Vec<(String, u16, String)> {
    let mut q = Quickstart::new(name, net);
    q.write_file("service-entries.yaml", &entries(&q));
    q.start_weftd();
    q.start_hello();
    q.start_client(envoy);
    // Wait until the DNS clusters resolved and serve (Envoy warms them asynchronously).
    weft_e2e::wait_until(std::time::Duration::from_secs(10), || {
        let mut c = Client::new(q.egress());
        let ok = ["api.external.test", "single.external.test"]
            .iter()
            .all(|h| c.get(h, "/").is_ok_and(|r| r.status == 200));
        ok.then_some(())
    })
    .unwrap_or_else(|| panic!("{name}: DNS clusters never served"));
    let mut seen = scenario(&q);
    // REGISTRY_ONLY: the client's Sidecar now answers hosts the mesh does not know with 502.
    let client = q.ip(10);
    q.write_file(
        "zz-sidecar.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{ name: client, namespace: default }}\nspec:\n  workloadSelector: {{ labels: {{ app: client }} }}\n  outboundTrafficPolicy: {{ mode: REGISTRY_ONLY }}\n  egress:\n  - port: {{ number: 8080, protocol: HTTP, name: egress-http }}\n    bind: {client}\n    hosts: [\"./*\"]\n"
        ),
    );
    let blocked = weft_e2e::wait_until(std::time::Duration::from_secs(10), || {
        let r = Client::new(q.egress())
            .get("unknown.external.test", "/")
            .ok()?;
        (r.status == 502).then_some(r.status)
    });
    let known = Client::new(q.egress())
        .get("legacy.internal", "/")
        .map(|r| r.status)
        .ok();
    seen.push((
        "registry-only unknown".into(),
        blocked.unwrap_or(0),
        String::new(),
    ));
    seen.push((
        "registry-only known".into(),
        known.unwrap_or(0),
        String::new(),
    ));
    eprintln!("{name}: {seen:?}");
    q.assert_client_nacked_nothing();
    seen
}

#[test]
fn weft_proxy_and_envoy_route_service_entry_hosts_alike() {
    let weft = run("se-weft", 48, false);
    let expect = |host: &str, status: u16, who: &str| {
        let hits: Vec<_> = weft.iter().filter(|(h, _, _)| h == host).collect();
        assert_eq!(hits.len(), 3, "{host}");
        for (_, s, w) in hits {
            assert_eq!((*s, w.as_str()), (status, who), "{host}");
        }
    };
    expect("legacy.internal/", 200, "hello-v1");
    expect("api.external.test/", 200, "hello-v2");
    expect("api.external.test:8080/", 200, "hello-v2");
    expect("api.external.test/legacy/x", 200, "hello-v1");
    expect("single.external.test/", 200, "hello-v1");
    expect("unknown.external.test/", 404, "-");
    assert!(weft.contains(&("registry-only unknown".into(), 502, String::new())));
    assert!(weft.contains(&("registry-only known".into(), 200, String::new())));
    let envoy = run("se-envoy", 49, true);
    assert_eq!(weft, envoy, "weft-proxy and Envoy differ");
}
