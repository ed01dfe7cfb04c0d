//! A cluster's `alt_stat_name`, through Envoy 1.40 and weft-proxy on one bootstrap: the
//! cluster's stats (plain and Prometheus) are kept under that name, `%UPSTREAM_CLUSTER%` logs
//! it, `%UPSTREAM_CLUSTER_RAW%` the cluster's own name, for answers from upstream and for local
//! replies on the cluster's routes alike.

use weft_e2e::standalone::{differing_lines, line_starting};
use weft_e2e::{Client, Flavor, Standalone};

const PORT: u16 = 8080;

fn resources(s: &mut Standalone, log: &std::path::Path) -> String {
    let a = s.backend("a");
    let access_log = Standalone::access_log(
        log,
        "%REQ(:PATH)% %RESPONSE_CODE% %UPSTREAM_CLUSTER% %UPSTREAM_CLUSTER_RAW%",
    );
    let listener = Standalone::http_listener(
        &s.ip(),
        PORT,
        &format!(
            r#"{access_log}          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: /abort }}
                route: {{ cluster: named }}
                typed_per_filter_config:
                  envoy.filters.http.fault:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
                    abort: {{ http_status: 418, percentage: {{ numerator: 100 }} }}
              - match: {{ prefix: /plain }}
                route: {{ cluster: plain }}
              - match: {{ prefix: /shared }}
                route: {{ cluster: also-named }}
              - match: {{ prefix: / }}
                route: {{ cluster: named }}
"#
        ),
        r#"          - name: envoy.filters.http.fault
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault }
"#,
    );
    let cluster = |name: &str, alt: &str| Standalone::static_cluster(name, &[a], alt);
    format!(
        "{listener}  clusters:\n{}{}{}",
        cluster("named", "    alt_stat_name: backend-stats\n"),
        // Two clusters under one stats name share their stats.
        cluster("also-named", "    alt_stat_name: backend-stats\n"),
        cluster("plain", ""),
    )
}

fn scenario(flavor: Flavor, net: u8) -> Vec<String> {
    let mut s = Standalone::new("stat-names", net, flavor);
    let log = s.dir.join("access.log");
    let resources = resources(&mut s, &log);
    s.start(&resources);
    let proxy = format!("{}:{PORT}", s.ip()).parse().expect("addr");
    let mut c = Client::new(proxy);
    let mut lines = Vec::new();
    for (path, status) in [
        ("/alt", 200),
        ("/alt", 200),
        ("/shared", 200),
        ("/plain", 200),
        ("/abort", 418),
    ] {
        let r = c.get("stat-names", path).expect("an answer");
        assert_eq!(r.status, status, "{}: {path}", flavor.name());
    }
    // Envoy writes its access log every second.
    lines.extend(s.log_lines(&log, 5));
    let admin = |path: &str| -> Vec<String> {
        let body = weft_e2e::get(s.admin(), path).expect("admin").body;
        body.lines().map(str::to_string).collect()
    };
    let stats = admin("/stats");
    for stat in [
        "cluster.backend-stats.upstream_rq_total:",
        "cluster.backend-stats.upstream_rq_2xx:",
        "cluster.plain.upstream_rq_total:",
        "cluster.named.",
        "cluster.also-named.",
    ] {
        lines.push(format!("{stat} {}", line_starting(&stats, stat)));
    }
    let prometheus = admin("/stats/prometheus");
    for sample in [
        "envoy_cluster_upstream_rq_total{envoy_cluster_name=\"backend-stats\"}",
        "envoy_cluster_upstream_rq_total{envoy_cluster_name=\"named\"}",
    ] {
        lines.push(format!("{sample} {}", line_starting(&prometheus, sample)));
    }
    // `/clusters` lists clusters by their own names.
    let clusters = admin("/clusters");
    for prefix in ["named::", "backend-stats::"] {
        let listed = clusters.iter().any(|l| l.starts_with(prefix));
        lines.push(format!("/clusters {prefix} {listed}"));
    }
    lines
}

#[test]
fn alt_stat_name_names_a_clusters_stats_and_logs_as_in_envoy() {
    let weft = scenario(Flavor::Weft, 124);
    // What it must be, whatever Envoy says.
    for line in [
        "/alt 200 backend-stats named",
        "/shared 200 backend-stats also-named",
        "/plain 200 plain plain",
        "/abort 418 backend-stats named",
        "cluster.backend-stats.upstream_rq_total: cluster.backend-stats.upstream_rq_total: 3",
        "cluster.named. ",
        "/clusters named:: true",
        "/clusters backend-stats:: false",
    ] {
        assert!(weft.iter().any(|l| l == line), "{line}: {weft:#?}");
    }
    let envoy = scenario(Flavor::Envoy, 125);
    assert_eq!(
        differing_lines(&weft, &envoy),
        0,
        "weft-proxy and Envoy differ"
    );
}
