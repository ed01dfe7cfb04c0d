//! Active health checks (HTTP, gRPC and TCP), run by weft-proxy and by a stock Envoy on the same
//! static bootstrap, against two echo backends whose health is switched on command. The
//! outcomes must be the same: which hosts serve, how many checks it takes to fail a host
//! (once for an unexpected status or a NOT_SERVING answer, `unhealthy_threshold` times for a
//! retriable status), the checks' host/authority, user agent and gRPC metadata.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use weft_e2e::{Client, Flavor, Standalone, wait_until};

const HTTP_PORT: u16 = 8080;

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// A STATIC cluster of `hosts` checked every 0.2 s (also before it carries traffic) by
/// `checker` (the checker's YAML, indented for its place under `health_checks`); `options`
/// goes under the cluster.
fn checked(
    name: &str,
    hosts: &[SocketAddr],
    options: &str,
    (unhealthy, healthy): (u32, u32),
    checker: &str,
) -> String {
    let assignment = Standalone::load_assignment(name, hosts);
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment: {assignment}
{options}    health_checks:
    - timeout: 1s
      interval: 0.2s
      no_traffic_interval: 0.2s
      unhealthy_threshold: {unhealthy}
      healthy_threshold: {healthy}
{checker}"#
    )
}

fn resources(ip: &str, hosts: &[SocketAddr]) -> String {
    let (ping, healthy_body) = (hex("ping"), hex("health 200"));
    // The TCP check speaks HTTP/1.1 itself and expects a 200 status line back.
    let send =
        hex("GET /echo/health/quiet HTTP/1.1\r\nhost: tcp-check\r\nconnection: close\r\n\r\n");
    let receive = hex("HTTP/1.1 200");
    let listener = Standalone::http_listener(
        ip,
        HTTP_PORT,
        r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: /tcp/ }
                route: { cluster: tcp-checked, prefix_rewrite: / }
              - match: { prefix: /grpc/ }
                route: { cluster: grpc-checked, prefix_rewrite: / }
              - match: { prefix: / }
                route: { cluster: http-checked }
"#,
        "",
    );
    let http2 = Standalone::HTTP2_UPSTREAM;
    let clusters = [
        checked(
            "http-checked",
            hosts,
            "",
            (3, 2),
            r#"      http_health_check:
        path: /echo/health
        host: health.local
        retriable_statuses: [{ start: 503, end: 504 }]
"#,
        ),
        checked(
            "tcp-checked",
            hosts,
            "",
            (2, 1),
            &format!(
                r#"      tcp_health_check:
        send: {{ text: "{send}" }}
        receive: [{{ text: "{receive}" }}]
"#
            ),
        ),
        checked(
            "grpc-checked",
            hosts,
            http2,
            (3, 1),
            r#"      grpc_health_check:
        service_name: echo.Echo
        authority: grpc-health.local
        initial_metadata: [{ header: { key: x-check, value: weft } }]
"#,
        ),
        checked(
            "body-checked",
            hosts,
            "",
            (3, 1),
            &format!(
                r#"      http_health_check:
        path: /echo/health/quiet
        method: POST
        send: {{ text: "{ping}" }}
        receive: [{{ text: "{healthy_body}" }}]
        expected_statuses: [{{ start: 200, end: 600 }}]
"#
            ),
        ),
        checked(
            "name-checked",
            hosts,
            "",
            (3, 1),
            r#"      http_health_check:
        path: /echo/health/quiet
        service_name_matcher: { exact: a }
"#,
        ),
    ]
    .concat();
    format!("{listener}  clusters:\n{clusters}")
}

/// What one proxy did.
#[derive(Debug, PartialEq)]
struct Outcomes {
    /// Backends that served 20 requests, per phase.
    served: Vec<BTreeSet<String>>,
    /// Checks b saw between being switched to a status and being marked failed.
    checks_to_fail_immediate: u64,
    checks_to_fail_retriable: u64,
    /// The HTTP check's Host header and user agent.
    check_headers: String,
    /// gRPC checks b saw between being switched to NOT_SERVING and being marked failed.
    grpc_checks_to_fail: u64,
    /// What the gRPC check carried (authority, user agent, te, grpc-timeout set, service).
    grpc_check: String,
    /// Connections the HTTP checks of the always-healthy a came over (`reuse_connection`).
    connections_to_a: u64,
    /// Whether the TCP checker counted network failures: its check closes the connection after
    /// each answer, and a kept connection closed by the host is one, as Envoy counts it.
    tcp_closes_counted: bool,
}

