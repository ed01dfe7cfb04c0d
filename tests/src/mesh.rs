//! The quickstart mesh as a test fixture: a client and `hello` v1/v2 on their own loopback block
//! `127.<net>.0.0/24`, so tests can run in parallel without sharing addresses or ports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::http::{Client, get_json};
use crate::procs::{Proc, bin, free_port, wait_until};

pub struct Quickstart {
    pub name: String,
    pub net: u8,
    pub dir: PathBuf,
    pub log_dir: PathBuf,
    echo_ports: [u16; 2],
    pub weftd: Option<Proc>,
    pub procs: Vec<Proc>,
    /// Extra command-line arguments for weftd.
    pub weftd_args: Vec<String>,
    /// Workloads run sidecars with mesh identities (see `enable_identities`).
    pub identities: bool,
    /// Extra command-line arguments for every weft-proxy sidecar.
    pub proxy_args: Vec<String>,
    /// weft-proxy sidecars get xDS from weftd's TLS port (15012), authenticated with their
    /// workload certificates (needs `enable_identities`).
    pub secure_xds: bool,
    /// The client's sidecar says `INTERCEPTION_MODE: REDIRECT` (weftd then generates the
    /// captured listeners for it; nothing redirects traffic on the test's loopback).
    pub client_captured: bool,
}

/// The service port, which is also the client's egress listener port.
pub const SERVICE_PORT: u16 = 8080;
/// The sidecars' inbound port.
pub const INBOUND_PORT: u16 = 9080;
/// A TCP service (`hello-tcp`, port name `tcp-echo`) in front of the same backends, proxied
/// with the TCP proxy filter on both sidecars.
pub const TCP_SERVICE_PORT: u16 = 7070;
pub const TCP_INBOUND_PORT: u16 = 9070;

impl Quickstart {
    /// Writes the config (80/20 split) for a test; `net` must be unique among tests.
    pub fn new(name: &str, net: u8) -> Quickstart {
        let root = std::env::temp_dir().join(format!("weft-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("config");
        std::fs::create_dir_all(&dir).expect("config dir");
        let echo_ports = [free_port("127.0.0.1"), free_port("127.0.0.1")];
        let q = Quickstart {
            name: name.into(),
            net,
            dir,
            log_dir: root.join("logs"),
            echo_ports,
            weftd: None,
            procs: Vec::new(),
            weftd_args: Vec::new(),
            identities: false,
            proxy_args: Vec::new(),
            secure_xds: false,
            client_captured: false,
        };
        std::fs::write(q.dir.join("mesh.yaml"), q.mesh_yaml()).expect("write mesh.yaml");
        q.set_split(80, 20);
        q
    }

    /// Marks every workload as running a sidecar with a mesh identity (Istio's
    /// `security.istio.io/tlsMode: istio` label), and has each weft-proxy started from now on
    /// obtain its certificate from weftd with a join token for its service account (`client`,
    /// `hello`). Sidecars then talk mTLS to each other.
    pub fn enable_identities(&mut self) {
        self.identities = true;
        let yaml = self
            .mesh_yaml()
            .replace(
                "labels: { app: client }",
                "labels: { app: client, security.istio.io/tlsMode: istio }",
            )
            .replace(
                "version: v1 }",
                "version: v1, security.istio.io/tlsMode: istio }",
            )
            .replace(
                "version: v2 }",
                "version: v2, security.istio.io/tlsMode: istio }",
            );
        self.write_file("mesh.yaml", &yaml);
    }

    /// Writes a mesh-wide PeerAuthentication (istio-system/default) with `mode`.
    pub fn set_peer_authentication(&self, mode: &str) {
        self.write_file(
            "peer-authentication.yaml",
            &format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{ name: default, namespace: istio-system }}\nspec: {{ mtls: {{ mode: {mode} }} }}\n"
            ),
        );
    }

