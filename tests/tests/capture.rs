//! Transparent interception, differential: in a network namespace of its own, `weft-proxy
//! iptables` redirects the workload's outbound TCP to port 15001, and a captured sidecar
//! (node metadata `INTERCEPTION_MODE: REDIRECT`, running as uid 1337 so its own connections
//! are let through) gets Istio's captured listeners from weftd. The workload (curl, as root)
//! then calls services by their addresses as if there were no proxy: HTTP by clusterIP and
//! Host, a TCP service by clusterIP, a ServiceEntry's CIDR with a `destinationSubnets` route for
//! part of it, a resolution NONE ServiceEntry and a DestinationRule PASSTHROUGH (ORIGINAL_DST
//! clusters), and destinations the mesh
//! does not know (ALLOW_ANY passes them through, or hands them to the Sidecar's `egressProxy`;
//! REGISTRY_ONLY refuses them). The same
//! scenario runs once with weft-proxy and once with a stock Envoy 1.40 as the sidecar; both
//! must see the same outcomes.
//!
//! A second scenario captures inbound traffic: a client in another namespace calls the
//! workload's own port and gets the sidecar's inbound chain (its connection manager, the
//! AuthorizationPolicy), and a port no service declares is passed through.
//!
//! Needs root (network namespaces, iptables); everything runs inside the namespaces, so their
//! addresses and ports are private to this test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weft_e2e::{Proc, bin, envoy_bin, wait_until};

const MESH: &str = r#"apiVersion: v1
kind: Service
metadata: { name: hello, namespace: default }
spec:
  clusterIP: 10.96.0.10
  selector: { app: hello }
  ports: [{ name: http, port: 80, targetPort: 18081 }]
---
apiVersion: v1
kind: Service
metadata: { name: db, namespace: default }
spec:
  clusterIP: 10.96.0.20
  selector: { app: db }
  ports: [{ name: tcp, port: 7070, targetPort: 17071 }]
---
apiVersion: v1
kind: Service
metadata: { name: pt, namespace: default }
spec:
  clusterIP: 10.255.0.1
  selector: { app: pt }
  ports: [{ name: tcp, port: 9997, targetPort: 17074 }]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: pt-1, namespace: default }
spec: { address: 127.0.0.1, labels: { app: pt }, ports: { tcp: 17074 } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: pt, namespace: default }
spec:
  host: pt
  trafficPolicy: { loadBalancer: { simple: PASSTHROUGH } }
---
apiVersion: v1
kind: Service
metadata: { name: cache, namespace: default }
spec:
  selector: { app: cache }
  ports: [{ name: tcp, port: 6379, targetPort: 16379 }]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: cache-1, namespace: default }
spec: { address: 127.0.0.1, labels: { app: cache }, ports: { tcp: 16379 } }
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: hello-v1, namespace: default }
spec: { address: 127.0.0.1, labels: { app: hello, version: v1 }, ports: { http: 18081 } }
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: db-v1, namespace: default }
spec: { address: 127.0.0.1, labels: { app: db, version: v1 }, ports: { tcp: 17071 } }
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: db-v2, namespace: default }
spec: { address: 127.0.0.1, labels: { app: db, version: v2 }, ports: { tcp: 17072 } }
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: client, namespace: default }
spec: { address: 10.255.0.1, labels: { app: client } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: db, namespace: default }
spec:
  host: db
  subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: legacy, namespace: default }
spec:
  hosts: [legacy.internal]
  addresses: [10.200.0.0/16]
  ports: [{ number: 7070, name: tcp, protocol: TCP }]
  resolution: STATIC
  endpoints: [{ address: 127.0.0.1, ports: { tcp: 17073 } }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: legacy, namespace: default }
spec:
  hosts: [legacy.internal]
  tcp:
  - match: [{ destinationSubnets: [10.200.5.0/24] }]
    route: [{ destination: { host: db.default.svc.cluster.local, subset: v2 } }]
  - route: [{ destination: { host: legacy.internal } }]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: direct, namespace: default }
spec:
  hosts: [direct.example]
  addresses: [10.255.0.1]
  ports: [{ number: 9998, name: tcp, protocol: TCP }]
  location: MESH_EXTERNAL
  resolution: NONE
"#;

const REGISTRY_ONLY: &str = r#"apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default, namespace: default }
spec:
  egress: [{ hosts: ["./*"] }]
  outboundTrafficPolicy: { mode: REGISTRY_ONLY }
"#;

