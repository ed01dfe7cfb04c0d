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
pub mod identity;
pub mod idle;
pub mod iptables;
pub mod listener;
pub mod rbac;
pub mod sds;
pub mod state;
pub mod stats;
pub mod tcp;
pub mod tls;
pub mod worker;
pub mod xds;

/// Locks a mutex that only one task uses at a time (a connection's or a request's own state,
/// shared between the futures of that one task): a panic while it was held left no half-done
/// update the next user could not take up, so poisoning is ignored.
pub(crate) fn lock_own<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

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

pub(crate) mod time {
    /// A time since the Unix epoch as RFC 3339 UTC with milliseconds (Envoy's `%START_TIME%`).
    pub fn rfc3339_millis(since_epoch: std::time::Duration) -> String {
        let secs = since_epoch.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3_600,
            rem % 3_600 / 60,
            rem % 60,
            since_epoch.subsec_millis()
        )
    }

    #[cfg(test)]
    #[test]
    fn formats_known_instants() {
        use std::time::Duration;
        assert_eq!(rfc3339_millis(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(Duration::from_millis(1_795_700_000_123)),
            "2026-11-26T13:33:20.123Z"
        );
        assert_eq!(
            rfc3339_millis(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
