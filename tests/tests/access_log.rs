//! Access logs (weftd `--access-log-file`, JSON encoding with Istio's keys) written by the client
//! sidecar, weft-proxy and a stock Envoy fed the same config: the same requests must give the
//! same fields (timings, ids and ports aside).

use std::time::Duration;

use weft_e2e::{Client, Quickstart, wait_until};

const FIELDS: [&str; 12] = [
    "method",
    "path",
    "protocol",
    "response_code",
    "response_flags",
    "bytes_received",
    "bytes_sent",
    "authority",
    "user_agent",
    "upstream_cluster",
    "route_name",
    "x_forwarded_for",
];

fn run(name: &str, net: u8, envoy: bool) -> Vec<Vec<String>> {
    let mut q = Quickstart::new(name, net);
    let log = q.dir.parent().expect("root").join("access.log");
    q.weftd_args = vec![
        "--access-log-file".into(),
        log.display().to_string(),
        "--access-log-encoding".into(),
        "JSON".into(),
    ];
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
  - route: [{ destination: { host: hello, subset: v1 } }]
"#,
    );
    q.start_weftd();
    q.start_hello();
    q.start_client(envoy);
    let mut c = Client::new(q.egress());
    let ua = ("user-agent", "weft-e2e/1");
    for (host, path) in [
        ("hello", "/ok?x=1"),
        ("hello", "/boom?status=500"),
        ("nobody", "/"),
    ] {
        c.request("GET", host, path, &[ua]).expect("request");
    }
    c.request("POST", "hello", "/post", &[ua, ("content-length", "0")])
        .expect("post");
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
    let egress = q.egress().to_string();
    let lines: Vec<serde_json::Value> = wait_until(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).ok()?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["downstream_local_address"] == egress.as_str())
            .collect();
        (lines.len() >= 7).then_some(lines)
    })
    .unwrap_or_else(|| panic!("{name}: no access log lines in {}", log.display()));
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
        [true, true, false, true, true, false, false],
        "{name}: {lines:#?}"
    );
    lines
        .iter()
        .map(|l| FIELDS.iter().map(|f| l[*f].to_string()).collect())
        .collect()
}

#[test]
fn weft_proxy_and_envoy_write_the_same_access_log_fields() {
    let weft = run("access-log-weft", 68, false);
    assert_eq!(weft[0][3], "200");
    assert_eq!(weft[1][3], "500");
    assert_eq!(
        (weft[2][3].as_str(), weft[2][4].as_str()),
        ("404", "\"NR\"")
    );
    // The cut answer: the upstream's status, flagged as timed out.
    assert_eq!(
        (weft[4][3].as_str(), weft[4][4].as_str()),
        ("200", "\"UT\"")
    );
    let envoy = run("access-log-envoy", 69, true);
    for (i, (w, e)) in weft.iter().zip(&envoy).enumerate() {
        assert_eq!(w, e, "line {i}: weft-proxy and Envoy differ ({FIELDS:?})");
    }
}
