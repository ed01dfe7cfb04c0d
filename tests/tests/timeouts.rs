//! The connection manager's timeouts and connection limits, differentially: one bootstrap with
//! static resources, run by Envoy and by weft-proxy, with a listener for each of
//! `stream_idle_timeout`, `request_timeout`, `request_headers_timeout`, and
//! `common_http_protocol_options`' `idle_timeout`, `max_requests_per_connection` and
//! `max_connection_duration` (1 s or 2 requests each). Clients that stall mid-head, backends
//! that stall before or during their answer, keep-alive connections left idle, pipelined and
//! spaced requests, clients that stop reading (an HTTP/1.1 socket left unread, an HTTP/2
//! stream whose window is never given back): what each client receives (statuses, `connection: close`, the proxies' own
//! answers, whether the body ended, whether the proxy closed), what `curl` sees of HTTP/2
//! connections told to go away, and the access log lines must be the same.
//!
//! Clusters' `max_connection_duration` and `upstream_connection_options.tcp_keepalive` are
//! checked on the upstream connections both proxies open (`upstream_cx_total`, `ss`'s timers).
//!
//! Not compared: when exactly a connection closes after it was told to. Envoy waits
//! `delayed_close_timeout` (1 s) for the client to close first, and keeps a drained HTTP/1.1
//! connection open until `drain_timeout` even after a `connection: close` answer; weft-proxy
//! closes once nothing more can come (docs/envoy-differences.md). Both must close within 9 s.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use weft_e2e::standalone::{Flavor, Standalone, differing_lines, line_starting};
use weft_e2e::wait_until;

const BASE: u16 = 18600;

/// (listener, HCM fields at 10 spaces)
const LISTENERS: [(&str, &str); 11] = [
    ("stream-idle", "          stream_idle_timeout: 1s\n"),
    ("request", "          request_timeout: 1s\n"),
    ("headers", "          request_headers_timeout: 1s\n"),
    (
        "idle",
        "          common_http_protocol_options: { idle_timeout: 1s }\n",
    ),
    (
        "max-requests",
        "          common_http_protocol_options: { max_requests_per_connection: 2 }\n",
    ),
    (
        "duration",
        "          common_http_protocol_options: { max_connection_duration: 1s }\n",
    ),
    ("defaults", ""),
    (
        "websocket",
        "          stream_idle_timeout: 1s\n          upgrade_configs: [{ upgrade_type: websocket }]\n",
    ),
    // Routes with their own `idle_timeout` (ROUTE_IDLE).
    ("route-idle", "          stream_idle_timeout: 1s\n"),
    ("small-heads", "          max_request_headers_kb: 2\n"),
    // Answers to a client that stops reading (logged without the bytes sent, which depend on
    // socket buffers).
    ("slow-reader", "          stream_idle_timeout: 1s\n"),
];

/// The `route-idle` listener's routes: a longer idle timeout, none, and the listener's.
const ROUTE_IDLE: &str = r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - { match: { prefix: /longer }, route: { cluster: echo, timeout: 0s, idle_timeout: 4s } }
              - { match: { prefix: /never }, route: { cluster: echo, timeout: 0s, idle_timeout: 0s } }
              - { match: { prefix: / }, route: { cluster: echo, timeout: 0s } }
"#;

/// TCP proxies (after the HTTP listeners' ports): with a 1 s idle timeout, and Envoy's default.
const TCP: [(&str, &str); 2] = [("tcp-idle", "idle_timeout: 1s, "), ("tcp-defaults", "")];

fn port(listener: &str) -> u16 {
    let names = LISTENERS.iter().chain(TCP.iter()).map(|(n, _)| *n);
    BASE + names.take_while(|n| *n != listener).count() as u16
}

const ROUTES: &str = r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - { match: { prefix: / }, route: { cluster: echo, timeout: 0s } }
"#;

