//! Envoy v3 xDS types for weft, taken from the `envoy-types` crate, plus what that crate lacks:
//! the proto3 JSON mapping (for `/config_dump`, Envoy-style YAML bootstrap files and golden
//! files), the type-URL constants of the resources weft serves, and `Any` pack/unpack helpers.
//!
//! This crate holds no copied `.proto` files: the JSON mapping reflects over the descriptor set
//! that `envoy-types` ships in its package (located by `build.rs`).

pub mod any;
pub mod ca;
pub mod json;
pub mod type_url;

pub use envoy_types::pb;
pub use envoy_types::pb::envoy;
pub use envoy_types::pb::google::protobuf as wkt;
pub use prost;

pub use any::{AnyError, pack, unpack};
pub use json::{JsonError, from_json, from_yaml, to_json, to_json_text};
