//! Start-up config: either flags (`--xds-address`, `--node-id`) or an Envoy-style bootstrap file
//! (`--config-path`, YAML or JSON) from which weft takes the node, the admin address, the ADS
//! server (the static cluster that `ads_config` points at) and any static listeners and
//! clusters (`static_resources`). A bootstrap may have ADS, static resources, or both.

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
    /// The ADS server; None for a bootstrap with static resources only.
    pub xds_address: Option<String>,
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
        .and_then(|d| d.ads_config.as_ref());
    let has_static = bootstrap
        .static_resources
        .as_ref()
        .is_some_and(|s| !s.listeners.is_empty());
    let xds_address = match ads {
        Some(ads) => Some(ads_address(&bootstrap, ads)?),
        None if has_static => None,
        None => bail!(
            "dynamic_resources.ads_config: the bootstrap has neither an ADS server nor static_resources.listeners, so there is nothing to serve"
        ),
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

/// The names of the static clusters that carry xDS itself (`ads_config`'s gRPC services):
/// they are how the proxy reaches its control plane, not upstreams for traffic.
pub fn ads_clusters(bootstrap: &Bootstrap) -> Vec<String> {
    bootstrap
        .dynamic_resources
        .as_ref()
        .and_then(|d| d.ads_config.as_ref())
        .map(|ads| {
            ads.grpc_services
                .iter()
                .filter_map(|g| match &g.target_specifier {
                    Some(grpc_service::TargetSpecifier::EnvoyGrpc(e)) => {
                        Some(e.cluster_name.clone())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn ads_address(
    bootstrap: &Bootstrap,
    ads: &weft_xds_proto::envoy::config::core::v3::ApiConfigSource,
) -> anyhow::Result<String> {
    let grpc = ads
        .grpc_services
        .first()
        .context("dynamic_resources.ads_config.grpc_services is empty")?;
    Ok(match &grpc.target_specifier {
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
        xds_address: Some(xds_address.to_string()),
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
        assert_eq!(s.xds_address.as_deref(), Some("127.0.0.1:15010"));
        assert_eq!(ads_clusters(&s.bootstrap), ["xds-grpc"]);
        assert_eq!(s.admin_address, Some("127.0.0.1:15000".parse().unwrap()));
        assert_eq!(s.node.cluster, "client");
    }

    #[test]
    fn missing_ads_is_a_clear_error() {
        let b: Bootstrap = weft_xds_proto::from_yaml("node: { id: x }").unwrap();
        let err = format!("{:#}", from_bootstrap(b).unwrap_err());
        assert!(err.contains("ads_config"), "{err}");
        assert!(err.contains("static_resources.listeners"), "{err}");
    }

    #[test]
    fn static_listeners_alone_need_no_ads() {
        let yaml = r#"
node: { id: edge }
static_resources:
  listeners:
  - name: l
    address: { socket_address: { address: 127.0.0.1, port_value: 10000 } }
"#;
        let b: Bootstrap = weft_xds_proto::from_yaml(yaml).unwrap();
        let s = from_bootstrap(b).unwrap();
        assert_eq!(s.xds_address, None);
        assert!(ads_clusters(&s.bootstrap).is_empty());
    }
}
