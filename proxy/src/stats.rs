//! Counters and gauges, Envoy-named, rendered in Prometheus text format by the admin server.
//! Atomic and relaxed: they are statistics, not synchronisation.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Decrements a gauge when dropped (an active request or connection ending on any path).
pub struct GaugeGuard<'a>(&'a Gauge);

impl<'a> GaugeGuard<'a> {
    pub fn new(g: &'a Gauge) -> GaugeGuard<'a> {
        g.inc();
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts responses by status class (1xx..5xx), as Envoy's `*_rq_Nxx` stats.
#[derive(Debug, Default)]
pub struct StatusClasses([Counter; 5]);

impl StatusClasses {
    #[inline]
    pub fn record(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.0[class].inc();
    }
    pub fn get(&self, class: usize) -> u64 {
        self.0[class - 1].get()
    }
}

/// Stats of one HTTP connection manager (`http.<stat_prefix>.*`).
#[derive(Debug, Default)]
pub struct HttpStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_rq_total: Counter,
    pub downstream_rq_active: Gauge,
    pub downstream_rq_xx: StatusClasses,
    pub no_route: Counter,
    pub no_cluster: Counter,
    /// Requests an RBAC filter refused (Envoy's `http.<prefix>.rbac.denied`).
    pub rbac_denied: Counter,
    /// Requests ended by `stream_idle_timeout`, `request_timeout`, `request_headers_timeout`.
    pub downstream_rq_idle_timeout: Counter,
    pub downstream_rq_timeout: Counter,
    pub downstream_rq_header_timeout: Counter,
    /// Requests ended by their route's `max_stream_duration`.
    pub downstream_rq_max_duration_reached: Counter,
    /// The trace decisions of a connection manager with `tracing` (`http.<prefix>.tracing.*`);
    /// `health_check` stays 0: weft-proxy has no health check filter.
    pub tracing_random_sampling: Counter,
    pub tracing_service_forced: Counter,
    pub tracing_client_enabled: Counter,
    pub tracing_not_traceable: Counter,
    pub tracing_health_check: Counter,
}

/// Stats of one TCP proxy (`tcp.<stat_prefix>.*`).
#[derive(Debug, Default)]
pub struct TcpStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_cx_rx_bytes_total: Counter,
    pub downstream_cx_tx_bytes_total: Counter,
    /// Connections closed by the TCP proxy's `idle_timeout`.
    pub idle_timeout: Counter,
}

/// Escapes a Prometheus label value.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
