//! VirtualService `tcp` routes on the client's TCP egress listener, through weft-proxy and
//! through a stock Envoy fed the same config by weftd: all connections to one subset, then a
//! weighted split, then a route whose match is for another port (so the default applies).

use weft_e2e::{Quickstart, binomial_bounds, wait_until};

const RULE: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: hello-tcp, namespace: default }
spec:
  host: hello-tcp
  subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
"#;

fn routes(body: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{ name: hello-tcp, namespace: default }}\nspec:\n  hosts: [hello-tcp]\n  tcp:\n{body}"
    )
}

fn backend(q: &Quickstart) -> String {
    let out = q.tcp_round_trip("/tcp");
    out.lines()
        .find_map(|l| l.strip_prefix("name: "))
        .unwrap_or("?")
        .to_string()
}

#[derive(Debug, PartialEq)]
struct Seen {
    pinned: Vec<String>,
    split_v1_in_bounds: bool,
    other_port_both_used: bool,
}

fn scenario(q: &mut Quickstart) -> Seen {
    q.write_file(
        "tcp-routes.yaml",
        &routes("  - route: [{ destination: { host: hello-tcp, subset: v2 } }]\n"),
    );
    // Connections made before the push may still go round robin: wait for the route.
    wait_until(std::time::Duration::from_secs(10), || {
        (0..6).all(|_| backend(q) == "hello-v2").then_some(())
    })
    .expect("the tcp route takes effect");
    let pinned: Vec<String> = (0..10).map(|_| backend(q)).collect();

    q.write_file(
        "tcp-routes.yaml",
        &routes("  - route:\n    - { destination: { host: hello-tcp, subset: v1 }, weight: 30 }\n    - { destination: { host: hello-tcp, subset: v2 }, weight: 70 }\n"),
    );
    wait_until(std::time::Duration::from_secs(10), || {
        (0..20).any(|_| backend(q) == "hello-v1").then_some(())
    })
    .expect("the split takes effect");
    let n = 300;
    let v1 = (0..n).filter(|_| backend(q) == "hello-v1").count();
    let (lo, hi) = binomial_bounds(n, 0.3);
    eprintln!(
        "{}: {v1} of {n} connections on v1 (bounds {lo}-{hi})",
        q.name
    );

    q.write_file(
        "tcp-routes.yaml",
        &routes("  - match: [{ port: 7071 }]\n    route: [{ destination: { host: hello-tcp, subset: v2 } }]\n"),
    );
    let both = wait_until(std::time::Duration::from_secs(10), || {
        let seen: std::collections::BTreeSet<String> = (0..20).map(|_| backend(q)).collect();
        (seen.len() == 2).then_some(())
    })
    .is_some();
    Seen {
        pinned,
        split_v1_in_bounds: (lo..=hi).contains(&v1),
        other_port_both_used: both,
    }
}

fn run(name: &str, net: u8, envoy: bool) -> Seen {
    let mut q = Quickstart::new(name, net);
    q.write_file("tcp-rule.yaml", RULE);
    q.start_weftd();
    q.start_hello();
    q.start_client(envoy);
    let seen = scenario(&mut q);
    q.assert_client_nacked_nothing();
    seen
}

#[test]
fn weft_proxy_and_envoy_route_tcp_alike() {
    let weft = run("tcp-routes-weft", 58, false);
    assert_eq!(
        weft,
        Seen {
            pinned: vec!["hello-v2".to_string(); 10],
            split_v1_in_bounds: true,
            other_port_both_used: true,
        }
    );
    let envoy = run("tcp-routes-envoy", 59, true);
    assert_eq!(weft, envoy, "weft-proxy and Envoy differ");
}
