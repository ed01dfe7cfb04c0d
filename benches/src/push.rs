//! `weft-pushload`: how fast weftd pushes config (issue: the Istio config API). It writes a mesh
//! of N services x M endpoints (every tenth service with subsets and a weighted VirtualService)
//! plus C client workloads (replicas of D deployments) sharing one Sidecar, starts weftd on it (CPU 0), connects C simulated
//! ADS clients (SotW, CPU 1) that subscribe to CDS, EDS, LDS and RDS and ACK every response, and
//! then, round after round, edits the config folder and times, per client, how long after the
//! file was replaced its sidecar received (and ACKed) the new resources:
//!   - route:    a VirtualService weight edit (RDS to every client);
//!   - cluster:  a DestinationRule connection-pool edit (CDS to every client);
//!   - endpoint: one WorkloadEntry's address (EDS only; any other type pushed is reported).
//!
//! It prints p50/p99/max per change over all rounds and weftd's RSS and CPU time. With
//! `--proxy-rss ENVOY`, it also starts a real weft-proxy and then a real Envoy as client 0's
//! sidecar on the synced mesh and reports each one's RSS with that config loaded (issue: weft-proxy
//! at Envoy parity, "RSS under 40 MB with 1,000 clusters of 10 endpoints").
//!
//! Run it with `benches/run-push.sh` (builds release binaries, pins with taskset).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_xds_proto::envoy::config::core::v3::Node;
use weft_xds_proto::envoy::service::discovery::v3::DiscoveryRequest;
use weft_xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_xds_proto::type_url;

struct Args {
    services: usize,
    endpoints: usize,
    clients: usize,
    /// Clients are replicas of this many deployments (distinct label sets).
    deployments: usize,
    rounds: usize,
    /// Clients are captured sidecars (INTERCEPTION_MODE REDIRECT, a catch-all egress): they
    /// get virtualOutbound/virtualInbound and a listener per destination port.
    captured: bool,
    poll_ms: u64,
    debounce_ms: u64,
    bin_dir: PathBuf,
    work_dir: PathBuf,
    /// Envoy binary: measure a real weft-proxy's and Envoy's RSS on the mesh.
    proxy_rss: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let exe = std::env::current_exe()?;
    let mut a = Args {
        services: 1000,
        endpoints: 10,
        clients: 100,
        deployments: 10,
        rounds: 10,
        captured: false,
        // weftd's defaults: changes are seen through inotify, the poll is the fallback.
        poll_ms: 200,
        debounce_ms: 20,
        bin_dir: exe.parent().context("exe dir")?.to_path_buf(),
        work_dir: std::env::temp_dir().join(format!("weft-push-{}", std::process::id())),
        proxy_rss: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--services" => a.services = val()?.parse()?,
            "--endpoints" => a.endpoints = val()?.parse()?,
            "--clients" => a.clients = val()?.parse()?,
            "--deployments" => a.deployments = val()?.parse()?,
            "--rounds" => a.rounds = val()?.parse()?,
            "--captured" => a.captured = true,
            "--poll-ms" => a.poll_ms = val()?.parse()?,
            "--debounce-ms" => a.debounce_ms = val()?.parse()?,
            "--proxy-rss" => a.proxy_rss = Some(PathBuf::from(val()?)),
            other => bail!(
                "unknown flag {other}; flags: --services N --endpoints N --clients N --deployments N --rounds N --captured --poll-ms MS --debounce-ms MS --proxy-rss ENVOY"
            ),
        }
    }
    if a.services == 0
        || a.endpoints == 0
        || a.endpoints > 250
        || a.clients == 0
        || a.deployments == 0
    {
        bail!("need at least one service, endpoint and client (at most 250 endpoints)");
    }
    Ok(a)
}

// ------------------------------------------------------------------ the mesh on disk