fn resources(ip: &str, backend: SocketAddr, logs: &std::path::Path) -> String {
    let mut out = String::from("  listeners:\n");
    for (name, hcm) in LISTENERS {
        let format = if name == "slow-reader" {
            "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%"
        } else {
            "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %BYTES_SENT%"
        };
        let log = Standalone::access_log(&logs.join(format!("access-{name}.log")), format);
        let routes = if name == "route-idle" {
            ROUTE_IDLE
        } else {
            ROUTES
        };
        out.push_str(&Standalone::hcm_listener(
            name,
            ip,
            port(name),
            &format!("{hcm}{log}{routes}"),
            "",
            "",
        ));
    }
    for (name, fields) in TCP {
        out.push_str(&format!(
            r#"  - name: {name}
    address: {{ socket_address: {{ address: {ip}, port_value: {} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, {fields}stat_prefix: {name}, cluster: echo }}
"#,
            port(name)
        ));
    }
    out.push_str(&format!(
        "  clusters:\n  - name: echo\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment: {}\n",
        Standalone::load_assignment("echo", &[backend])
    ));
    out
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: svc\r\n\r\n")
}

/// A request whose head carries `n` bytes of one header's value.
fn big_head(path: &str, n: usize) -> (String, u64) {
    let value = "v".repeat(n);
    (
        format!("GET {path} HTTP/1.1\r\nhost: svc\r\nx-big: {value}\r\nconnection: close\r\n\r\n"),
        0,
    )
}

/// What a client sends: pieces, each followed by a pause (ms).
type Pieces = Vec<(String, u64)>;

/// (case, listener, what the client sends)
fn cases() -> Vec<(&'static str, &'static str, Pieces)> {
    let partial = |path: &str| (format!("GET {path} HTTP/1.1\r\nhost: svc\r\n"), 0);
    let chunked = |path: &str| {
        format!(
            "POST {path}?echo_body=1 HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"
        )
    };
    let chunk = |text: &str, pause| (format!("{:x}\r\n{text}\r\n", text.len()), pause);
    vec![
        ("stalled head", "stream-idle", vec![partial("/a")]),
        (
            "stalled upstream",
            "stream-idle",
            vec![(get("/b?delay_ms=2500"), 0)],
        ),
        (
            "stalled answer body",
            "stream-idle",
            vec![(get("/c?body_delay_ms=2500"), 0)],
        ),
        (
            "idle between requests",
            "stream-idle",
            vec![(get("/d1"), 2000), (get("/d2"), 0)],
        ),
        (
            "stalled small body",
            "stream-idle",
            vec![(
                "POST /m1?echo_body=1 HTTP/1.1\r\nhost: svc\r\ncontent-length: 10\r\n\r\n12345"
                    .to_string(),
                0,
            )],
        ),
        (
            "stalled streamed body",
            "stream-idle",
            vec![(chunked("/m2"), 0), chunk("hello", 0)],
        ),
        (
            // Never a second without a byte, for longer than the timeout.
            "slow steady body",
            "stream-idle",
            vec![
                (chunked("/m3"), 250),
                chunk("a", 250),
                chunk("b", 250),
                chunk("c", 250),
                chunk("d", 250),
                ("0\r\n\r\n".to_string(), 0),
            ],
        ),
        ("stalled head", "request", vec![partial("/e")]),
        (
            "stalled streamed body",
            "request",
            vec![(chunked("/m4"), 0), chunk("hello", 0)],
        ),
        (
            "slow upstream",
            "request",
            vec![(get("/f?delay_ms=1500"), 0)],
        ),
        ("stalled head", "headers", vec![partial("/g")]),
        ("idle after a request", "idle", vec![(get("/h"), 0)]),
        ("idle without a request", "idle", vec![]),
        (
            "pipelined",
            "max-requests",
            vec![(format!("{}{}{}", get("/i1"), get("/i2"), get("/i3")), 0)],
        ),
        (
            "spaced",
            "duration",
            vec![(get("/j1"), 1500), (get("/j2"), 0)],
        ),
        (
            "in flight when old",
            "duration",
            vec![(get("/k?delay_ms=1500"), 0)],
        ),
        (
            "quiet session",
            "websocket",
            vec![(
                "GET /ws HTTP/1.1\r\nhost: svc\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nhi".to_string(),
                0,
            )],
        ),
        (
            "longer route timeout",
            "route-idle",
            vec![(get("/longer?delay_ms=2500"), 0)],
        ),
        (
            "route timeout off",
            "route-idle",
            vec![(get("/never?delay_ms=2500"), 0)],
        ),
        (
            "listener's timeout",
            "route-idle",
            vec![(get("/default?delay_ms=2500"), 0)],
        ),
        (
            "head under the limit",
            "small-heads",
            vec![big_head("/o1", 1500)],
        ),
        (
            "head over the limit",
            "small-heads",
            vec![big_head("/o2", 3000)],
        ),
        (
            "head over the default limit",
            "defaults",
            vec![big_head("/o3", 62 * 1024)],
        ),
        (
            "client stops reading",
            "slow-reader",
            vec![(get("/big?bytes=50000000"), 3000)],
        ),
        (
            "a large answer read at once",
            "defaults",
            vec![(get("/big?bytes=2000000"), 0)],
        ),
        ("quiet connection", "tcp-idle", vec![(get("/n1"), 0)]),
        ("quiet connection", "tcp-defaults", vec![(get("/n2"), 0)]),
        (
            "keep-alive",
            "defaults",
            vec![(get("/l1"), 1200), (get("/l2"), 0)],
        ),
    ]
}

/// What a client saw: each answer's status, `connection: close`, the proxy's own body text,
/// whether a body ended; then whether the proxy closed the connection within 9 s.
fn exchange(addr: SocketAddr, pieces: &[(String, u64)]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut out = Vec::new();
    for (bytes, pause) in pieces {
        if s.write_all(bytes.as_bytes()).is_err() {
            out.push("(send refused)".to_string());
            break;
        }
        std::thread::sleep(Duration::from_millis(*pause));
    }
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = Vec::new();
    let start = Instant::now();
    let end = loop {
        let mut chunk = [0u8; 16384];
        match s.read(&mut chunk) {
            Ok(0) => break "closed",
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
            Err(_) if start.elapsed() > Duration::from_secs(9) => break "open",
            Err(_) => {}
        }
    };
    let text = String::from_utf8_lossy(&got).into_owned();
    for answer in text.split("HTTP/1.1 ").skip(1) {
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
        let status = &head[..3];
        let close = head.contains("\r\nconnection: close");
        let body = if status == "101" {
            format!("{body:?}")
        } else if head.contains("x-echo-name") {
            // The backend's echo names the request id: only whether it ended.
            let declared = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.trim().parse::<usize>().ok());
            let short = match declared {
                Some(n) => body.len() < n,
                None => head.contains("transfer-encoding: chunked") && !body.ends_with("0\r\n\r\n"),
            };
            if short {
                "(echo, cut short)".to_string()
            } else {
                "(echo)".to_string()
            }
        } else {
            format!("{body:?}")
        };
        out.push(format!(
            "{status}{} {body}",
            if close { " close" } else { "" }
        ));
    }
    out.push(end.to_string());
    out.join(", ")
}

/// What `curl` reports of three HTTP/2 requests 2 s apart: new connections, reuses, GOAWAYs.
fn h2_spaced(addr: SocketAddr) -> String {
    let url = format!("http://{addr}/h2");
    let out = Command::new("curl")
        .args([
            "-sv",
            "--http2-prior-knowledge",
            "--rate",
            "30/m",
            "-o",
            "/dev/null",
        ])
        .args(["-o", "/dev/null", "-o", "/dev/null", &url, &url, &url])
        .output()
        .expect("curl runs");
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .filter_map(|l| {
            if l.contains("Connected to") {
                Some("connect")
            } else if l.contains("Re-using existing connection") {
                Some("reuse")
            } else if l.contains("GOAWAY") {
                Some("goaway")
            } else if l.starts_with("< HTTP/2 200") {
                Some("200")
            } else {
                None
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An HTTP/2 client that stops reading: it never gives back flow-control window, so the
/// answer stalls once its first 64 KiB are sent. The status, then how the stream ended: reset
/// (with its reason), ended, or still open after 9 s.
fn h2_stalled_reader(addr: SocketAddr) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut client, conn) = h2::client::handshake(tcp).await.expect("handshake");
        tokio::spawn(conn);
        let req = http::Request::get("http://svc/big?bytes=50000001")
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).expect("request");
        let resp = match tokio::time::timeout(Duration::from_secs(9), resp).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return format!("no answer: {:?}", e.reason()),
            Err(_) => return "no answer".to_string(),
        };
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let end = tokio::time::timeout(Duration::from_secs(9), async {
            loop {
                match body.data().await {
                    // Read, and the window not given back.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break format!("reset {:?}", e.reason()),
                    None => break "ended".to_string(),
                }
            }
        })
        .await
        .unwrap_or_else(|_| "open".to_string());
        format!("{status} {end}")
    })
}

