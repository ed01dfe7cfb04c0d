//! WebSocket upgrades through the client sidecar (weftd puts Istio's `upgrade_configs:
//! websocket` on every connection manager): through weft-proxy and through a stock Envoy, the
//! upgrade request gets the backend's 101 and the connection then carries bytes both ways.

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

fn run(name: &str, net: u8, envoy: bool) -> Vec<(String, bool, bool, bool)> {
    let mut q = Quickstart::new(name, net);
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
    seen
}

#[test]
fn weft_proxy_and_envoy_carry_websocket_upgrades_alike() {
    let weft = run("ws-weft", 64, false);
    assert_eq!(
        weft,
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
