//! Istio's Bookinfo served to a stock Envoy 1.40 by weftd: the Services of bookinfo.yaml with
//! WorkloadEntries standing in for its Deployments (echo servers), destination-rule-all.yaml,
//! virtual-service-all-v1.yaml, and then each other networking file in turn, as Istio's tasks
//! apply them. Envoy must ACK everything (no NACK) and route as each file intends; last,
//! bookinfo-gateway.yaml through a stock Envoy running as the ingress gateway.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use weft_e2e::{Client, Proc, Quickstart, bin, binomial_bounds, get_json, wait_until};

/// Istio's sample config beside the checkout (or $WEFT_ISTIO_TESTDATA).
fn networking() -> Option<PathBuf> {
    let candidates = [
        std::env::var("WEFT_ISTIO_TESTDATA").ok().map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/istio")),
        Some(PathBuf::from("/work/shared/testdata/istio")),
    ];
    let found = candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("bookinfo").is_dir());
    if found.is_none() {
        eprintln!("NOTE: Istio test data not found (set WEFT_ISTIO_TESTDATA); skipping Bookinfo");
    }
    found.map(|p| p.join("bookinfo"))
}

const DEPLOYMENTS: [(&str, &str, &str); 6] = [
    ("productpage-v1", "productpage", "v1"),
    ("details-v1", "details", "v1"),
    ("ratings-v1", "ratings", "v1"),
    ("reviews-v1", "reviews", "v1"),
    ("reviews-v2", "reviews", "v2"),
    ("reviews-v3", "reviews", "v3"),
];

fn ask(c: &mut Client, svc: &str, user: Option<&str>) -> (u16, String) {
    let headers: Vec<(&str, &str)> = user.map(|u| vec![("end-user", u)]).unwrap_or_default();
    let r = c
        .request("GET", &format!("{svc}:9080"), "/", &headers)
        .unwrap();
    (r.status, r.header("x-echo-name").unwrap_or("").to_string())
}

fn share(c: &mut Client, svc: &str, n: usize, name: &str) -> usize {
    (0..n).filter(|_| ask(c, svc, None).1 == name).count()
}

