//! CoreDNS's Prometheus metrics, with its names and labels: requests by server, zone, protocol,
//! family and type; responses by rcode and plugin; request duration histograms; cache hits,
//! misses and entries; forward requests per upstream.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// CoreDNS's duration buckets (seconds).
const BUCKETS: [f64; 16] = [
    0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
    2.048, 4.096, 8.192,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Inner {
    counters: BTreeMap<(&'static str, Labels), u64>,
    gauges: BTreeMap<(&'static str, Labels), i64>,
    histograms: BTreeMap<Labels, Histogram>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

const HELP: [(&str, &str, &str); 8] = [
    (
        "coredns_dns_requests_total",
        "counter",
        "Counter of DNS requests made per zone, protocol and family.",
    ),
    (
        "coredns_dns_responses_total",
        "counter",
        "Counter of response status codes.",
    ),
    (
        "coredns_dns_request_duration_seconds",
        "histogram",
        "Histogram of the time (in seconds) each request took per zone.",
    ),
    (
        "coredns_cache_hits_total",
        "counter",
        "The count of cache hits.",
    ),
    (
        "coredns_cache_misses_total",
        "counter",
        "The count of cache misses.",
    ),
    (
        "coredns_cache_entries",
        "gauge",
        "The number of elements in the cache.",
    ),
    (
        "coredns_forward_requests_total",
        "counter",
        "Counter of requests made per upstream.",
    ),
    (
        "coredns_build_info",
        "gauge",
        "A metric with a constant '1' value labeled by version.",
    ),
];

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn inc(&self, name: &'static str, labels: Labels) {
        *self.lock().counters.entry((name, labels)).or_default() += 1;
    }

    pub fn set(&self, name: &'static str, labels: Labels, v: i64) {
        self.lock().gauges.insert((name, labels), v);
    }

    pub fn observe(&self, labels: Labels, d: Duration) {
        let secs = d.as_secs_f64();
        let mut inner = self.lock();
        let h = inner.histograms.entry(labels).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let inner = self.lock();
        let mut out = String::new();
        let fmt_labels = |l: &Labels, extra: Option<(&str, String)>| {
            let mut parts: Vec<String> = l
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect();
            if let Some((k, v)) = extra {
                parts.push(format!("{k}=\"{v}\""));
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", parts.join(","))
            }
        };
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            if name == "coredns_build_info" {
                let _ = writeln!(
                    out,
                    "coredns_build_info{{goversion=\"none\",revision=\"weftd\",version=\"{}\"}} 1",
                    env!("CARGO_PKG_VERSION")
                );
            }
            if kind == "histogram" {
                for (labels, h) in &inner.histograms {
                    for (i, b) in BUCKETS.iter().enumerate() {
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {}",
                            fmt_labels(labels, Some(("le", format!("{b}")))),
                            h.counts[i]
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {}",
                        fmt_labels(labels, Some(("le", "+Inf".into()))),
                        h.count
                    );
                    let _ = writeln!(out, "{name}_sum{} {}", fmt_labels(labels, None), h.sum);
                    let _ = writeln!(out, "{name}_count{} {}", fmt_labels(labels, None), h.count);
                }
            }
            for ((n, labels), v) in inner.counters.iter().filter(|((n, _), _)| *n == name) {
                let _ = writeln!(out, "{n}{} {v}", fmt_labels(labels, None));
            }
            for ((n, labels), v) in inner.gauges.iter().filter(|((n, _), _)| *n == name) {
                let _ = writeln!(out, "{n}{} {v}", fmt_labels(labels, None));
            }
        }
        out
    }
}
