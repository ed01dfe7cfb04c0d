//! `weftctl echo`: a tiny HTTP/1.1 and h2c echo server for demos and tests. It answers every
//! request with its name, the request's method, path and headers (text, or JSON when the
//! client sends `accept: application/json`), and the header `x-echo-name`.
//!
//! Scripted behaviour for resilience tests, by query parameter:
//! - `status=NNN`: answer with that status;
//! - `delay_ms=N`: wait before answering;
//! - `echo_body`: read the request's body and add it to the answer (`body (N bytes): ...`, the
//!   text only up to 1 KiB);
//! - `bytes=N`: add N bytes (`x`, at most 64 MiB) after the echo (a large answer); with
//!   `fill=TEXT`, the N bytes repeat TEXT instead (a check of the answer's order and origin);
//! - `body_delay_ms=N`: send the head and the echo at once, then, N ms later, a last chunk
//!   `tail` (the body is chunked);
//! - `fail=N`: answer 503 to the first N attempts of each `x-request-id` (proxies keep the id
//!   across retries), then succeed; the reply's `x-echo-attempt` says which attempt it was;
//! - `fail_on=NAME`: answer 500 when this server is NAME (one bad host among several);
//! - `retry_header=N`: add `x-echo-retry-me: yes` to the answer of the first N attempts of each
//!   `x-request-id` (for retries on response headers).
//!
//! `GET /echo/attempts?id=ID` reports how many attempts of a request id this server has seen.
//!
//! A health endpoint for active health checks: `/echo/health` answers with the status last set
//! by `/echo/health?set=NNN` (200 at first) and counts the checks; `/echo/health/stats` reports
//! `checks=N host=H user-agent=UA` (the count and the last check's headers);
//! `/echo/health/quiet` answers the same status without counting (for a second checker), with
//! `x-envoy-upstream-healthchecked-cluster: NAME` (this server's name);
//! `/echo/health/connections` says over how many client connections the checks came.
//! `grpc.health.v1.Health/Check` answers SERVING while that status is 200, NOT_SERVING
//! otherwise; `/echo/health/grpc-stats` counts those checks and shows the last one's
//! authority, user agent, `te`, whether it set `grpc-timeout`, its `x-check` metadata and the
//! service asked about.
//! A gRPC request (`content-type: application/grpc`) gets one message and `grpc-status` trailers,
//! or a scripted trailers-only error (`x-grpc-status`, `x-grpc-fail`, `x-delay-ms` headers).
//! A request with `upgrade: websocket` is answered `101 Switching Protocols`; the upgraded
//! connection then sends the server's name and a newline, and echoes every byte back.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

