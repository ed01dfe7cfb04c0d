//! Retry features weftd does not generate, run by weft-proxy and by a stock Envoy on one static
//! bootstrap: retries on response headers (`retriable-headers`), only for requests with given
//! headers (`retriable_request_headers`), a retry budget that allows no retry or one, and the
//! response flags when retries stop (`URX`: the policy's retries are used up; `UO`: the
//! circuit breaker refused one), and the attempt numbers the virtual host's
//! `include_request_attempt_count` / `include_attempt_count_in_response` put on the upstream
//! request and on the answer (`x-envoy-attempt-count`). Attempts seen by the backend, statuses,
//! attempt headers and access log flags must be the same.

use std::net::SocketAddr;
use std::path::Path;

use weft_e2e::{Client, Flavor, Standalone};

const PORT: u16 = 8080;

fn cluster(name: &str, backend: SocketAddr, budget: Option<(f64, u32)>) -> String {
    let breakers = budget
        .map(|(p, m)| {
            format!(
                "\n    circuit_breakers: {{ thresholds: [{{ retry_budget: {{ budget_percent: {{ value: {p} }}, min_retry_concurrency: {m} }} }}] }}"
            )
        })
        .unwrap_or_default();
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s{breakers}
    load_assignment: {}
"#,
        Standalone::load_assignment(name, &[backend])
    )
}

fn resources(ip: &str, backend: SocketAddr, log: &Path) -> String {
    let clusters = [
        cluster("plain", backend, None),
        cluster("no-budget", backend, Some((0.0, 0))),
        cluster("one-retry-budget", backend, Some((0.0, 1))),
    ]
    .concat();
    let log = log.display();
    let listener = Standalone::http_listener(
        ip,
        PORT,
        &format!(
            r#"          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format: {{ text_format_source: {{ inline_string: "%REQ(X-REQUEST-ID)% %RESPONSE_CODE% %RESPONSE_FLAGS%\n" }} }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              include_request_attempt_count: true
              include_attempt_count_in_response: true
              routes:
              - match: {{ prefix: /headers }}
                route:
                  cluster: plain
                  retry_policy:
                    retry_on: retriable-headers
                    num_retries: 3
                    retriable_headers: [{{ name: x-echo-retry-me, string_match: {{ exact: "yes" }} }}]
              - match: {{ prefix: /opt-in }}
                route:
                  cluster: plain
                  retry_policy:
                    retry_on: 5xx
                    num_retries: 2
                    retriable_request_headers: [{{ name: x-retry-allowed }}]
              - match: {{ prefix: /no-budget }}
                route:
                  cluster: no-budget
                  retry_policy: {{ retry_on: 5xx, num_retries: 2 }}
              - match: {{ prefix: /one-retry-budget }}
                route:
                  cluster: one-retry-budget
                  retry_policy: {{ retry_on: 5xx, num_retries: 2 }}
              - match: {{ prefix: / }}
                route:
                  cluster: plain
                  retry_policy: {{ retry_on: 5xx, num_retries: 1 }}
"#
        ),
        "",
    );
    format!(
        r#"{listener}  clusters:
{clusters}"#
    )
}

/// (name, status, attempts the backend saw, access log flags, `x-envoy-attempt-count` of the
/// last attempt as the backend saw it / of the answer)
type Case = (String, u16, String, String, String);

/// (name, path, extra request headers)
type Request = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

fn run(flavor: Flavor, net: u8) -> (Vec<Case>, Vec<(String, u64)>) {
    let mut s = Standalone::new("retry-policies", net, flavor);
    let backend = s.backend("backend");
    let log = s.dir.join("access.log");
    s.start(&resources(&s.ip(), backend, &log));
    let mut c = Client::new(format!("{}:{PORT}", s.ip()).parse().unwrap());
    let tag = flavor.name();
    let cases: [Request; 7] = [
        ("headers-recover", "/headers?retry_header=2", &[]),
        ("headers-give-up", "/headers?retry_header=9", &[]),
        ("opt-in-without-header", "/opt-in?fail=1", &[]),
        (
            "opt-in-with-header",
            "/opt-in?fail=1",
            &[("x-retry-allowed", "1")],
        ),
        ("no-budget", "/no-budget?fail=1", &[]),
        ("one-retry-budget", "/one-retry-budget?fail=1", &[]),
        ("retries-used-up", "/other?fail=5", &[]),
    ];
    let mut ids = Vec::new();
    let mut out = Vec::new();
    for (name, path, extra) in cases {
        let id = format!("{tag}-{name}");
        let mut headers = vec![
            ("x-request-id", id.as_str()),
            ("x-envoy-attempt-count", "7"),
        ];
        headers.extend_from_slice(extra);
        let r = c.request("GET", "svc", path, &headers).unwrap();
        let attempts = weft_e2e::get(backend, &format!("/echo/attempts?id={id}"))
            .unwrap()
            .body;
        // The client's own value is overwritten.
        let sent = r
            .body
            .lines()
            .find_map(|l| l.trim().strip_prefix("x-envoy-attempt-count: "))
            .unwrap_or("-");
        let answered = r.header("x-envoy-attempt-count").unwrap_or("-");
        let counts = format!("{sent}/{answered}");
        out.push((name.to_string(), r.status, attempts, String::new(), counts));
        ids.push(id);
    }
    // Envoy flushes its access log every second.
    let lines = s.log_lines(&log, ids.len());
    for (case, id) in out.iter_mut().zip(&ids) {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("{tag}: no access log line for {id}: {lines:?}"));
        case.3 = line.rsplit(' ').next().unwrap_or("").to_string();
    }
    let stats = ["no-budget", "one-retry-budget", "plain"]
        .iter()
        .flat_map(|c| {
            ["upstream_rq_retry", "upstream_rq_retry_overflow"].map(|stat| {
                let name = format!("cluster.{c}.{stat}");
                (name.clone(), s.stat(&name))
            })
        })
        .collect();
    eprintln!("{tag}: {out:#?}\n{stats:?}");
    (out, stats)
}

#[test]
fn weft_proxy_and_envoy_retry_alike() {
    let weft = run(Flavor::Weft, 94);
    let expected: Vec<Case> = [
        ("headers-recover", 200, "3", "-", "3/3"),
        ("headers-give-up", 200, "4", "URX", "4/4"),
        ("opt-in-without-header", 503, "1", "-", "1/1"),
        ("opt-in-with-header", 200, "2", "-", "2/2"),
        ("no-budget", 503, "1", "UO", "1/1"),
        ("one-retry-budget", 200, "2", "-", "2/2"),
        ("retries-used-up", 503, "2", "URX", "2/2"),
    ]
    .map(|(n, s, a, f, c)| {
        (
            n.to_string(),
            s,
            a.to_string(),
            f.to_string(),
            c.to_string(),
        )
    })
    .into();
    assert_eq!(weft.0, expected);
    let envoy = run(Flavor::Envoy, 95);
    assert_eq!(weft, envoy);
}
