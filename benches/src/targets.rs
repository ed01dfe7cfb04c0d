//! The systems under test: an nginx backend, weftd, weft-proxy and Envoy sidecars fed by it, and
//! nginx as a reverse proxy. Proxies and the backend are pinned to CPU 0 with one worker each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub const TARGETS: [&str; 4] = ["direct", "weft-proxy", "envoy", "nginx-proxy"];

const BACKEND_H1: u16 = 18080;
const BACKEND_H2: u16 = 18081;
const NGINX_PROXY_H1: u16 = 18090;
const NGINX_PROXY_H2: u16 = 18091;
/// The service port and the sidecars' egress listener port.
const SERVICE_PORT: u16 = 18100;
const WEFT_IP: &str = "127.0.0.2";
const ENVOY_IP: &str = "127.0.0.3";
const XDS: &str = "127.0.0.1:25010";
const DEBUG: &str = "127.0.0.1:25014";
/// The authority clients use for the mesh service.
pub const AUTHORITY: &str = "bench:18100";

pub struct Environment {
    procs: Vec<(String, Child)>,
}

fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> anyhow::Result<(String, Child)> {
    let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
    let child = cmd
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok((name.to_string(), child))
}

fn pinned(program: &Path) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c").arg("0").arg(program);
    c
}

fn wait_port(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{addr} did not start listening")
}

fn nginx_conf(dir: &Path, name: &str, servers: &str) -> anyhow::Result<PathBuf> {
    let conf = format!(
        "worker_processes 1;\nmaster_process off;\npid {dir}/{name}.pid;\nerror_log {dir}/{name}-error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {dir}/{name}-body;\n  proxy_temp_path {dir}/{name}-proxy;\n  fastcgi_temp_path {dir}/{name}-fcgi;\n  uwsgi_temp_path {dir}/{name}-uwsgi;\n  scgi_temp_path {dir}/{name}-scgi;\n{servers}\n}}\n",
        dir = dir.display()
    );
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf)?;
    Ok(path)
}

fn mesh_yaml(body_port: u16) -> String {
    let mut y = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{ name: bench, namespace: default }}
spec:
  selector: {{ app: backend }}
  ports: [{{ name: http, port: {SERVICE_PORT} }}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{ name: backend, namespace: default }}
spec: {{ address: 127.0.0.1, labels: {{ app: backend }}, ports: {{ http: {body_port} }} }}
"#
    );
    for (name, ip) in [("bench-weft", WEFT_IP), ("bench-envoy", ENVOY_IP)] {
        y.push_str(&format!(
            r#"---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{ name: {name}, namespace: default }}
spec: {{ address: {ip}, labels: {{ app: {name} }} }}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: {name}, namespace: default }}
spec:
  workloadSelector: {{ labels: {{ app: {name} }} }}
  egress:
  - port: {{ number: {SERVICE_PORT}, protocol: HTTP, name: http }}
    bind: {ip}
    captureMode: NONE
    hosts: ["./*"]
"#
        ));
    }
    y
}

