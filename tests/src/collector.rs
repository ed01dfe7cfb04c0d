//! A Zipkin collector for the tests: it answers every report `202` and keeps it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A connection manager's `tracing` (YAML at 10 spaces) sampling every request and reporting
/// Zipkin spans to the `zipkin` cluster, with `extra` fields (YAML at 12 spaces: custom tags,
/// `spawn_upstream_span`...).
pub fn hcm_tracing(extra: &str) -> String {
    format!(
        r#"          tracing:
            random_sampling: {{ value: 100 }}
{extra}            provider:
              name: envoy.tracers.zipkin
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig
                collector_cluster: zipkin
                collector_endpoint: /api/v2/spans
                collector_endpoint_version: HTTP_JSON
"#
    )
}

/// Reports the collector received: the request's head lines that matter and its body.
pub type Reports = Arc<Mutex<Vec<(String, String)>>>;

/// A Zipkin collector on a free port of 127.0.0.1: answers every POST `202` and keeps its
/// request.
pub fn zipkin() -> (SocketAddr, Reports) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind collector");
    let addr = listener.local_addr().expect("addr");
    let reports: Reports = Arc::default();
    let keep = reports.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut out = conn.try_clone().expect("clone");
                let mut r = BufReader::new(conn);
                loop {
                    let mut head = Vec::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push(line.trim_end().to_string());
                    }
                    let header = |name: &str| {
                        head.iter().find_map(|l| {
                            let (n, v) = l.split_once(':')?;
                            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                    };
                    let mut body = Vec::new();
                    if header("transfer-encoding").is_some_and(|t| t == "chunked") {
                        loop {
                            let mut size = String::new();
                            r.read_line(&mut size).expect("chunk size");
                            let n = usize::from_str_radix(size.trim(), 16).expect("hex size");
                            let mut chunk = vec![0; n + 2];
                            r.read_exact(&mut chunk).expect("chunk");
                            if n == 0 {
                                break;
                            }
                            body.extend_from_slice(&chunk[..n]);
                        }
                    } else {
                        let n = header("content-length").map_or(0, |v| v.parse().unwrap());
                        body.resize(n, 0);
                        r.read_exact(&mut body).expect("body");
                    }
                    let what = format!(
                        "{} host={} content-type={}",
                        head[0],
                        header("host").unwrap_or_default(),
                        header("content-type").unwrap_or_default()
                    );
                    keep.lock()
                        .unwrap()
                        .push((what, String::from_utf8_lossy(&body).into()));
                    let _ = out.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    (addr, reports)
}

/// The spans of every report so far, once there are at least `n` (or `wait` has passed).
pub fn spans(reports: &Reports, n: usize, wait: Duration) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + wait;
    loop {
        let spans: Vec<serde_json::Value> = reports
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, body)| {
                serde_json::from_str::<Vec<serde_json::Value>>(body).expect("a JSON array")
            })
            .collect();
        if spans.len() >= n || Instant::now() > deadline {
            return spans;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