    /// How many filter chains the active inbound listener on `port` has on the sidecar whose
    /// admin is on `host` (weft-proxy's config dump is proto3 JSON, camelCase; Envoy's keeps
    /// the proto field names); 0 when there is none.
    pub fn inbound_chains(&self, host: u8, port: u16) -> usize {
        let dump = get_json(self.admin(host), "/config_dump").unwrap_or_default();
        let get = |v: &serde_json::Value, snake: &str, camel: &str| {
            v.get(snake)
                .or_else(|| v.get(camel))
                .cloned()
                .unwrap_or_default()
        };
        dump["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| {
                get(c, "dynamic_listeners", "dynamicListeners")
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|l| {
                l["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(&format!("_{port}")))
            })
            .filter_map(|l| {
                let state = get(&l, "active_state", "activeState");
                get(&state["listener"], "filter_chains", "filterChains")
                    .as_array()
                    .map(Vec::len)
            })
            .next()
            .unwrap_or(0)
    }

    /// A join token for `service_account` in namespace default, written to a file (weftd must
    /// be running: it creates the signing key).
    pub fn token_file(&self, service_account: &str) -> PathBuf {
        self.token_file_in("default", service_account)
    }

    /// A join token for `namespace`/`service_account`, written to a file.
    pub fn token_file_in(&self, namespace: &str, service_account: &str) -> PathBuf {
        // weftd writes its signing key (atomically) shortly after it starts listening: a test
        // that asks for a token right away waits for the key instead of racing it.
        let key = self.state_dir().join("join-token-key");
        wait_until(Duration::from_secs(10), || key.exists().then_some(()))
            .unwrap_or_else(|| panic!("weftd wrote {}", key.display()));
        let out = std::process::Command::new(bin("weftctl"))
            .args(["token", "create", "-n", namespace])
            .args(["--service-account", service_account, "--state-dir"])
            .arg(self.state_dir())
            .output()
            .expect("run weftctl token create");
        assert!(
            out.status.success(),
            "weftctl token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = self
            .log_dir
            .join(format!("{namespace}-{service_account}.token"));
        std::fs::create_dir_all(&self.log_dir).expect("log dir");
        std::fs::write(&path, out.stdout).expect("write token");
        path
    }

    /// A mesh certificate for `namespace`/`service_account` from weftd's CA (`weftctl cert
    /// request` with a join token): the folder with key.pem, cert-chain.pem, root-cert.pem.
    pub fn mesh_certificate(&self, namespace: &str, service_account: &str) -> PathBuf {
        let dir = self
            .log_dir
            .join(format!("cert-{namespace}-{service_account}"));
        let token = self.token_file_in(namespace, service_account);
        let out = std::process::Command::new(bin("weftctl"))
            .args(["cert", "request", "--ca-address", &self.xds().to_string()])
            .args(["-n", namespace, "--service-account", service_account])
            .arg("--token-file")
            .arg(&token)
            .arg("--out-dir")
            .arg(&dir)
            .output()
            .expect("run weftctl cert request");
        assert!(
            out.status.success(),
            "weftctl cert request: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    }

    /// The echo backend of hello-v1 (0) or hello-v2 (1), bypassing the mesh.
    pub fn echo_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.echo_ports[i]))
    }

    pub fn ip(&self, host: u8) -> String {
        format!("127.{}.0.{host}", self.net)
    }

    pub fn xds(&self) -> SocketAddr {
        format!("{}:15010", self.ip(1)).parse().expect("addr")
    }

    /// weftd's state folder (its CA and join-token key).
    pub fn state_dir(&self) -> PathBuf {
        self.log_dir.with_file_name("state")
    }

    pub fn debug(&self) -> SocketAddr {
        format!("{}:15014", self.ip(1)).parse().expect("addr")
    }

    /// The client's outbound listener (the Sidecar egress bind).
    pub fn egress(&self) -> SocketAddr {
        format!("{}:{SERVICE_PORT}", self.ip(10))
            .parse()
            .expect("addr")
    }

    pub fn admin(&self, host: u8) -> SocketAddr {
        format!("{}:15000", self.ip(host)).parse().expect("addr")
    }

    pub fn node_id(&self, host: u8, workload: &str) -> String {
        format!(
            "sidecar~{}~{workload}.default~default.svc.cluster.local",
            self.ip(host)
        )
    }

    fn mesh_yaml(&self) -> String {
        let mut y = format!(
            r#"apiVersion: v1
kind: Service
metadata: {{ name: hello, namespace: default }}
spec:
  selector: {{ app: hello }}
  ports: [{{ name: http, port: {SERVICE_PORT} }}]
---
apiVersion: v1
kind: Service
metadata: {{ name: hello-tcp, namespace: default }}
spec:
  selector: {{ app: hello }}
  ports: [{{ name: tcp-echo, port: {TCP_SERVICE_PORT} }}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{ name: client, namespace: default }}
spec: {{ address: {client}, labels: {{ app: client }}, serviceAccount: client }}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: hello, namespace: default }}
spec:
  host: hello
  subsets:
  - {{ name: v1, labels: {{ version: v1 }} }}
  - {{ name: v2, labels: {{ version: v2 }} }}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: client, namespace: default }}
