//! The data plane keeps serving while weftd is away, and resyncs when it returns.

use std::time::Duration;

use weft_e2e::{Client, Quickstart, wait_until};

#[test]
fn traffic_survives_weftd_restart_and_the_proxy_resyncs() {
    let mut q = Quickstart::new("outage", 23);
    q.start_weftd();
    q.start_hello();
    q.start_weft_proxy(10, "client");
    let mut c = Client::new(q.egress());
    assert_eq!(c.get("hello", "/").unwrap().status, 200);

    q.stop_weftd();
    // Config changes while weftd is down take effect only once it is back.
    q.set_split(0, 100);
    for i in 0..200 {
        let r = c
            .get("hello", "/")
            .unwrap_or_else(|e| panic!("request {i} with weftd down: {e}"));
        assert_eq!(r.status, 200, "request {i} with weftd down");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (v1, _, failures) = q.split(100);
    assert!(
        failures.is_empty() && v1 > 0,
        "the last good config (80/20) keeps serving: v1={v1} {failures:?}"
    );

    q.start_weftd();
    let client_id = q.node_id(10, "client");
    wait_until(Duration::from_secs(20), || {
        let s = q.sync_of(&client_id)?;
        let lds = &s["types"]["RDS"];
        (lds["acks"].as_u64()? >= 1 && lds["acked_nonce"] == lds["sent_nonce"]).then_some(())
    })
    .expect("the client sidecar reconnects and ACKs the resynced routes");
    let resynced = wait_until(Duration::from_secs(5), || {
        let (v1, v2, f) = q.split(50);
        (f.is_empty() && v1 == 0 && v2 == 50).then_some(())
    });
    assert!(
        resynced.is_some(),
        "after the reconnect the proxy serves the config written while weftd was down"
    );
}
