//! Envoy's router headers, differentially: `x-envoy-upstream-rq-timeout-ms`,
//! `x-envoy-upstream-rq-per-try-timeout-ms`, `x-envoy-retry-on`, `x-envoy-retry-grpc-on` and
//! `x-envoy-max-retries` steer the router on requests the connection manager counts as internal
//! (`x-forwarded-for` holding one address of `internal_address_config`), and on no other
//! request. One bootstrap with an internal listener and a plain one, run by Envoy and by
//! weft-proxy; every case is sent to both listeners; statuses, the attempt that answered, and
//! the logged flags must be the same.

use std::net::SocketAddr;

use weft_e2e::standalone::{Flavor, Standalone, differing_lines, line_starting};
use weft_e2e::{Client, wait_until};

const BASE: u16 = 18700;

/// (listener, HCM fields at 10 spaces)
const LISTENERS: [(&str, &str); 2] = [
    (
        "internal",
        "          internal_address_config: { cidr_ranges: [{ address_prefix: 10.0.0.0, prefix_len: 8 }] }\n",
    ),
    ("plain", ""),
];

const ROUTES: &str = r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - { match: { prefix: /no-policy }, route: { cluster: echo, timeout: 0s } }
              - { match: { prefix: /timed }, route: { cluster: echo, timeout: 1s } }
              - { match: { prefix: / }, route: { cluster: echo, timeout: 0s, retry_policy: { retry_on: reset, num_retries: 1 } } }
"#;

fn resources(ip: &str, backend: SocketAddr, logs: &std::path::Path) -> String {
    let mut out = String::from("  listeners:\n");
    for (i, (name, hcm)) in LISTENERS.iter().enumerate() {
        let log = Standalone::access_log(
            &logs.join(format!("access-{name}.log")),
            "%REQ(X-REQUEST-ID)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%",
        );
        out.push_str(&Standalone::hcm_listener(
            name,
            ip,
            BASE + i as u16,
            &format!("{hcm}{log}{ROUTES}"),
            "",
            "",
        ));
    }
    // The cases run at once: room for all their retries, so that the retry circuit breaker
    // (3 in flight by default) never decides an outcome.
    out.push_str(&format!(
        "  clusters:\n  - name: echo\n    type: STATIC\n    connect_timeout: 1s\n    circuit_breakers: {{ thresholds: [{{ max_retries: 100 }}] }}\n    load_assignment: {}\n",
        Standalone::load_assignment("echo", &[backend])
    ));
    out
}

/// Headers sent with a case.
type Sent = &'static [(&'static str, &'static str)];

