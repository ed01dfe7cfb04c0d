//! HTTP/1.1 towards upstreams, on the wire: a backend that writes raw responses (every framing
//! RFC 9112 allows, and some it forbids) behind Envoy 1.40 and behind weft-proxy, on the same
//! static bootstrap. Both must hand the client the same statuses, bodies and response flags,
//! and both must survive the backend closing pooled connections under them.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use weft_e2e::{Client, Flavor, Standalone};

const PORT: u16 = 8080;

/// The raw answer to a path, and whether the backend closes the connection after it.
fn answer(path: &str) -> (&'static [u8], bool) {
    match path {
        "/length" => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false),
        "/server" => (
            b"HTTP/1.1 200 OK\r\nServer: raw-backend\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
            false,
        ),
        // Both framings: refused (RFC 9112 6.3 allows reading it as chunked; Envoy refuses).
        "/both" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            true,
        ),
        // No length: the body runs to the connection's close.
        "/until-close" => (b"HTTP/1.1 200 OK\r\n\r\nread to the end", true),
        "/http10" => (
            b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nold!",
            true,
        ),
        "/interim" => (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        "/no-content" => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        "/conflicting-lengths" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            true,
        ),
        "/bad-status" => (b"HTTP/1.1 20x OK\r\nContent-Length: 0\r\n\r\n", true),
        "/garbage" => (b"this is not HTTP\r\n\r\n", true),
        "/nothing" => (b"", true),
        // Keep-alive announced, then the connection is closed once the answer is out: the
        // proxy's next request must not be lost on the dead pooled connection.
        "/then-close" => (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbye!", true),
        _ => (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", false),
    }
}

/// A backend answering each request with `answer`; counts the connections it accepted.
fn raw_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind raw backend");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || serve(conn));
        }
    });
    (addr, accepted)
}

fn serve(conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        if path.starts_with("/early") {
            // An answer before the body, which is never read (a server refusing an upload):
            // `/early` closes at once (the proxy's next bytes bring back a reset), `/early-open`
            // keeps the connection and reads nothing more for a while.
            let stream = reader.get_mut();
            let _ = stream
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!");
            if path == "/early-open" {
                std::thread::sleep(Duration::from_secs(5));
            }
            return;
        }
        // The head, then the body (by content-length, or chunked) read and dropped: what is
        // left of a body would read as the next request on this connection.
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        if chunked {
            loop {
                let mut size = String::new();
                if reader.read_line(&mut size).unwrap_or(0) == 0 {
                    return;
                }
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                    .unwrap_or(0);
                if n == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        let mut t = String::new();
                        if reader.read_line(&mut t).unwrap_or(0) == 0 || t == "\r\n" {
                            break;
                        }
                    }
                    break;
                }
                // The chunk and its CRLF.
                let mut chunk = vec![0u8; n + 2];
                if std::io::Read::read_exact(&mut reader, &mut chunk).is_err() {
                    return;
                }
            }
        } else if length > 0 {
            let mut body = vec![0u8; length];
            if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
                return;
            }
        }
        let (bytes, close) = answer(&path);
        let stream = reader.get_mut();
        if stream.write_all(bytes).is_err() || close {
            return;
        }
    }
}

fn resources(ip: &str, backend: SocketAddr, log: &Path) -> String {
    let log = log.display();
    let listener = Standalone::http_listener(
        ip,
        PORT,
        &format!(
            r#"          server_name: istio-envoy
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              log_format: {{ text_format_source: {{ inline_string: "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS%\n" }} }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: / }}
                route: {{ cluster: raw }}
"#
        ),
        "",
    );
    format!(
        r#"{listener}  clusters:
  - name: raw
    type: STATIC
    connect_timeout: 1s
    load_assignment: {}
"#,
        Standalone::load_assignment("raw", &[backend])
    )
}