fn write_atomically(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

fn endpoint_ip(service: usize, j: usize) -> String {
    format!("10.{}.{}.{}", service >> 8, service & 255, j + 1)
}

fn services_yaml(a: &Args) -> String {
    let mut s = String::with_capacity(a.services * a.endpoints * 220);
    for i in 1..a.services {
        s.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: svc-{i}, namespace: default }}\nspec:\n  selector: {{ app: svc-{i} }}\n  ports: [{{ name: http, port: 8080 }}]\n---\n"
        ));
        for j in 0..a.endpoints {
            let v = if j % 2 == 0 { "v1" } else { "v2" };
            s.push_str(&format!(
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: svc-{i}-{j}, namespace: default }}\nspec: {{ address: {}, labels: {{ app: svc-{i}, version: {v} }}, ports: {{ http: 9080 }} }}\n---\n",
                endpoint_ip(i, j)
            ));
        }
        if i % 10 == 0 {
            s.push_str(&format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: svc-{i}, namespace: default }}\nspec:\n  host: svc-{i}\n  subsets: [{{ name: v1, labels: {{ version: v1 }} }}, {{ name: v2, labels: {{ version: v2 }} }}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{ name: svc-{i}, namespace: default }}\nspec:\n  hosts: [svc-{i}]\n  http:\n  - route:\n    - {{ destination: {{ host: svc-{i}, subset: v1 }}, weight: 90 }}\n    - {{ destination: {{ host: svc-{i}, subset: v2 }}, weight: 10 }}\n---\n"
            ));
        }
    }
    s
}

/// svc-0 lives in its own files so that each change rewrites a small file.
fn svc0_yaml(a: &Args, round: usize) -> String {
    let mut s = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: { name: svc-0, namespace: default }\nspec:\n  selector: { app: svc-0 }\n  ports: [{ name: http, port: 8080 }]\n---\n",
    );
    for j in 0..a.endpoints {
        // The endpoint change: endpoint 0 moves to a new address each round.
        let ip = if j == 0 {
            format!("10.250.{}.{}", round / 250, round % 250 + 1)
        } else {
            endpoint_ip(0, j)
        };
        s.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: svc-0-{j}, namespace: default }}\nspec: {{ address: {ip}, labels: {{ app: svc-0, version: v1 }}, ports: {{ http: 9080 }} }}\n---\n"
        ));
    }
    s
}

fn route_yaml(round: usize) -> String {
    let w = 50 + (round % 40);
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{ name: svc-0, namespace: default }}\nspec:\n  hosts: [svc-0]\n  http:\n  - route:\n    - {{ destination: {{ host: svc-0, subset: a }}, weight: {w} }}\n    - {{ destination: {{ host: svc-0, subset: b }}, weight: {} }}\n",
        100 - w
    )
}

fn rule_yaml(round: usize) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: svc-0, namespace: default }}\nspec:\n  host: svc-0\n  trafficPolicy: {{ connectionPool: {{ tcp: {{ maxConnections: {} }} }} }}\n  subsets: [{{ name: a, labels: {{ version: v1 }} }}, {{ name: b, labels: {{ version: v1 }} }}]\n",
        100 + round
    )
}

fn clients_yaml(a: &Args) -> String {
    let mut s = String::from(if a.captured {
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: { name: clients, namespace: default }\nspec:\n  workloadSelector: { labels: { app: client } }\n  egress:\n  - hosts: [\"./*\"]\n---\n"
    } else {
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: { name: clients, namespace: default }\nspec:\n  workloadSelector: { labels: { app: client } }\n  egress:\n  - port: { number: 8080, protocol: HTTP, name: egress-http }\n    bind: 127.0.0.1\n    hosts: [\"./*\"]\n---\n"
    });
    for k in 0..a.clients {
        s.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: client-{k}, namespace: default }}\nspec: {{ address: {}, labels: {{ app: client, deployment: d{} }} }}\n---\n",
            client_ip(k),
            k % a.deployments
        ));
    }
    s
}

fn client_ip(k: usize) -> String {
    format!("127.77.{}.{}", k / 250, k % 250 + 1)
}

// ------------------------------------------------------------------ simulated ADS clients

/// What one client has received: per type, the last version and when it arrived.
#[derive(Default, Clone)]
struct Seen {
    last: BTreeMap<&'static str, (String, Instant)>,
    responses: BTreeMap<&'static str, u64>,
}

type Shared = Arc<Mutex<Seen>>;

const TYPES: [&str; 4] = [
    type_url::CLUSTER,
    type_url::CLUSTER_LOAD_ASSIGNMENT,
    type_url::LISTENER,
    type_url::ROUTE_CONFIGURATION,
];

fn static_type(t: &str) -> Option<&'static str> {
    TYPES.iter().copied().find(|x| *x == t)
}

