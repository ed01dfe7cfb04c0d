//! Envoy bootstrap files pointing a proxy (Envoy or weft-proxy) at weftd's ADS server.

use std::net::SocketAddr;

/// A v3 bootstrap: node id, cluster and metadata (a YAML flow mapping such as
/// `{ NAMESPACE: default }`), admin on `admin`, ADS (SotW, or delta with `delta`) to `xds`
/// through a static HTTP/2 cluster.
pub fn bootstrap(
    node_id: &str,
    cluster: &str,
    metadata: &str,
    admin: SocketAddr,
    xds: SocketAddr,
    delta: bool,
) -> String {
    format!(
        r#"node:
  id: "{node_id}"
  cluster: {cluster}
  metadata: {metadata}
admin:
  address: {{ socket_address: {{ address: {admin_ip}, port_value: {admin_port} }} }}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    grpc_services: [{{ envoy_grpc: {{ cluster_name: xds-grpc }} }}]
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
{xds_cluster}"#,
        admin_ip = admin.ip(),
        admin_port = admin.port(),
        api = if delta { "DELTA_GRPC" } else { "GRPC" },
        xds_cluster = grpc_cluster(
            "xds-grpc",
            &format!(
                "socket_address: {{ address: {}, port_value: {} }}",
                xds.ip(),
                xds.port()
            )
        ),
    )
}

/// A static HTTP/2 cluster for a gRPC server at `address` (an Envoy `Address` body in YAML
/// flow style), as a `static_resources.clusters` entry.
fn grpc_cluster(name: &str, address: &str) -> String {
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ {address} }} }} }}] }}]
"#
    )
}

/// The `sds-grpc` static cluster Istio's bootstrap has: the agent's SDS server on a Unix
/// socket. Append it to a [`bootstrap`] (it continues `static_resources.clusters`).
pub fn sds_cluster(socket: &std::path::Path) -> String {
    grpc_cluster(
        "sds-grpc",
        &format!("pipe: {{ path: \"{}\" }}", socket.display()),
    )
}