/// Sends `bytes` on a new connection and returns what comes back within a second of quiet.
fn raw_exchange(proxy: SocketAddr, bytes: &[u8]) -> String {
    use std::io::Read;
    let mut s = TcpStream::connect(proxy).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    s.write_all(bytes).expect("send");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends `head` and a body of `len` bytes from another thread while the answer is read here:
/// the status and body that came back (0 when none did), and, with `to_the_end`, how the
/// connection ended after it and whether all was sent (else reading stops at the answer).
fn upload(proxy: SocketAddr, head: String, len: usize, to_the_end: bool) -> (u16, String, String) {
    use std::io::Read;
    let mut s = TcpStream::connect(proxy).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut w = s.try_clone().expect("clone");
    w.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let writer = std::thread::spawn(move || {
        // The proxy may stop reading once the answer is out: the rest fails to go, as it may.
        w.write_all(head.as_bytes())
            .and_then(|()| w.write_all(&vec![b'x'; len]))
            .is_ok()
    });
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut end = String::from("answer");
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) => {
                end = "closed".into();
                break;
            }
            Ok(n) => n,
            Err(e) => {
                end = format!("{:?}", e.kind());
                break;
            }
        };
        got.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&got);
        let length = |head: &str| {
            head.to_ascii_lowercase()
                .split("content-length: ")
                .nth(1)
                .and_then(|v| v.split("\r\n").next()?.parse::<usize>().ok())
        };
        if !to_the_end
            && let Some((head, body)) = text.split_once("\r\n\r\n")
            && length(head).is_some_and(|n| body.len() >= n)
        {
            break;
        }
    }
    if !to_the_end {
        // The proxy may wait for the rest of the body: it is not coming.
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    let sent = writer.join().unwrap_or(false);
    let text = String::from_utf8_lossy(&got);
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    let end = if to_the_end {
        format!("{end}, all sent: {sent}")
    } else {
        end
    };
    (status, body.unwrap_or_default(), end)
}

/// What the client saw for each path, and the access log's flags.
#[derive(Debug, PartialEq)]
struct Outcomes {
    answers: Vec<(String, u16, String)>,
    flags: Vec<String>,
    /// Where weft-proxy is held to more than Envoy does (docs/envoy-differences.md): checked
    /// for weft-proxy, shown for Envoy.
    beyond_envoy: Vec<(String, u16, String)>,
}

fn scenario(flavor: Flavor, net: u8) -> Outcomes {
    let (backend, accepted) = raw_backend();
    let mut s = Standalone::new("upstream-h1", net, flavor);
    let log = s.dir.join("access.log");
    s.start(&resources(&s.ip(), backend, &log));
    let proxy: SocketAddr = format!("{}:{PORT}", s.ip()).parse().expect("addr");
    let mut answers = Vec::new();
    let paths = [
        "/length",
        "/chunked",
        "/both",
        "/until-close",
        "/http10",
        "/interim",
        "/no-content",
        "/length",
        "/conflicting-lengths",
        "/bad-status",
        "/garbage",
        "/nothing",
    ];
    for path in paths {
        // A fresh downstream connection per request: a failed answer may close it.
        let r = Client::new(proxy).get("raw", path);
        let (status, body) = r.map(|r| (r.status, r.body)).unwrap_or((0, String::new()));
        // Envoy's and weft's local reply texts are compared through the flags instead.
        let body = if status >= 500 { String::new() } else { body };
        answers.push((path.to_string(), status, body));
    }
    // The connection manager's `server_name` replaces the upstream's `server` header (Envoy's
    // default transformation, OVERWRITE) and is set on answers without one and local replies;
    // the router times upstream answers (`x-envoy-upstream-service-time`), not local replies.
    for path in ["/server", "/length", "/garbage"] {
        let r = Client::new(proxy).get("raw", path).expect("an answer");
        let timed = r
            .header("x-envoy-upstream-service-time")
            .map(|v| v.parse::<u64>().is_ok());
        answers.push((
            format!("{path}: server {:?}, timed {timed:?}", r.header("server")),
            r.status,
            String::new(),
        ));
    }
    // Answers that come before the upstream took the request's body are passed on: one that
    // fits the proxy's buffer and one streamed past the socket buffers.
    let mut beyond_envoy = Vec::new();
    for (path, len) in [("/early", 1 << 20), ("/early-open", 16 << 20)] {
        let head = format!("POST {path} HTTP/1.1\r\nHost: raw\r\nContent-Length: {len}\r\n\r\n");
        let open = path == "/early-open";
        let (status, body, end) = upload(proxy, head, len, open);
        if open {
            // The proxy answers, and then, as it closes, reads what the client still sends
            // (hyper's side of `delayed_close_timeout`); Envoy resets the connection.
            beyond_envoy.push((format!("{path}, then: {end}"), status, String::new()));
        }
        // An upstream that closes at once: Envoy answers 503 `UC` when its next write meets
        // the reset before it read the answer (seen in one run of four).
        let to = if path == "/early" {
            &mut beyond_envoy
        } else {
            &mut answers
        };
        to.push((format!("{path}: {len} bytes"), status, body));
    }
    // A head too large, refused while the client still sends it: the refusal reaches it (the
    // proxy reads what still comes before it closes, or the close would be a reset).
    let big = format!(
        "GET /length HTTP/1.1\r\nHost: raw\r\nx-big: {}\r\n\r\n",
        "a".repeat(8 << 20)
    );
    let (status, _, end) = upload(proxy, big, 0, true);
    // Envoy resets the connection (the client's sending fails): the answer reaches a Linux
    // client all the same.
    beyond_envoy.push((format!("an 8 MiB head, then: {end}"), status, String::new()));
    // Pooled connections the backend closed after answering: every request still succeeds.
    let mut c = Client::new(proxy);
    for i in 0..6 {
        let r = c
            .get("raw", "/then-close")
            .expect("answer after a closed pooled connection");
        answers.push((format!("/then-close #{i}"), r.status, r.body));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Keep-alive answers reuse the upstream connection.
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..5 {
        let r = c.get("raw", "/length").expect("keep-alive answer");
        assert_eq!(r.body, "hello");
    }
    let opened = accepted.load(Ordering::SeqCst) - before;
    answers.push((
        "connections for 5 keep-alive requests".into(),
        opened as u16,
        String::new(),
    ));
    // The client's side of HTTP/1.1: raw exchanges on one connection each, the statuses read
    // off whatever came back.
    let downstream: &[(&str, &[u8])] = &[
        (
            "pipelined",
            b"GET /length HTTP/1.1\r\nHost: raw\r\n\r\nGET /chunked HTTP/1.1\r\nHost: raw\r\n\r\n",
        ),
        ("http/1.0", b"GET /length HTTP/1.0\r\nHost: raw\r\n\r\n"),
        ("head", b"HEAD /length HTTP/1.1\r\nHost: raw\r\n\r\n"),
        (
            "post with a body, then a get",
            b"POST /length HTTP/1.1\r\nHost: raw\r\nContent-Length: 4\r\n\r\nbodyGET /length HTTP/1.1\r\nHost: raw\r\n\r\n",
        ),
        (
            "chunked post, then a get",
            b"POST /length HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\nGET /length HTTP/1.1\r\nHost: raw\r\n\r\n",
        ),
        ("malformed", b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n"),
        (
            "conflicting lengths",
            b"POST / HTTP/1.1\r\nHost: raw\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ),
    ];
    for (case, bytes) in downstream {
        let got = raw_exchange(proxy, bytes);
        let statuses: Vec<&str> = got
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &got[i + 9..(i + 12).min(got.len())])
            .collect();
        let hellos = got.matches("hello").count();
        answers.push((
            format!("{case}: statuses {statuses:?}"),
            hellos as u16,
            String::new(),
        ));
    }
    // Envoy flushes its access log every second.
    let flags = weft_e2e::wait_until(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).ok()?;
        let lines: Vec<String> = text
            .lines()
            .filter(|l| {
                l.starts_with("/")
                    && !l.starts_with("/then-close")
                    && !l.starts_with("/length")
                    && !l.starts_with("/early ")
            })
            .map(str::to_string)
            .collect();
        (lines.len() >= paths.len() - 2).then_some(lines)
    })
    .unwrap_or_else(|| {
        panic!(
            "{}: access log lines: {:?}\n{}",
            flavor.name(),
            std::fs::read_to_string(&log),
            s.logs()
        )
    });
    Outcomes {
        answers,
        flags,
        beyond_envoy,
    }
}