async fn run_client(xds: String, k: usize, seen: Shared, captured: bool) -> anyhow::Result<()> {
    use weft_xds_proto::envoy::config::cluster::v3::Cluster;
    use weft_xds_proto::wkt::{Struct, Value, value::Kind};
    let metadata = captured.then(|| Struct {
        fields: [(
            "INTERCEPTION_MODE".to_string(),
            Value {
                kind: Some(Kind::StringValue("REDIRECT".into())),
            },
        )]
        .into_iter()
        .collect(),
    });
    let node = Node {
        id: format!(
            "sidecar~{}~client-{k}.default~default.svc.cluster.local",
            client_ip(k)
        ),
        metadata,
        ..Default::default()
    };
    let mut client = AggregatedDiscoveryServiceClient::connect(xds)
        .await?
        .max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
    let req = |t: &str, names: Vec<String>, version: &str, nonce: &str| DiscoveryRequest {
        node: Some(node.clone()),
        type_url: t.to_string(),
        resource_names: names,
        version_info: version.to_string(),
        response_nonce: nonce.to_string(),
        ..Default::default()
    };
    tx.send(req(type_url::CLUSTER, vec![], "", "")).await?;
    tx.send(req(type_url::LISTENER, vec![], "", "")).await?;
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut eds_names: Vec<String> = Vec::new();
    let mut rds_requested = false;
    while let Some(resp) = stream.message().await? {
        let now = Instant::now();
        let Some(t) = static_type(&resp.type_url) else {
            continue;
        };
        {
            let mut s = seen.lock().expect("lock");
            s.last.insert(t, (resp.version_info.clone(), now));
            *s.responses.entry(t).or_default() += 1;
        }
        let names = match t {
            type_url::CLUSTER_LOAD_ASSIGNMENT => eds_names.clone(),
            type_url::ROUTE_CONFIGURATION => vec!["8080".to_string()],
            _ => vec![],
        };
        tx.send(req(t, names, &resp.version_info, &resp.nonce))
            .await?;
        if t == type_url::CLUSTER {
            let mut names: Vec<String> = resp
                .resources
                .iter()
                .filter_map(|a| weft_xds_proto::unpack::<Cluster>(a).ok())
                .filter(|c| c.eds_cluster_config.is_some())
                .map(|c| c.name)
                .collect();
            names.sort();
            if names != eds_names {
                eds_names = names;
                tx.send(req(
                    type_url::CLUSTER_LOAD_ASSIGNMENT,
                    eds_names.clone(),
                    "",
                    "",
                ))
                .await?;
            }
        }
        if t == type_url::LISTENER && !rds_requested {
            rds_requested = true;
            tx.send(req(
                type_url::ROUTE_CONFIGURATION,
                vec!["8080".into()],
                "",
                "",
            ))
            .await?;
        }
    }
    bail!("client {k}: weftd closed the stream")
}

// ------------------------------------------------------------------ measuring