fn checks(addr: SocketAddr) -> u64 {
    counted(addr, "/echo/health/stats")
}

fn counted(addr: SocketAddr, path: &str) -> u64 {
    let text = weft_e2e::get(addr, path).unwrap().body;
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("checks=").or(w.strip_prefix("connections=")))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

fn set_health(addr: SocketAddr, status: u16) {
    let r = weft_e2e::get(addr, &format!("/echo/health?set={status}")).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The backends that serve 20 requests once the proxy's load balancer has caught up with the
/// health flags: Envoy flips a host's flag at once but rebuilds its workers' host sets a moment
/// later, so this polls (up to 5 s) until `expected` serves, and returns what served last.
fn serving(s: &Standalone, prefix: &str, expected: &[&str]) -> BTreeSet<String> {
    let expected: BTreeSet<String> = expected.iter().map(|n| n.to_string()).collect();
    let mut last = BTreeSet::new();
    wait_until(Duration::from_secs(5), || {
        last = serving_once(s, prefix);
        (last == expected).then_some(())
    });
    last
}

fn serving_once(s: &Standalone, prefix: &str) -> BTreeSet<String> {
    let addr: SocketAddr = format!("{}:{HTTP_PORT}", s.ip()).parse().unwrap();
    let mut c = Client::new(addr);
    (0..20)
        .map(|_| {
            let r = c.get("svc", &format!("{prefix}echo/x")).unwrap();
            assert_eq!(r.status, 200, "{}: {}", s.flavor.name(), r.body);
            r.header("x-echo-name").unwrap_or("").to_string()
        })
        .collect()
}

fn wait_flags(s: &Standalone, cluster: &str, host: SocketAddr, failed: bool) {
    wait_until(Duration::from_secs(10), || {
        let f = s.health_flags(cluster, host);
        (f.contains("failed_active_hc") == failed).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{}: {cluster} {host} failed={failed}; flags now {:?}\n{}",
            s.flavor.name(),
            s.health_flags(cluster, host),
            s.logs()
        )
    });
}

/// Switches b to `status` and counts the checks it sees until the proxy marks it failed.
fn checks_until_failed(s: &Standalone, b: SocketAddr, status: u16) -> u64 {
    let before = checks(b);
    set_health(b, status);
    wait_flags(s, "http-checked", b, true);
    checks(b) - before
}