#[test]
fn upstream_http1_framing_and_failures_match_envoy() {
    let weft = scenario(Flavor::Weft, 77);
    for (case, status) in [
        (
            "/server: server Some(\"istio-envoy\"), timed Some(true)",
            200,
        ),
        (
            "/length: server Some(\"istio-envoy\"), timed Some(true)",
            200,
        ),
        ("/garbage: server Some(\"istio-envoy\"), timed None", 502),
    ] {
        assert!(
            weft.answers
                .iter()
                .any(|(p, s, _)| p == case && *s == status),
            "{case}: {weft:#?}"
        );
    }
    let expected = [
        ("/length", 200, "hello"),
        ("/chunked", 200, "hello world"),
        ("/until-close", 200, "read to the end"),
        ("/http10", 200, "old!"),
        ("/interim", 201, "ok"),
        ("/no-content", 204, ""),
        ("/early-open: 16777216 bytes", 413, "too big!"),
        ("/early: 1048576 bytes", 413, "too big!"),
        ("an 8 MiB head, then: closed, all sent: true", 431, ""),
        ("/early-open, then: closed, all sent: true", 413, ""),
    ];
    for (path, status, body) in expected {
        assert!(
            weft.answers
                .iter()
                .chain(&weft.beyond_envoy)
                .any(|(p, s, b)| p == path && *s == status && b == body),
            "{path}: {weft:#?}"
        );
    }
    let envoy = scenario(Flavor::Envoy, 78);
    println!(
        "Envoy, where weft-proxy is held to more: {:#?}",
        envoy.beyond_envoy
    );
    assert_eq!(
        (weft.answers, weft.flags),
        (envoy.answers, envoy.flags),
        "weft-proxy (left) and Envoy (right) differ"
    );
}