/// A network namespace with loopback up and a default route out of a veth whose address
/// (10.255.0.1) stands for "somewhere outside the mesh"; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// A namespace with only loopback up.
    fn bare(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let ns = Netns { name: name.into() };
        run("ip", &["netns", "add", name]);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Links two namespaces with a veth pair, `a` on 10.255.3.1/24 and `b` on 10.255.3.2/24.
    fn link(a: &Netns, b: &Netns) {
        // Interface names are at most 15 bytes; made in the host namespace, so per process.
        let tag = format!("w{}", std::process::id() % 100_000);
        let (ea, eb) = (format!("{tag}-a"), format!("{tag}-b"));
        run(
            "ip",
            &["link", "add", &ea, "type", "veth", "peer", "name", &eb],
        );
        run("ip", &["link", "set", &ea, "netns", &a.name]);
        run("ip", &["link", "set", &eb, "netns", &b.name]);
        for (ns, dev, ip) in [(a, &ea, "10.255.3.1/24"), (b, &eb, "10.255.3.2/24")] {
            ns.run(&["ip", "link", "set", dev, "up"]);
            ns.run(&["ip", "addr", "add", ip, "dev", dev]);
        }
    }

    /// Has the namespace resolve names with weftd's DNS (on its loopback), with a pod's search
    /// list: `ip netns exec` mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf.
    fn use_mesh_dns(&self) {
        let dir = Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).expect("/etc/netns");
        std::fs::write(
            dir.join("resolv.conf"),
            "nameserver 127.0.0.1\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
        )
        .expect("resolv.conf");
    }

    fn new(name: &str) -> Netns {
        let ns = Netns::bare(name);
        for cmd in [
            "ip link add v0 type veth peer name v1",
            "ip link set v0 up",
            "ip link set v1 up",
            "ip addr add 10.255.0.1/24 dev v0",
            "ip route add default dev v0",
        ] {
            let args: Vec<&str> = cmd.split(' ').collect();
            ns.run(&args);
        }
        ns
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    fn run(&self, args: &[&str]) {
        let out = self.command(args).output().expect("ip netns exec");
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A long-running process inside the namespace.
    fn start(&self, name: &str, args: &[&str], logs: &Path) -> Proc {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        Proc::start(name, Path::new("ip"), &all, logs)
    }

    /// curl from the workload (root, so captured): the status (0: no HTTP answer) and the
    /// name of the echo backend that answered.
    fn fetch(&self, url: &str, host: Option<&str>) -> (u16, Option<String>) {
        let (code, text) = self.fetch_text(url, host);
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("name: "))
            .map(str::to_string);
        (code, name)
    }

    /// curl: the status (0: no HTTP answer) and the body.
    fn fetch_text(&self, url: &str, host: Option<&str>) -> (u16, String) {
        let mut args = vec!["curl", "-s", "-m", "5", "-w", "\n%{http_code}"];
        let header;
        if let Some(h) = host {
            header = format!("Host: {h}");
            args.extend(["-H", &header]);
        }
        args.push(url);
        let out = self.command(&args).output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {} (this test needs root: network namespaces and iptables)",
        String::from_utf8_lossy(&out.stderr)
    );
}

const EGRESS_PROXY: &str = r#"apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default, namespace: default }
spec:
  egress: [{ hosts: ["./*"] }]
  outboundTrafficPolicy: { mode: ALLOW_ANY, egressProxy: { host: legacy.internal, port: { number: 7070 } } }
"#;

#[derive(Debug, PartialEq)]
struct Seen {
    http_by_cluster_ip: (u16, Option<String>),
    tcp_by_cluster_ip: Vec<String>,
    cidr_service_entry: Option<String>,
    destination_subnet: Vec<Option<String>>,
    resolution_none: Option<String>,
    resolution_none_cluster_used: bool,
    allow_any_tcp: Option<String>,
    allow_any_http: (u16, Option<String>),
    registry_only_http: u16,
    registry_only_tcp: (u16, Option<String>),
    registry_only_known: Option<String>,
    /// By name, through weftd's DNS: the short name of an HTTP service, and the full name of
    /// a TCP service without a clusterIP (the address DNS allocates is the one its chain
    /// matches).
    by_short_name: (u16, Option<String>),
    by_name_allocated_address: Option<String>,
    /// DestinationRule PASSTHROUGH: the connection goes where it was sent (here the service's
    /// own address, where another server listens), not to the service's endpoint.
    passthrough_load_balancer: Option<String>,
    egress_proxy_tcp: Option<String>,
    egress_proxy_http: (u16, Option<String>),
    /// A connection made to 15001 itself: closed, not passed through to itself.
    direct_to_capture_port: u16,
}

