//! weftd pushes only the load assignments that changed (state of the world allows it for EDS):
//! after one WorkloadEntry moves, a stock Envoy and weft-proxy must both show the new address in
//! that subset's cluster and keep the other clusters' hosts, which were not sent again.

use std::time::Duration;

use weft_e2e::{Quickstart, get, wait_until};

/// `host:port` of every host of `cluster` in the proxy's `/clusters` text.
fn hosts(q: &Quickstart, cluster: &str) -> Vec<String> {
    let text = get(q.admin(10), "/clusters")
        .map(|r| r.body)
        .unwrap_or_default();
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{cluster}::")))
        .filter_map(|rest| {
            let (addr, _) = rest.split_once("::")?;
            addr.contains(':').then(|| addr.to_string())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn run(name: &str, net: u8, envoy: bool) -> (Vec<String>, Vec<String>) {
    let mut q = Quickstart::new(name, net);
    q.start_weftd();
    q.start_client(envoy);
    let v1 = "outbound|8080|v1|hello.default.svc.cluster.local";
    let v2 = "outbound|8080|v2|hello.default.svc.cluster.local";
    let before_v1 = hosts(&q, v1);
    assert_eq!(before_v1, [format!("{}:9080", q.ip(11))], "{name}");
    // hello-v2 moves from .12 to .22: only v2's assignment (and the service's) change.
    let mesh = std::fs::read_to_string(q.dir.join("mesh.yaml")).expect("mesh.yaml");
    q.write_file(
        "mesh.yaml",
        &mesh.replace(
            &format!("address: {}", q.ip(12)),
            &format!("address: {}", q.ip(22)),
        ),
    );
    let moved = format!("{}:9080", q.ip(22));
    wait_until(Duration::from_secs(10), || {
        hosts(&q, v2).contains(&moved).then_some(())
    })
    .unwrap_or_else(|| panic!("{name}: v2 never moved: {:?}", hosts(&q, v2)));
    q.assert_client_nacked_nothing();
    (hosts(&q, v1), hosts(&q, v2))
}

#[test]
fn proxies_keep_the_assignments_weftd_did_not_resend() {
    let weft = run("partial-eds-weft", 62, false);
    assert_eq!(weft.0, ["127.62.0.11:9080"], "v1 kept its host");
    assert_eq!(weft.1, ["127.62.0.22:9080"]);
    let envoy = run("partial-eds-envoy", 63, true);
    assert_eq!(envoy.0, ["127.63.0.11:9080"], "Envoy kept v1's host");
    assert_eq!(envoy.1, ["127.63.0.22:9080"]);
}