/// The status `curl` gets for an HTTP/2 request with `n` bytes of one header's value.
fn h2_big_head(addr: SocketAddr, n: usize) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-H", &format!("x-big: {}", "v".repeat(n))])
        .arg(format!("http://{addr}/h2-big"))
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Per case what the client saw, the HTTP/2 lines, then the sorted log lines.
fn run(flavor: Flavor, net: u8) -> Vec<String> {
    let mut s = Standalone::new("timeouts", net, flavor);
    let backend = s.backend("echo");
    let dir = s.dir.clone();
    s.start(&resources(&s.ip(), backend, &dir));
    let ip = s.ip();
    // Every case on its own connection, at once: the run takes as long as the longest.
    let threads: Vec<_> = cases()
        .into_iter()
        .map(|(case, listener, pieces)| {
            let addr: SocketAddr = format!("{ip}:{}", port(listener)).parse().unwrap();
            std::thread::spawn(move || format!("{listener} {case}: {}", exchange(addr, &pieces)))
        })
        .collect();
    let h2: Vec<_> = ["idle", "max-requests", "duration", "defaults"]
        .into_iter()
        .map(|listener| {
            let addr: SocketAddr = format!("{ip}:{}", port(listener)).parse().unwrap();
            std::thread::spawn(move || format!("{listener} HTTP/2: {}", h2_spaced(addr)))
        })
        .collect();
    let heads: Vec<_> = [1500, 3000]
        .into_iter()
        .map(|n| {
            let addr: SocketAddr = format!("{ip}:{}", port("small-heads")).parse().unwrap();
            // Over the limit, Envoy resets the stream and weft-proxy (its HTTP/2 library)
            // answers 431: written down in docs/envoy-differences.md, not compared.
            let known = if n > 2048 { "differs: " } else { "" };
            std::thread::spawn(move || {
                format!("{known}small-heads HTTP/2 {n} B: {}", h2_big_head(addr, n))
            })
        })
        .collect();
    let stalled = {
        let addr: SocketAddr = format!("{ip}:{}", port("slow-reader")).parse().unwrap();
        std::thread::spawn(move || {
            format!(
                "slow-reader HTTP/2 client stops reading: {}",
                h2_stalled_reader(addr)
            )
        })
    };
    let mut seen: Vec<String> = threads
        .into_iter()
        .chain(h2)
        .chain(heads)
        .chain([stalled])
        .map(|t| t.join().expect("case thread"))
        .collect();
    seen.sort();
    // 11 HTTP/1.1 requests reach the backend or time out, 3 partial heads are refused, and
    // 12 HTTP/2 requests: 26 lines, give or take what each proxy does with the third pipelined
    // request (none answer it). Waited for until the count stops growing.
    let mut last = 0;
    let logged = wait_until(Duration::from_secs(10), || {
        let mut lines = Vec::new();
        for (name, _) in LISTENERS {
            let text = std::fs::read_to_string(dir.join(format!("access-{name}.log"))).ok()?;
            lines.extend(text.lines().map(|l| format!("{name} {l}")));
        }
        let settled = lines.len() >= 20 && lines.len() == last;
        last = lines.len();
        std::thread::sleep(Duration::from_millis(300));
        settled.then_some(lines)
    })
    .unwrap_or_else(|| panic!("{}: access log lines\n{}", flavor.name(), s.logs()));
    let mut logged: Vec<String> = logged
        .into_iter()
        .filter(|l| !l.contains("http2.header_list_size_too_large"))
        .collect();
    logged.sort();
    seen.extend(logged.into_iter().map(|l| format!("log {l}")));
    seen
}

