//! VirtualService timeouts, retries and fault injection, run twice against the same backends:
//! once with weft-proxy as the client sidecar, once with a stock Envoy, both fed by weftd. The
//! outcomes (status codes, attempts each backend saw) must be the same.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use weft_e2e::{Client, Quickstart};

const VS: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: hello, namespace: default }
spec:
  hosts: [hello]
  http:
  - match: [{ uri: { prefix: /abort } }]
    fault: { abort: { httpStatus: 418, percentage: { value: 100 } } }
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /half-abort } }]
    fault: { abort: { httpStatus: 503, percentage: { value: 50 } } }
    retries: { attempts: 0 }
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /delay } }]
    fault: { delay: { fixedDelay: 300ms, percentage: { value: 100 } } }
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /slow-body } }]
    timeout: 300ms
    retries: { attempts: 0 }
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /slow-try-body } }]
    timeout: 5s
    retries: { attempts: 2, perTryTimeout: 300ms, retryOn: 5xx }
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /slow } }]
    timeout: 300ms
    retries: { attempts: 0 }
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /flaky } }]
    retries: { attempts: 3, perTryTimeout: 2s, retryOn: 5xx }
    route: [{ destination: { host: hello, subset: v1 } }]
  - route: [{ destination: { host: hello, subset: v1 } }]
"#;

/// What a client sidecar did with each scripted request.
#[derive(Debug, PartialEq)]
struct Outcomes {
    abort: u16,
    half_abort_503s_in_200: usize,
    delay: (u16, bool),
    slow: (u16, String),
    slow_body: Cut,
    slow_body_h2: Cut,
    slow_try_body: Cut,
    flaky_recovers: (u16, String, String),
    flaky_gives_up: (u16, String),
    default_policy: (u16, String),
    /// A chunked body (no length known up front) under the default policy: status, attempts
    /// the backend saw, and the body the last attempt delivered.
    streamed_retry: (u16, String, String),
    /// The same with a body past what a proxy keeps (1.5 MiB, read whole by the backend
    /// before it fails the attempt): status and attempts.
    streamed_too_big: (u16, String),
}

/// What a client saw of an answer whose head came in time and whose body did not.
#[derive(Debug, Clone, PartialEq)]
struct Cut {
    status: u16,
    /// The part of the body the backend sent at once arrived.
    first_part: bool,
    /// The chunked body ended properly (its last chunk and the terminating empty one).
    complete: bool,
    /// The proxy closed the connection before the backend's late chunk was due (Envoy closes
    /// it a second after cutting the answer, its `delayed_close_timeout`; weft at once).
    closed_early: bool,
}

/// A request on a fresh connection, read until the proxy closes it (or 4 s without a byte).
fn cut_short(addr: SocketAddr, path: &str) -> Cut {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: hello\r\n\r\n").as_bytes())
        .unwrap();
    let started = Instant::now();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let mut closed = false;
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // Reset by the proxy: closed as well.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                closed = true;
                break;
            }
            Err(_) => break,
        }
    }
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&raw);
    Cut {
        status: text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        first_part: text.contains("name: hello-v1"),
        complete: text.contains("tail\n") && text.ends_with("0\r\n\r\n"),
        // The late chunk is due after 3 s; the timeouts are 300 ms.
        closed_early: closed && elapsed < Duration::from_millis(2500),
    }
}

