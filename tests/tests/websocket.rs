//! WebSocket upgrades through the client sidecar (weftd puts Istio's `upgrade_configs:
//! websocket` on every connection manager): through weft-proxy and through a stock Envoy, the
//! upgrade request gets the backend's 101 and the connection then carries bytes both ways, and
//! the access log names the same status, details, upstream host, cluster and route.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use weft_e2e::Quickstart;

/// (status line, the backend's name line, whether every message came back intact, whether the
/// answer had `x-envoy-upstream-service-time`)
fn upgrade_round_trip(q: &Quickstart) -> (String, String, bool, bool) {
    let s = TcpStream::connect(q.egress()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut w = s.try_clone().expect("clone");
    w.write_all(
        b"GET /chat HTTP/1.1\r\nhost: hello\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .expect("write");
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).expect("status line");
    let mut timed = false;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("header line");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        timed |= line
            .to_ascii_lowercase()
            .starts_with("x-envoy-upstream-service-time:");
    }
    if !status.contains(" 101 ") {
        return (status.trim().to_string(), String::new(), false, timed);
    }
    let mut name = String::new();
    r.read_line(&mut name).expect("the backend's greeting");
    let mut intact = true;
    for i in 0..20 {
        let msg = format!("message {i} {}", "x".repeat(i * 100));
        w.write_all(msg.as_bytes()).expect("send");
        let mut back = vec![0u8; msg.len()];
        r.read_exact(&mut back).expect("echo");
        intact &= back == msg.as_bytes();
    }
    (
        status.trim().to_string(),
        name.trim().to_string(),
        intact,
        timed,
    )
}

/// The round trips, then the client's access log lines, written when each upgraded connection
/// ends: (status, flags, details, the session's bytes each way, whether the upstream host is
/// hello's sidecar, cluster, route, the upstream connection's local IP).
type Run = (Vec<(String, bool, bool, bool)>, Vec<Vec<String>>);

fn run(name: &str, net: u8, envoy: bool) -> Run {
    let mut q = Quickstart::new(name, net);
    let log = q.json_access_log();
    q.start_weftd();
    q.start_hello();
    q.start_client(envoy);
    let seen = (0..5)
        .map(|_| {
            let (status, backend, intact, timed) = upgrade_round_trip(&q);
            (status, backend.starts_with("hello-v"), intact, timed)
        })
        .collect();
    q.assert_client_nacked_nothing();
    let logged = q
        .client_log_lines(&log, 5)
        .iter()
        .map(|l| {
            vec![
                l["response_code"].to_string(),
                l["response_flags"].to_string(),
                l["response_code_details"].to_string(),
                l["bytes_received"].to_string(),
                l["bytes_sent"].to_string(),
                l["upstream_host"]
                    .as_str()
                    .is_some_and(|h| h.ends_with(":9080"))
                    .to_string(),
                // The route splits between hello's two subsets: either is right.
                l["upstream_cluster"]
                    .to_string()
                    .replace("|v1|", "|vN|")
                    .replace("|v2|", "|vN|"),
                l["route_name"].to_string(),
                l["upstream_local_address"]
                    .as_str()
                    .and_then(|a| a.rsplit_once(':'))
                    .map(|(ip, _)| ip.to_string())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    (seen, logged)
}

#[test]
fn weft_proxy_and_envoy_carry_websocket_upgrades_alike() {
    let weft = run("ws-weft", 64, false);
    // The client closed each session: 19,210 bytes sent, 19,219 back (the greeting too).
    assert_eq!(
        weft.1[0][..6],
        [
            "101",
            "\"DC\"",
            "\"downstream_remote_disconnect\"",
            "19210",
            "19219",
            "true"
        ],
        "{:?}",
        weft.1
    );
    assert_eq!(
        weft.0,
        vec![
            (
                "HTTP/1.1 101 Switching Protocols".to_string(),
                true,
                true,
                true
            );
            5
        ]
    );
    let envoy = run("ws-envoy", 65, true);
    assert_eq!(weft, envoy, "weft-proxy and Envoy differ");
}
