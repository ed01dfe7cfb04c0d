//! weftd's monitoring/debug HTTP endpoints (port 15014, as istiod's): `/ready`,
//! `/debug/syncz` (per-proxy sent/ACKed/NACKed state), `/debug/nacks`, `/debug/configz`
//! (objects served and objects rejected, with reasons).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;

use crate::xds::{MeshSnapshot, StatusRegistry};

#[derive(Clone)]
pub struct DebugState {
    pub status: Arc<StatusRegistry>,
    pub mesh: watch::Receiver<Arc<MeshSnapshot>>,
}

pub async fn serve(listener: tokio::net::TcpListener, state: DebugState) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json(value: serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp
}

fn handle<B>(state: &DebugState, req: Request<B>) -> Response<Full<Bytes>> {
    let mesh = state.mesh.borrow().clone();
    match req.uri().path() {
        "/ready" => {
            if mesh.generation > 0 {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "config not loaded yet\n")
            }
        }
        "/debug/syncz" => json(serde_json::to_value(state.status.snapshot()).unwrap_or_default()),
        "/debug/nacks" => json(serde_json::Value::Array(state.status.nack_log())),
        "/debug/configz" => {
            let c = &mesh.mesh.config;
            let names = |v: Vec<(String, String, String)>| {
                v.into_iter().map(|(ns, n, file)| serde_json::json!({"namespace": ns, "name": n, "file": file})).collect::<Vec<_>>()
            };
            macro_rules! list {
                ($v:expr) => {
                    names(
                        $v.iter()
                            .map(|o| {
                                (
                                    o.namespace.clone(),
                                    o.meta.name.clone(),
                                    o.origin.file.display().to_string(),
                                )
                            })
                            .collect(),
                    )
                };
            }
            json(serde_json::json!({
                "generation": mesh.generation,
                "Service": list!(c.services),
                "WorkloadEntry": list!(c.workload_entries),
                "VirtualService": list!(c.virtual_services),
                "DestinationRule": list!(c.destination_rules),
                "Sidecar": list!(c.sidecars),
                "rejected": mesh.errors.iter().map(|e| serde_json::json!({
                    "file": e.file.display().to_string(), "document": e.document + 1,
                    "object": e.object, "field": e.field, "reason": e.reason,
                })).collect::<Vec<_>>(),
            }))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "unknown path; try /ready, /debug/syncz, /debug/nacks, /debug/configz\n",
        ),
    }
}