/// The same over h2c, with curl: the proxy ends a cut answer's stream with a reset.
fn cut_short_h2(addr: SocketAddr, path: &str) -> Cut {
    let dir = std::env::temp_dir().join(format!("weft-cut-{}-{}", std::process::id(), addr.port()));
    let started = Instant::now();
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "--max-time",
            "6",
            "-H",
            "host: hello",
        ])
        .args(["-o"])
        .arg(&dir)
        .args(["-w", "%{http_code}"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("curl runs");
    let elapsed = started.elapsed();
    let body = std::fs::read_to_string(&dir).unwrap_or_default();
    let _ = std::fs::remove_file(&dir);
    Cut {
        status: String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        first_part: body.contains("name: hello-v1"),
        // curl fails a stream that was reset (or cut) before its end.
        complete: out.status.success() && body.ends_with("tail\n"),
        closed_early: !out.status.success() && elapsed < Duration::from_millis(2500),
    }
}

fn attempts_seen(q: &Quickstart, id: &str) -> String {
    weft_e2e::get(q.echo_addr(0), &format!("/echo/attempts?id={id}"))
        .unwrap()
        .body
}

fn scenario(q: &Quickstart, tag: &str) -> Outcomes {
    let mut c = Client::new(q.egress());
    let abort = c.get("hello", "/abort").unwrap().status;
    let half_abort_503s_in_200 = (0..200)
        .filter(|_| c.get("hello", "/half-abort").unwrap().status == 503)
        .count();
    let started = Instant::now();
    let delayed = c.get("hello", "/delay").unwrap().status;
    let delay = (delayed, started.elapsed() >= Duration::from_millis(280));
    let slow = c.get("hello", "/slow?delay_ms=3000").unwrap();
    let slow = (slow.status, slow.body);
    let slow_body = cut_short(q.egress(), "/slow-body?body_delay_ms=3000");
    let slow_body_h2 = cut_short_h2(q.egress(), "/slow-body?body_delay_ms=3000");
    let slow_try_body = cut_short(q.egress(), "/slow-try-body?body_delay_ms=3000");
    let id = format!("{tag}-flaky-ok");
    let ok = c
        .request("GET", "hello", "/flaky?fail=2", &[("x-request-id", &id)])
        .unwrap();
    let flaky_recovers = (
        ok.status,
        ok.header("x-echo-attempt").unwrap_or("").to_string(),
        attempts_seen(q, &id),
    );
    let id = format!("{tag}-flaky-bad");
    let bad = c
        .request("GET", "hello", "/flaky?fail=9", &[("x-request-id", &id)])
        .unwrap();
    let flaky_gives_up = (bad.status, attempts_seen(q, &id));
    let id = format!("{tag}-default");
    let d = c
        .request("GET", "hello", "/other?fail=1", &[("x-request-id", &id)])
        .unwrap();
    let default_policy = (d.status, attempts_seen(q, &id));
    let id = format!("{tag}-streamed");
    let raw = format!(
        "POST /other?fail=1&echo_body=1 HTTP/1.1\r\nhost: hello\r\nx-request-id: {id}\r\n\
         transfer-encoding: chunked\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
    );
    let s = Client::new(q.egress()).send_raw(raw.as_bytes()).unwrap();
    let delivered = s
        .body
        .lines()
        .find(|l| l.starts_with("body ("))
        .unwrap_or("")
        .to_string();
    let streamed_retry = (s.status, attempts_seen(q, &id), delivered);
    let id = format!("{tag}-streamed-big");
    let mut raw = format!(
        "POST /other?fail=1&echo_body=1 HTTP/1.1\r\nhost: hello\r\nx-request-id: {id}\r\n\
         transfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..24 {
        raw.extend_from_slice(b"10000\r\n");
        raw.extend_from_slice(&[b'x'; 0x10000]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let s = Client::new(q.egress()).send_raw(&raw).unwrap();
    let streamed_too_big = (s.status, attempts_seen(q, &id));
    Outcomes {
        abort,
        half_abort_503s_in_200,
        delay,
        slow,
        slow_body,
        slow_body_h2,
        slow_try_body,
        flaky_recovers,
        flaky_gives_up,
        default_policy,
        streamed_retry,
        streamed_too_big,
    }
}

fn run(name: &str, net: u8, envoy: bool) -> Outcomes {
    let mut q = Quickstart::new(name, net);
    q.write_file("virtual-service.yaml", VS);
    q.start_weftd();
    q.start_hello();
    q.start_client(envoy);
    let out = scenario(&q, name);
    eprintln!("{name}: {out:?}");
    q.assert_client_nacked_nothing();
    out
}

fn check(o: &Outcomes, who: &str) {
    assert_eq!(o.abort, 418, "{who}: fault abort");
    assert!(
        (60..=140).contains(&o.half_abort_503s_in_200),
        "{who}: a 50% abort hit {} of 200",
        o.half_abort_503s_in_200
    );
    assert_eq!(o.delay, (200, true), "{who}: fault delay of 300ms");
    assert_eq!(
        o.slow,
        (504, "upstream request timeout".to_string()),
        "{who}: route timeout"
    );
    // Envoy's route timeout runs until the response is complete: an answer whose body is late
    // is cut (its head already went out, so no 504 can replace it). Its per-try timeout stops
    // at the response head: the late body arrives whole.
    let cut = Cut {
        status: 200,
        first_part: true,
        complete: false,
        closed_early: true,
    };
    assert_eq!(o.slow_body, cut, "{who}: route timeout during the body");
    assert_eq!(
        o.slow_body_h2, cut,
        "{who}: route timeout during the body, HTTP/2"
    );
    let whole = Cut {
        complete: true,
        closed_early: false,
        ..cut
    };
    assert_eq!(
        o.slow_try_body, whole,
        "{who}: per-try timeout during the body"
    );
    assert_eq!(
        o.flaky_recovers,
        (200, "3".into(), "3".into()),
        "{who}: 2 failures then success on the 3rd attempt"
    );
    assert_eq!(
        o.flaky_gives_up,
        (503, "4".into()),
        "{who}: 1 attempt + 3 retries, then the last 503"
    );
    assert_eq!(
        o.default_policy,
        (200, "2".into()),
        "{who}: Istio's default policy retries a 503 once more"
    );
    assert_eq!(
        o.streamed_retry,
        (200, "2".into(), "body (11 bytes): hello world".into()),
        "{who}: a streamed body is kept for the retry and sent whole again"
    );
    assert_eq!(
        o.streamed_too_big,
        (503, "1".into()),
        "{who}: a body past the retry buffer is not retried"
    );
}

#[test]
fn weft_proxy_and_envoy_agree_on_timeouts_retries_and_faults() {
    let weft = run("resilience-weft", 41, false);
    check(&weft, "weft-proxy");
    let envoy = run("resilience-envoy", 42, true);
    check(&envoy, "Envoy");
    // Beyond the bounds each must meet, the deterministic outcomes are identical.
    let strip = |o: &Outcomes| {
        (
            o.abort,
            o.delay,
            o.slow.clone(),
            o.slow_body.clone(),
            o.slow_body_h2.clone(),
            o.slow_try_body.clone(),
            o.flaky_recovers.clone(),
            o.flaky_gives_up.clone(),
            o.default_policy.clone(),
            o.streamed_retry.clone(),
            o.streamed_too_big.clone(),
        )
    };
    assert_eq!(strip(&weft), strip(&envoy));
}
