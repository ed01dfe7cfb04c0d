//! gRPC through the client sidecar (h2c downstream from curl, HTTP/2 upstream to a `GRPC`
//! port), through weft-proxy and through a stock Envoy fed the same config by weftd: status in
//! trailers passes through, Istio's default retry policy retries UNAVAILABLE (trailers-only
//! answers), other statuses are not retried, a fault aborts with a gRPC status, a route timeout
//! answers the gRPC way. Outcomes (HTTP status, grpc-status, message, attempts) must match.

use std::process::Command;

use weft_e2e::Quickstart;

fn config(q: &Quickstart) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: grpc-echo, namespace: default }}
spec:
  hosts: [grpc.echo.internal]
  location: MESH_EXTERNAL
  ports: [{{ number: 8080, name: grpc, protocol: GRPC }}]
  resolution: STATIC
  endpoints: [{{ address: 127.0.0.1, ports: {{ grpc: {port} }} }}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: grpc-echo, namespace: default }}
spec:
  hosts: [grpc.echo.internal]
  http:
  - match: [{{ uri: {{ prefix: /pkg.Faults/ }} }}]
    fault: {{ abort: {{ grpcStatus: UNAVAILABLE, percentage: {{ value: 100 }} }} }}
    route: [{{ destination: {{ host: grpc.echo.internal }} }}]
  - match: [{{ uri: {{ prefix: /pkg.Slow/ }} }}]
    timeout: 300ms
    retries: {{ attempts: 0 }}
    route: [{{ destination: {{ host: grpc.echo.internal }} }}]
  - match: [{{ uri: {{ prefix: /pkg.NoRetry/ }} }}]
    retries: {{ attempts: 0 }}
    route: [{{ destination: {{ host: grpc.echo.internal }} }}]
  - route: [{{ destination: {{ host: grpc.echo.internal }} }}]
"#,
        port = q.echo_addr(0).port()
    )
}

/// (HTTP status, grpc-status, has a message body, backend attempts as the backend reported)
type Outcome = (u16, String, bool, String);

fn call(q: &Quickstart, path: &str, id: &str, headers: &[(&str, &str)]) -> Outcome {
    let dir = std::env::temp_dir().join(format!("weft-grpc-{}-{id}", q.name));
    std::fs::create_dir_all(&dir).expect("tmp");
    let frame = dir.join("frame.bin");
    std::fs::write(&frame, [0u8, 0, 0, 0, 2, b'h', b'i']).expect("frame");
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--http2-prior-knowledge",
        "--max-time",
        "5",
        "-D",
        "-",
    ])
    .arg("-o")
    .arg(dir.join("body.bin"))
    .args([
        "-H",
        "host: grpc.echo.internal",
        "-H",
        "content-type: application/grpc",
    ])
    .args(["-H", "te: trailers", "-H", &format!("x-request-id: {id}")]);
    for (k, v) in headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    // A request the proxy answers without reading it (a fault abort) may be reset while curl
    // is still sending its body: those go out without one.
    if !path.starts_with("/pkg.Faults/") {
        // Without `content-length`, as gRPC clients send their messages: the proxy cannot know
        // the body is small, yet must keep it for a retry.
        cmd.arg("--data-binary")
            .arg(format!("@{}", frame.display()))
            .args(["-H", "content-length:"]);
    } else {
        cmd.args(["-X", "POST"]);
    }
    cmd.arg(format!("http://{}{path}", q.egress()));
    let out = cmd.output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let field = |name: &str| {
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "-".into())
    };
    let body = std::fs::read(dir.join("body.bin")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (
        status,
        field("grpc-status"),
        body.len() > 5,
        field("x-echo-attempt"),
    )
}

fn run(name: &str, net: u8, envoy: bool) -> Vec<Outcome> {
    let mut q = Quickstart::new(name, net);
    q.write_file("grpc.yaml", &config(&q));
    q.start_weftd();
    q.start_hello();
    q.start_client(envoy);
    let seen = vec![
        call(&q, "/pkg.Svc/Ok", &format!("{name}-ok"), &[]),
        call(
            &q,
            "/pkg.Svc/Flaky",
            &format!("{name}-flaky"),
            &[("x-grpc-fail", "2")],
        ),
        call(
            &q,
            "/pkg.NoRetry/Call",
            &format!("{name}-noretry"),
            &[("x-grpc-fail", "1")],
        ),
        call(
            &q,
            "/pkg.Svc/Err",
            &format!("{name}-err"),
            &[("x-grpc-status", "7")],
        ),
        call(&q, "/pkg.Faults/Call", &format!("{name}-fault"), &[]),
        call(
            &q,
            "/pkg.Slow/Call",
            &format!("{name}-slow"),
            &[("x-delay-ms", "2000")],
        ),
        // The client's deadline (`grpc-timeout`) is the route's timeout where the route has
        // none, capped by it where it has one (istiod's `max_grpc_timeout`).
        call(
            &q,
            "/pkg.NoRetry/Deadline",
            &format!("{name}-deadline"),
            &[("x-delay-ms", "2000"), ("grpc-timeout", "200m")],
        ),
        call(
            &q,
            "/pkg.NoRetry/Deadline",
            &format!("{name}-in-time"),
            &[("x-delay-ms", "100"), ("grpc-timeout", "3S")],
        ),
        call(
            &q,
            "/pkg.Slow/Call",
            &format!("{name}-capped"),
            &[("x-delay-ms", "2000"), ("grpc-timeout", "4S")],
        ),
    ];
    eprintln!("{name}: {seen:?}");
    q.assert_client_nacked_nothing();
    seen
}

#[test]
fn weft_proxy_and_envoy_carry_grpc_alike() {
    let weft = run("grpc-weft", 66, false);
    let o = |s: u16, g: &str, body: bool, a: &str| (s, g.to_string(), body, a.to_string());
    assert_eq!(
        weft[0],
        o(200, "0", true, "1"),
        "status in trailers, message through"
    );
    assert_eq!(
        weft[1],
        o(200, "0", true, "3"),
        "UNAVAILABLE retried twice (Istio's default)"
    );
    assert_eq!(
        weft[2],
        o(200, "14", false, "1"),
        "no retries when attempts: 0"
    );
    assert_eq!(
        weft[3],
        o(200, "7", false, "1"),
        "PERMISSION_DENIED is not retried"
    );
    assert_eq!(weft[4].1, "14", "the fault aborts with UNAVAILABLE");
    assert_eq!(
        weft[5],
        o(200, "14", false, "-"),
        "a route timeout is a gRPC UNAVAILABLE (Envoy's local reply mapping)"
    );
    assert_eq!(
        weft[6],
        o(200, "14", false, "-"),
        "the client's deadline cuts the call where the route has no timeout"
    );
    assert_eq!(
        weft[7],
        o(200, "0", true, "1"),
        "a call within its deadline"
    );
    assert_eq!(
        weft[8],
        o(200, "14", false, "-"),
        "the route's timeout caps a longer deadline"
    );
    let envoy = run("grpc-envoy", 67, true);
    assert_eq!(weft, envoy, "weft-proxy and Envoy differ");
}
