//! `weftctl up DIR`: universal mode on this host. Starts weftd on DIR, one weft-proxy per
//! WorkloadEntry (its admin server on the workload's own loopback address when it has one), and
//! the workload's own process when the entry carries the `weft.dev/command` annotation. Keeps
//! the set in step with the folder (workloads added or removed while running), and stops
//! everything with SIGTERM on Ctrl-C.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use weft_control_plane::config::source::load_dir;
use weft_control_plane::model::{Mesh, Workload};

/// The annotation naming the command that runs a workload's application.
pub const COMMAND_ANNOTATION: &str = "weft.dev/command";

pub struct UpOptions {
    pub dir: PathBuf,
    pub xds_address: SocketAddr,
    pub debug_address: SocketAddr,
    pub log_dir: PathBuf,
    pub proxy_concurrency: usize,
    /// A Corefile for weftd's DNS server (None: no DNS).
    pub corefile: Option<PathBuf>,
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped or stopped.
struct Managed {
    name: String,
    child: Child,
}

impl Managed {
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // Each child leads its own process group: signal the group, so that what a
            // `sh -c` command started stops too.
            let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        }
    }
}

struct WorkloadProcs {
    workload: Workload,
    sidecar: Managed,
    admin: SocketAddr,
    app: Option<Managed>,
}

fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    let path = dir.join(format!("{name}.log"));
    std::fs::File::create(&path).with_context(|| format!("creating log file {}", path.display()))
}

fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> anyhow::Result<Managed> {
    let log = log_file(log_dir, name)?;
    let err = log.try_clone()?;
    cmd.stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    Ok(Managed {
        name: name.to_string(),
        child,
    })
}

/// Istio's sidecar node id for a workload.
pub fn node_id(w: &Workload) -> String {
    format!(
        "sidecar~{}~{}.{}~{}.svc.cluster.local",
        w.address, w.name, w.namespace, w.namespace
    )
}

fn admin_address(w: &Workload, index: usize) -> SocketAddr {
    match w.address.parse::<IpAddr>() {
        // Each loopback workload address gets the standard admin port to itself.
        Ok(ip) if ip.is_loopback() && ip != IpAddr::from([127, 0, 0, 1]) => {
            SocketAddr::new(ip, 15000)
        }
        _ => SocketAddr::from(([127, 0, 0, 1], 15100 + index as u16)),
    }
}

async fn wait_ready(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Ok(200) = crate::http_get_status(addr, path).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

pub async fn run(opts: UpOptions) -> anyhow::Result<()> {
    if !opts.dir.is_dir() {
        bail!("{} is not a folder of YAML config", opts.dir.display());
    }
    // Handle SIGTERM before starting anything, so no signal can leave children behind.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    std::fs::create_dir_all(&opts.log_dir)
        .with_context(|| format!("creating {}", opts.log_dir.display()))?;
    let (config, errors) =
        load_dir(&opts.dir).with_context(|| format!("reading {}", opts.dir.display()))?;
    for e in &errors {
        eprintln!("warning: rejected config: {e}");
    }
    let mut weftd_cmd = Command::new(sibling_binary("weftd"));
    weftd_cmd
        .arg("--config-dir")
        .arg(&opts.dir)
        .arg("--xds-address")
        .arg(opts.xds_address.to_string())
        .arg("--debug-address")
        .arg(opts.debug_address.to_string())
        .arg("--secure-xds-address")
        .arg(SocketAddr::new(opts.xds_address.ip(), 15012).to_string())
        .arg("--state-dir")
        .arg(opts.log_dir.join("state"));
    match &opts.corefile {
        Some(c) => weftd_cmd.arg("--corefile").arg(c),
        // The built-in Corefile's ports (53, 8080, 8181, 9153) would collide with a
        // quickstart's listeners: DNS is opt-in here.
        None => weftd_cmd.arg("--no-dns"),
    };
    let mut weftd = spawn("weftd", weftd_cmd, &opts.log_dir)?;
    if !wait_ready(opts.debug_address, "/ready", Duration::from_secs(10)).await {
        weftd.stop().await;
        bail!(
            "weftd did not become ready on {}; see {}/weftd.log",
            opts.debug_address,
            opts.log_dir.display()
        );
    }
    // weftd answers /ready while its CA may still be creating the join-token key (a slow
    // machine, a debug build): sidecars started before the key exists get no identity.
    let key = opts.log_dir.join("state").join("join-token-key");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !key.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "weftd          xDS {}   debug http://{}/debug/syncz",
        opts.xds_address, opts.debug_address
    );

    let mut running: BTreeMap<String, WorkloadProcs> = BTreeMap::new();
    reconcile(&opts, &Mesh::build(&config).workloads, &mut running).await;
    println!(
        "logs in {}; Ctrl-C stops everything",
        opts.log_dir.display()
    );

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            _ = interrupt.recv() => break Ok(()),
            _ = term.recv() => break Ok(()),
            status = weftd.child.wait() => break Err(anyhow::anyhow!("weftd exited ({status:?}); see {}/weftd.log", opts.log_dir.display())),
            _ = tick.tick() => {
                if let Ok((config, _)) = load_dir(&opts.dir) {
                    reconcile(&opts, &Mesh::build(&config).workloads, &mut running).await;
                }
                check_exits(&mut running, &opts.log_dir);
            }
        }
    };
    println!("stopping...");
    for (_, p) in std::mem::take(&mut running) {
        stop_workload(p).await;
    }
    weftd.stop().await;
    println!("stopped");
    result
}

