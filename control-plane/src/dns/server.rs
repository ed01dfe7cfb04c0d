//! Running the Corefile: UDP and TCP listeners per port, the health/ready/prometheus HTTP
//! endpoints, record rebuilds on config changes, `reload` of the Corefile, and the `loop` probe.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::answer::{Block, handle};
use super::corefile::{self, Corefile};
use super::metrics::Metrics;
use crate::config::source::ConfigSnapshot;

#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// None: the Corefile Kubernetes ships.
    pub corefile: Option<PathBuf>,
    /// Replaces the port of every server block (tests, unprivileged runs).
    pub port_override: Option<u16>,
}

/// Set while shutting down (`health { lameduck }`): /health answers 503.
static LAMEDUCK: AtomicBool = AtomicBool::new(false);

/// Marks the server as going away (/health answers 503); returns how long
/// `health { lameduck }` asks the process to keep serving before it exits.
pub fn begin_lameduck(opts: &DnsOptions) -> Duration {
    LAMEDUCK.store(true, Ordering::Relaxed);
    let Ok((_, corefile)) = read_corefile(opts) else {
        return Duration::ZERO;
    };
    corefile
        .blocks
        .iter()
        .filter_map(|b| b.plugins.health.as_ref())
        .map(|h| h.lameduck)
        .max()
        .unwrap_or_default()
}

/// Reads and parses the Corefile, for a startup error that names the line.
pub fn corefile_check(opts: &DnsOptions) -> anyhow::Result<()> {
    read_corefile(opts).map(|_| ())
}

fn read_corefile(opts: &DnsOptions) -> anyhow::Result<(String, Corefile)> {
    let text = match &opts.corefile {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading Corefile {}", p.display()))?,
        None => corefile::KUBERNETES_DEFAULT.to_string(),
    };
    let mut parsed = corefile::parse(&text).map_err(|e| match &opts.corefile {
        Some(p) => anyhow::anyhow!("{}: {e}", p.display()),
        None => anyhow::anyhow!("{e}"),
    })?;
    if let Some(port) = opts.port_override {
        for b in &mut parsed.blocks {
            b.port = port;
        }
    }
    Ok((text, parsed))
}

/// Validates the Corefile (a startup error names the line), then serves it until the process
/// ends, reloading it on change when the `reload` plugin asks.
pub async fn run(
    opts: DnsOptions,
    config: watch::Receiver<Arc<ConfigSnapshot>>,
) -> anyhow::Result<()> {
    let (mut text, mut parsed) = read_corefile(&opts)?;
    loop {
        let mut tasks = start(&parsed, config.clone()).await?;
        let reload = parsed.blocks.iter().find_map(|b| b.plugins.reload.clone());
        let Some(reload) = reload.filter(|_| opts.corefile.is_some()) else {
            // Nothing to reload: serve until a task fails.
            while let Some(r) = tasks.join_next().await {
                if let Ok(Err(e)) = r {
                    return Err(e);
                }
            }
            return Ok(());
        };
        loop {
            let jitter = reload.jitter.mul_f64(fastrand_unit());
            tokio::time::sleep(reload.interval + jitter).await;
            match read_corefile(&opts) {
                Ok((t, p)) if t != text => {
                    tracing::info!("Corefile changed: reloading");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    (text, parsed) = (t, p);
                    break;
                }
                Ok(_) => {}
                Err(e) => tracing::error!("Corefile not reloaded, keeping the running one: {e:#}"),
            }
        }
    }
}

fn fastrand_unit() -> f64 {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(n % 1000) / 1000.0
}

