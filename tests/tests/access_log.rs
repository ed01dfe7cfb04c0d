//! Access logs (weftd `--access-log-file`, Istio's JSON encoding and keys) written by the client
//! sidecar, in a mesh of weft-proxies and in the same mesh of stock Envoys fed the same config:
//! the same requests (answered, refused, timed out, aborted, redirected, failed to connect, with
//! no endpoint, preflighted, malformed) must give the same fields, response code details
//! included (timings, ids and ports aside).

use weft_e2e::{Client, Quickstart};

/// Istio's JSON access log keys compared between the two proxies.
const FIELDS: [&str; 17] = [
    "method",
    "path",
    "protocol",
    "response_code",
    "response_flags",
    "response_code_details",
    "connection_termination_details",
    "upstream_transport_failure_reason",
    "bytes_received",
    "bytes_sent",
    "authority",
    "user_agent",
    "upstream_cluster",
    "route_name",
    "x_forwarded_for",
    "requested_server_name",
    // The upstream connection's local IP (its port differs from run to run).
    "upstream_local_ip",
];

fn run(name: &str, net: u8, envoy: bool) -> Vec<Vec<String>> {
    let mut q = Quickstart::new(name, net);
    let log = q.json_access_log();
    // `/cut`: a route timeout that runs out while the body streams.
    q.write_file(
        "virtual-service.yaml",
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: hello, namespace: default }
spec:
  hosts: [hello]
  http:
  - match: [{ uri: { prefix: /cut } }]
    timeout: 300ms
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /slow } }]
    timeout: 300ms
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /abort } }]
    fault: { abort: { httpStatus: 418, percentage: { value: 100 } } }
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /moved } }]
    redirect: { uri: /elsewhere }
  - match: [{ uri: { prefix: /try } }]
    retries: { attempts: 1, perTryTimeout: 200ms, retryOn: gateway-error }
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /ghost } }]
    route: [{ destination: { host: ghost } }]
  - match: [{ uri: { prefix: /cors } }]
    corsPolicy: { allowOrigins: [{ exact: "http://a.example" }], allowMethods: [GET] }
    route: [{ destination: { host: hello, subset: v1 } }]
  - route: [{ destination: { host: hello, subset: v1 } }]
"#,
    );
    // `refused.example`: one endpoint where nothing listens; `empty.example`: no endpoint.
    q.write_file(
        "service-entries.yaml",
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: refused, namespace: default }
spec:
  hosts: [refused.example]
  ports: [{ number: 8080, name: http, protocol: HTTP }]
  resolution: STATIC
  location: MESH_EXTERNAL
  endpoints: [{ address: 127.0.0.1, ports: { http: 1 } }]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: empty, namespace: default }
spec:
  hosts: [empty.example]
  ports: [{ number: 8080, name: http, protocol: HTTP }]
  resolution: STATIC
  location: MESH_EXTERNAL
  workloadSelector: { labels: { app: nobody } }
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: refused, namespace: default }
spec:
  hosts: [refused.example]
  http:
  - match: [{ uri: { prefix: /once } }]
    retries: { attempts: 0 }
    route: [{ destination: { host: refused.example } }]
  - route: [{ destination: { host: refused.example } }]
