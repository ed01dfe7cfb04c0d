//! A config weft-proxy cannot apply is NACKed with a message naming it, the NACK is recorded by
//! weftd, and the previous config keeps serving.

use std::net::TcpListener;
use std::time::Duration;

use weft_e2e::{Quickstart, wait_until};

#[test]
fn unbindable_listener_is_nacked_and_the_old_config_keeps_serving() {
    let mut q = Quickstart::new("nack", 26);
    q.start_weftd();
    q.start_hello();
    q.start_weft_proxy(10, "client");
    // Something else holds the port a new egress listener will ask for.
    let squatter = TcpListener::bind((q.ip(10).as_str(), 0)).expect("bind");
    let port = squatter.local_addr().unwrap().port();
    let extra = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{ name: other, namespace: default }}
spec:
  selector: {{ app: hello }}
  ports: [{{ name: http, port: {port} }}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: client, namespace: default }}
spec:
  workloadSelector: {{ labels: {{ app: client }} }}
  egress:
  - port: {{ number: 8080, protocol: HTTP, name: egress-http }}
    bind: {ip}
    captureMode: NONE
    hosts: ["./*"]
  - port: {{ number: {port}, protocol: HTTP, name: egress-other }}
    bind: {ip}
    captureMode: NONE
    hosts: ["./*"]
"#,
        ip = q.ip(10)
    );
    // Replace the client's Sidecar (same name, in a later file) with one that adds the listener.
    q.write_file("zz-sidecar.yaml", &extra);
    let id = q.node_id(10, "client");
    let nack = wait_until(Duration::from_secs(5), || {
        let s = q.sync_of(&id)?;
        let lds = &s["types"]["LDS"];
        (lds["nacks"].as_u64()? >= 1).then(|| {
            lds["last_nack"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
    })
    .expect("weft-proxy NACKs the listener it cannot bind");
    let listener = format!("{}_{port}", q.ip(10));
    assert!(
        nack.contains(&listener) && nack.contains("cannot bind"),
        "NACK message names the listener and the reason: {nack}"
    );
    let nacks = weft_e2e::http::get_json(q.debug(), "/debug/nacks").unwrap();
    assert!(nacks.to_string().contains(&listener), "{nacks}");

    // The previous listeners keep serving.
    let (v1, v2, failures) = q.split(100);
    assert!(failures.is_empty() && v1 + v2 == 100, "{failures:?}");
    let listeners = weft_e2e::get(q.admin(10), "/listeners").unwrap().body;
    assert!(
        !listeners.contains(&listener),
        "the rejected listener is not running: {listeners}"
    );
    drop(squatter);
}
