//! The `cache` plugin: answers kept for their TTL (capped by the Corefile), successes and
//! denials (NXDOMAIN, NODATA) in separate, bounded tables. Cached answers go out with their TTLs
//! reduced by the time they spent in the cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};

use super::corefile::{Cache as CacheConfig, CacheClass};

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub name: String,
    pub qtype: u16,
    pub dnssec_ok: bool,
}

struct Entry {
    msg: Message,
    stored: Instant,
    expires: Instant,
}

pub struct Cache {
    pub cfg: CacheConfig,
    success: Mutex<HashMap<Key, Entry>>,
    denial: Mutex<HashMap<Key, Entry>>,
}

pub enum Class {
    Success,
    Denial,
}

impl Cache {
    pub fn new(cfg: CacheConfig) -> Cache {
        Cache {
            cfg,
            success: Mutex::default(),
            denial: Mutex::default(),
        }
    }

    /// A cached answer for `key`, TTLs aged, with the given message id.
    pub fn get(&self, key: &Key, id: u16) -> Option<(Message, Class)> {
        let now = Instant::now();
        for (table, class) in [
            (&self.success, Class::Success),
            (&self.denial, Class::Denial),
        ] {
            let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = t.get(key) {
                if e.expires <= now {
                    t.remove(key);
                    continue;
                }
                let age = now.duration_since(e.stored).as_secs() as u32;
                let mut msg = e.msg.clone();
                msg.metadata.id = id;
                for r in msg
                    .answers
                    .iter_mut()
                    .chain(msg.authorities.iter_mut())
                    .chain(msg.additionals.iter_mut())
                {
                    r.ttl = r.ttl.saturating_sub(age);
                }
                return Some((msg, class));
            }
        }
        None
    }

    /// Stores a response: NOERROR with answers as success, NXDOMAIN/NODATA as denial.
    pub fn put(&self, key: Key, msg: &Message) {
        let rcode = msg.metadata.response_code;
        let (table, class): (&Mutex<HashMap<Key, Entry>>, &CacheClass) = match rcode {
            ResponseCode::NoError if !msg.answers.is_empty() => (&self.success, &self.cfg.success),
            ResponseCode::NoError | ResponseCode::NXDomain => (&self.denial, &self.cfg.denial),
            _ => return,
        };
        let min_record_ttl = msg
            .answers
            .iter()
            .chain(msg.authorities.iter())
            .map(|r| r.ttl)
            .min()
            .unwrap_or(class.min_ttl);
        let ttl = min_record_ttl.clamp(
            class.min_ttl.min(class.max_ttl),
            class.max_ttl.min(self.cfg.max_ttl),
        );
        if ttl == 0 {
            return;
        }
        let now = Instant::now();
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() >= class.capacity && !t.contains_key(&key) {
            // Full: drop expired entries, else an arbitrary one (CoreDNS evicts randomly too).
            t.retain(|_, e| e.expires > now);
            if t.len() >= class.capacity
                && let Some(k) = t.keys().next().cloned()
            {
                t.remove(&k);
            }
        }
        t.insert(
            key,
            Entry {
                msg: msg.clone(),
                stored: now,
                expires: now + Duration::from_secs(u64::from(ttl)),
            },
        );
    }

    /// Forgets everything: the mesh changed, so cached answers (and denials) may be wrong.
    pub fn clear(&self) {
        for t in [&self.success, &self.denial] {
            t.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    pub fn sizes(&self) -> (usize, usize) {
        let s = self.success.lock().map(|t| t.len()).unwrap_or(0);
        let d = self.denial.lock().map(|t| t.len()).unwrap_or(0);
        (s, d)
    }
}
