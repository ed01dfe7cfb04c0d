//! What access logs and Zipkin spans say about gRPC requests, differentially: one bootstrap (an
//! HTTP/2 cluster of the echo backend, an access log with `%GRPC_STATUS%` in its three forms,
//! `%GRPC_STATUS_NUMBER%` and `%TRAILER(...)%`, every request traced) run by Envoy 1.40 and by
//! weft-proxy. The same gRPC calls (OK with `grpc-status` in the trailers, trailers-only
//! errors a client or a server made, a code past the known ones, one to a cluster with no
//! endpoint, which the proxy answers itself) and a plain request must give the same log lines
//! and the same spans' `grpc.*` tags, `error` and status.

use std::time::Duration;

use weft_e2e::collector::zipkin as collector;
use weft_e2e::standalone::differing_lines;
use weft_e2e::{Client, Flavor, Standalone};

const PORT: u16 = 8080;

const FORMAT: &str = "%REQ(:PATH)% %RESPONSE_CODE% %GRPC_STATUS% %GRPC_STATUS(SNAKE_STRING)% \
                      %GRPC_STATUS(NUMBER)% %GRPC_STATUS_NUMBER% %TRAILER(GRPC-STATUS)% \
                      %TRAILER(grpc-message?x-none):6%";

/// (path, headers): gRPC unless said otherwise.
fn cases() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
    let grpc = |extra: &[(&'static str, &'static str)]| {
        let mut h = vec![("content-type", "application/grpc")];
        h.extend_from_slice(extra);
        h
    };
    vec![
        ("/pkg.S/Ok", grpc(&[("grpc-timeout", "3S")])),
        ("/pkg.S/NotFound", grpc(&[("x-grpc-status", "5")])),
        ("/pkg.S/Unavailable", grpc(&[("x-grpc-status", "14")])),
        ("/pkg.S/Custom", grpc(&[("x-grpc-status", "20")])),
        ("/dead/pkg.S/Call", grpc(&[])),
        ("/plain", vec![]),
    ]
}

fn scenario(flavor: Flavor, net: u8) -> Vec<String> {
    let mut s = Standalone::new("grpc-observability", net, flavor);
    let log = s.dir.join("access.log");
    let echo = s.backend("echo");
    let (zipkin, reports) = collector();
    let access_log = Standalone::access_log(&log, FORMAT);
    let listener = Standalone::http_listener(
        &s.ip(),
        PORT,
        &format!(
            r#"{access_log}{tracing}          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - {{ match: {{ prefix: /dead }}, route: {{ cluster: dead }} }}
              - {{ match: {{ prefix: / }}, route: {{ cluster: grpc }} }}
"#,
            tracing = weft_e2e::collector::hcm_tracing("")
        ),
        "",
    );
    let h2 = Standalone::HTTP2_UPSTREAM;
    s.start(&format!(
        "{listener}  clusters:\n{}{}{}",
        Standalone::static_cluster("grpc", &[echo], h2),
        Standalone::static_cluster("dead", &[], h2),
        Standalone::static_cluster("zipkin", &[zipkin], "")
    ));
    std::thread::sleep(Duration::from_millis(200));
    reports.lock().unwrap().clear();
    let proxy = format!("{}:{PORT}", s.ip()).parse().expect("addr");
    let mut lines = Vec::new();
    let cases = cases();
    for (n, (path, headers)) in cases.iter().enumerate() {
        let id = format!("00000000-0000-4000-8000-0000000000{n:02}");
        let mut headers = headers.clone();
        headers.push(("x-request-id", &id));
        let r = Client::new(proxy)
            .request("POST", "svc", path, &headers)
            .expect("the proxy answers");
        lines.push(format!(
            "{path}: {} grpc-status {:?}",
            r.status,
            r.header("grpc-status")
        ));
    }
    lines.extend(s.log_lines(&log, cases.len()));
    let spans = weft_e2e::collector::spans(&reports, cases.len(), Duration::from_secs(20));
    let mut reported = Vec::new();
    for span in &spans {
        let tags = span["tags"].as_object().expect("tags");
        let id = tags["guid:x-request-id"].as_str().expect("request id");
        let mut line = format!("span {}:", &id[id.len() - 2..]);
        for (k, v) in tags {
            if k.starts_with("grpc.")
                || ["error", "http.status_code", "response_flags", "http.url"].contains(&k.as_str())
            {
                line.push_str(&format!(" {k}={}", v.as_str().unwrap_or_default()));
            }
        }
        reported.push(line);
    }
    reported.sort();
    lines.extend(reported);
    lines
}

#[test]
fn grpc_statuses_in_access_logs_and_spans_are_envoys() {
    let weft = scenario(Flavor::Weft, 145);
    let envoy = scenario(Flavor::Envoy, 146);
    assert_eq!(
        differing_lines(&weft, &envoy),
        0,
        "weft-proxy and Envoy differ"
    );
    // What the comparison rests on: the statuses came through, and were seen.
    for line in [
        "/pkg.S/Ok 200 OK OK 0 0 0 -",
        "/pkg.S/Unavailable 200 Unavailable UNAVAILABLE 14 14 - -",
    ] {
        assert!(weft.iter().any(|l| l == line), "{line}: {weft:#?}");
    }
    let span = |n: &str| weft_e2e::standalone::line_starting(&weft, &format!("span {n}:"));
    assert!(span("00").contains(" grpc.timeout=3S "), "{weft:#?}");
    assert!(span("02").contains(" error=true "), "{weft:#?}");
    assert!(!span("01").contains(" error="), "{weft:#?}");
}
