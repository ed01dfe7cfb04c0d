//! The DNS query path as a synchronous function over a fixture, for the cargo-fuzz target in
//! fuzz/ and the regression inputs it found (fuzz/regressions/dns_query, replayed by the tests).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use hickory_proto::op::Message;

use super::answer::{Block, handle};
use super::corefile;
use super::metrics::Metrics;
use crate::config::ConfigSet;

pub type Blocks = Vec<Arc<Block>>;

const MESH: &str = r#"apiVersion: v1
kind: Service
metadata: { name: web, namespace: default }
spec: { clusterIP: 10.96.0.10, ports: [{ name: http, port: 80 }] }
---
apiVersion: v1
kind: Service
metadata: { name: db, namespace: prod }
spec: { clusterIP: None, ports: [{ name: mysql, port: 3306 }] }
---
apiVersion: v1
kind: Endpoints
metadata: { name: db, namespace: prod }
subsets: [{ addresses: [{ ip: 10.1.0.5, hostname: db-0 }, { ip: "fd00::6" }], ports: [{ name: mysql, port: 3306 }] }]
---
apiVersion: v1
kind: Service
metadata: { name: ext, namespace: default }
spec: { type: ExternalName, externalName: web.default.svc.cluster.local }
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: api, namespace: default }
spec: { hosts: [api.example.com], addresses: [192.0.2.10], resolution: DNS }
"#;

/// Server blocks with kubernetes (pods insecure), cache and loadbalance over a small mesh.
pub fn fixture() -> Blocks {
    let cf = corefile::parse(".:53 {\n  kubernetes cluster.local in-addr.arpa ip6.arpa {\n    pods insecure\n  }\n  cache 30\n  loadbalance\n}\n")
        .expect("fixture Corefile");
    let mut config = ConfigSet::default();
    let errors = config.add_file(std::path::Path::new("fuzz.yaml"), MESH);
    assert!(errors.is_empty(), "{errors:?}");
    config.sort();
    let metrics = Arc::new(Metrics::default());
    cf.blocks
        .into_iter()
        .map(|b| {
            let block = Block::new(b, metrics.clone());
            block.update(&config);
            Arc::new(block)
        })
        .collect()
}

/// Runs one query; panics if the reply does not parse (a server bug, for the fuzzer to find).
pub fn query(blocks: &Blocks, data: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let peer: SocketAddr = ([127, 0, 0, 1], 5300).into();
    let mut fut = std::pin::pin!(handle(blocks, data, tcp, peer));
    // Without `forward` nothing in the chain waits: one poll completes it.
    let reply = match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => panic!("the query path waited without a forward plugin"),
    };
    if let Some(Err(e)) = reply.as_deref().map(Message::from_vec) {
        panic!("reply does not parse: {e}");
    }
    reply
}