impl Environment {
    /// Starts the backend, nginx as a proxy, weftd and the sidecars: `weft_proxy` and, when
    /// given, `envoy`.
    pub fn start(
        dir: &Path,
        bin_dir: &Path,
        weft_proxy: &Path,
        envoy: Option<&Path>,
        body_bytes: usize,
        trace_sampling: Option<f64>,
    ) -> anyhow::Result<Environment> {
        let nginx = PathBuf::from("nginx");
        let body: String = "x".repeat(body_bytes);
        let mut env = Environment { procs: Vec::new() };
        // nginx's `return` takes a few KiB at most: larger bodies are served from a file.
        let answer = if body_bytes <= 1024 {
            format!("return 200 \"{body}\";")
        } else {
            let www = dir.join("www");
            std::fs::create_dir_all(&www)?;
            std::fs::write(www.join("body.txt"), &body)?;
            format!(
                "default_type text/plain; root {}; try_files /body.txt =404;",
                www.display()
            )
        };
        let backend = nginx_conf(
            dir,
            "backend",
            &format!(
                "  server {{ listen 127.0.0.1:{BACKEND_H1}; keepalive_requests 1000000; location / {{ {answer} }} location = /api/v2/spans {{ return 202; }} }}\n  server {{ listen 127.0.0.1:{BACKEND_H2} http2; keepalive_requests 1000000; http2_max_requests 1000000; location / {{ {answer} }} }}"
            ),
        )?;
        let proxy = nginx_conf(
            dir,
            "nginx-proxy",
            &format!(
                "  upstream backend {{ server 127.0.0.1:{BACKEND_H1}; keepalive 64; keepalive_requests 1000000; }}\n  server {{ listen 127.0.0.1:{NGINX_PROXY_H1}; keepalive_requests 1000000; location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n  server {{ listen 127.0.0.1:{NGINX_PROXY_H2} http2; keepalive_requests 1000000; http2_max_requests 1000000; location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
            ),
        )?;
        let config_dir = dir.join("config");
        std::fs::create_dir_all(&config_dir)?;
        std::fs::write(config_dir.join("mesh.yaml"), mesh_yaml(BACKEND_H1))?;
        let bootstrap = dir.join("envoy.yaml");
        let envoy_node =
            format!("sidecar~{ENVOY_IP}~bench-envoy.default~default.svc.cluster.local");
        let admin = format!("{ENVOY_IP}:15000").parse()?;
        std::fs::write(
            &bootstrap,
            weft_e2e::envoy::bootstrap(&envoy_node, "bench", "{}", admin, XDS.parse()?, false),
        )?;

        env.procs.push(spawn(
            "backend",
            pinned(&nginx)
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&backend)
                .arg("-g")
                .arg("daemon off;"),
            dir,
        )?);
        env.procs.push(spawn(
            "nginx-proxy",
            pinned(&nginx)
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&proxy)
                .arg("-g")
                .arg("daemon off;"),
            dir,
        )?);
        env.procs.push(spawn(
            "weftd",
            Command::new(bin_dir.join("weftd"))
                .arg("--config-dir")
                .arg(&config_dir)
                .args([
                    "--xds-address",
                    XDS,
                    "--debug-address",
                    DEBUG,
                    "--no-dns",
                    "--no-ca",
                ])
                // Both sidecars report their spans to the backend, which takes them (`202`).
                .args(trace_sampling.into_iter().flat_map(|pct| {
                    [
                        "--zipkin-address".to_string(),
                        format!("127.0.0.1:{BACKEND_H1}"),
                        "--trace-sampling".to_string(),
                        pct.to_string(),
                    ]
                })),
            dir,
        )?);
        wait_port(XDS, Duration::from_secs(10))?;
        let node = format!("sidecar~{WEFT_IP}~bench-weft.default~default.svc.cluster.local");
        env.procs.push(spawn(
            "weft-proxy",
            pinned(weft_proxy)
                .args([
                    "--xds-address",
                    XDS,
                    "--node-id",
                    &node,
                    "--concurrency",
                    "1",
                    "--admin-address",
                ])
                .arg(format!("{WEFT_IP}:15000")),
            dir,
        )?);
        let mut listening = vec![
            format!("127.0.0.1:{BACKEND_H1}"),
            format!("127.0.0.1:{NGINX_PROXY_H1}"),
            format!("{WEFT_IP}:{SERVICE_PORT}"),
        ];
        if let Some(envoy) = envoy {
            env.procs.push(spawn(
                "envoy",
                pinned(envoy).arg("-c").arg(&bootstrap).args([
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "-l",
                    "warning",
                    "--base-id",
                    "77",
                ]),
                dir,
            )?);
            listening.push(format!("{ENVOY_IP}:{SERVICE_PORT}"));
        }
        for addr in listening {
            wait_port(&addr, Duration::from_secs(20))
                .with_context(|| format!("see logs in {}", dir.display()))?;
        }
        // Let every proxy settle (EDS/RDS warm-up) before measuring.
        std::thread::sleep(Duration::from_secs(2));
        Ok(env)
    }

    pub fn http1_url(&self, target: &str) -> (String, Option<&'static str>) {
        match target {
            "direct" => (format!("http://127.0.0.1:{BACKEND_H1}/"), None),
            "weft-proxy" => (format!("http://{WEFT_IP}:{SERVICE_PORT}/"), Some(AUTHORITY)),
            "envoy" => (
                format!("http://{ENVOY_IP}:{SERVICE_PORT}/"),
                Some(AUTHORITY),
            ),
            _ => (format!("http://127.0.0.1:{NGINX_PROXY_H1}/"), None),
        }
    }

    pub fn h2_url(&self, target: &str) -> (String, Option<&'static str>) {
        match target {
            "direct" => (format!("http://127.0.0.1:{BACKEND_H2}/"), None),
            "nginx-proxy" => (format!("http://127.0.0.1:{NGINX_PROXY_H2}/"), None),
            t => self.http1_url(t),
        }
    }

    fn pid_of(&self, name: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    /// CPU ticks used so far by a target's own processes (for `direct`, the backend; for a
    /// proxy, the proxy alone, not the backend behind it; nginx: master plus its worker).
    pub fn cpu_ticks(&self, target: &str) -> (u64, u64) {
        self.processes(target)
            .into_iter()
            .map(weft_benches::cpu_ticks_split)
            .fold((0, 0), |(u, s), (pu, ps)| (u + pu, s + ps))
    }

    /// A target's own processes: the one started for it (taskset execs the program, so the pid
    /// is the program's own) and its children (nginx's worker); none when it is not running.
    fn processes(&self, target: &str) -> Vec<u32> {
        let Some(pid) = Self::process_of(target).and_then(|name| self.pid_of(name)) else {
            return Vec::new();
        };
        let mut all = vec![pid];
        all.extend(children(pid));
        all
    }

    fn process_of(target: &str) -> Option<&'static str> {
        Some(match target {
            "weft-proxy" => "weft-proxy",
            "envoy" => "envoy",
            "nginx-proxy" => "nginx-proxy",
            "direct" => "backend",
            _ => return None,
        })
    }

    /// VmRSS in MiB of each proxy process (nginx: master plus its worker).
    pub fn rss_by_target(&self) -> BTreeMap<&'static str, f64> {
        let mut m = BTreeMap::new();
        for target in TARGETS {
            let pids = self.processes(target);
            if !pids.is_empty() {
                let kib: u64 = pids.into_iter().map(weft_benches::rss_kib).sum();
                m.insert(target, kib as f64 / 1024.0);
            }
        }
        m
    }

    /// Stops every process: SIGTERM first, so that each ends as it would in a deployment (an
    /// instrumented weft-proxy writes its profile then), SIGKILL for any still running 10 s
    /// later.
    pub fn stop(&mut self) {
        for (_, c) in &self.procs {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, c) in &mut self.procs {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.procs.clear();
    }
}

impl Drop for Environment {
    fn drop(&mut self) {
        self.stop();
    }
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