fn dir(root: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = root.join(name);
    std::fs::create_dir_all(&d).expect("dir");
    // The sidecar runs as uid 1337 and reads its bootstrap from here.
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// A captured workload's namespace: iptables set up by `weft-proxy iptables`, weftd reading
/// `config`, echo backends, and the sidecar (weft-proxy or Envoy, as uid 1337) identified as
/// `node`, all inside `ns`.
struct CapturedMesh {
    config: PathBuf,
    procs: Vec<Proc>,
}

impl CapturedMesh {
    fn start(
        ns: &Netns,
        tag: &str,
        envoy: bool,
        mesh: &str,
        node: &str,
        backends: &[(&str, &str, &str)],
    ) -> CapturedMesh {
        let kind = if envoy { "envoy" } else { "weft" };
        let root = std::env::temp_dir().join(format!(
            "weft-e2e-capture-{tag}-{kind}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        dir(&root, "");
        let (config, logs) = (dir(&root, "config"), root.join("logs"));
        std::fs::write(config.join("mesh.yaml"), mesh).expect("mesh.yaml");
        let bootstrap = root.join("bootstrap.yaml");
        let text = weft_e2e::envoy::bootstrap(
            node,
            "captured",
            "{ INTERCEPTION_MODE: REDIRECT, NAMESPACE: default }",
            "127.0.0.1:15000".parse().expect("admin"),
            "127.0.0.1:15010".parse().expect("xds"),
            false,
        );
        std::fs::write(&bootstrap, text).expect("bootstrap");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        let weft_proxy = bin("weft-proxy").display().to_string();
        // Inbound too, but for the sidecar's admin port (read by the test).
        ns.run(&[
            &weft_proxy,
            "iptables",
            "--proxy-uid",
            "1337",
            "--exclude-inbound-ports",
            "15000",
        ]);
        let weftd = bin("weftd").display().to_string();
        let config_s = config.display().to_string();
        // DNS for the mesh on the namespace's port 53 (UDP: not captured).
        let corefile = root.join("Corefile");
        std::fs::write(
            &corefile,
            "cluster.local:53 {\n    kubernetes cluster.local\n}\n",
        )
        .expect("Corefile");
        let corefile_s = corefile.display().to_string();
        let state_s = root.join("state").display().to_string();
        let mut procs = vec![ns.start(
            "weftd",
            &[
                &weftd,
                "--config-dir",
                &config_s,
                "--xds-address",
                "127.0.0.1:15010",
                "--debug-address",
                "127.0.0.1:15014",
                "--corefile",
                &corefile_s,
                "--poll-ms",
                "50",
                "--state-dir",
                &state_s,
            ],
            &logs,
        )];
        let weftctl = bin("weftctl").display().to_string();
        for (name, address, port) in backends {
            procs.push(ns.start(
                &format!("echo-{name}"),
                &[
                    &weftctl,
                    "echo",
                    "--address",
                    address,
                    "--port",
                    port,
                    "--name",
                    name,
                ],
                &logs,
            ));
        }
        let bootstrap_s = bootstrap.display().to_string();
        let envoy_s = envoy_bin().display().to_string();
        let as_proxy = ["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"];
        let sidecar: Vec<&str> = if envoy {
            [
                &envoy_s,
                "-c",
                &bootstrap_s,
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "info",
            ]
            .to_vec()
        } else {
            [&weft_proxy, "-c", &bootstrap_s, "--concurrency", "1"].to_vec()
        };
        let args: Vec<&str> = as_proxy.iter().copied().chain(sidecar).collect();
        procs.push(ns.start(kind, &args, &logs));
        CapturedMesh { config, procs }
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.config.join(file), text).expect("config file");
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("--- {}\n{}", p.name, p.logs()))
            .collect()
    }
}

fn scenario(envoy: bool) -> Seen {
    let kind = if envoy { "envoy" } else { "weft" };
    let ns = Netns::new(&format!("weftcap-{kind}-{}", std::process::id()));
    let mesh = CapturedMesh::start(
        &ns,
        "out",
        envoy,
        MESH,
        "sidecar~10.255.0.1~client.default~default.svc.cluster.local",
        &[
            ("hello-v1", "127.0.0.1", "18081"),
            ("db-v1", "127.0.0.1", "17071"),
            ("db-v2", "127.0.0.1", "17072"),
            ("legacy", "127.0.0.1", "17073"),
            ("outside", "10.255.0.1", "9999"),
            ("outside-80", "10.255.0.1", "80"),
            ("direct", "10.255.0.1", "9998"),
            ("cache", "127.0.0.1", "16379"),
            ("pt-endpoint", "127.0.0.1", "17074"),
            ("pt-original", "10.255.0.1", "9997"),
        ],
    );
    ns.use_mesh_dns();
    // Ready once the HTTP listener serves the service by its clusterIP.
    wait_until(Duration::from_secs(20), || {
        (ns.fetch("http://10.96.0.10/", Some("hello")).0 == 200).then_some(())
    })
    .unwrap_or_else(|| panic!("{kind}: the captured sidecar never served\n{}", mesh.logs()));

    let http_by_cluster_ip = ns.fetch("http://10.96.0.10/", Some("hello.default"));
    let mut tcp_by_cluster_ip: Vec<String> = (0..4)
        .filter_map(|_| ns.fetch("http://10.96.0.20:7070/", None).1)
        .collect();
    tcp_by_cluster_ip.sort();
    tcp_by_cluster_ip.dedup();
    let cidr_service_entry = ns.fetch("http://10.200.1.1:7070/", None).1;
    let destination_subnet = (0..3)
        .map(|_| ns.fetch("http://10.200.5.9:7070/", None).1)
        .collect();
    let resolution_none = ns.fetch("http://10.255.0.1:9998/", None).1;
    let stats = String::from_utf8_lossy(
        &ns.command(&["curl", "-s", "http://127.0.0.1:15000/stats"])
            .output()
            .expect("stats")
            .stdout,
    )
    .to_string();
    let resolution_none_cluster_used = stats.lines().any(|l| {
        l.strip_prefix("cluster.outbound|9998||direct.example.upstream_cx_total: ")
            .is_some_and(|n| n.trim().parse::<u64>().is_ok_and(|n| n >= 1))
    });
    let by_short_name = ns.fetch("http://hello/", None);
    let by_name_allocated_address = ns
        .fetch("http://cache.default.svc.cluster.local:6379/", None)
        .1;
    let passthrough_load_balancer = ns.fetch("http://10.255.0.1:9997/", None).1;
    let allow_any_tcp = ns.fetch("http://10.255.0.1:9999/", None).1;
    let allow_any_http = ns.fetch("http://10.255.0.1/", Some("elsewhere.example"));

    mesh.write("sidecar.yaml", REGISTRY_ONLY);
    wait_until(Duration::from_secs(10), || {
        (ns.fetch("http://10.255.0.1/", Some("elsewhere.example")).0 == 502).then_some(())
    })
    .unwrap_or_else(|| panic!("{kind}: REGISTRY_ONLY never applied\n{}", mesh.logs()));
    let registry_only_http = ns.fetch("http://10.255.0.1/", Some("elsewhere.example")).0;
    let registry_only_tcp = ns.fetch("http://10.255.0.1:9999/", None);
    let registry_only_known = ns.fetch("http://10.96.0.10/", Some("hello")).1;

    mesh.write("sidecar.yaml", EGRESS_PROXY);
    wait_until(Duration::from_secs(10), || {
        (ns.fetch("http://10.255.0.1:9999/", None).1.as_deref() == Some("legacy")).then_some(())
    })
    .unwrap_or_else(|| panic!("{kind}: the egress proxy never applied\n{}", mesh.logs()));
    let egress_proxy_tcp = ns.fetch("http://10.255.0.1:9999/", None).1;
    let egress_proxy_http = ns.fetch("http://10.255.0.1/", Some("elsewhere.example"));
    let direct_to_capture_port = ns.fetch("http://127.0.0.1:15001/", None).0;
    let seen = Seen {
        http_by_cluster_ip,
        tcp_by_cluster_ip,
        cidr_service_entry,
        destination_subnet,
        resolution_none,
        resolution_none_cluster_used,
        allow_any_tcp,
        allow_any_http,
        registry_only_http,
        registry_only_tcp,
        registry_only_known,
        by_short_name,
        by_name_allocated_address,
        passthrough_load_balancer,
        egress_proxy_tcp,
        egress_proxy_http,
        direct_to_capture_port,
    };
    eprintln!("{kind}: {seen:#?}");
    seen
}

#[test]
fn a_captured_sidecar_serves_the_workload_as_envoy_does() {
    let weft = scenario(false);
    let some = |s: &str| Some(s.to_string());
    let expected = Seen {
        http_by_cluster_ip: (200, some("hello-v1")),
        tcp_by_cluster_ip: vec!["db-v1".into(), "db-v2".into()],
        cidr_service_entry: some("legacy"),
        destination_subnet: vec![some("db-v2"); 3],
        resolution_none: some("direct"),
        resolution_none_cluster_used: true,
        allow_any_tcp: some("outside"),
        allow_any_http: (200, some("outside-80")),
        registry_only_http: 502,
        registry_only_tcp: (0, None),
        registry_only_known: some("hello-v1"),
        by_short_name: (200, some("hello-v1")),
        by_name_allocated_address: some("cache"),
        passthrough_load_balancer: some("pt-original"),
        egress_proxy_tcp: some("legacy"),
        egress_proxy_http: (200, some("legacy")),
        direct_to_capture_port: 0,
    };
    assert_eq!(weft, expected, "weft-proxy");
    let envoy = scenario(true);
    assert_eq!(envoy, weft, "Envoy 1.40 and weft-proxy differ");
}

const INBOUND_MESH: &str = r#"apiVersion: v1
kind: Service
metadata: { name: hello, namespace: default }
spec:
  clusterIP: 10.96.0.10
  selector: { app: hello }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: server, namespace: default }
