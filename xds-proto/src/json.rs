//! The proto3 JSON mapping for every Envoy message, through `prost-reflect` over the descriptor
//! set `envoy-types` ships. `Any` fields are expanded with their `@type`, as Envoy's own
//! `/config_dump` and bootstrap parser do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_types.bin"));

/// Builds the pool, without the descriptors' source code info (the comments and their
/// locations of every .proto file): kept, that alone made up ~30 MiB, and nothing here reads
/// it. Takes ~70 ms (release build).
fn build_pool() -> Result<DescriptorPool, JsonError> {
    let mut set = prost_reflect::prost_types::FileDescriptorSet::decode(DESCRIPTORS)
        .map_err(|e| JsonError::Pool(format!("envoy-types descriptor set: {e}")))?;
    for file in &mut set.file {
        file.source_code_info = None;
    }
    DescriptorPool::from_file_descriptor_set(set)
        .map_err(|e| JsonError::Pool(format!("envoy-types descriptor set: {e}")))
}

/// Whether the pool stays built once built (the default), or is dropped when its last user is
/// done (see `release_pool_after_use`).
static RETAIN: AtomicBool = AtomicBool::new(true);
static KEPT: Mutex<Option<Arc<DescriptorPool>>> = Mutex::new(None);
static SHARED: Mutex<Weak<DescriptorPool>> = Mutex::new(Weak::new());

/// For a process that needs the JSON mapping only now and then (a proxy: its bootstrap and
/// `/config_dump`): the descriptor pool (~7 MiB) is then built for each use and dropped after
/// it instead of staying in memory for the life of the process.
pub fn release_pool_after_use() {
    RETAIN.store(false, Ordering::Relaxed);
    *KEPT.lock().unwrap_or_else(|p| p.into_inner()) = None;
}
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("{0}")]
    Pool(String),
    #[error("message type {0} is not in the Envoy descriptor set")]
    UnknownType(String),
    #[error("invalid {type_name}: {reason}")]
    Invalid { type_name: String, reason: String },
    #[error("invalid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// The descriptor pool of every message `envoy-types` knows.
pub fn pool() -> Result<Arc<DescriptorPool>, JsonError> {
    if RETAIN.load(Ordering::Relaxed) {
        let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = kept.as_ref() {
            return Ok(p.clone());
        }
        let p = Arc::new(build_pool()?);
        *kept = Some(p.clone());
        return Ok(p);
    }
    let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = shared.upgrade() {
        return Ok(p);
    }
    let p = Arc::new(build_pool()?);
    *shared = Arc::downgrade(&p);
    Ok(p)
}

/// Renders a message as proto3 JSON (camelCase field names, as Envoy prints them).
pub fn to_json<M: Message + Name>(msg: &M) -> Result<serde_json::Value, JsonError> {
    let desc = pool()?
        .get_message_by_name(&M::full_name())
        .ok_or_else(|| JsonError::UnknownType(M::full_name()))?;
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()).map_err(|e| {
        JsonError::Invalid {
            type_name: M::full_name(),
            reason: e.to_string(),
        }
    })?;
    let opts = SerializeOptions::new().stringify_64_bit_integers(true);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &opts)
        .map_err(|e| JsonError::Invalid {
            type_name: M::full_name(),
            reason: e.to_string(),
        })
}

/// Renders a message as pretty-printed proto3 JSON text, streamed (no intermediate JSON tree:
/// for a large config dump that tree is several times the size of the text).
pub fn to_json_text<M: Message + Name>(msg: &M) -> Result<String, JsonError> {
    let desc = pool()?
        .get_message_by_name(&M::full_name())
        .ok_or_else(|| JsonError::UnknownType(M::full_name()))?;
    let invalid = |reason: String| JsonError::Invalid {
        type_name: M::full_name(),
        reason,
    };
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .map_err(|e| invalid(e.to_string()))?;
    let opts = SerializeOptions::new().stringify_64_bit_integers(true);
    let mut out = Vec::new();
    dynamic
        .serialize_with_options(&mut serde_json::Serializer::pretty(&mut out), &opts)
        .map_err(|e| invalid(e.to_string()))?;
    String::from_utf8(out).map_err(|e| invalid(e.to_string()))
}

/// Parses proto3 JSON (either camelCase or the original snake_case field names, as Envoy
/// accepts) into a message. Unknown fields are an error naming the field.
pub fn from_json<M: Message + Name + Default>(value: &serde_json::Value) -> Result<M, JsonError> {
    let desc = pool()?
        .get_message_by_name(&M::full_name())
        .ok_or_else(|| JsonError::UnknownType(M::full_name()))?;
    let opts = DeserializeOptions::new().deny_unknown_fields(true);
    let dynamic = DynamicMessage::deserialize_with_options(desc, value, &opts).map_err(|e| {
        JsonError::Invalid {
            type_name: M::full_name(),
            reason: e.to_string(),
        }
    })?;
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| JsonError::Invalid {
        type_name: M::full_name(),
        reason: e.to_string(),
    })
}

/// Parses an Envoy-style YAML document (for example a bootstrap file) into a message.
pub fn from_yaml<M: Message + Name + Default>(yaml: &str) -> Result<M, JsonError> {
    let value: serde_json::Value = serde_yaml::from_str(yaml)?;
    from_json(&value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::config::bootstrap::v3::Bootstrap;
    use crate::envoy::config::cluster::v3::Cluster;
    use crate::envoy::config::listener::v3::{Filter, Listener, filter};
    use crate::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
    use crate::pack;

    #[test]
    fn any_fields_are_expanded_with_their_type() {
        let tcp = TcpProxy {
            stat_prefix: "s".into(),
            cluster_specifier: Some(
                crate::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier::Cluster(
                    "c".into(),
                ),
            ),
            ..Default::default()
        };
        let l = Listener {
            name: "127.0.0.1_8080".into(),
            filter_chains: vec![crate::envoy::config::listener::v3::FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(pack(&tcp))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = to_json(&l).unwrap();
        let typed = &json["filterChains"][0]["filters"][0]["typedConfig"];
        assert_eq!(typed["@type"], crate::type_url::TCP_PROXY);
        assert_eq!(typed["cluster"], "c");
        let back: Listener = from_json(&json).unwrap();
        assert_eq!(back, l);
    }

    #[test]
    fn bootstrap_yaml_with_snake_case_fields() {
        let yaml = r#"
node:
  id: sidecar~127.0.0.2~hello-v1.default~default.svc.cluster.local
  cluster: hello
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: { cluster_name: xds }
  cds_config: { ads: {}, resource_api_version: V3 }
  lds_config: { ads: {}, resource_api_version: V3 }
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 15010 } } }
"#;
        let b: Bootstrap = from_yaml(yaml).unwrap();
        assert_eq!(
            b.node.unwrap().id,
            "sidecar~127.0.0.2~hello-v1.default~default.svc.cluster.local"
        );
        let c: &Cluster = &b.static_resources.unwrap().clusters[0];
        assert_eq!(c.connect_timeout.unwrap().seconds, 1);
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = from_yaml::<Bootstrap>("node: { idd: x }")
            .unwrap_err()
            .to_string();
        assert!(err.contains("idd"), "{err}");
    }
}
