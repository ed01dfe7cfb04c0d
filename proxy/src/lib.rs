//! weft-proxy, the weft data plane: a sidecar configured over Envoy's xDS v3 API (ADS).
//!
//! A request's path, in order (see `http::proxy_request` for the one function that shows it):
//! `listener` accepts -> `http` (connection manager: HTTP/1.1 and h2c) -> `http::router` picks
//! the virtual host, route and cluster -> `cluster` picks an endpoint (load balancer) ->
//! `cluster::pool` sends it over a pooled upstream connection. TCP listeners go
//! `listener` -> `tcp` -> `cluster` instead.
//!
//! Config arrives through `xds` (the ADS client), is validated and translated into immutable
//! structures (`cluster::Cluster`, `http::router::RouteTable`, `listener::ListenerConfig`), and
//! swapped in atomically (`state`). The request path takes no locks on shared config.

pub mod admin;
pub mod bootstrap;
pub mod cluster;
pub mod http;
pub mod listener;
pub mod state;
pub mod stats;
pub mod tcp;
pub mod worker;
pub mod xds;

/// Envoy's duration to std's, treating negative values as zero.
pub(crate) fn duration(d: &weft_xds_proto::wkt::Duration) -> std::time::Duration {
    std::time::Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// A config the proxy cannot apply: the resource and field it names become the NACK's
/// `error_detail`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{kind} {name:?}: {field}: {reason}")]
pub struct Rejection {
    pub kind: &'static str,
    pub name: String,
    pub field: String,
    pub reason: String,
}

impl Rejection {
    pub fn new(
        kind: &'static str,
        name: &str,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Rejection {
        Rejection {
            kind,
            name: name.to_string(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}
