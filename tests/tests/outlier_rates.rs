//! Statistical outlier detection, run by weft-proxy and by a stock Envoy on one static
//! bootstrap: five backends, one of which answers 500 to everything; with consecutive-5xx
//! ejection off, the success-rate rule (one cluster) and the failure-percentage rule (another)
//! must eject that host at the next interval, and only it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use weft_e2e::{Client, Flavor, Standalone, wait_until};

const PORT: u16 = 8080;

fn resources(ip: &str, hosts: &[SocketAddr]) -> String {
    let cluster = |name: &str, rule: &str| {
        format!(
            r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment: {}
    outlier_detection:
      interval: 1s
      base_ejection_time: 60s
      max_ejection_percent: 50
      enforcing_consecutive_5xx: 0
      {rule}
"#,
            Standalone::load_assignment(name, hosts)
        )
    };
    let clusters = [
        cluster(
            "success-rate",
            "success_rate_minimum_hosts: 5\n      success_rate_request_volume: 10",
        ),
        cluster(
            "failure-percentage",
            "enforcing_success_rate: 0\n      enforcing_failure_percentage: 100\n      failure_percentage_threshold: 60\n      failure_percentage_minimum_hosts: 5\n      failure_percentage_request_volume: 10",
        ),
    ]
    .concat();
    let listener = Standalone::http_listener(
        ip,
        PORT,
        r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: /fp/ }
                route: { cluster: failure-percentage, prefix_rewrite: / }
              - match: { prefix: / }
                route: { cluster: success-rate }
"#,
        "",
    );
    format!(
        r#"{listener}  clusters:
{clusters}"#
    )
}

/// Which backends answered, and with which statuses, for `n` requests.
fn traffic(c: &mut Client, prefix: &str, n: usize) -> (BTreeSet<String>, BTreeSet<u16>) {
    let mut names = BTreeSet::new();
    let mut statuses = BTreeSet::new();
    for _ in 0..n {
        let r = c.get("svc", &format!("{prefix}x?fail_on=e")).unwrap();
        statuses.insert(r.status);
        names.insert(r.header("x-echo-name").unwrap_or("").to_string());
    }
    (names, statuses)
}

fn run(flavor: Flavor, net: u8) -> Vec<(String, String, BTreeSet<String>, BTreeSet<u16>)> {
    let mut s = Standalone::new("outlier-rates", net, flavor);
    let hosts: Vec<SocketAddr> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|n| s.backend(n))
        .collect();
    s.start(&resources(&s.ip(), &hosts));
    let bad = hosts[4];
    let mut c = Client::new(format!("{}:{PORT}", s.ip()).parse().unwrap());
    let mut out = Vec::new();
    for (cluster, prefix) in [("success-rate", "/"), ("failure-percentage", "/fp/")] {
        // At least 10 requests per host within one interval, then the interval ends.
        let before = traffic(&mut c, prefix, 100);
        let flags = wait_until(Duration::from_secs(5), || {
            let f = s.health_flags(cluster, bad);
            f.contains("failed_outlier_check").then_some(f)
        })
        .unwrap_or_else(|| {
            panic!(
                "{}: {cluster} ejects e; flags {:?}\n{}",
                flavor.name(),
                s.health_flags(cluster, bad),
                s.logs()
            )
        });
        let after = traffic(&mut c, prefix, 40);
        let others: Vec<String> = hosts[..4]
            .iter()
            .map(|h| s.health_flags(cluster, *h))
            .collect();
        assert!(
            others.iter().all(|f| f == "healthy"),
            "{}: {cluster}: only e is ejected: {others:?}",
            flavor.name()
        );
        out.push((cluster.to_string(), flags, before.0, before.1));
        out.push((cluster.to_string(), "after".into(), after.0, after.1));
    }
    eprintln!("{}: {out:?}", flavor.name());
    out
}

#[test]
fn weft_proxy_and_envoy_eject_by_success_rate_and_failure_percentage_alike() {
    let weft = run(Flavor::Weft, 96);
    let all: BTreeSet<String> = ["a", "b", "c", "d", "e"].map(String::from).into();
    let good: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
    for pair in weft.chunks(2) {
        assert_eq!(pair[0].2, all, "{}: every host served before", pair[0].0);
        assert_eq!(pair[0].3, [200, 500].into());
        assert_eq!(pair[1].2, good, "{}: e is out after", pair[1].0);
        assert_eq!(pair[1].3, [200].into());
    }
    let envoy = run(Flavor::Envoy, 97);
    assert_eq!(weft, envoy);
}
