//! A route's `max_stream_duration`, through Envoy 1.40 and weft-proxy on one bootstrap: it
//! replaces the route's `timeout` (which is then none), ends a request that takes longer with
//! Envoy's local reply, cuts an answer whose body is late, and, with `grpc_timeout_header_max`,
//! takes the client's `grpc-timeout` as the limit (capped); the connection manager's own limit
//! serves routes that set none. A cluster's own `max_stream_duration` limits each upstream
//! request: a late head is answered 504 `UMSDR` (retried as a reset), a late body is cut.
//! Statuses, gRPC statuses, access log lines and the counters must be the same.

use weft_e2e::standalone::differing_lines;
use weft_e2e::{Client, Flavor, Standalone};

const PORT: u16 = 8080;

fn resources(s: &mut Standalone, log: &std::path::Path) -> String {
    let a = s.backend("a");
    let access_log = Standalone::access_log(
        log,
        "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%",
    );
    let listener = Standalone::http_listener(
        &s.ip(),
        PORT,
        &format!(
            r#"{access_log}          common_http_protocol_options: {{ max_stream_duration: 0.4s }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: /capped }}
                route: {{ cluster: a, max_stream_duration: {{ grpc_timeout_header_max: 0.3s }} }}
              - match: {{ prefix: /grpc }}
                route: {{ cluster: a, max_stream_duration: {{ grpc_timeout_header_max: 0s }} }}
              - match: {{ prefix: /hcm }}
                route: {{ cluster: a }}
              - match: {{ prefix: /upretry }}
                route: {{ cluster: b, max_stream_duration: {{ max_stream_duration: 5s }}, retry_policy: {{ retry_on: reset, num_retries: 1 }} }}
              - match: {{ prefix: /up }}
                route: {{ cluster: b, max_stream_duration: {{ max_stream_duration: 5s }} }}
              - match: {{ prefix: / }}
                route: {{ cluster: a, timeout: 0.1s, max_stream_duration: {{ max_stream_duration: 0.5s }} }}
"#
        ),
        "",
    );
    // The same backend, each upstream request limited to 300 ms by the cluster.
    let limited = r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: { max_stream_duration: 0.3s }
        explicit_http_config: { http_protocol_options: {} }
"#;
    format!(
        "{listener}  clusters:\n{}{}",
        Standalone::static_cluster("a", &[a], ""),
        Standalone::static_cluster("b", &[a], limited)
    )
}

fn scenario(flavor: Flavor, net: u8) -> Vec<String> {
    let mut s = Standalone::new("stream-duration", net, flavor);
    let log = s.dir.join("access.log");
    let resources = resources(&mut s, &log);
    s.start(&resources);
    let proxy = format!("{}:{PORT}", s.ip()).parse().expect("addr");
    let grpc = [("content-type", "application/grpc")];
    let cases: [(&str, &[(&str, &str)]); 13] = [
        // The connection manager's limit (400 ms), for routes that set none of their own.
        ("/hcm?delay_ms=100", &[]),
        ("/hcm?delay_ms=1000", &[]),
        ("/grpc/e?delay_ms=700", &[]),
        // The route's 100 ms timeout does not apply next to a stream duration of 500 ms.
        ("/slow?delay_ms=250", &[]),
        ("/slow?delay_ms=2000", &[]),
        ("/grpc/a?delay_ms=1000", &[("grpc-timeout", "200m")]),
        ("/grpc/b?delay_ms=300", &[]),
        ("/capped?delay_ms=1000", &[("grpc-timeout", "5S")]),
        ("/grpc/c", &[]),
        (
            "/grpc/d",
            &[("grpc-timeout", "200m"), ("x-delay-ms", "1000"), grpc[0]],
        ),
        // The cluster's 300 ms per upstream request.
        ("/up?delay_ms=100", &[]),
        ("/up?delay_ms=1000", &[]),
        ("/upretry?delay_ms=1000", &[]),
    ];
    let mut lines = Vec::new();
    for (path, headers) in cases {
        let got = Client::new(proxy).request("GET", "svc", path, headers);
        lines.push(match got {
            Ok(r) => format!(
                "{path}: {} grpc-status {:?} {:?}",
                r.status,
                r.header("grpc-status"),
                if r.header("x-echo-name").is_some() {
                    "from the backend".to_string()
                } else {
                    r.body.clone()
                }
            ),
            Err(e) => format!("{path}: failed ({:?})", e.kind()),
        });
    }
    // The head in time, the body late: the answer is cut.
    let cut = Client::new(proxy).request("GET", "svc", "/cut?body_delay_ms=2000", &[]);
    lines.push(format!("/cut: cut {}", cut.is_err()));
    let cut = Client::new(proxy).request("GET", "svc", "/up/cut?body_delay_ms=2000", &[]);
    lines.push(format!("/up/cut: cut {}", cut.is_err()));
    lines.extend(s.log_lines(&log, 15));
    lines.push(format!(
        "downstream_rq_max_duration_reached {}",
        s.stat("http.http.downstream_rq_max_duration_reached")
    ));
    lines.push(format!(
        "upstream_rq_max_duration_reached {}",
        s.stat("cluster.b.upstream_rq_max_duration_reached")
    ));
    lines
}

#[test]
fn max_stream_duration_as_in_envoy() {
    let weft = scenario(Flavor::Weft, 128);
    for line in [
        "/slow?delay_ms=250: 200 grpc-status None \"from the backend\"",
        "/slow?delay_ms=2000: 504 grpc-status None \"downstream duration timeout\"",
        "/cut: cut true",
        "/up?delay_ms=1000: 504 grpc-status None \"upstream max stream duration reached\"",
        "/up/cut: cut true",
        "upstream_rq_max_duration_reached 4",
    ] {
        assert!(weft.iter().any(|l| l == line), "{line}: {weft:#?}");
    }
    let envoy = scenario(Flavor::Envoy, 129);
    assert_eq!(
        differing_lines(&weft, &envoy),
        0,
        "weft-proxy and Envoy differ"
    );
}