"#,
    );
    q.start_weftd();
    // The same proxy on every side: the client's answers pass through hello's sidecar too.
    q.start_hello_with([envoy, envoy]);
    q.start_client(envoy);
    let mut c = Client::new(q.egress());
    let ua = ("user-agent", "weft-e2e/1");
    for (host, path) in [
        ("hello", "/ok?x=1"),
        ("hello", "/boom?status=500"),
        ("nobody", "/"),
        ("hello", "/slow?delay_ms=2000"),
        ("hello", "/abort"),
        ("hello", "/moved"),
        ("refused.example", "/"),
        ("empty.example", "/"),
        ("hello", "/try?delay_ms=1000"),
        ("refused.example", "/once"),
        ("hello", "/ghost"),
    ] {
        c.request("GET", host, path, &[ua]).expect("request");
    }
    let preflight = [
        ua,
        ("origin", "http://a.example"),
        ("access-control-request-method", "GET"),
    ];
    c.request("OPTIONS", "hello", "/cors", &preflight)
        .expect("preflight");
    c.request("POST", "hello", "/post", &[ua, ("content-length", "0")])
        .expect("post");
    // A streamed body (chunked): its bytes are counted as they go through.
    let chunked = c
        .send_raw(b"POST /chunked HTTP/1.1\r\nhost: hello\r\nuser-agent: weft-e2e/1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .expect("chunked post");
    assert_eq!(chunked.status, 200, "{name}: {}", chunked.body);
    // The answer's head arrives, its body is cut at the route timeout: the client's read fails.
    let cut = Client::new(q.egress()).request("GET", "hello", "/cut?body_delay_ms=3000", &[ua]);
    assert!(cut.is_err(), "{name}: the late body was not cut: {cut:?}");
    // Refused before the request path: a header line without a colon, and HTTP/1.0.
    for (raw, status) in [
        (
            &b"GET /bad HTTP/1.1\r\nhost: hello\r\nno colon here\r\n\r\n"[..],
            400,
        ),
        (b"GET /old HTTP/1.0\r\nhost: hello\r\n\r\n", 426),
    ] {
        let got = Client::new(q.egress()).send_raw(raw).expect("refused");
        assert_eq!(
            got.status,
            status,
            "{name}: {}",
            String::from_utf8_lossy(raw)
        );
    }
    // Every sidecar of the mesh logs to the path weftd gave: keep the client's lines.
    let lines = q.client_log_lines(&log, 17);
    q.assert_client_nacked_nothing();
    for l in &lines {
        assert!(
            l["start_time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{l}"
        );
        // A request refused before its head was read has no id yet.
        assert!(
            l["request_id"].as_str().is_some_and(|id| id.len() == 36)
                || l["response_flags"] == "DPE",
            "{l}"
        );
        assert!(l["duration"].is_u64(), "{l}");
    }
    let upstream_hosts: Vec<bool> = lines
        .iter()
        .map(|l| {
            l["upstream_host"]
                .as_str()
                .is_some_and(|h| h.ends_with(":9080"))
        })
        .collect();
    assert_eq!(
        upstream_hosts,
        [
            true, true, false, true, false, false, false, false, true, false, false, false, true,
            true, true, false, false
        ],
        "{name}: {lines:#?}"
    );
    lines
        .iter()
        .map(|l| {
            FIELDS
                .iter()
                .map(|f| match *f {
                    "upstream_local_ip" => l["upstream_local_address"]
                        .as_str()
                        .and_then(|a| a.rsplit_once(':'))
                        .map(|(ip, _)| ip.to_string())
                        .unwrap_or_else(|| l["upstream_local_address"].to_string()),
                    f => l[f].to_string(),
                })
                .collect()
        })
        .collect()
}

#[test]
fn weft_proxy_and_envoy_write_the_same_access_log_fields() {
    let weft = run("access-log-weft", 68, false);
    let envoy = run("access-log-envoy", 69, true);
    let differ: Vec<String> = weft
        .iter()
        .zip(&envoy)
        .enumerate()
        .flat_map(|(i, (w, e))| {
            FIELDS
                .iter()
                .zip(w.iter().zip(e))
                .filter(|(_, (w, e))| w != e)
                .map(move |(f, (w, e))| format!("line {i} {f}: weft-proxy {w}, Envoy {e}"))
        })
        .collect();
    assert!(differ.is_empty(), "{differ:#?}");
    // What both wrote, as Istio users read it: status, flags and details per scenario.
    let seen: Vec<(&str, &str, &str)> = weft
        .iter()
        .map(|l| {
            (
                l[3].as_str(),
                l[4].trim_matches('"'),
                l[5].trim_matches('"'),
            )
        })
        .collect();
    let refused = "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}";
    assert_eq!(
        seen,
        [
            ("200", "-", "via_upstream"),
            ("500", "-", "via_upstream"),
            ("404", "NR", "route_not_found"),
            ("504", "UT", "response_timeout"),
            ("418", "FI", "fault_filter_abort"),
            ("301", "-", "direct_response"),
            ("503", "URX,UF", refused),
            ("503", "UH", "no_healthy_upstream"),
            ("504", "URX,UT", "upstream_per_try_timeout"),
            ("503", "UF", refused),
            ("503", "NC", "cluster_not_found"),
            ("200", "-", "cors_response"),
            ("200", "-", "via_upstream"),
            ("200", "-", "via_upstream"),
            ("200", "UT", "response_timeout"),
            ("400", "DPE", "http1.codec_error"),
            ("426", "DPE", "low_version"),
        ]
    );
    // The chunked POST's body: 11 bytes, counted (the declared length would say 0).
    assert_eq!(weft[13][8], "11", "{:?}", weft[13]);
    assert_eq!(
        weft[6][7], "\"delayed_connect_error:_Connection_refused\"",
        "{:?}",
        weft[6]
    );
}
