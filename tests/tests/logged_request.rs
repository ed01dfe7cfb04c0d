//! The request an access log sees, differentially: Envoy's router changes the request it was
//! given (the route's `request_headers_to_add` and `_remove`, `prefix_rewrite` with
//! `x-envoy-original-path`, `host_rewrite_literal`, `x-envoy-attempt-count`,
//! `x-envoy-expected-rq-timeout-ms`), so `%REQ(...)%` logs the request as it went upstream, the
//! attempt count of the last attempt. One
//! bootstrap run by Envoy and by weft-proxy; the same requests must give the same log lines.

use weft_e2e::standalone::differing_lines;
use weft_e2e::{Client, Flavor, Standalone};

const PORT: u16 = 8080;

const FORMAT: &str = "%REQ(:PATH)% %REQ(X-ENVOY-ORIGINAL-PATH)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% \
                      %REQ(:AUTHORITY)% %REQ(X-ADDED)% %REQ(X-GONE)% %REQ(X-KEPT)% \
                      %REQ(X-ENVOY-ATTEMPT-COUNT)% %REQ(X-ENVOY-EXPECTED-RQ-TIMEOUT-MS)% \
                      %RESPONSE_CODE%";

fn scenario(flavor: Flavor, net: u8) -> Vec<String> {
    let mut s = Standalone::new("logged-request", net, flavor);
    let log = s.dir.join("access.log");
    let echo = s.backend("echo");
    let access_log = Standalone::access_log(&log, FORMAT);
    let listener = Standalone::http_listener(
        &s.ip(),
        PORT,
        &format!(
            r#"{access_log}          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              include_request_attempt_count: true
              routes:
              - match: {{ prefix: /old }}
                route: {{ cluster: echo, prefix_rewrite: /new, host_rewrite_literal: rewritten.example, timeout: 3s }}
                request_headers_to_add: [{{ header: {{ key: x-added, value: "yes" }} }}]
                request_headers_to_remove: [x-gone]
              - match: {{ prefix: /retry }}
                route: {{ cluster: echo, timeout: 0s, retry_policy: {{ retry_on: 5xx, num_retries: 2, retry_back_off: {{ base_interval: 0.01s }} }} }}
              - match: {{ prefix: /none }}
                direct_response: {{ status: 204 }}
              - match: {{ prefix: / }}
                route: {{ cluster: echo, timeout: 0s }}
"#
        ),
        "",
    );
    s.start(&format!(
        "{listener}  clusters:\n{}",
        Standalone::static_cluster("echo", &[echo], "")
    ));
    let proxy = format!("{}:{PORT}", s.ip()).parse().expect("addr");
    let headers = [("x-gone", "bye"), ("x-kept", "k")];
    // The second attempt answers: the log says 2.
    let paths = ["/old/a?q=1", "/plain", "/none", "/retry?fail=1"];
    let mut lines = Vec::new();
    for (n, path) in paths.into_iter().enumerate() {
        let id = format!("logged-{n}");
        let mut headers = headers.to_vec();
        headers.push(("x-request-id", &id));
        let r = Client::new(proxy)
            .request("GET", "svc", path, &headers)
            .expect("the proxy answers");
        lines.push(format!("{path}: {}", r.status));
    }
    lines.extend(s.log_lines(&log, paths.len()));
    lines
}

#[test]
fn access_logs_see_the_request_as_the_router_sent_it() {
    let weft = scenario(Flavor::Weft, 147);
    let envoy = scenario(Flavor::Envoy, 148);
    assert_eq!(
        differing_lines(&weft, &envoy),
        0,
        "weft-proxy and Envoy differ"
    );
    for line in [
        "/new/a?q=1 /old/a?q=1 /old/a?q=1 rewritten.example yes - k 1 3000 200",
        "/retry?fail=1 - /retry?fail=1 svc - bye k 2 - 200",
    ] {
        assert!(weft.iter().any(|l| l == line), "{line}: {weft:#?}");
    }
}
