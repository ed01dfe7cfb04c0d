//! weftd's monitoring/debug HTTP endpoints (port 15014, as istiod's): `/ready`,
//! `/debug/syncz` (per-proxy sent/ACKed/NACKed state), `/debug/nacks`, `/debug/configz`
//! (objects served and objects rejected, with reasons).

use std::sync::Arc;

use hyper::StatusCode;
use tokio::sync::watch;

use crate::httpd::Reply;
use crate::xds::{MeshSnapshot, StatusRegistry};

#[derive(Clone)]
pub struct DebugState {
    pub status: Arc<StatusRegistry>,
    pub mesh: watch::Receiver<Arc<MeshSnapshot>>,
}

pub async fn serve(listener: tokio::net::TcpListener, state: DebugState) {
    crate::httpd::serve(listener, move |_, path| handle(&state, path)).await
}

fn json(value: serde_json::Value) -> Reply {
    (
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(&value).unwrap_or_default(),
    )
}

fn handle(state: &DebugState, path: &str) -> Reply {
    let mesh = state.mesh.borrow().clone();
    match path {
        "/ready" if mesh.generation > 0 => (StatusCode::OK, "text/plain", "ready\n".into()),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "config not loaded yet\n".into(),
        ),
        "/debug/syncz" => json(serde_json::to_value(state.status.snapshot()).unwrap_or_default()),
        "/debug/nacks" => json(serde_json::Value::Array(state.status.nack_log())),
        "/debug/configz" => {
            let c = &mesh.mesh.config;
            macro_rules! list {
                ($v:expr) => {
                    $v.iter()
                        .map(|o| serde_json::json!({"namespace": o.namespace, "name": o.meta.name, "file": o.origin.file.display().to_string()}))
                        .collect::<Vec<_>>()
                };
            }
            json(serde_json::json!({
                "generation": mesh.generation,
                "Service": list!(c.services),
                "WorkloadEntry": list!(c.workload_entries),
                "VirtualService": list!(c.virtual_services),
                "DestinationRule": list!(c.destination_rules),
                "Sidecar": list!(c.sidecars),
                "ServiceEntry": list!(c.service_entries),
                "Pod": list!(c.pods),
                "Endpoints": list!(c.endpoints),
                "EndpointSlice": list!(c.endpoint_slices),
                "Namespace": list!(c.namespaces),
                "rejected": mesh.errors.iter().map(|e| serde_json::json!({
                    "file": e.file.display().to_string(), "document": e.document + 1,
                    "object": e.object, "field": e.field, "reason": e.reason,
                })).collect::<Vec<_>>(),
            }))
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "unknown path; try /ready, /debug/syncz, /debug/nacks, /debug/configz\n".into(),
        ),
    }
}
