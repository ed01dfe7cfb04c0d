//! Per-connection xDS bookkeeping: what each proxy was sent, what it ACKed and what it NACKed
//! (with the proxy's `error_detail`). Served as JSON on `/debug/syncz`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Nack {
    pub nonce: String,
    /// The version the proxy still runs (the last one it accepted).
    pub version: String,
    pub message: String,
    pub at_unix_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TypeStatus {
    pub sent_version: String,
    pub sent_nonce: String,
    pub sent_resources: usize,
    pub acked_version: String,
    pub acked_nonce: String,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<Nack>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectionStatus {
    pub connection_id: u64,
    pub proxy: String,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    pub peer: String,
    pub connected_at_unix_ms: u64,
    /// By short type name: CDS, EDS, LDS, RDS.
    pub types: BTreeMap<&'static str, TypeStatus>,
}

/// All live connections, plus a log of every NACK seen since start (kept after disconnects so an
/// operator can see why a proxy that has gone away rejected config).
#[derive(Debug, Default)]
pub struct StatusRegistry {
    next_id: AtomicU64,
    connections: Mutex<BTreeMap<u64, ConnectionStatus>>,
    nack_log: Mutex<Vec<(String, &'static str, Nack)>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl StatusRegistry {
    pub fn open(&self, protocol: &'static str, peer: String) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let status = ConnectionStatus {
            connection_id: id,
            proxy: String::new(),
            protocol,
            peer,
            connected_at_unix_ms: now_ms(),
            types: BTreeMap::new(),
        };
        self.lock().insert(id, status);
        id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ConnectionStatus>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn close(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn set_proxy(&self, id: u64, proxy: &str) {
        if let Some(c) = self.lock().get_mut(&id) {
            c.proxy = proxy.to_string();
        }
    }

    pub fn update(&self, id: u64, short_type: &'static str, f: impl FnOnce(&mut TypeStatus)) {
        if let Some(c) = self.lock().get_mut(&id) {
            f(c.types.entry(short_type).or_default());
        }
    }

    pub fn record_nack(&self, id: u64, short_type: &'static str, nack: Nack) {
        let proxy = {
            let mut conns = self.lock();
            let Some(c) = conns.get_mut(&id) else { return };
            let t = c.types.entry(short_type).or_default();
            t.nacks += 1;
            t.last_nack = Some(nack.clone());
            c.proxy.clone()
        };
        tracing::warn!(proxy = %proxy, r#type = short_type, nonce = %nack.nonce, "proxy rejected config (NACK): {}", nack.message);
        let mut log = self.nack_log.lock().unwrap_or_else(|p| p.into_inner());
        log.push((proxy, short_type, nack));
        let excess = log.len().saturating_sub(1000);
        log.drain(..excess);
    }

    pub fn snapshot(&self) -> Vec<ConnectionStatus> {
        self.lock().values().cloned().collect()
    }

    pub fn nack_log(&self) -> Vec<serde_json::Value> {
        let log = self.nack_log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter()
            .map(|(proxy, t, n)| serde_json::json!({"proxy": proxy, "type": t, "nack": n}))
            .collect()
    }
}