spec:
  workloadSelector: {{ labels: {{ app: client }} }}
  egress:
  - port: {{ number: {SERVICE_PORT}, protocol: HTTP, name: egress-http }}
    bind: {client}
    captureMode: NONE
    hosts: ["./*"]
  - port: {{ number: {TCP_SERVICE_PORT}, protocol: TCP, name: egress-tcp }}
    bind: {client}
    captureMode: NONE
    hosts: ["./*"]
"#,
            client = self.ip(10)
        );
        for (i, v) in ["v1", "v2"].iter().enumerate() {
            let ip = self.ip(11 + i as u8);
            y.push_str(&format!(
                r#"---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{ name: hello-{v}, namespace: default }}
spec: {{ address: {ip}, labels: {{ app: hello, version: {v} }}, ports: {{ http: {INBOUND_PORT}, tcp-echo: {TCP_INBOUND_PORT} }}, serviceAccount: hello }}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: hello-{v}, namespace: default }}
spec:
  workloadSelector: {{ labels: {{ app: hello, version: {v} }} }}
  ingress:
  - port: {{ number: {INBOUND_PORT}, protocol: HTTP, name: http }}
    bind: {ip}
    defaultEndpoint: 127.0.0.1:{port}
  - port: {{ number: {TCP_INBOUND_PORT}, protocol: TCP, name: tcp }}
    bind: {ip}
    defaultEndpoint: 127.0.0.1:{port}
  egress: [{{ hosts: ["./*"] }}]
"#,
                port = self.echo_ports[i]
            ));
        }
        y
    }

    /// Rewrites the VirtualService with the given weights (atomically: write, then rename).
    pub fn set_split(&self, v1: u32, v2: u32) {
        let yaml = format!(
            r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: hello, namespace: default }}
spec:
  hosts: [hello]
  http:
  - route:
    - {{ destination: {{ host: hello, subset: v1 }}, weight: {v1} }}
    - {{ destination: {{ host: hello, subset: v2 }}, weight: {v2} }}