#[test]
fn timeouts_and_connection_limits_behave_as_envoys() {
    let (weft, weft_known): (Vec<String>, Vec<String>) = run(Flavor::Weft, 112)
        .into_iter()
        .partition(|l| !l.starts_with("differs: "));
    let (envoy, envoy_known): (Vec<String>, Vec<String>) = run(Flavor::Envoy, 113)
        .into_iter()
        .partition(|l| !l.starts_with("differs: "));
    assert_eq!(weft_known, ["differs: small-heads HTTP/2 3000 B: 431"]);
    assert_eq!(envoy_known, ["differs: small-heads HTTP/2 3000 B: 000"]);
    let differ = differing_lines(&weft, &envoy);
    assert_eq!(differ, 0, "weft-proxy and Envoy differ (see above)");
    // And what the cases are there to show, spelled out.
    let case = |prefix: &str| line_starting(&weft, prefix);
    assert_eq!(
        case("stream-idle stalled head:"),
        "stream-idle stalled head: 408 close \"stream timeout\", closed"
    );
    assert_eq!(
        case("stream-idle stalled upstream:"),
        "stream-idle stalled upstream: 504 \"stream timeout\", open"
    );
    assert_eq!(
        case("stream-idle stalled answer body:"),
        "stream-idle stalled answer body: 200 (echo, cut short), closed"
    );
    assert_eq!(
        case("headers stalled head:"),
        "headers stalled head: 408 close \"request header timeout\", closed"
    );
    assert_eq!(
        case("max-requests pipelined:"),
        "max-requests pipelined: 200 (echo), 200 close (echo), closed"
    );
    assert_eq!(
        case("stream-idle stalled streamed body:"),
        "stream-idle stalled streamed body: 408 close \"stream timeout\", closed"
    );
    assert!(
        case("stream-idle slow steady body:").contains("200 (echo)"),
        "{weft:?}"
    );
    assert!(
        case("route-idle longer route timeout:")
            .starts_with("route-idle longer route timeout: 200")
    );
    assert!(case("route-idle listener's timeout:").contains("504"));
    assert!(
        case("small-heads head over the limit:").contains("431"),
        "{weft:?}"
    );
    assert!(
        case("defaults head over the default limit:").contains("431"),
        "{weft:?}"
    );
    assert!(
        case("slow-reader HTTP/2 client stops reading:")
            == "slow-reader HTTP/2 client stops reading: 200 reset Some(INTERNAL_ERROR)",
        "{weft:?}"
    );
    assert!(
        weft.iter()
            .any(|l| l == "log slow-reader /big?bytes=50000001 200 SI stream_idle_timeout"),
        "{weft:?}"
    );
    assert!(case("idle HTTP/2:").contains("goaway"), "{weft:?}");
    assert!(!case("defaults HTTP/2:").contains("goaway"), "{weft:?}");
}

