//! Packing and unpacking `google.protobuf.Any` with the type URLs Envoy expects.

use crate::wkt::Any;
use prost::{Message, Name};

#[derive(Debug, thiserror::Error)]
pub enum AnyError {
    #[error("expected an Any of type {expected}, got {got}")]
    WrongType { expected: String, got: String },
    #[error("cannot decode {type_url}: {source}")]
    Decode {
        type_url: String,
        #[source]
        source: prost::DecodeError,
    },
}

/// Packs a message into an `Any` with its `type.googleapis.com/...` URL.
pub fn pack<M: Message + Name>(msg: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: msg.encode_to_vec(),
    }
}

/// Unpacks an `Any`, checking that its type URL names `M`.
pub fn unpack<M: Message + Name + Default>(any: &Any) -> Result<M, AnyError> {
    let expected = M::type_url();
    if any.type_url != expected {
        return Err(AnyError::WrongType {
            expected,
            got: any.type_url.clone(),
        });
    }
    M::decode(any.value.as_slice()).map_err(|source| AnyError::Decode {
        type_url: any.type_url.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::config::cluster::v3::Cluster;
    use crate::envoy::config::listener::v3::Listener;
    use crate::type_url;

    #[test]
    fn round_trip_and_type_check() {
        let c = Cluster {
            name: "outbound|80||hello.default.svc.cluster.local".into(),
            ..Default::default()
        };
        let any = pack(&c);
        assert_eq!(any.type_url, type_url::CLUSTER);
        let back: Cluster = unpack(&any).unwrap();
        assert_eq!(back, c);
        let err = unpack::<Listener>(&any).unwrap_err();
        assert!(
            err.to_string()
                .contains("envoy.config.listener.v3.Listener"),
            "{err}"
        );
    }
}