"#
        );
        self.write_file("virtual-service.yaml", &yaml);
    }

    /// Writes a config file atomically (the watcher never sees half a file).
    pub fn write_file(&self, name: &str, text: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, self.dir.join(name)).expect("rename config");
    }

    pub fn start_weftd(&mut self) {
        let dir = self.dir.display().to_string();
        let (xds, debug) = (self.xds().to_string(), self.debug().to_string());
        let secure = format!("{}:15012", self.ip(1));
        let state = self.state_dir().display().to_string();
        let p = Proc::start(
            "weftd",
            &bin("weftd"),
            &[
                "--config-dir",
                &dir,
                "--xds-address",
                &xds,
                "--debug-address",
                &debug,
                "--poll-ms",
                "50",
                "--no-dns",
                "--secure-xds-address",
                &secure,
                "--state-dir",
                &state,
            ]
            .into_iter()
            .chain(self.weftd_args.iter().map(String::as_str))
            .collect::<Vec<_>>(),
            &self.log_dir,
        );
        self.weftd = Some(p);
        let debug = self.debug();
        wait_until(Duration::from_secs(10), || {
            crate::http::get(debug, "/ready")
                .ok()
                .filter(|r| r.status == 200)
        })
        .expect("weftd becomes ready");
    }

    pub fn stop_weftd(&mut self) {
        if let Some(mut p) = self.weftd.take() {
            p.kill();
        }
    }

    /// The two echo backends and their weft-proxy sidecars.
    pub fn start_hello(&mut self) {
        self.start_hello_with_envoy_v2(false);
    }

    /// The two echo backends; hello-v1's sidecar is weft-proxy, hello-v2's a stock Envoy when
    /// `envoy_v2` (with an agent for its certificate when identities are on).
    pub fn start_hello_with_envoy_v2(&mut self, envoy_v2: bool) {
        self.start_hello_with([false, envoy_v2]);
    }

    /// The two echo backends; each sidecar is a stock Envoy where `envoy[i]` says so.
    pub fn start_hello_with(&mut self, envoy: [bool; 2]) {
        for (i, v) in ["v1", "v2"].iter().enumerate() {
            let port = self.echo_ports[i].to_string();
            let name = format!("hello-{v}");
            self.procs.push(Proc::start(
                &format!("echo-{v}"),
                &bin("weftctl"),
                &["echo", "--port", &port, "--name", &name],
                &self.log_dir,
            ));
            let host = 11 + i as u8;
            if envoy[i] {
                let labels = if self.identities {
                    format!("{{ app: hello, version: {v}, security.istio.io/tlsMode: istio }}")
                } else {
                    format!("{{ app: hello, version: {v} }}")
                };
                let node = self.node_id(host, &name);
                self.start_envoy_as(host, &name, &node, &labels);
            } else {
                self.start_weft_proxy(host, &name);
            }
        }
    }

    pub fn start_weft_proxy(&mut self, host: u8, workload: &str) {
        self.start_weft_proxy_as(host, workload, &self.node_id(host, workload));
    }

    /// A weft-proxy with any node id (`router~...` for a gateway), its admin on `host`.
    pub fn start_weft_proxy_as(&mut self, host: u8, workload: &str, node: &str) {
        let (mut xds, admin) = (self.xds().to_string(), self.admin(host));
        if self.secure_xds {
            xds = format!("{}:15012", self.ip(1));
        }
        let admin_s = admin.to_string();
        let mut args: Vec<String> = [
            "--xds-address",
            &xds,
            "--node-id",
            node,
            "--admin-address",
            &admin_s,
            "--concurrency",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.identities {
            // client -> client, hello-v1 -> hello
            let sa = workload.split('-').next().unwrap_or(workload);
            let token = self.token_file(sa);
            args.extend([
                "--ca-token-file".to_string(),
                token.display().to_string(),
                "--service-account".to_string(),
                sa.to_string(),
            ]);
        }
        if self.secure_xds {
            args.push("--xds-root-cert".into());
            args.push(self.state_dir().join("root-cert.pem").display().to_string());
        }
        args.extend(self.proxy_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.procs.push(Proc::start(
            &format!("weft-proxy-{workload}"),
            &bin("weft-proxy"),
            &args,
            &self.log_dir,
        ));
        wait_until(Duration::from_secs(10), || {
            crate::http::get(admin, "/ready")
                .ok()
                .filter(|r| r.status == 200)
        })
        .unwrap_or_else(|| panic!("{workload}'s weft-proxy becomes LIVE"));
    }

    /// With identities on, an Envoy sidecar needs an agent: `weft-proxy --agent-only` gets the
    /// workload certificate and serves it over SDS on a Unix socket (returned), as Istio's
    /// pilot-agent does. Its admin is on port 15020 of the workload's address.
    pub fn start_agent(&mut self, host: u8, workload: &str, node: &str) -> Option<PathBuf> {
        if !self.identities {
            return None;
        }
        let sa = workload.split('-').next().unwrap_or(workload);
        let token = self.token_file(sa).display().to_string();
        std::fs::create_dir_all(&self.log_dir).expect("log dir");
        let socket = self.log_dir.join(format!("{workload}-sds.sock"));
        let admin: SocketAddr = format!("{}:15020", self.ip(host)).parse().expect("addr");
        let (xds, admin_s, socket_s) = (
            self.xds().to_string(),
            admin.to_string(),
            socket.display().to_string(),
        );
        self.procs.push(Proc::start(
            &format!("agent-{workload}"),
            &bin("weft-proxy"),
            &[
                "--agent-only",
                "--sds-socket",
                &socket_s,
                "--xds-address",
                &xds,
                "--node-id",
                node,
                "--admin-address",
                &admin_s,
                "--ca-token-file",
                &token,
                "--service-account",
                sa,
            ],
            &self.log_dir,
        ));
        wait_until(Duration::from_secs(10), || {
            get_json(admin, "/certs").filter(|c| c["identity"].is_string())
        })
        .unwrap_or_else(|| panic!("{workload}'s agent obtains a certificate"));
        Some(socket)
    }

    /// Writes an Envoy bootstrap for the client's sidecar, over SotW (`GRPC`) or delta
    /// (`DELTA_GRPC`) ADS, and returns its path.
    pub fn client_bootstrap(&self, delta: bool) -> PathBuf {
        let capture = if self.client_captured {
            ", INTERCEPTION_MODE: REDIRECT"
        } else {
            ""
        };
        let metadata = format!(
            "{{ NAMESPACE: default, WORKLOAD_NAME: client, LABELS: {{ app: client }}{capture} }}"
        );
        let bootstrap = crate::envoy::bootstrap(
            &self.node_id(10, "client"),
            "client",
            &metadata,
            self.admin(10),
            self.xds(),
            delta,
        );
        std::fs::create_dir_all(&self.log_dir).expect("log dir");
        let path = self.log_dir.join(format!(
            "client-bootstrap-{}.yaml",
            if delta { "delta" } else { "sotw" }
        ));
        std::fs::write(&path, bootstrap).expect("write bootstrap");
        path
    }

    /// A stock Envoy as the client's sidecar.
    pub fn start_envoy_client(&mut self, delta: bool) {
        let path = self.client_bootstrap(delta);
        let node = self.node_id(10, "client");
        if let Some(socket) = self.start_agent(10, "client", &node) {
            let mut text = std::fs::read_to_string(&path).expect("bootstrap");
            text.push_str(&crate::envoy::sds_cluster(&socket));
            std::fs::write(&path, text).expect("write bootstrap");
        }
        let base_id = u32::from(self.net) * 10 + u32::from(delta);
        self.launch_envoy("envoy", &path, base_id, 10);
    }

    /// Starts Envoy on a bootstrap file and waits until its admin (on `host`) reports ready.
    fn launch_envoy(&mut self, name: &str, bootstrap: &std::path::Path, base_id: u32, host: u8) {
        self.procs.push(crate::procs::start_envoy(
            name,
            bootstrap,
            base_id,
            &self.log_dir,
        ));
        let admin = self.admin(host);
        wait_until(Duration::from_secs(20), || {
            crate::http::get(admin, "/ready")
                .ok()
                .filter(|r| r.status == 200)
        })
        .unwrap_or_else(|| panic!("{name} becomes LIVE on weftd's config"));
    }

    /// A stock Envoy with any node id (`router~...` for a gateway), its admin on `host`.
    pub fn start_envoy_as(&mut self, host: u8, workload: &str, node: &str, labels: &str) {
        let metadata =
            format!("{{ NAMESPACE: default, WORKLOAD_NAME: {workload}, LABELS: {labels} }}");
        let mut bootstrap = crate::envoy::bootstrap(
            node,
            workload,
            &metadata,
            self.admin(host),
            self.xds(),
            false,
        );
        if let Some(socket) = self.start_agent(host, workload, node) {
            bootstrap.push_str(&crate::envoy::sds_cluster(&socket));
        }
        std::fs::create_dir_all(&self.log_dir).expect("log dir");
        let path = self.log_dir.join(format!("{workload}-bootstrap.yaml"));
        std::fs::write(&path, bootstrap).expect("write bootstrap");
        let base_id = u32::from(self.net) * 10 + 5 + u32::from(host);
        self.launch_envoy(&format!("envoy-{workload}"), &path, base_id, host);
    }

    /// weft-proxy as the client's sidecar, started from the same Envoy bootstrap file.
    pub fn start_weft_client_from_bootstrap(&mut self, concurrency: usize) {
        let path_s = self.client_bootstrap(false).display().to_string();
        let c = concurrency.to_string();
        self.procs.push(Proc::start(
            "weft-proxy-client",
            &bin("weft-proxy"),
            &["--config-path", &path_s, "--concurrency", &c],
            &self.log_dir,
        ));
        let admin = self.admin(10);
        wait_until(Duration::from_secs(10), || {
            crate::http::get(admin, "/ready")
                .ok()
                .filter(|r| r.status == 200)
        })
        .expect("weft-proxy becomes LIVE from the Envoy bootstrap");
    }

    /// A raw TCP round trip through the client's TCP egress listener (an HTTP/1.1 request
    /// inside, opaque to the TCP proxies); returns what the backend sent before closing.
    pub fn tcp_round_trip(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.tcp_egress())
            .expect("connect the TCP egress listener");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: raw\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out)
            .expect("read until the backend closes");
        out
    }

    /// The client's TCP egress listener.
    pub fn tcp_egress(&self) -> SocketAddr {
        format!("{}:{TCP_SERVICE_PORT}", self.ip(10))
            .parse()
            .expect("addr")
    }

    /// The client's sidecar: a stock Envoy (SotW) or weft-proxy.
    pub fn start_client(&mut self, envoy: bool) {
        if envoy {
            self.start_envoy_client(false);
        } else if self.client_captured {
            let mut args = self.proxy_args.clone();
            self.proxy_args
                .extend(["--interception-mode".to_string(), "REDIRECT".to_string()]);
            self.start_weft_proxy(10, "client");
            std::mem::swap(&mut self.proxy_args, &mut args);
        } else {
            self.start_weft_proxy(10, "client");
        }
    }

    /// Has weftd give every sidecar Istio's JSON access log, in one file for the whole mesh
    /// (call before `start_weftd`); returns the file.
    pub fn json_access_log(&mut self) -> PathBuf {
        let log = self.dir.parent().expect("root").join("access.log");
        self.weftd_args.extend([
            "--access-log-file".into(),
            log.display().to_string(),
            "--access-log-encoding".into(),
            "JSON".into(),
        ]);
        log
    }

    /// The client sidecar's first `n` lines of that log (Envoy writes a line when a stream
    /// ends and flushes every second: waits up to 10 s).
    pub fn client_log_lines(&self, log: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
        let egress = self.egress().to_string();
        wait_until(Duration::from_secs(10), || {
            let text = std::fs::read_to_string(log).ok()?;
            let lines: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|l| l["downstream_local_address"] == egress.as_str())
                .collect();
            (lines.len() >= n).then_some(lines)
        })
        .unwrap_or_else(|| panic!("{}: no access log lines in {}", self.name, log.display()))
    }

    /// Asserts that weftd recorded no NACK from the client's sidecar.
    pub fn assert_client_nacked_nothing(&self) {
        let s = self
            .sync_of(&self.node_id(10, "client"))
            .expect("client connected");
        for (t, st) in s["types"].as_object().into_iter().flatten() {
            assert_eq!(
                st["nacks"], 0,
                "{}: {t} NACKed: {}",
                self.name, st["last_nack"]
            );
        }
    }

    /// Sends `n` requests through the client sidecar; returns (v1, v2, failures).
    pub fn split(&self, n: usize) -> (usize, usize, Vec<String>) {
        let mut c = Client::new(self.egress());
        let (mut v1, mut v2, mut failures) = (0, 0, Vec::new());
        for _ in 0..n {
            match c.get("hello", "/") {
                Ok(r) if r.status == 200 => match r.header("x-echo-name") {
                    Some("hello-v1") => v1 += 1,
                    Some("hello-v2") => v2 += 1,
                    other => failures.push(format!("unexpected backend {other:?}")),
                },
                Ok(r) => failures.push(format!("status {} body {:?}", r.status, r.body)),
                Err(e) => failures.push(e.to_string()),
            }
        }
        (v1, v2, failures)
    }

    /// weftd's per-proxy xDS state.
    pub fn syncz(&self) -> serde_json::Value {
        get_json(self.debug(), "/debug/syncz").unwrap_or_default()
    }

    /// The syncz entry of one proxy.
    pub fn sync_of(&self, node_id: &str) -> Option<serde_json::Value> {
        self.syncz()
            .as_array()?
            .iter()
            .find(|c| c["proxy"] == node_id)
            .cloned()
    }
}

/// For a binomial(n, p) count, the interval mean ± 5 standard deviations: a correct split
/// falls outside it about once in 3.5 million runs, a wrong one (say 70/30 for 80/20) is caught.
pub fn binomial_bounds(n: usize, p: f64) -> (usize, usize) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (
        ((mean - 5.0 * sd).floor().max(0.0)) as usize,
        (mean + 5.0 * sd).ceil() as usize,
    )
}
