//! Tracing across a mesh (weftd `--zipkin-address`, Istio's `meshConfig` tracing with a Zipkin
//! collector): the client's weft-proxy sidecar and the two servers' sidecars (hello-v1 a
//! weft-proxy, hello-v2 a stock Envoy), all fed by weftd, report their spans to one collector.
//! Every request gives one trace: the client's CLIENT span and the serving sidecar's SERVER
//! span, its child (Istio's spans share no context), with 128-bit trace ids and Istio's tags
//! (canonical service, namespace, mesh id), whichever proxy served it.

use std::collections::BTreeMap;
use std::time::Duration;

use weft_e2e::{Client, Quickstart};

const REQUESTS: usize = 20;

#[test]
fn a_trace_crosses_weft_proxy_and_envoy_sidecars() {
    let (collector, reports) = weft_e2e::collector::zipkin();
    let mut q = Quickstart::new("mesh-tracing", 144);
    q.weftd_args = vec![
        "--zipkin-address".into(),
        collector.to_string(),
        "--trace-sampling".into(),
        "100".into(),
    ];
    q.set_split(50, 50);
    q.start_weftd();
    q.start_hello_with([false, true]);
    q.start_client(false);
    let mut c = Client::new(q.egress());
    let mut ids = Vec::new();
    for i in 0..REQUESTS {
        let r = c
            .request("GET", "hello", &format!("/traced/{i}"), &[])
            .expect("request");
        assert_eq!(r.status, 200, "{}", r.body);
        let echoed = |name: &str| r.echoed(name);
        ids.push((
            echoed("x-b3-traceid").expect("a trace id reaches the application"),
            echoed("x-b3-sampled"),
        ));
    }
    q.assert_client_nacked_nothing();
    // Two spans a request: the client's and the server's.
    let spans = weft_e2e::collector::spans(&reports, 2 * REQUESTS, Duration::from_secs(20));
    let mut by_trace: BTreeMap<String, Vec<&serde_json::Value>> = BTreeMap::new();
    for s in &spans {
        by_trace
            .entry(s["traceId"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(s);
    }
    let mut servers = BTreeMap::<&str, usize>::new();
    for (trace, sampled) in &ids {
        assert_eq!(trace.len(), 32, "128-bit trace ids: {trace}");
        assert_eq!(sampled.as_deref(), Some("1"));
        let spans = by_trace
            .get(trace)
            .unwrap_or_else(|| panic!("no spans of trace {trace}: {spans:#?}"));
        let kind = |k: &str| {
            spans
                .iter()
                .find(|s| s["kind"] == k)
                .unwrap_or_else(|| panic!("no {k} span in {spans:#?}"))
        };
        let (client, server) = (kind("CLIENT"), kind("SERVER"));
        assert_eq!(spans.len(), 2, "{spans:#?}");
        assert_eq!(server["parentId"], client["id"], "{spans:#?}");
        assert!(client.get("parentId").is_none(), "{client:#}");
        assert!(server.get("shared").is_none(), "{server:#}");
        for (s, service) in [(client, "client"), (server, "hello")] {
            let tags = &s["tags"];
            assert_eq!(tags["istio.mesh_id"], "cluster.local", "{s:#}");
            assert_eq!(tags["istio.namespace"], "default", "{s:#}");
            assert_eq!(tags["istio.canonical_service"], service, "{s:#}");
            assert_eq!(tags["http.status_code"], "200", "{s:#}");
        }
        assert!(
            client["tags"]["node_id"]
                .as_str()
                .is_some_and(|n| n.contains("client")),
            "{client:#}"
        );
        let node = server["tags"]["node_id"].as_str().unwrap_or_default();
        let served_by = if node.contains("hello-v1") {
            "weft-proxy"
        } else if node.contains("hello-v2") {
            "envoy"
        } else {
            panic!("a server span from {node}")
        };
        *servers.entry(served_by).or_default() += 1;
    }
    // The split sends requests to both: traces cross to either proxy.
    assert!(
        servers.len() == 2,
        "both sidecars serve and report: {servers:?}"
    );
}