fn check_exits(running: &mut BTreeMap<String, WorkloadProcs>, log_dir: &Path) {
    for p in running.values_mut() {
        for m in [Some(&mut p.sidecar), p.app.as_mut()].into_iter().flatten() {
            if let Ok(Some(status)) = m.child.try_wait() {
                eprintln!(
                    "warning: {} exited ({status}); see {}/{}.log",
                    m.name,
                    log_dir.display(),
                    m.name
                );
            }
        }
    }
}

async fn stop_workload(p: WorkloadProcs) {
    if let Some(app) = p.app {
        app.stop().await;
    }
    p.sidecar.stop().await;
}

async fn reconcile(
    opts: &UpOptions,
    workloads: &[std::sync::Arc<Workload>],
    running: &mut BTreeMap<String, WorkloadProcs>,
) {
    let key = |w: &Workload| format!("{}.{}", w.name, w.namespace);
    let wanted: BTreeMap<String, &Workload> = workloads.iter().map(|w| (key(w), &**w)).collect();
    let gone: Vec<String> = running
        .iter()
        .filter(|(k, p)| wanted.get(*k).is_none_or(|w| **w != p.workload))
        .map(|(k, _)| k.clone())
        .collect();
    for k in gone {
        if let Some(p) = running.remove(&k) {
            println!("stopping workload {k}");
            stop_workload(p).await;
        }
    }
    for (index, (k, w)) in wanted.into_iter().enumerate() {
        if running.contains_key(&k) {
            continue;
        }
        match start_workload(opts, w, index).await {
            Ok(p) => {
                let app = p
                    .app
                    .as_ref()
                    .map(|a| format!("   app: {}", a.name))
                    .unwrap_or_default();
                println!(
                    "workload {k:<20} address {:<14} sidecar admin http://{}{app}",
                    w.address, p.admin
                );
                if let Ok(listeners) = crate::http_get_text(p.admin, "/listeners").await {
                    for l in listeners.lines() {
                        println!("    listener {l}");
                    }
                }
                running.insert(k, p);
            }
            Err(e) => eprintln!("error: workload {k}: {e:#}"),
        }
    }
}

/// Writes (mode 0600) a 30-day join token for the workload's service account.
fn join_token(opts: &UpOptions, w: &Workload) -> anyhow::Result<(PathBuf, String)> {
    let key = weft_control_plane::ca::token::TokenKey::load(&opts.log_dir.join("state"))?;
    let sa = if w.service_account.is_empty() {
        "default"
    } else {
        &w.service_account
    };
    let token = key.issue(&w.namespace, sa, Duration::from_secs(30 * 24 * 3600));
    let dir = opts.log_dir.join("tokens");
    std::fs::create_dir_all(&dir)?;
    let name = format!("{}.{}.token", w.name, w.namespace);
    weft_control_plane::ca::write_private(&dir, &name, token.as_bytes(), 0o600)?;
    Ok((dir.join(name), sa.to_string()))
}

async fn start_workload(
    opts: &UpOptions,
    w: &Workload,
    index: usize,
) -> anyhow::Result<WorkloadProcs> {
    let admin = admin_address(w, index);
    let name = format!("{}.{}", w.name, w.namespace);
    let mut cmd = Command::new(sibling_binary("weft-proxy"));
    cmd.arg("--xds-address")
        .arg(opts.xds_address.to_string())
        .arg("--node-id")
        .arg(node_id(w))
        .arg("--admin-address")
        .arg(admin.to_string())
        .arg("--concurrency")
        .arg(opts.proxy_concurrency.to_string());
    // Every sidecar gets an identity: a join token for its workload's service account, from
    // the key weftd keeps in its state folder.
    match join_token(opts, w) {
        Ok((token, sa)) => {
            cmd.arg("--ca-token-file")
                .arg(token)
                .arg("--service-account")
                .arg(sa);
        }
        Err(e) => eprintln!("warning: {name}: no workload certificate ({e:#})"),
    }
    let sidecar = spawn(&format!("sidecar-{name}"), cmd, &opts.log_dir)?;
    let app = match w.annotations.get(COMMAND_ANNOTATION) {
        Some(command) => {
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(command);
            // Let commands name weftctl (for `weftctl echo`) without a PATH setup.
            if let Some(dir) = std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
            {
                let path = std::env::var("PATH").unwrap_or_default();
                cmd.env("PATH", format!("{}:{path}", dir.display()));
            }
            cmd.env("WEFT_WORKLOAD", &w.name)
                .env("WEFT_NAMESPACE", &w.namespace)
                .env("WEFT_ADDRESS", &w.address);
            Some(spawn(&format!("app-{name}"), cmd, &opts.log_dir)?)
        }
        None => None,
    };
    if !wait_ready(admin, "/ready", Duration::from_secs(10)).await {
        eprintln!(
            "warning: sidecar of {name} is not LIVE yet; see {}/sidecar-{name}.log",
            opts.log_dir.display()
        );
    }
    Ok(WorkloadProcs {
        workload: w.clone(),
        sidecar,
        admin,
        app,
    })
}
