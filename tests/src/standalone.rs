//! One proxy on a bootstrap with static resources (no control plane), run as Envoy or as
//! weft-proxy on the very same file, in front of scripted `weftctl echo` backends: the
//! differential harness for xDS that weftd does not generate (active health checks, local rate
//! limits, retry budgets...).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::procs::{Proc, bin, free_port, wait_until};

/// Which proxy runs the bootstrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Weft,
    Envoy,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Weft => "weft-proxy",
            Flavor::Envoy => "envoy",
        }
    }
}

/// A proxy and its backends on the loopback block `127.<net>.0.0/24`.
pub struct Standalone {
    pub flavor: Flavor,
    pub net: u8,
    pub dir: PathBuf,
    /// Backends by name, started with [`Standalone::backend`].
    pub backends: Vec<(String, SocketAddr)>,
    procs: Vec<Proc>,
}

impl Standalone {
    pub fn new(name: &str, net: u8, flavor: Flavor) -> Standalone {
        let dir = std::env::temp_dir().join(format!(
            "weft-e2e-{name}-{}-{}",
            flavor.name(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        Standalone {
            flavor,
            net,
            dir,
            backends: Vec::new(),
            procs: Vec::new(),
        }
    }

    /// The proxy's address for listeners (`127.<net>.0.10`).
    pub fn ip(&self) -> String {
        format!("127.{}.0.10", self.net)
    }

    pub fn admin(&self) -> SocketAddr {
        format!("{}:15000", self.ip()).parse().expect("addr")
    }

    /// Starts an echo backend called `name` on a free port of 127.0.0.1.
    pub fn backend(&mut self, name: &str) -> SocketAddr {
        let port = free_port("127.0.0.1");
        let p = port.to_string();
        self.procs.push(Proc::start(
            &format!("echo-{name}"),
            &bin("weftctl"),
            &["echo", "--port", &p, "--name", name],
            &self.dir,
        ));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        wait_until(Duration::from_secs(10), || {
            crate::http::get(addr, "/echo/health/stats").ok()
        })
        .unwrap_or_else(|| panic!("echo backend {name} answers"));
        self.backends.push((name.to_string(), addr));
        addr
    }

    pub fn backend_addr(&self, name: &str) -> SocketAddr {
        self.backends
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    /// Writes `resources` (the YAML of `static_resources`, indented as its body) into a
    /// bootstrap with the admin address and starts the proxy on it; waits until `/ready`.
    pub fn start(&mut self, resources: &str) {
        let admin = self.admin();
        let bootstrap = format!(
            "node: {{ id: standalone, cluster: standalone }}\nadmin:\n  address: {{ socket_address: {{ address: {}, port_value: {} }} }}\nstatic_resources:\n{resources}",
            admin.ip(),
            admin.port()
        );
        let path = self.dir.join("bootstrap.yaml");
        std::fs::write(&path, bootstrap).expect("write bootstrap");
        let path_s = path.display().to_string();
        let proc = match self.flavor {
            Flavor::Weft => Proc::start(
                "weft-proxy",
                &bin("weft-proxy"),
                &["--config-path", &path_s, "--concurrency", "1"],
                &self.dir,
            ),
            Flavor::Envoy => {
                crate::procs::start_envoy("envoy", &path, u32::from(self.net) * 10 + 7, &self.dir)
            }
        };
        self.procs.push(proc);
        let ready = wait_until(Duration::from_secs(20), || {
            crate::http::get(admin, "/ready")
                .ok()
                .filter(|r| r.status == 200)
        });
        if ready.is_none() {
            let logs = self.procs.last().map(|p| p.logs()).unwrap_or_default();
            panic!(
                "{} becomes ready on its bootstrap:\n{logs}",
                self.flavor.name()
            );
        }
    }

    /// The proxy's `/clusters` health flags of a host (`healthy`, `/failed_active_hc`...).
    pub fn health_flags(&self, cluster: &str, host: SocketAddr) -> String {
        let text = crate::http::get(self.admin(), "/clusters")
            .map(|r| r.body)
            .unwrap_or_default();
        let key = format!("{cluster}::{host}::health_flags::");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .unwrap_or("")
            .to_string()
    }

    /// A counter or gauge from `/stats` (plain text), 0 when absent.
    pub fn stat(&self, name: &str) -> u64 {
        let text = crate::http::get(self.admin(), "/stats")
            .map(|r| r.body)
            .unwrap_or_default();
        let key = format!("{name}: ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `static_resources.listeners` with one HTTP listener on `ip:port`: an HTTP connection
    /// manager whose body (`route_config`, `access_log`...; YAML at 10 spaces) is `hcm`, with
    /// the `filters` (YAML list items at 10 spaces) ahead of the router.
    pub fn http_listener(ip: &str, port: u16, hcm: &str, filters: &str) -> String {
        format!(
            "  listeners:\n{}",
            Standalone::hcm_listener("http", ip, port, hcm, filters, "")
        )
    }

    /// One listener (a YAML list item for `static_resources.listeners`) named `name`, its
    /// connection manager's stat prefix too: `hcm` and `filters` as for
    /// [`Standalone::http_listener`], `socket` the filter chain's `transport_socket` (YAML at 6
    /// spaces, or empty for plaintext).
    pub fn hcm_listener(
        name: &str,
        ip: &str,
        port: u16,
        hcm: &str,
        filters: &str,
        socket: &str,
    ) -> String {
        format!(
            r#"  - name: {name}
    address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
{hcm}          http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
{socket}"#
        )
    }

    /// An access log on the connection manager (YAML at 10 spaces, for `hcm`): lines of
    /// `format` (a newline is added) to `path`.
    pub fn access_log(path: &std::path::Path, format: &str) -> String {
        format!(
            r#"          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              log_format: {{ text_format_source: {{ inline_string: "{format}\n" }} }}
"#,
            path.display()
        )
    }

    /// A cluster's HTTP/2 upstream (`extra` for [`Standalone::static_cluster`]).
    pub const HTTP2_UPSTREAM: &str = r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
"#;

    /// A STATIC cluster named `name` with these hosts (a YAML list item for
    /// `static_resources.clusters`), with `extra` (YAML at 4 spaces) among its fields.
    pub fn static_cluster(name: &str, hosts: &[SocketAddr], extra: &str) -> String {
        format!(
            "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n{extra}    load_assignment: {}\n",
            Standalone::load_assignment(name, hosts)
        )
    }

    /// The lines of the access log at `log`, once it has at least `n` (Envoy writes its log
    /// every second); panics with the proxy's log when they do not come.
    pub fn log_lines(&self, log: &std::path::Path, n: usize) -> Vec<String> {
        wait_until(Duration::from_secs(10), || {
            let text = std::fs::read_to_string(log).ok()?;
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            (lines.len() >= n).then_some(lines)
        })
        .unwrap_or_else(|| panic!("{}: no access log\n{}", self.flavor.name(), self.logs()))
    }

    /// A STATIC cluster's `load_assignment` for these hosts (YAML flow style).
    pub fn load_assignment(cluster: &str, hosts: &[SocketAddr]) -> String {
        let eps = hosts
            .iter()
            .map(|a| {
                format!(
                    "{{ endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }} }}",
                    a.ip(),
                    a.port()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!("{{ cluster_name: {cluster}, endpoints: [{{ lb_endpoints: [{eps}] }}] }}")
    }

    /// The proxy's log so far.
    pub fn logs(&self) -> String {
        self.procs.last().map(|p| p.logs()).unwrap_or_default()
    }
}

/// Prints what weft-proxy and Envoy gave, line by line (`!` and both lines where they differ),
/// and returns how many lines differ (a missing line counts).
pub fn differing_lines(weft: &[String], envoy: &[String]) -> usize {
    let mut differ = 0;
    for i in 0..weft.len().max(envoy.len()) {
        let (w, e) = (
            weft.get(i).map(String::as_str).unwrap_or("(none)"),
            envoy.get(i).map(String::as_str).unwrap_or("(none)"),
        );
        if w == e {
            println!("  {w}");
        } else {
            differ += 1;
            println!("! weft  {w}\n! envoy {e}");
        }
    }
    differ
}

/// The first of `lines` that starts with `prefix`; empty when none does.
pub fn line_starting(lines: &[String], prefix: &str) -> String {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .cloned()
        .unwrap_or_default()
}
