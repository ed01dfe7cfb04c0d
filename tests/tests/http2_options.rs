//! The connection manager's `http2_protocol_options`, differentially: one bootstrap, run by
//! Envoy and by weft-proxy, with a listener whose options set the concurrent streams, both
//! flow-control windows and the HPACK table. What `nghttp` reads from each proxy at the start of
//! a connection (the SETTINGS the options set, the connection's window) and the answer's status
//! must be the same.
//!
//! A listener without options is checked on weft-proxy alone: its defaults are not Envoy's
//! (docs/envoy-differences.md).

use std::net::SocketAddr;
use std::process::Command;

use weft_e2e::standalone::{Flavor, Standalone, differing_lines};

const BASE: u16 = 18800;

const ROUTES: &str = r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - { match: { prefix: / }, route: { cluster: echo } }
"#;

const TUNED: &str = "          http2_protocol_options: { max_concurrent_streams: 7, initial_stream_window_size: 70000, initial_connection_window_size: 300000, hpack_table_size: 1024 }\n";

fn resources(ip: &str, backend: SocketAddr) -> String {
    let mut out = String::from("  listeners:\n");
    for (i, (name, hcm)) in [("tuned", TUNED), ("defaults", "")].into_iter().enumerate() {
        out.push_str(&Standalone::hcm_listener(
            name,
            ip,
            BASE + i as u16,
            &format!("{hcm}{ROUTES}"),
            "",
            "",
        ));
    }
    out.push_str("  clusters:\n");
    out.push_str(&Standalone::static_cluster("echo", &[backend], ""));
    out
}

/// What `nghttp` reads from the proxy before the answer: the settings named here (sorted), the
/// connection's window (65,535 plus the WINDOW_UPDATEs on stream 0), and the status.
fn start_of_connection(addr: SocketAddr) -> Vec<String> {
    let out = Command::new("nghttp")
        .args(["-nv", &format!("http://{addr}/x")])
        .output()
        .expect("nghttp runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut seen = Vec::new();
    let mut window: u64 = 65_535;
    // The frame the indented lines below belong to (nghttp prints its own frames too).
    let mut frame = "";
    let mut status = String::from("no answer");
    for line in text.lines() {
        let line = line.trim();
        if line.contains("] recv ") || line.contains("] send ") {
            frame = line;
            if let Some((_, s)) = line.split_once(":status: ") {
                status = s.to_string();
            }
            continue;
        }
        if !frame.contains("] recv ") {
            continue;
        }
        if frame.contains("WINDOW_UPDATE frame")
            && frame.contains("stream_id=0>")
            && let Some(n) = line.strip_prefix("(window_size_increment=")
        {
            window += n.trim_end_matches(')').parse::<u64>().unwrap_or(0);
        }
        if frame.contains("SETTINGS frame")
            && [
                "SETTINGS_MAX_CONCURRENT_STREAMS",
                "SETTINGS_INITIAL_WINDOW_SIZE",
                "SETTINGS_HEADER_TABLE_SIZE",
            ]
            .iter()
            .any(|name| line.starts_with(&format!("[{name}(")))
        {
            seen.push(line.to_string());
        }
    }
    seen.sort();
    seen.push(format!("connection window {window}"));
    seen.push(format!("status {status}"));
    seen
}

fn run(flavor: Flavor, net: u8) -> (Vec<String>, Vec<String>) {
    let mut s = Standalone::new("http2-options", net, flavor);
    let backend = s.backend("echo");
    s.start(&resources(&s.ip(), backend));
    let ip = s.ip();
    let at = |i: u16| -> SocketAddr { format!("{ip}:{}", BASE + i).parse().unwrap() };
    (start_of_connection(at(0)), start_of_connection(at(1)))
}

#[test]
fn http2_protocol_options_set_what_the_client_is_told_as_envoy() {
    let (weft, weft_defaults) = run(Flavor::Weft, 140);
    let (envoy, _) = run(Flavor::Envoy, 141);
    assert_eq!(
        differing_lines(&weft, &envoy),
        0,
        "weft-proxy and Envoy differ"
    );
    assert_eq!(
        weft,
        [
            "[SETTINGS_HEADER_TABLE_SIZE(0x01):1024]",
            "[SETTINGS_INITIAL_WINDOW_SIZE(0x04):70000]",
            "[SETTINGS_MAX_CONCURRENT_STREAMS(0x03):7]",
            "connection window 300000",
            "status 200",
        ]
    );
    // weft-proxy's own defaults (Envoy's are 2^31-1 streams and 256 MiB windows).
    assert_eq!(
        weft_defaults,
        [
            "[SETTINGS_INITIAL_WINDOW_SIZE(0x04):1048576]",
            "[SETTINGS_MAX_CONCURRENT_STREAMS(0x03):1024]",
            "connection window 1048576",
            "status 200",
        ]
    );
}
