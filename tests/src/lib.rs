//! Test support for weft's end-to-end tests: start the real binaries (weftd, weft-proxy,
//! weftctl echo) and a real Envoy on loopback, talk HTTP/1.1 to them, and read their debug
//! endpoints. Every process is killed when its handle drops, so a failing test leaves nothing
//! behind.

pub mod collector;
pub mod envoy;
pub mod http;
pub mod mesh;
pub mod procs;
pub mod standalone;

pub use http::{Client, Response, get, get_json};
pub use mesh::{Quickstart, binomial_bounds};
pub use procs::{
    Proc, bin, envoy_bin, free_port, openssl, openssl_ca, openssl_csr, openssl_issue,
    openssl_self_signed, wait_until,
};
pub use standalone::{Flavor, Standalone};