/// The weights of every weighted-cluster route to reviews in the client Envoy's own
/// /config_dump, each list sorted: what Envoy has applied, not what weftd last wrote.
fn reviews_weights(q: &Quickstart) -> Vec<Vec<u64>> {
    fn walk(v: &serde_json::Value, out: &mut Vec<Vec<u64>>) {
        match v {
            serde_json::Value::Object(m) => {
                let clusters = m
                    .get("weighted_clusters")
                    .and_then(|w| w["clusters"].as_array());
                if let Some(clusters) = clusters
                    && clusters
                        .iter()
                        .any(|c| c["name"].as_str().is_some_and(|n| n.contains("reviews")))
                {
                    let mut w: Vec<u64> = clusters
                        .iter()
                        .filter_map(|c| c["weight"].as_u64())
                        .collect();
                    w.sort_unstable();
                    out.push(w);
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(dump) = get_json(q.admin(10), "/config_dump") {
        walk(&dump, &mut out);
    }
    out
}

#[test]
fn bookinfo_networking_files_through_envoy() {
    let Some(bookinfo) = networking() else { return };
    let net = 47;
    let mut q = Quickstart::new("bookinfo", net);
    // Replace the quickstart's objects with Bookinfo's.
    for f in ["mesh.yaml", "virtual-service.yaml"] {
        let _ = std::fs::remove_file(q.dir.join(f));
    }
    std::fs::copy(
        bookinfo.join("bookinfo.yaml"),
        q.dir.join("00-bookinfo.yaml"),
    )
    .unwrap();
    std::fs::copy(
        bookinfo.join("networking/destination-rule-all.yaml"),
        q.dir.join("05-destination-rule-all.yaml"),
    )
    .unwrap();
    std::fs::copy(
        bookinfo.join("networking/virtual-service-all-v1.yaml"),
        q.dir.join("10-virtual-service-all-v1.yaml"),
    )
    .unwrap();
    let mut mesh = format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: client }}\nspec: {{ address: {c}, labels: {{ app: client }} }}\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{ name: client }}\nspec:\n  workloadSelector: {{ labels: {{ app: client }} }}\n  egress:\n  - {{ port: {{ number: 9080, protocol: HTTP, name: http }}, bind: {c}, captureMode: NONE, hosts: [\"./*\"] }}\n",
        c = q.ip(10)
    );
    // The ingress gateway's workload (bookinfo-gateway.yaml selects istio: ingressgateway).
    mesh.push_str(&format!(
        "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: istio-ingressgateway }}\nspec: {{ address: {}, labels: {{ istio: ingressgateway }} }}\n",
        q.ip(40)
    ));
    let mut apps: Vec<Proc> = Vec::new();
    for (i, (name, app, version)) in DEPLOYMENTS.iter().enumerate() {
        let ip = q.ip(20 + i as u8);
        mesh.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: {name} }}\nspec: {{ address: {ip}, labels: {{ app: {app}, version: {version} }}, serviceAccount: bookinfo-{app} }}\n"
        ));
        apps.push(Proc::start(
            name,
            &bin("weftctl"),
            &["echo", "--address", &ip, "--port", "9080", "--name", name],
            &q.log_dir,
        ));
    }
    std::fs::write(q.dir.join("01-workloads.yaml"), mesh).unwrap();
    q.start_weftd();
    q.start_client(true);
    let mut c = Client::new(format!("{}:9080", q.ip(10)).parse().unwrap());

    // virtual-service-all-v1: every service's v1.
    for (svc, v1) in [
        ("productpage", "productpage-v1"),
        ("details", "details-v1"),
        ("ratings", "ratings-v1"),
        ("reviews", "reviews-v1"),
    ] {
        let seen = wait_until(Duration::from_secs(5), || {
            (ask(&mut c, svc, None) == (200, v1.to_string())).then_some(())
        });
        assert!(seen.is_some(), "all-v1: {svc} goes to {v1}");
        assert_eq!(share(&mut c, svc, 20, v1), 20, "all-v1: only {v1}");
    }

    // Each further file in turn, over all-v1 (same-named objects are replaced).
    let apply = |q: &Quickstart, file: &str| {
        let _ = std::fs::remove_file(q.dir.join("20-scenario.yaml"));
        std::fs::copy(
            bookinfo.join("networking").join(file),
            q.dir.join("20-scenario.yaml"),
        )
        .unwrap();
    };
    apply(&q, "virtual-service-reviews-test-v2.yaml");
    wait_until(Duration::from_secs(5), || {
        (ask(&mut c, "reviews", Some("jason")).1 == "reviews-v2").then_some(())
    })
    .expect("jason reaches reviews-v2");
    assert!((0..20).all(|_| ask(&mut c, "reviews", Some("jason")).1 == "reviews-v2"));
    assert!(
        (0..20).all(|_| ask(&mut c, "reviews", Some("mary")).1 == "reviews-v1"),
        "everyone else stays on v1"
    );

    for (file, v1_share, other, weights) in [
        (
            "virtual-service-reviews-80-20.yaml",
            0.8,
            "reviews-v2",
            [20, 80],
        ),
        (
            "virtual-service-reviews-90-10.yaml",
            0.9,
            "reviews-v2",
            [10, 90],
        ),
        (
            "virtual-service-reviews-v2-v3.yaml",
            0.0,
            "reviews-v3",
            [50, 50],
        ),
    ] {
        apply(&q, file);
        // Traffic reaching `other` does not show the new split is in force (80-20 already sends
        // some to v2), so wait until Envoy itself reports the new weights.
        wait_until(Duration::from_secs(5), || {
            let w = reviews_weights(&q);
            (!w.is_empty() && w.iter().all(|w| w[..] == weights[..])).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{file}: Envoy applies weights {weights:?}, its config_dump has {:?}",
                reviews_weights(&q)
            )
        });
        wait_until(Duration::from_secs(5), || {
            (0..30)
                .any(|_| ask(&mut c, "reviews", None).1 == other)
                .then_some(())
        })
        .unwrap_or_else(|| panic!("{file}: traffic reaches {other}"));
        let n = 400;
        let hits = share(&mut c, "reviews", n, other);
        let p = if v1_share == 0.0 { 0.5 } else { 1.0 - v1_share };
        let (lo, hi) = binomial_bounds(n, p);
        assert!(
            (lo..=hi).contains(&hits),
            "{file}: {other} got {hits} of {n}, expected [{lo}, {hi}]"
        );
    }

    apply(&q, "virtual-service-ratings-test-abort.yaml");
    wait_until(Duration::from_secs(5), || {
        (ask(&mut c, "ratings", Some("jason")).0 == 500).then_some(())
    })
    .expect("jason's ratings abort with 500");
    assert_eq!(
        ask(&mut c, "ratings", Some("mary")),
        (200, "ratings-v1".into())
    );

    apply(&q, "fault-injection-details-v1.yaml");
    wait_until(Duration::from_secs(5), || {
        (ask(&mut c, "details", None).0 == 555).then_some(())
    })
    .expect("details aborts with 555");

    apply(&q, "virtual-service-ratings-test-delay.yaml");
    wait_until(Duration::from_secs(5), || {
        let started = Instant::now();
        let r = ask(&mut c, "ratings", Some("jason"));
        (r.0 == 200 && started.elapsed() >= Duration::from_millis(6500)).then_some(())
    })
    .expect("jason's ratings are delayed 7 s");
    let started = Instant::now();
    assert_eq!(
        ask(&mut c, "ratings", Some("mary")),
        (200, "ratings-v1".into())
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "others are not delayed"
    );

    // bookinfo-gateway.yaml, served by a stock Envoy as the ingress gateway (a `router~` node):
    // its listener on the gateway's address and port 8080 routes the product page paths.
    std::fs::copy(
        bookinfo.join("networking/bookinfo-gateway.yaml"),
        q.dir.join("30-bookinfo-gateway.yaml"),
    )
    .unwrap();
    let node = format!(
        "router~{}~istio-ingressgateway.default~default.svc.cluster.local",
        q.ip(40)
    );
    q.start_envoy_as(
        40,
        "istio-ingressgateway",
        &node,
        "{ istio: ingressgateway }",
    );
    let mut g = Client::new(format!("{}:8080", q.ip(40)).parse().unwrap());
    let via_gateway = |g: &mut Client, path: &str| {
        g.get("bookinfo.example.com", path)
            .map(|r| (r.status, r.header("x-echo-name").unwrap_or("").to_string()))
            .unwrap_or((0, String::new()))
    };
    wait_until(Duration::from_secs(10), || {
        (via_gateway(&mut g, "/productpage") == (200, "productpage-v1".into())).then_some(())
    })
    .expect("the gateway routes /productpage to productpage");
    assert_eq!(
        via_gateway(&mut g, "/static/style.css"),
        (200, "productpage-v1".into())
    );
    assert_eq!(
        via_gateway(&mut g, "/api/v1/products/0"),
        (200, "productpage-v1".into())
    );
    assert_eq!(
        via_gateway(&mut g, "/admin").0,
        404,
        "unrouted paths get 404"
    );
    let gw = q.sync_of(&node).expect("the gateway is connected");
    for (t, st) in gw["types"].as_object().into_iter().flatten() {
        assert_eq!(
            st["nacks"], 0,
            "the gateway NACKed {t}: {}",
            st["last_nack"]
        );
    }

    q.assert_client_nacked_nothing();
    drop(apps);
}