/// How many upstream connections a cluster with `max_connection_duration: 1s` opened for a
/// request, another 1.5 s later, and three more at once after it (`upstream_cx_total`), and
/// the statuses.
fn run_aged(flavor: Flavor, net: u8) -> (u64, Vec<u16>) {
    let mut s = Standalone::new("upstream-age", net, flavor);
    let backend = s.backend("echo");
    let listener = Standalone::http_listener(&s.ip(), BASE + 30, ROUTES, "");
    s.start(&format!(
        r#"{listener}  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http_protocol_options: {{}} }}
        common_http_protocol_options: {{ max_connection_duration: 1s }}
    load_assignment: {}
"#,
        Standalone::load_assignment("echo", &[backend])
    ));
    let addr: SocketAddr = format!("{}:{}", s.ip(), BASE + 30).parse().unwrap();
    let mut client = weft_e2e::Client::new(addr);
    let mut statuses = Vec::new();
    let mut get = |path: &str| {
        statuses.push(
            client
                .request("GET", "svc", path, &[])
                .map(|r| r.status)
                .unwrap_or(0),
        )
    };
    get("/first");
    std::thread::sleep(Duration::from_millis(1500));
    for path in ["/second", "/third", "/fourth", "/fifth"] {
        get(path);
    }
    (s.stat("cluster.echo.upstream_cx_total"), statuses)
}