/// Binds every listener of the Corefile and starts serving; binding errors are returned.
async fn start(
    cf: &Corefile,
    config: watch::Receiver<Arc<ConfigSnapshot>>,
) -> anyhow::Result<JoinSet<anyhow::Result<()>>> {
    let metrics = Arc::new(Metrics::default());
    let mut tasks = JoinSet::new();
    let mut by_port: BTreeMap<u16, Vec<Arc<Block>>> = BTreeMap::new();
    for b in &cf.blocks {
        let block = Arc::new(Block::new(b.clone(), metrics.clone()));
        if let Some(f) = block.forward.clone() {
            tasks.spawn(async move {
                f.health_checks().await;
                Ok(())
            });
        }
        if b.plugins.kubernetes.is_some() {
            tasks.spawn(keep_records(block.clone(), config.clone()));
        } else {
            block.synced.store(true, Ordering::Relaxed);
        }
        by_port.entry(b.port).or_default().push(block);
    }
    for (port, blocks) in &by_port {
        let addr = SocketAddr::from(([0, 0, 0, 0], *port));
        let udp = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding DNS {addr}/udp"))?;
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding DNS {addr}/tcp"))?;
        tracing::info!(%addr, zones = ?blocks.iter().flat_map(|b| b.cfg.zones.clone()).collect::<Vec<_>>(), "DNS listening (udp, tcp)");
        tasks.spawn(serve_udp(Arc::new(udp), blocks.clone()));
        tasks.spawn(serve_tcp(tcp, blocks.clone()));
        for b in blocks
            .iter()
            .filter(|b| b.loop_probe.is_some() && b.forward.is_some())
        {
            tasks.spawn(send_loop_probe(b.clone(), *port));
        }
    }
    // health, ready and prometheus: one HTTP server per address.
    let mut http: BTreeMap<SocketAddr, (bool, bool, bool)> = BTreeMap::new();
    for b in &cf.blocks {
        if let Some(h) = &b.plugins.health {
            http.entry(h.address).or_default().0 = true;
        }
        if let Some(a) = b.plugins.ready {
            http.entry(a).or_default().1 = true;
        }
        if let Some(a) = b.plugins.prometheus {
            http.entry(a).or_default().2 = true;
        }
    }
    let all_blocks: Vec<Arc<Block>> = by_port.values().flatten().cloned().collect();
    for (addr, (health, ready, prom)) in http {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr} (health/ready/prometheus)"))?;
        let blocks = all_blocks.clone();
        let metrics = metrics.clone();
        tasks.spawn(async move {
            crate::httpd::serve(listener, move |_, path| match path {
                "/health" if health => {
                    if LAMEDUCK.load(Ordering::Relaxed) {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "text/plain",
                            "lameduck\n".into(),
                        )
                    } else {
                        (StatusCode::OK, "text/plain", "OK".into())
                    }
                }
                "/ready" if ready => {
                    if blocks.iter().all(|b| b.synced.load(Ordering::Relaxed)) {
                        (StatusCode::OK, "text/plain", "OK".into())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "text/plain",
                            "kubernetes\n".into(),
                        )
                    }
                }
                "/metrics" if prom => (
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    metrics.render(),
                ),
                _ => (
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "404 page not found\n".into(),
                ),
            })
            .await;
            Ok(())
        });
    }
    Ok(tasks)
}

/// Rebuilds a block's records whenever the config changes.
async fn keep_records(
    block: Arc<Block>,
    mut config: watch::Receiver<Arc<ConfigSnapshot>>,
) -> anyhow::Result<()> {
    loop {
        let snapshot = config.borrow_and_update().clone();
        if snapshot.synced {
            tracing::debug!(generation = snapshot.generation, "DNS records rebuilt");
            block.update(&snapshot.config);
        }
        if config.changed().await.is_err() {
            return Ok(());
        }
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, blocks: Vec<Arc<Block>>) -> anyhow::Result<()> {
    let blocks: Arc<[Arc<Block>]> = blocks.into();
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("DNS udp receive: {e}");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let needs_network = blocks.iter().any(|b| b.forward.is_some());
        if needs_network {
            // Forwarded queries wait on upstreams: never hold up the receive loop for them.
            let (socket, blocks) = (socket.clone(), blocks.clone());
            tokio::spawn(async move {
                if let Some(resp) = handle(&blocks, &query, false, peer).await {
                    let _ = socket.send_to(&resp, peer).await;
                }
            });
        } else if let Some(resp) = handle(&blocks, &query, false, peer).await {
            let _ = socket.send_to(&resp, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, blocks: Vec<Arc<Block>>) -> anyhow::Result<()> {
    let blocks: Arc<[Arc<Block>]> = blocks.into();
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let blocks = blocks.clone();
        tokio::spawn(async move {
            loop {
                // Idle connections are closed after 10 s, as CoreDNS does.
                let mut len = [0u8; 2];
                match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut len))
                    .await
                {
                    Ok(Ok(_)) => {}
                    _ => return,
                }
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut query))
                    .await
                    .is_err()
                {
                    return;
                }
                let Some(resp) = handle(&blocks, &query, true, peer).await else {
                    return;
                };
                let Ok(rlen) = u16::try_from(resp.len()) else {
                    return;
                };
                if stream.write_all(&rlen.to_be_bytes()).await.is_err()
                    || stream.write_all(&resp).await.is_err()
                {
                    return;
                }
            }
        });
    }
}

/// The `loop` plugin: a random HINFO query to ourselves through the chain. If forwarding loops
/// back here, `handle` sees the probe name again and stops the server.
async fn send_loop_probe(block: Arc<Block>, port: u16) -> anyhow::Result<()> {
    let Some((probe, _)) = &block.loop_probe else {
        return Ok(());
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut q = Message::query();
    let Ok(name) = Name::from_ascii(probe) else {
        return Ok(());
    };
    q.add_query(Query::query(name, RecordType::HINFO));
    q.metadata.recursion_desired = true;
    let Ok(bytes) = q.to_vec() else { return Ok(()) };
    if let Ok(sock) = UdpSocket::bind("127.0.0.1:0").await {
        let _ = sock.send_to(&bytes, ("127.0.0.1", port)).await;
        let mut buf = [0u8; 512];
        let _ = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await;
    }
    Ok(())
}