fn run(flavor: Flavor, net: u8) -> Outcomes {
    let mut s = Standalone::new("health-checks", net, flavor);
    let a = s.backend("a");
    let b = s.backend("b");
    s.start(&resources(&s.ip(), &[a, b]));
    for cluster in [
        "http-checked",
        "tcp-checked",
        "grpc-checked",
        "body-checked",
    ] {
        wait_flags(&s, cluster, a, false);
        wait_flags(&s, cluster, b, false);
    }
    // service_name_matcher: b answers 200 but as another cluster than the one wanted: once
    // checked (no longer pending), it is failed.
    wait_flags(&s, "name-checked", a, false);
    wait_until(Duration::from_secs(10), || {
        let f = s.health_flags("name-checked", b);
        (f.contains("failed_active_hc") && !f.contains("pending_active_hc")).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{}: name-checked b flags {:?}",
            flavor.name(),
            s.health_flags("name-checked", b)
        )
    });
    let mut served = vec![
        serving(&s, "/", &["a", "b"]),
        serving(&s, "/tcp/", &["a", "b"]),
        serving(&s, "/grpc/", &["a", "b"]),
    ];
    // An unexpected status (500) fails the host at the first check, for both checkers (the
    // TCP check no longer reads a 200 status line).
    let checks_to_fail_immediate = checks_until_failed(&s, b, 500);
    wait_flags(&s, "tcp-checked", b, true);
    // The body check accepts any status: "health 500" instead of "health 200" fails it.
    wait_flags(&s, "body-checked", b, true);
    served.push(serving(&s, "/", &["a"]));
    served.push(serving(&s, "/tcp/", &["a"]));
    // Healthy again: two good checks (healthy_threshold) bring it back.
    set_health(b, 200);
    wait_flags(&s, "http-checked", b, false);
    wait_flags(&s, "tcp-checked", b, false);
    wait_flags(&s, "body-checked", b, false);
    served.push(serving(&s, "/", &["a", "b"]));
    // A retriable status (503) takes unhealthy_threshold (3) checks.
    let checks_to_fail_retriable = checks_until_failed(&s, b, 503);
    served.push(serving(&s, "/", &["a"]));
    // gRPC: NOT_SERVING fails the host at the first check (threshold 3 notwithstanding), one
    // SERVING answer brings it back.
    set_health(b, 200);
    wait_flags(&s, "grpc-checked", b, false);
    served.push(serving(&s, "/grpc/", &["a", "b"]));
    let before = counted(b, "/echo/health/grpc-stats");
    set_health(b, 500);
    wait_flags(&s, "grpc-checked", b, true);
    let grpc_checks_to_fail = counted(b, "/echo/health/grpc-stats") - before;
    served.push(serving(&s, "/grpc/", &["a"]));
    let grpc_stats = weft_e2e::get(a, "/echo/health/grpc-stats").unwrap().body;
    let grpc_check = grpc_stats
        .split_once(' ')
        .map(|(_, rest)| rest.to_string())
        .unwrap_or_default();
    let stats = weft_e2e::get(a, "/echo/health/stats").unwrap().body;
    let check_headers = stats
        .split_once(' ')
        .map(|(_, rest)| rest.to_string())
        .unwrap_or_default();
    let out = Outcomes {
        served,
        checks_to_fail_immediate,
        checks_to_fail_retriable,
        check_headers,
        grpc_checks_to_fail,
        grpc_check,
        connections_to_a: counted(a, "/echo/health/connections"),
        tcp_closes_counted: s.stat("cluster.tcp-checked.health_check.network_failure") > 0,
    };
    eprintln!("{}: {out:?}", flavor.name());
    let attempts = s.stat("cluster.http-checked.health_check.attempt");
    assert!(
        attempts > 10,
        "{}: {attempts} health_check.attempt",
        flavor.name()
    );
    out
}

#[test]
fn weft_proxy_and_envoy_health_check_alike() {
    let both: BTreeSet<String> = ["a", "b"].map(String::from).into();
    let only_a: BTreeSet<String> = ["a"].map(String::from).into();
    let weft = run(Flavor::Weft, 90);
    let envoy = run(Flavor::Envoy, 91);
    for (o, who) in [(&weft, "weft-proxy"), (&envoy, "Envoy")] {
        assert_eq!(
            o.served,
            vec![
                both.clone(),
                both.clone(),
                both.clone(),
                only_a.clone(),
                only_a.clone(),
                both.clone(),
                only_a.clone(),
                both.clone(),
                only_a.clone()
            ],
            "{who}: hosts serving in each phase"
        );
        assert_eq!(o.checks_to_fail_immediate, 1, "{who}: a 500 fails at once");
        assert_eq!(
            o.checks_to_fail_retriable, 3,
            "{who}: a retriable 503 fails after unhealthy_threshold checks"
        );
        assert_eq!(
            o.check_headers, "host=health.local user-agent=Envoy/HC",
            "{who}"
        );
        assert_eq!(o.grpc_checks_to_fail, 1, "{who}: NOT_SERVING fails at once");
        assert!(
            o.tcp_closes_counted,
            "{who}: closed TCP check connections count"
        );
        assert_eq!(
            o.connections_to_a, 1,
            "{who}: every HTTP check of a healthy host over one connection (reuse_connection)"
        );
        assert_eq!(
            o.grpc_check,
            "authority=grpc-health.local user-agent=Envoy/HC te=trailers grpc-timeout=true x-check=weft service=echo.Echo",
            "{who}"
        );
    }
    assert_eq!(weft, envoy);
}