#[test]
fn upstream_connections_are_not_reused_past_their_maximum_duration() {
    let weft = run_aged(Flavor::Weft, 118);
    let envoy = run_aged(Flavor::Envoy, 119);
    assert_eq!(weft, envoy, "weft-proxy, then Envoy");
    assert_eq!(weft, (2, vec![200; 5]), "a second connection, reused after");
}

/// The keepalive timer `ss` reports on each of the proxy's connections to `backend` (None: no
/// keepalive), e.g. `Some(1.8)` seconds to the next probe.
fn keepalive_timers(backend: SocketAddr) -> Vec<Option<f64>> {
    let out = Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .arg(format!("dst {backend}"))
        .output()
        .expect("ss (iproute2) is installed by scripts/test.sh");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let timer = line.split("timer:(keepalive,").nth(1)?;
            let left = timer.split(',').next()?;
            // `1.8sec`, `950ms`, `1min2sec`...
            if let Some(ms) = left.strip_suffix("ms") {
                return ms.parse::<f64>().ok().map(|v| v / 1000.0);
            }
            left.strip_suffix("sec")?.parse().ok()
        })
        .collect()
}

/// A request through a cluster with `upstream_connection_options.tcp_keepalive` and one
/// through a cluster without; the keepalive timers on the proxy's idle upstream connections.
fn run_keepalive(flavor: Flavor, net: u8) -> (Vec<Option<f64>>, Vec<Option<f64>>) {
    let mut s = Standalone::new("upstream-keepalive", net, flavor);
    let kept = s.backend("kept");
    let plain = s.backend("plain");
    let ip = s.ip();
    let mut listeners = String::new();
    for (i, cluster) in ["kept", "plain"].iter().enumerate() {
        let routes = ROUTES.replace("cluster: echo", &format!("cluster: {cluster}"));
        let port = BASE + 40 + i as u16;
        listeners.push_str(&Standalone::hcm_listener(
            cluster, &ip, port, &routes, "", "",
        ));
    }
    s.start(&format!(
        r#"  listeners:
{listeners}  clusters:
  - name: kept
    type: STATIC
    connect_timeout: 1s
    upstream_connection_options:
      tcp_keepalive: {{ keepalive_time: 2, keepalive_interval: 1, keepalive_probes: 3 }}
    load_assignment: {}
  - name: plain
    type: STATIC
    connect_timeout: 1s
    load_assignment: {}
"#,
        Standalone::load_assignment("kept", &[kept]),
        Standalone::load_assignment("plain", &[plain]),
    ));
    for i in 0..2 {
        let addr: SocketAddr = format!("{ip}:{}", BASE + 40 + i).parse().unwrap();
        let status = weft_e2e::Client::new(addr)
            .request("GET", "svc", "/", &[])
            .map(|r| r.status)
            .unwrap_or(0);
        assert_eq!(status, 200, "{flavor:?} listener {i}");
    }
    (keepalive_timers(kept), keepalive_timers(plain))
}

#[test]
fn upstream_connections_keep_alive_as_the_cluster_says() {
    for (flavor, net) in [(Flavor::Weft, 120), (Flavor::Envoy, 121)] {
        let (kept, plain) = run_keepalive(flavor, net);
        // One pooled connection each; the kept one probes within its 2 s keepalive time (the
        // kernel's default is 2 hours), the other has no keepalive timer.
        assert_eq!(kept.len(), 1, "{flavor:?}: {kept:?}");
        assert!(
            kept[0].is_some_and(|left| left > 0.0 && left <= 2.0),
            "{flavor:?}: {kept:?}"
        );
        assert_eq!(plain, vec![None], "{flavor:?}");
    }
}
