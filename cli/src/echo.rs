//! `weftctl echo`: a tiny HTTP/1.1 and h2c echo server for demos and tests. It answers every
//! request with its name, the request's method, path and headers (text, or JSON when the
//! client sends `accept: application/json`), and the header `x-echo-name`.

use std::convert::Infallible;
use std::net::SocketAddr;

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
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| async move {
                Ok::<_, Infallible>(echo(name, req))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
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
        let h: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
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