spec: { address: 10.255.3.2, labels: { app: hello } }
"#;

const DENY_ADMIN: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: no-admin, namespace: default }
spec:
  selector: { matchLabels: { app: hello } }
  action: DENY
  rules: [{ to: [{ operation: { paths: ["/admin"] } }] }]
"#;

#[derive(Debug, PartialEq)]
struct InboundSeen {
    /// The service's port, through the inbound connection manager (it adds x-request-id).
    declared: (u16, Option<String>, bool),
    denied_path: (u16, bool),
    /// A port no service declares, while a DENY policy names HTTP paths: Istio makes such a
    /// rule deny all of a TCP chain's connections.
    undeclared_under_path_deny: (u16, Option<String>),
    undeclared: (u16, Option<String>),
}

fn inbound_scenario(envoy: bool) -> InboundSeen {
    let kind = if envoy { "envoy" } else { "weft" };
    let id = std::process::id();
    let (client, server) = (
        Netns::bare(&format!("weftin-c-{kind}-{id}")),
        Netns::bare(&format!("weftin-s-{kind}-{id}")),
    );
    Netns::link(&client, &server);
    let mesh = CapturedMesh::start(
        &server,
        "in",
        envoy,
        &format!("{INBOUND_MESH}---\n{DENY_ADMIN}"),
        "sidecar~10.255.3.2~server.default~default.svc.cluster.local",
        &[("hello", "0.0.0.0", "8080"), ("other", "0.0.0.0", "9999")],
    );
    wait_until(Duration::from_secs(20), || {
        (client.fetch("http://10.255.3.2:8080/ok", None).0 == 200).then_some(())
    })
    .unwrap_or_else(|| panic!("{kind}: inbound capture never served\n{}", mesh.logs()));
    let (code, body) = client.fetch_text("http://10.255.3.2:8080/ok", None);
    let name = body
        .lines()
        .find_map(|l| l.strip_prefix("name: "))
        .map(str::to_string);
    let declared = (code, name, body.contains("x-request-id"));
    let (code, body) = client.fetch_text("http://10.255.3.2:8080/admin", None);
    let denied_path = (code, body.contains("RBAC: access denied"));
    let undeclared_under_path_deny = client.fetch("http://10.255.3.2:9999/", None);
    mesh.write("mesh.yaml", INBOUND_MESH);
    wait_until(Duration::from_secs(10), || {
        (client.fetch("http://10.255.3.2:9999/", None).0 == 200).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{kind}: the policy's removal never applied\n{}",
            mesh.logs()
        )
    });
    let undeclared = client.fetch("http://10.255.3.2:9999/", None);
    let seen = InboundSeen {
        declared,
        denied_path,
        undeclared_under_path_deny,
        undeclared,
    };
    eprintln!("{kind}: {seen:#?}");
    seen
}

#[test]
fn a_captured_sidecar_serves_inbound_traffic_as_envoy_does() {
    let weft = inbound_scenario(false);
    let expected = InboundSeen {
        declared: (200, Some("hello".into()), true),
        denied_path: (403, true),
        undeclared_under_path_deny: (0, None),
        undeclared: (200, Some("other".into())),
    };
    assert_eq!(weft, expected, "weft-proxy");
    let envoy = inbound_scenario(true);
    assert_eq!(envoy, weft, "Envoy 1.40 and weft-proxy differ");
}
