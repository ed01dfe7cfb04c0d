//! A stock Envoy 1.40 as the client's sidecar, fed by weftd over SotW and delta ADS, in front of
//! weft-proxy server sidecars: it ACKs everything and routes the split correctly.

use std::time::Duration;

use weft_e2e::{Quickstart, binomial_bounds, wait_until};

fn envoy_runs_the_quickstart(name: &str, net: u8, delta: bool) {
    let mut q = Quickstart::new(name, net);
    q.start_weftd();
    q.start_hello();
    q.start_envoy_client(delta);

    let id = q.node_id(10, "client");
    let sync = wait_until(Duration::from_secs(10), || {
        let s = q.sync_of(&id)?;
        let types = s["types"].as_object()?;
        let all_acked = ["CDS", "EDS", "LDS", "RDS"].iter().all(|t| {
            let st = &types.get(*t).cloned().unwrap_or_default();
            st["acks"].as_u64().unwrap_or(0) >= 1 && st["acked_nonce"] == st["sent_nonce"]
        });
        all_acked.then_some(s)
    })
    .expect("Envoy ACKs CDS, EDS, LDS and RDS");
    assert_eq!(sync["protocol"], if delta { "delta" } else { "sotw" });
    for (t, st) in sync["types"].as_object().unwrap() {
        assert_eq!(st["nacks"], 0, "Envoy NACKed {t}: {}", st["last_nack"]);
    }

    let n = 1000;
    let (v1, v2, failures) = q.split(n);
    assert!(failures.is_empty(), "{failures:?}");
    let (lo, hi) = binomial_bounds(n, 0.2);
    assert!(
        (lo..=hi).contains(&v2),
        "through Envoy v2 served {v2} of {n} (v1 {v1}), expected [{lo}, {hi}]"
    );

    let tcp = q.tcp_round_trip("/through-envoy-tcp-proxy");
    assert!(
        tcp.starts_with("HTTP/1.1 200") && tcp.contains("path: /through-envoy-tcp-proxy"),
        "{tcp}"
    );

    q.set_split(0, 100);
    let moved = wait_until(Duration::from_secs(2), || {
        let (v1, v2, f) = q.split(20);
        (f.is_empty() && v1 == 0 && v2 == 20).then_some(())
    });
    assert!(moved.is_some(), "Envoy follows the edited split within 2 s");
    let s = q.sync_of(&id).unwrap();
    for (t, st) in s["types"].as_object().unwrap() {
        assert_eq!(
            st["nacks"], 0,
            "Envoy NACKed {t} after the update: {}",
            st["last_nack"]
        );
    }
}

#[test]
fn envoy_over_state_of_the_world_ads() {
    envoy_runs_the_quickstart("envoy-sotw", 24, false);
}

#[test]
fn envoy_over_delta_ads() {
    envoy_runs_the_quickstart("envoy-delta", 25, true);
}
