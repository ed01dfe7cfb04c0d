//! weftd's DNS server: service discovery for the mesh, answered as CoreDNS's `kubernetes`
//! plugin answers it, configured with a Corefile (`corefile`). Records are precomputed from
//! the config on each change (`records`); queries run the server block's plugin chain
//! (`answer`); `forward`, `cache` and `metrics` are the plugins of the same names.

pub mod answer;
pub mod cache;
pub mod corefile;
pub mod forward;
pub mod fuzzing;
pub mod metrics;
pub mod records;
mod server;

pub use server::{DnsOptions, begin_lameduck, corefile_check, run};

#[cfg(test)]
mod tests;
