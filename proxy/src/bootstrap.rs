//! Start-up config: either flags (`--xds-address`, `--node-id`) or an Envoy-style bootstrap file
//! (`--config-path`, YAML or JSON) from which weft takes the node, the admin address and the ADS
//! server (the static cluster that `ads_config` points at).

use std::net::SocketAddr;

use anyhow::{Context, bail};
use weft_xds_proto::envoy::config::bootstrap::v3::{Admin, Bootstrap};
use weft_xds_proto::envoy::config::core::v3::{Node, grpc_service};

use crate::cluster::socket_addr;

/// What the proxy needs from its bootstrap.
#[derive(Debug, Clone)]
pub struct Startup {
    pub bootstrap: Bootstrap,
    pub node: Node,
    pub xds_address: String,
    pub admin_address: Option<SocketAddr>,
}

/// Reads an Envoy bootstrap file and finds the ADS server in it.
pub fn from_file(path: &std::path::Path) -> anyhow::Result<Startup> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading bootstrap {}", path.display()))?;
    let bootstrap: Bootstrap = weft_xds_proto::from_yaml(&text)
        .with_context(|| format!("parsing bootstrap {}", path.display()))?;
    from_bootstrap(bootstrap).with_context(|| format!("bootstrap {}", path.display()))
}

pub fn from_bootstrap(bootstrap: Bootstrap) -> anyhow::Result<Startup> {
    let node = bootstrap
        .node
        .clone()
        .context("node: the bootstrap must identify the proxy (node.id)")?;
    let ads = bootstrap
        .dynamic_resources
        .as_ref()
        .and_then(|d| d.ads_config.as_ref())
        .context("dynamic_resources.ads_config: weft-proxy is configured over ADS only")?;
    let grpc = ads
        .grpc_services
        .first()
        .context("dynamic_resources.ads_config.grpc_services is empty")?;
    let xds_address = match &grpc.target_specifier {
        Some(grpc_service::TargetSpecifier::EnvoyGrpc(e)) => {
            let cluster = bootstrap
                .static_resources
                .as_ref()
                .and_then(|s| s.clusters.iter().find(|c| c.name == e.cluster_name))
                .with_context(|| format!("ads_config names cluster {:?}, which is not among static_resources.clusters", e.cluster_name))?;
            let endpoint = cluster
                .load_assignment
                .as_ref()
                .and_then(|la| la.endpoints.first())
                .and_then(|g| g.lb_endpoints.first())
                .and_then(|lbe| match &lbe.host_identifier {
                    Some(weft_xds_proto::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(ep)) => ep.address.as_ref(),
                    _ => None,
                })
                .with_context(|| format!("static cluster {:?} has no endpoint address", e.cluster_name))?;
            socket_addr(Some(endpoint))
                .map_err(|r| anyhow::anyhow!("static cluster {:?}: {r}", e.cluster_name))?
                .to_string()
        }
        Some(grpc_service::TargetSpecifier::GoogleGrpc(g)) => g.target_uri.clone(),
        None => bail!("dynamic_resources.ads_config.grpc_services[0] has no target"),
    };
    let admin_address = bootstrap
        .admin
        .as_ref()
        .and_then(|a: &Admin| a.address.as_ref())
        .map(|a| socket_addr(Some(a)).map_err(|r| anyhow::anyhow!("admin.address: {r}")))
        .transpose()?;
    Ok(Startup {
        bootstrap,
        node,
        xds_address,
        admin_address,
    })
}

/// The bootstrap equivalent to command-line flags (shown in `/config_dump`).
pub fn from_flags(node_id: &str, cluster: &str, xds_address: &str) -> Startup {
    let node = Node {
        id: node_id.to_string(),
        cluster: cluster.to_string(),
        ..Default::default()
    };
    Startup {
        bootstrap: Bootstrap {
            node: Some(node.clone()),
            ..Default::default()
        },
        node,
        xds_address: xds_address.to_string(),
        admin_address: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_ads_server_in_an_envoy_bootstrap() {
        let yaml = r#"
node: { id: "sidecar~127.0.0.10~client.default~default.svc.cluster.local", cluster: client }
admin: { address: { socket_address: { address: 127.0.0.1, port_value: 15000 } } }
dynamic_resources:
  ads_config: { api_type: GRPC, transport_api_version: V3, grpc_services: [{ envoy_grpc: { cluster_name: xds-grpc } }] }
  cds_config: { ads: {}, resource_api_version: V3 }
  lds_config: { ads: {}, resource_api_version: V3 }
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 15010 } } } }] }]
"#;
        let b: Bootstrap = weft_xds_proto::from_yaml(yaml).unwrap();
        let s = from_bootstrap(b).unwrap();
        assert_eq!(s.xds_address, "127.0.0.1:15010");
        assert_eq!(s.admin_address, Some("127.0.0.1:15000".parse().unwrap()));
        assert_eq!(s.node.cluster, "client");
    }

    #[test]
    fn missing_ads_is_a_clear_error() {
        let b: Bootstrap = weft_xds_proto::from_yaml("node: { id: x }").unwrap();
        let err = format!("{:#}", from_bootstrap(b).unwrap_err());
        assert!(err.contains("ads_config"), "{err}");
    }
}
