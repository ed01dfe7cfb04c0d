//! Type URLs of the xDS resources weft serves and consumes, exactly as Envoy spells them.

pub const PREFIX: &str = "type.googleapis.com/";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_CONFIGURATION: &str =
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const CLUSTER_LOAD_ASSIGNMENT: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
pub const HTTP_CONNECTION_MANAGER: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
pub const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

/// The order in which a control plane pushes resource types so that a proxy never sees a
/// reference to something it has not received yet (CDS -> EDS, LDS -> RDS).
pub const PUSH_ORDER: [&str; 4] = [
    CLUSTER,
    CLUSTER_LOAD_ASSIGNMENT,
    LISTENER,
    ROUTE_CONFIGURATION,
];

/// Short name used in logs and debug output (`CDS`, `EDS`, `LDS`, `RDS`).
pub fn short_name(type_url: &str) -> &'static str {
    match type_url {
        LISTENER => "LDS",
        ROUTE_CONFIGURATION => "RDS",
        CLUSTER => "CDS",
        CLUSTER_LOAD_ASSIGNMENT => "EDS",
        SECRET => "SDS",
        _ => "unknown",
    }
}