fn proc_stat(pid: u32) -> (f64, f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: utime and stime are the 14th and 15th fields overall.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0, cpu)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Waits until every client has a version of `t` different from `before`; per-client latency
/// from `t0` in milliseconds.
async fn wait_all(
    clients: &[Shared],
    t: &'static str,
    before: &[Option<String>],
    t0: Instant,
) -> anyhow::Result<Vec<f64>> {
    let deadline = t0 + Duration::from_secs(60);
    loop {
        let mut out = Vec::with_capacity(clients.len());
        for (c, b) in clients.iter().zip(before) {
            let s = c.lock().expect("lock");
            match s.last.get(t) {
                Some((v, at)) if Some(v) != b.as_ref() => {
                    out.push(at.saturating_duration_since(t0).as_secs_f64() * 1000.0)
                }
                _ => break,
            }
        }
        if out.len() == clients.len() {
            return Ok(out);
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} clients got new {t} within 60 s",
                out.len(),
                clients.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn versions(clients: &[Shared], t: &str) -> Vec<Option<String>> {
    clients
        .iter()
        .map(|c| c.lock().expect("lock").last.get(t).map(|(v, _)| v.clone()))
        .collect()
}

fn response_counts(clients: &[Shared]) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for c in clients {
        for (t, n) in &c.lock().expect("lock").responses {
            *out.entry(*t).or_default() += n;
        }
    }
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let config = a.work_dir.join("config");
    std::fs::create_dir_all(&config)?;
    std::fs::write(config.join("services.yaml"), services_yaml(&a))?;
    std::fs::write(config.join("clients.yaml"), clients_yaml(&a))?;
    std::fs::write(config.join("svc0.yaml"), svc0_yaml(&a, 0))?;
    std::fs::write(config.join("svc0-route.yaml"), route_yaml(0))?;
    std::fs::write(config.join("svc0-rule.yaml"), rule_yaml(0))?;
    let xds_port = weft_e2e::free_port("127.0.0.1");
    let debug_port = weft_e2e::free_port("127.0.0.1");
    let log = std::fs::File::create(a.work_dir.join("weftd.log"))?;
    let mut weftd = std::process::Command::new("taskset")
        .args(["-c", "0"])
        .arg(a.bin_dir.join("weftd"))
        .args(["--config-dir", &config.display().to_string()])
        .args(["--xds-address", &format!("127.0.0.1:{xds_port}")])
        .args(["--debug-address", &format!("127.0.0.1:{debug_port}")])
        .args(["--poll-ms", &a.poll_ms.to_string()])
        .args([
            "--debounce-ms",
            &a.debounce_ms.to_string(),
            "--no-dns",
            "--no-ca",
        ])
        .env(
            "RUST_LOG",
            std::env::var("WEFTD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start weftd (taskset from util-linux must be installed)")?;
    let pid = weftd.id();
    let result = measure(&a, &config, xds_port, debug_port, pid).await;
    let _ = weftd.kill();
    let _ = weftd.wait();
    if std::env::var_os("WEFT_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&a.work_dir);
    } else {
        eprintln!("kept {}", a.work_dir.display());
    }
    result
}

async fn measure(
    a: &Args,
    config: &Path,
    xds_port: u16,
    debug_port: u16,
    pid: u32,
) -> anyhow::Result<()> {
    let debug: std::net::SocketAddr = ([127, 0, 0, 1], debug_port).into();
    let start = Instant::now();
    tokio::task::spawn_blocking(move || {
        weft_e2e::wait_until(Duration::from_secs(120), || {
            weft_e2e::get(debug, "/ready")
                .ok()
                .filter(|r| r.status == 200)
        })
    })
    .await?
    .context("weftd never became ready")?;
    let load_ms = start.elapsed().as_secs_f64() * 1000.0;
    let (rss_loaded, _, _) = proc_stat(pid);

    let clients: Vec<Shared> = (0..a.clients).map(|_| Shared::default()).collect();
    let t0 = Instant::now();
    for (k, seen) in clients.iter().enumerate() {
        let xds = format!("http://127.0.0.1:{xds_port}");
        let seen = seen.clone();
        let captured = a.captured;
        tokio::spawn(async move {
            if let Err(e) = run_client(xds, k, seen, captured).await {
                eprintln!("{e:#}");
            }
        });
    }
    let none = vec![None; a.clients];
    let mut sync = Vec::new();
    for t in TYPES {
        sync = wait_all(&clients, t, &none, t0).await?;
    }
    sync.sort_by(f64::total_cmp);
    let proxies = match &a.proxy_rss {
        Some(envoy) => proxy_rss(a, envoy, xds_port).await?,
        None => Vec::new(),
    };
    // weftd re-reads a file modified in the last 2 s even when its size and time look unchanged
    // (timestamps are coarser than writes): start the changes once the big files have settled.
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(start.elapsed())).await;
    let cpu_before = proc_stat(pid).2;
    let counts_before = response_counts(&clients);
    let (rss_synced, _, _) = proc_stat(pid);

    let mut lat: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 1..=a.rounds {
        for (change, file, text, t) in [
            (
                "route",
                "svc0-route.yaml",
                route_yaml(round),
                type_url::ROUTE_CONFIGURATION,
            ),
            (
                "cluster",
                "svc0-rule.yaml",
                rule_yaml(round),
                type_url::CLUSTER,
            ),
            (
                "endpoint",
                "svc0.yaml",
                svc0_yaml(a, round),
                type_url::CLUSTER_LOAD_ASSIGNMENT,
            ),
        ] {
            let before = versions(&clients, t);
            let t0 = Instant::now();
            write_atomically(config, file, &text)?;
            let mut l = wait_all(&clients, t, &before, t0).await?;
            if std::env::var_os("WEFT_PUSH_EACH").is_some() {
                let max = l.iter().copied().fold(0.0, f64::max);
                let min = l.iter().copied().fold(f64::MAX, f64::min);
                eprintln!("round {round} {change}: first {min:.1} ms, last {max:.1} ms");
            }
            lat.entry(change).or_default().append(&mut l);
            // Let stragglers (other types of the same push) land before the next change.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let (rss, hwm, cpu_after) = proc_stat(pid);
    let counts_after = response_counts(&clients);

    println!(
        "weftd push benchmark: {} services x {} endpoints, {} {}ADS clients (SotW) from {} deployments, {} rounds, weftd --poll-ms {} --debounce-ms {} on CPU 0, clients on CPU 1",
        a.services,
        a.endpoints,
        a.clients,
        if a.captured { "captured " } else { "" },
        a.deployments,
        a.rounds,
        a.poll_ms,
        a.debounce_ms
    );
    println!("config load to ready: {load_ms:.0} ms; RSS {rss_loaded:.1} MiB");
    println!(
        "initial sync of all clients (connect, CDS, EDS, LDS, RDS): p50 {:.0} ms, p99 {:.0} ms, all {:.0} ms",
        percentile(&sync, 0.5),
        percentile(&sync, 0.99),
        sync.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "{:<10} {:>9} {:>9} {:>9}   (ms from file replaced to the client's receipt)",
        "change", "p50", "p99", "max"
    );
    for (change, mut v) in lat {
        v.sort_by(f64::total_cmp);
        println!(
            "{change:<10} {:>9.1} {:>9.1} {:>9.1}",
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    let pushed: Vec<String> = TYPES
        .iter()
        .map(|t| {
            let n = counts_after.get(t).unwrap_or(&0) - counts_before.get(t).unwrap_or(&0);
            format!("{}={n}", type_url::short_name(t))
        })
        .collect();
    println!(
        "responses during the changes: {} (expected per round: one RDS, one CDS (+EDS when subsets change) and one EDS per client)",
        pushed.join(" ")
    );
    println!(
        "weftd RSS: {rss_synced:.1} MiB synced, {rss:.1} MiB at the end, peak {hwm:.1} MiB; CPU during the {} changes: {:.2} s ({:.0} ms per change)",
        a.rounds * 3,
        cpu_after - cpu_before,
        (cpu_after - cpu_before) * 1000.0 / (a.rounds * 3) as f64
    );
    for line in proxies {
        println!("{line}");
    }
    Ok(())
}

/// Starts weft-proxy, then Envoy, as client 0's sidecar (one worker, CPU 1), waits until it is
/// LIVE with the whole mesh, lets it settle and reads its RSS and cluster count.
async fn proxy_rss(a: &Args, envoy: &Path, xds_port: u16) -> anyhow::Result<Vec<String>> {
    let node = format!(
        "sidecar~{}~client-0.default~default.svc.cluster.local",
        client_ip(0)
    );
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], weft_e2e::free_port("127.0.0.1")).into();
    let xds: std::net::SocketAddr = ([127, 0, 0, 1], xds_port).into();
    let bootstrap = a.work_dir.join("client-0-bootstrap.yaml");
    std::fs::write(
        &bootstrap,
        weft_e2e::envoy::bootstrap(
            &node,
            "client",
            "{ NAMESPACE: default, LABELS: { app: client, deployment: d0 } }",
            admin,
            xds,
            false,
        ),
    )?;
    let mut out = Vec::new();
    for (name, program, args) in [
        (
            "weft-proxy",
            a.bin_dir.join("weft-proxy"),
            vec!["--config-path".to_string(), bootstrap.display().to_string()],
        ),
        (
            "Envoy",
            envoy.to_path_buf(),
            vec![
                "-c".to_string(),
                bootstrap.display().to_string(),
                "--disable-hot-restart".into(),
                "--base-id".into(),
                "91".into(),
                "-l".into(),
                "warning".into(),
            ],
        ),
    ] {
        let log = std::fs::File::create(a.work_dir.join(format!("{name}.log")))?;
        let mut child = std::process::Command::new("taskset")
            .args(["-c", "1"])
            .arg(&program)
            .args(&args)
            .args(["--concurrency", "1"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        let started = Instant::now();
        let ready = tokio::task::spawn_blocking(move || {
            weft_e2e::wait_until(Duration::from_secs(120), || {
                weft_e2e::get(admin, "/ready")
                    .ok()
                    .filter(|r| r.status == 200)
            })
        })
        .await?;
        let live_ms = started.elapsed().as_secs_f64() * 1000.0;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rss, hwm, _) = proc_stat(child.id());
        let clusters = tokio::task::spawn_blocking(move || {
            weft_e2e::get(admin, "/clusters")
                .map(|r| {
                    r.body
                        .lines()
                        .filter(|l| l.contains("::observability_name::"))
                        .count()
                })
                .unwrap_or(0)
        })
        .await?;
        let _ = child.kill();
        let _ = child.wait();
        if ready.is_none() {
            bail!(
                "{name} never became LIVE on the mesh (see {})",
                a.work_dir.display()
            );
        }
        out.push(format!(
            "{name} as client 0's sidecar: LIVE in {live_ms:.0} ms with {clusters} clusters; RSS {rss:.1} MiB (peak {hwm:.1} MiB)"
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(out)
}