pub async fn run(address: SocketAddr, name: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("binding {address}: {e}"))?;
    eprintln!("echo server {name:?} listening on {address}");
    let name: &'static str = Box::leak(name.into_boxed_str());
    let attempts: &'static Attempts = Box::leak(Box::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer);
                async move { Ok::<_, Infallible>(respond(name, attempts, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn respond(
    name: &'static str,
    attempts: &Attempts,
    req: Request<hyper::body::Incoming>,
) -> Response<EchoBody> {
    use http_body_util::BodyExt;
    let grpc = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc && req.uri().path() == "/grpc.health.v1.Health/Check" {
        return grpc_health(req).await;
    }
    if grpc {
        return grpc_reply(name, attempts, req).await;
    }
    let query = req.uri().query().unwrap_or("");
    let body_delay = query_param(query, "body_delay_ms").and_then(|v| v.parse::<u64>().ok());
    let resp = if query_param(query, "echo_body").is_some() {
        // The request's body read whole, and its size and text appended to the answer.
        let (parts, body) = req.into_parts();
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => Bytes::from(format!("<body failed: {e}>")),
        };
        let resp = scripted(name, attempts, Request::from_parts(parts, ())).await;
        let (parts, answer) = resp.into_parts();
        let mut text = match answer.collect().await {
            Ok(b) => b.to_bytes().to_vec(),
            Err(never) => match never {},
        };
        text.extend_from_slice(format!("body ({} bytes): ", bytes.len()).as_bytes());
        if bytes.len() <= 1024 {
            text.extend_from_slice(&bytes);
        }
        text.push(b'\n');
        Response::from_parts(parts, Full::new(Bytes::from(text)))
    } else {
        scripted(name, attempts, req).await
    };
    match body_delay {
        Some(ms) => resp.map(|b| delayed_tail(b, ms)),
        None => resp.map(|b| b.boxed()),
    }
}

/// `body` at once, then after `ms` milliseconds a last chunk, `tail\n`: an answer whose head
/// arrives in time and whose body does not (for timeouts that cover the whole response).
fn delayed_tail(body: Full<Bytes>, ms: u64) -> EchoBody {
    use futures::StreamExt;
    use http_body_util::BodyExt;
    let head = futures::stream::once(async move {
        let bytes = body.collect().await?.to_bytes();
        Ok(hyper::body::Frame::data(bytes))
    });
    let tail = futures::stream::once(async move {
        tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
        Ok(hyper::body::Frame::data(Bytes::from_static(b"tail\n")))
    });
    BodyExt::boxed(http_body_util::StreamBody::new(head.chain(tail)))
}

/// A gRPC answer: one length-prefixed message (the server's name) and `grpc-status: 0` in the
/// trailers; or, scripted by request headers, a trailers-only error: `x-grpc-status: N`, or
/// `x-grpc-fail: N` (UNAVAILABLE for the first N attempts of each `x-request-id`), after
/// `x-delay-ms`.
async fn grpc_reply(
    name: &'static str,
    attempts: &Attempts,
    req: Request<hyper::body::Incoming>,
) -> Response<EchoBody> {
    use http_body_util::BodyExt;
    let header = |k: &str| {
        req.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let attempt = match header("x-request-id") {
        Some(id) if !id.is_empty() => attempts.record(&id),
        _ => 1,
    };
    if let Some(ms) = header("x-delay-ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
    }
    let fail: u32 = header("x-grpc-fail")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let status: u32 = if attempt <= fail {
        14
    } else {
        header("x-grpc-status")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut resp = if status != 0 {
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        let h = r.headers_mut();
        h.insert("grpc-status", status.to_string().parse().expect("digits"));
        h.insert("grpc-message", "scripted".parse().expect("value"));
        r
    } else {
        grpc_ok(name.as_bytes())
    };
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        "application/grpc".parse().expect("value"),
    );
    h.insert(
        "x-echo-name",
        name.parse()
            .unwrap_or_else(|_| "echo".parse().expect("value")),
    );
    h.insert(
        "x-echo-attempt",
        attempt.to_string().parse().expect("digits"),
    );
    resp
}

/// `grpc.health.v1.Health/Check`: SERVING (1) while `/echo/health` answers 200, NOT_SERVING (2)
/// otherwise; counted apart from the HTTP checks, with what the last one carried
/// (`/echo/health/grpc-stats`).
async fn grpc_health(req: Request<hyper::body::Incoming>) -> Response<EchoBody> {
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering;
    let header = |k: &str| {
        req.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_else(|| header("host"));
    let seen = format!(
        "authority={authority} user-agent={} te={} grpc-timeout={} x-check={}",
        header("user-agent"),
        header("te"),
        !header("grpc-timeout").is_empty(),
        header("x-check")
    );
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    // HealthCheckRequest { string service = 1 }, after the 5-byte gRPC prefix.
    let service = match body.get(5..) {
        Some([0x0a, len, rest @ ..]) if rest.len() == *len as usize => {
            String::from_utf8_lossy(rest).into_owned()
        }
        _ => String::new(),
    };
    HEALTH.grpc_checks.fetch_add(1, Ordering::Relaxed);
    *HEALTH.grpc_last.lock().unwrap_or_else(|p| p.into_inner()) =
        format!("{seen} service={service}");
    let serving = HEALTH.status.load(Ordering::Relaxed) == 200;
    // HealthCheckResponse { status = 1 }: SERVING is 1, NOT_SERVING 2.
    grpc_ok(&[0x08, if serving { 1 } else { 2 }])
}

/// A successful gRPC answer: `message` as one length-prefixed message, then `grpc-status: 0`.
fn grpc_ok(message: &[u8]) -> Response<EchoBody> {
    use http_body_util::BodyExt;
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().expect("digit"));
    let frames = futures::stream::iter(vec![
        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(frame))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ]);
    let mut resp = Response::new(http_body_util::StreamBody::new(frames).boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/grpc".parse().expect("value"),
    );
    resp
}

/// Attempts seen per x-request-id (bounded: the oldest ids are forgotten).
#[derive(Default)]
struct Attempts(Mutex<(HashMap<String, u32>, VecDeque<String>)>);

impl Attempts {
    fn record(&self, id: &str) -> u32 {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *g;
        let n = map.entry(id.to_string()).or_insert_with(|| {
            order.push_back(id.to_string());
            0
        });
        *n += 1;
        let n = *n;
        while order.len() > 100_000 {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        n
    }

    fn get(&self, id: &str) -> u32 {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.0.get(id).copied().unwrap_or(0)
    }
}

/// What `/echo/health` answers and what it has seen.
struct Health {
    status: std::sync::atomic::AtomicU16,
    checks: std::sync::atomic::AtomicU64,
    last: Mutex<(String, String)>,
    grpc_checks: std::sync::atomic::AtomicU64,
    grpc_last: Mutex<String>,
    /// The client connections `/echo/health` checks came over.
    connections: Mutex<std::collections::BTreeSet<SocketAddr>>,
}

static HEALTH: Health = Health {
    status: std::sync::atomic::AtomicU16::new(200),
    checks: std::sync::atomic::AtomicU64::new(0),
    last: Mutex::new((String::new(), String::new())),
    grpc_checks: std::sync::atomic::AtomicU64::new(0),
    grpc_last: Mutex::new(String::new()),
    connections: Mutex::new(std::collections::BTreeSet::new()),
};

fn health<B>(name: &str, req: &Request<B>, query: &str) -> Option<Response<Full<Bytes>>> {
    use std::sync::atomic::Ordering;
    let header = |name: hyper::header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    match req.uri().path() {
        "/echo/health/stats" => {
            let last = HEALTH.last.lock().unwrap_or_else(|p| p.into_inner());
            let text = format!(
                "checks={} host={} user-agent={}",
                HEALTH.checks.load(Ordering::Relaxed),
                last.0,
                last.1
            );
            Some(Response::new(Full::new(Bytes::from(text))))
        }
        "/echo/health/connections" => {
            let n = HEALTH
                .connections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len();
            Some(Response::new(Full::new(Bytes::from(format!(
                "connections={n}"
            )))))
        }
        "/echo/health/grpc-stats" => {
            let last = HEALTH.grpc_last.lock().unwrap_or_else(|p| p.into_inner());
            let text = format!(
                "checks={} {last}",
                HEALTH.grpc_checks.load(Ordering::Relaxed)
            );
            Some(Response::new(Full::new(Bytes::from(text))))
        }
        "/echo/health/quiet" => {
            let code = HEALTH.status.load(Ordering::Relaxed);
            let mut resp = Response::new(Full::new(Bytes::from(format!("health {code}\n"))));
            *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
            // As Envoy's health check filter: the cluster (here: server) that answered.
            if let Ok(v) = hyper::header::HeaderValue::from_str(name) {
                resp.headers_mut()
                    .insert("x-envoy-upstream-healthchecked-cluster", v);
            }
            Some(resp)
        }
        "/echo/health" => {
            if let Some(code) = query_param(query, "set").and_then(|v| v.parse::<u16>().ok()) {
                if hyper::StatusCode::from_u16(code).is_err() {
                    let mut resp = Response::new(Full::new(Bytes::from("not a status\n")));
                    *resp.status_mut() = hyper::StatusCode::BAD_REQUEST;
                    return Some(resp);
                }
                HEALTH.status.store(code, Ordering::Relaxed);
                return Some(Response::new(Full::new(Bytes::from(format!(
                    "set {code}\n"
                )))));
            }
            HEALTH.checks.fetch_add(1, Ordering::Relaxed);
            if let Some(peer) = req.extensions().get::<SocketAddr>() {
                HEALTH
                    .connections
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(*peer);
            }
            *HEALTH.last.lock().unwrap_or_else(|p| p.into_inner()) = (
                header(hyper::header::HOST),
                header(hyper::header::USER_AGENT),
            );
            let code = HEALTH.status.load(Ordering::Relaxed);
            let mut resp = Response::new(Full::new(Bytes::from(format!("health {code}\n"))));
            *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
            Some(resp)
        }
        _ => None,
    }
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

async fn scripted<B>(
    name: &'static str,
    attempts: &Attempts,
    mut req: Request<B>,
) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("").to_string();
    let wants_upgrade = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if wants_upgrade {
        // An upgraded connection echoes every byte back, prefixed once with this server's name.
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut io = TokioIo::new(upgraded);
            if io.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(hyper::header::UPGRADE, "websocket".parse().expect("value"));
        h.insert(hyper::header::CONNECTION, "upgrade".parse().expect("value"));
        h.insert(
            "x-echo-name",
            name.parse()
                .unwrap_or_else(|_| "echo".parse().expect("value")),
        );
        return resp;
    }
    if let Some(resp) = health(name, &req, &query) {
        return resp;
    }
    if req.uri().path() == "/echo/attempts" {
        let n = query_param(&query, "id")
            .map(|id| attempts.get(id))
            .unwrap_or(0);
        return Response::new(Full::new(Bytes::from(n.to_string())));
    }
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let attempt = if id.is_empty() {
        1
    } else {
        attempts.record(&id)
    };
    if let Some(ms) = query_param(&query, "delay_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
    }
    let fail = query_param(&query, "fail")
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    let status = if attempt <= fail {
        Some(503)
    } else if query_param(&query, "fail_on") == Some(name) {
        Some(500)
    } else {
        query_param(&query, "status").and_then(|v| v.parse::<u16>().ok())
    };
    let padding = query_param(&query, "bytes")
        .and_then(|v| v.parse::<usize>().ok())
        .map(|n| n.min(64 << 20));
    let mut resp = echo(name, req);
    if let Some(n) = padding {
        let (parts, body) = resp.into_parts();
        let mut text = match http_body_util::BodyExt::collect(body).await {
            Ok(b) => b.to_bytes().to_vec(),
            Err(never) => match never {},
        };
        match query_param(&query, "fill").filter(|f| !f.is_empty()) {
            Some(fill) => text.extend(fill.bytes().cycle().take(n)),
            None => text.resize(text.len() + n, b'x'),
        }
        resp = Response::from_parts(parts, Full::new(Bytes::from(text)));
    }
    if let Some(code) = status.and_then(|s| hyper::StatusCode::from_u16(s).ok()) {
        *resp.status_mut() = code;
    }
    if let Ok(v) = hyper::header::HeaderValue::from_str(&attempt.to_string()) {
        resp.headers_mut().insert("x-echo-attempt", v);
    }
    let header_attempts = query_param(&query, "retry_header")
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    if attempt <= header_attempts {
        resp.headers_mut().insert(
            "x-echo-retry-me",
            hyper::header::HeaderValue::from_static("yes"),
        );
    }
    resp
}

fn echo<B>(name: &str, req: Request<B>) -> Response<Full<Bytes>> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let wants_json = req
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let (body, content_type) = if wants_json {
        // Repeated headers are joined with ", " (as HTTP allows), so none is lost.
        let mut h = serde_json::Map::new();
        for (k, v) in &headers {
            match h.get_mut(k) {
                Some(serde_json::Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(v);
                }
                _ => {
                    h.insert(k.clone(), v.clone().into());
                }
            }
        }
        let v = serde_json::json!({"name": name, "method": req.method().as_str(), "path": path, "version": format!("{:?}", req.version()), "headers": h});
        (v.to_string() + "\n", "application/json")
    } else {
        let mut s = format!(
            "name: {name}\nmethod: {}\npath: {path}\nversion: {:?}\nheaders:\n",
            req.method(),
            req.version()
        );
        for (k, v) in &headers {
            s.push_str(&format!("  {k}: {v}\n"));
        }
        (s, "text/plain")
    };
    Response::builder()
        .header("content-type", content_type)
        .header("x-echo-name", name)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}