/// (case, path, the router headers sent)
const CASES: [(&str, &str, Sent); 9] = [
    (
        "timeout",
        "/slow?delay_ms=1500",
        &[("x-envoy-upstream-rq-timeout-ms", "500")],
    ),
    (
        "per-try timeout",
        "/slow?delay_ms=1500",
        &[("x-envoy-upstream-rq-per-try-timeout-ms", "300")],
    ),
    (
        "no timeout",
        "/timed?delay_ms=1500",
        &[("x-envoy-upstream-rq-timeout-ms", "0")],
    ),
    (
        "retries on 5xx, two",
        "/fail?fail=2",
        &[("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "2")],
    ),
    (
        "retries on 5xx",
        "/fail?fail=1",
        &[("x-envoy-retry-on", "5xx,not-a-condition")],
    ),
    (
        "more retries, no condition",
        "/fail?fail=1",
        &[("x-envoy-max-retries", "3")],
    ),
    (
        "retries without a route policy",
        "/no-policy?fail=1",
        &[("x-envoy-retry-on", "gateway-error,5xx")],
    ),
    (
        "gRPC conditions do not retry an HTTP 503",
        "/fail?fail=1",
        &[("x-envoy-retry-grpc-on", "unavailable,5xx")],
    ),
    (
        "a timeout that is not a number",
        "/timed?delay_ms=1500",
        &[("x-envoy-upstream-rq-timeout-ms", "soon")],
    ),
];

/// Per (listener, case): status and the attempt that answered; then the sorted log lines.
fn run(flavor: Flavor, net: u8) -> Vec<String> {
    let mut s = Standalone::new("router-headers", net, flavor);
    let backend = s.backend("echo");
    let dir = s.dir.clone();
    s.start(&resources(&s.ip(), backend, &dir));
    let ip = s.ip();
    let mut threads = Vec::new();
    for (i, (listener, _)) in LISTENERS.iter().enumerate() {
        let addr: SocketAddr = format!("{ip}:{}", BASE + i as u16).parse().unwrap();
        for (n, (case, path, headers)) in CASES.iter().enumerate() {
            let id = format!("{listener}-{n}-{}", flavor.name());
            threads.push(std::thread::spawn(move || {
                let mut sent = vec![
                    ("x-forwarded-for", "10.1.2.3"),
                    ("x-request-id", id.as_str()),
                ];
                sent.extend_from_slice(headers);
                let r = Client::new(addr).request("GET", "svc", path, &sent);
                let seen = match r {
                    Ok(r) => format!(
                        "{} attempt {}",
                        r.status,
                        r.header("x-echo-attempt").unwrap_or("-")
                    ),
                    Err(e) => format!("failed: {e}"),
                };
                format!("{listener} {case}: {seen}")
            }));
        }
    }
    let mut seen: Vec<String> = threads
        .into_iter()
        .map(|t| t.join().expect("case thread"))
        .collect();
    seen.sort();
    let total = LISTENERS.len() * CASES.len();
    let mut logged = wait_until(std::time::Duration::from_secs(10), || {
        let mut lines = Vec::new();
        for (name, _) in LISTENERS {
            let text = std::fs::read_to_string(dir.join(format!("access-{name}.log"))).ok()?;
            // The request id names the proxy: not compared.
            lines.extend(
                text.lines()
                    .map(|l| l.replacen(&format!("-{}", flavor.name()), "", 1)),
            );
        }
        (lines.len() >= total).then_some(lines)
    })
    .unwrap_or_else(|| panic!("{}: access log lines\n{}", flavor.name(), s.logs()));
    logged.sort();
    seen.extend(logged.into_iter().map(|l| format!("log {l}")));
    seen
}

#[test]
fn router_headers_steer_internal_requests_as_in_envoy() {
    let weft = run(Flavor::Weft, 114);
    let envoy = run(Flavor::Envoy, 115);
    let differ = differing_lines(&weft, &envoy);
    assert_eq!(differ, 0, "weft-proxy and Envoy differ (see above)");
    let case = |prefix: &str| line_starting(&weft, prefix);
    // Honoured on the internal listener, not on the plain one.
    assert!(case("internal timeout:").contains("504"), "{weft:?}");
    assert!(case("plain timeout:").contains("200"), "{weft:?}");
    assert!(
        case("internal retries on 5xx, two:").ends_with("200 attempt 3"),
        "{weft:?}"
    );
    assert!(
        case("plain retries on 5xx, two:").ends_with("503 attempt 1"),
        "{weft:?}"
    );
}

/// What a retried POST got through a listener whose `per_connection_buffer_limit_bytes` is
/// 1 KiB: (case, status, attempt), then the log lines. Bodies over the limit are not kept, so
/// not retried (Envoy's `retry_or_shadow_abandoned`); smaller ones are.
fn run_buffered(flavor: Flavor, net: u8) -> Vec<String> {
    let mut s = Standalone::new("buffer-limit", net, flavor);
    let backend = s.backend("echo");
    let dir = s.dir.clone();
    let log = Standalone::access_log(
        &dir.join("access.log"),
        "%REQ(X-CASE)% %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED%",
    );
    let routes = r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - { match: { prefix: / }, route: { cluster: echo, timeout: 0s, retry_policy: { retry_on: 5xx, num_retries: 1 } } }
"#;
    let listener = Standalone::http_listener(&s.ip(), BASE + 10, &format!("{log}{routes}"), "")
        .replacen(
            "    filter_chains:",
            "    per_connection_buffer_limit_bytes: 1024\n    filter_chains:",
            1,
        );
    s.start(&format!(
        "{listener}  clusters:\n  - name: echo\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment: {}\n",
        Standalone::load_assignment("echo", &[backend])
    ));
    let addr: SocketAddr = format!("{}:{}", s.ip(), BASE + 10).parse().unwrap();
    let mut seen = Vec::new();
    for (case, chunked, n) in [
        ("small", false, 512),
        ("at the limit", false, 1024),
        ("over the limit", false, 1500),
        ("large", false, 70_000),
        ("streamed small", true, 600),
        ("streamed over the limit", true, 4096),
    ] {
        let id = format!("{case}-{}", flavor.name());
        let body = "b".repeat(n);
        let framing = if chunked {
            format!("transfer-encoding: chunked\r\n\r\n{n:x}\r\n{body}\r\n0\r\n\r\n")
        } else {
            format!("content-length: {n}\r\n\r\n{body}")
        };
        let raw = format!(
            "POST /retry?fail=1&echo_body=1 HTTP/1.1\r\nhost: svc\r\nx-request-id: {id}\r\nx-case: {case}\r\nconnection: close\r\n{framing}"
        );
        let r = Client::new(addr)
            .send_raw(raw.as_bytes())
            .unwrap_or_else(|e| panic!("{}: {case}: {e}", flavor.name()));
        seen.push(format!(
            "{case}: {} attempt {}",
            r.status,
            r.header("x-echo-attempt").unwrap_or("-")
        ));
    }
    let mut logged = wait_until(std::time::Duration::from_secs(10), || {
        let text = std::fs::read_to_string(dir.join("access.log")).ok()?;
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (lines.len() >= 6).then_some(lines)
    })
    .unwrap_or_else(|| panic!("{}: access log lines\n{}", flavor.name(), s.logs()));
    logged.sort();
    seen.extend(logged.into_iter().map(|l| format!("log {l}")));
    seen
}

#[test]
fn the_listeners_buffer_limit_bounds_what_is_retried_as_in_envoy() {
    let weft = run_buffered(Flavor::Weft, 116);
    let envoy = run_buffered(Flavor::Envoy, 117);
    for (w, e) in weft.iter().zip(&envoy) {
        println!("{} {w}", if w == e { " " } else { "!" });
    }
    assert_eq!(weft, envoy, "weft-proxy and Envoy differ (see above)");
    assert!(
        weft.contains(&"small: 200 attempt 2".to_string()),
        "{weft:?}"
    );
    assert!(
        weft.contains(&"over the limit: 503 attempt 1".to_string()),
        "{weft:?}"
    );
}
