//! The `forward` plugin: sends queries to upstream resolvers over UDP (TCP when the answer is
//! truncated, or always with `force_tcp`), picks a healthy upstream by policy, marks one down
//! after `max_fails` consecutive failures and health-checks it back (`. IN NS` every
//! `health_check`), and refuses beyond `max_concurrent` queries in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::corefile::{Forward as ForwardConfig, Policy};

const TIMEOUT: Duration = Duration::from_secs(2);

pub struct Upstream {
    pub addr: SocketAddr,
    fails: AtomicU32,
    down: AtomicBool,
}

pub struct Forwarder {
    pub cfg: ForwardConfig,
    pub upstreams: Vec<Arc<Upstream>>,
    next: AtomicUsize,
    inflight: Option<Semaphore>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("more than max_concurrent queries in flight")]
    Overloaded,
    #[error("no upstream answered: {0}")]
    Failed(String),
}

impl Forwarder {
    pub fn new(cfg: ForwardConfig) -> Arc<Forwarder> {
        let upstreams = cfg
            .to
            .iter()
            .map(|a| {
                Arc::new(Upstream {
                    addr: *a,
                    fails: AtomicU32::new(0),
                    down: AtomicBool::new(false),
                })
            })
            .collect();
        let inflight = cfg.max_concurrent.map(Semaphore::new);
        Arc::new(Forwarder {
            cfg,
            upstreams,
            next: AtomicUsize::new(0),
            inflight,
        })
    }

    /// Upstreams in the order to try them: healthy ones by policy, then the others.
    fn order(&self) -> Vec<Arc<Upstream>> {
        let n = self.upstreams.len();
        let start = match self.cfg.policy {
            Policy::Sequential => 0,
            Policy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            Policy::Random => fastrand_index(n),
        };
        let mut v: Vec<Arc<Upstream>> = (0..n)
            .map(|i| self.upstreams[(start + i) % n].clone())
            .collect();
        v.sort_by_key(|u| u.down.load(Ordering::Relaxed));
        v
    }

    /// Forwards `req` (already encoded is not needed: the message is re-encoded) and returns
    /// the upstream's answer with the client's id.
    pub async fn forward(&self, req: &Message) -> Result<Message, ForwardError> {
        let _permit = match &self.inflight {
            Some(s) => Some(s.try_acquire().map_err(|_| ForwardError::Overloaded)?),
            None => None,
        };
        let mut last = String::new();
        for up in self.order() {
            match exchange(up.addr, req, self.cfg.force_tcp).await {
                Ok(resp) => {
                    up.fails.store(0, Ordering::Relaxed);
                    up.down.store(false, Ordering::Relaxed);
                    return Ok(resp);
                }
                Err(e) => {
                    last = format!("{}: {e}", up.addr);
                    if up.fails.fetch_add(1, Ordering::Relaxed) + 1 >= self.cfg.max_fails.max(1) {
                        up.down.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        Err(ForwardError::Failed(last))
    }

    /// Health-checks upstreams that are down, every `health_check`, until dropped.
    pub async fn health_checks(self: Arc<Self>) {
        if self.cfg.health_check.is_zero() {
            return;
        }
        let mut probe = Message::query();
        probe.add_query(Query::query(Name::root(), RecordType::NS));
        probe.metadata.recursion_desired = true;
        loop {
            tokio::time::sleep(self.cfg.health_check).await;
            for up in &self.upstreams {
                if up.down.load(Ordering::Relaxed)
                    && exchange(up.addr, &probe, self.cfg.force_tcp).await.is_ok()
                {
                    tracing::info!(upstream = %up.addr, "forward: upstream healthy again");
                    up.fails.store(0, Ordering::Relaxed);
                    up.down.store(false, Ordering::Relaxed);
                }
            }
        }
    }
}

fn fastrand_index(n: usize) -> usize {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos as usize % n.max(1)
}

async fn exchange(addr: SocketAddr, req: &Message, force_tcp: bool) -> Result<Message, String> {
    let mut out = req.clone();
    let client_id = req.metadata.id;
    let our_id: u16 = rand_id();
    out.metadata.id = our_id;
    let bytes = out.to_vec().map_err(|e| e.to_string())?;
    let resp = if force_tcp {
        tcp_exchange(addr, &bytes).await?
    } else {
        let resp = udp_exchange(addr, &bytes, our_id).await?;
        if resp.metadata.truncation {
            tcp_exchange(addr, &bytes).await?
        } else {
            resp
        }
    };
    let mut resp = resp;
    resp.metadata.id = client_id;
    Ok(resp)
}

fn rand_id() -> u16 {
    use std::sync::atomic::AtomicU16;
    static NEXT: AtomicU16 = AtomicU16::new(0x5a5a);
    // Ids only need to differ between queries in flight on one socket (each has its own).
    NEXT.fetch_add(7919, Ordering::Relaxed)
}

async fn udp_exchange(addr: SocketAddr, bytes: &[u8], id: u16) -> Result<Message, String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap_or(addr)
    } else {
        "[::]:0".parse().unwrap_or(addr)
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(addr).await.map_err(|e| e.to_string())?;
    sock.send(bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65535];
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        match Message::from_vec(&buf[..n]) {
            Ok(m) if m.metadata.id == id => return Ok(m),
            _ => continue, // a stray or spoofed datagram: keep waiting
        }
    }
}

async fn tcp_exchange(addr: SocketAddr, bytes: &[u8]) -> Result<Message, String> {
    let work = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let len = u16::try_from(bytes.len()).map_err(|_| "query too large".to_string())?;
        s.write_all(&len.to_be_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(bytes).await.map_err(|e| e.to_string())?;
        let mut lb = [0u8; 2];
        s.read_exact(&mut lb).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(lb))];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Message::from_vec(&buf).map_err(|e| e.to_string())
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| "timed out".to_string())?
}
