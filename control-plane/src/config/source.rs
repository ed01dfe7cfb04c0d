//! The universal-mode config source: a folder of YAML files, read on start and re-read when any
//! file's size or modification time changes (polled, which works on every filesystem and inside
//! containers where inotify is unavailable or exhausted).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::{ConfigError, ConfigSet};

/// One consistent view of the config folder.
#[derive(Debug, Clone, Default)]
pub struct ConfigSnapshot {
    pub config: ConfigSet,
    pub errors: Vec<ConfigError>,
    /// Increases by one on every change that is served.
    pub generation: u64,
    /// False until the source has been read once (DNS answers SERVFAIL, readiness fails).
    pub synced: bool,
}

/// Reads every `*.yaml` / `*.yml` file directly in `dir` (sorted by name).
pub fn load_dir(dir: &Path) -> std::io::Result<(ConfigSet, Vec<ConfigError>)> {
    let mut set = ConfigSet::default();
    let mut errors = Vec::new();
    for path in yaml_files(dir)? {
        match std::fs::read_to_string(&path) {
            Ok(text) => errors.extend(set.add_file(&path, &text)),
            Err(e) => errors.push(ConfigError {
                file: path.clone(),
                document: 0,
                object: String::new(),
                field: String::new(),
                reason: format!("cannot read file: {e}"),
            }),
        }
    }
    set.sort();
    Ok((set, errors))
}

fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    Ok(files)
}

type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> std::io::Result<Fingerprint> {
    Ok(yaml_files(dir)?
        .into_iter()
        .map(|p| {
            let md = std::fs::metadata(&p).ok();
            let len = md.as_ref().map(|m| m.len()).unwrap_or(0);
            let mtime = md.and_then(|m| m.modified().ok());
            (p, len, mtime)
        })
        .collect())
}

/// Loads `dir` once, publishes it, then keeps publishing a new snapshot whenever the folder's
/// content changes. Changes are debounced: a burst of writes within `debounce` is one reload.
pub async fn watch_dir(
    dir: PathBuf,
    tx: watch::Sender<Arc<ConfigSnapshot>>,
    poll: Duration,
    debounce: Duration,
) {
    let mut last_print: Option<Fingerprint> = None;
    let mut generation = 0u64;
    let mut unreadable = false;
    loop {
        let print = fingerprint(&dir);
        if print.is_ok() {
            unreadable = false;
        }
        match print {
            Ok(print) if Some(&print) != last_print.as_ref() => {
                if last_print.is_some() {
                    // Let a burst of writes (an editor's save, `cp` of several files) settle.
                    tokio::time::sleep(debounce).await;
                }
                last_print = fingerprint(&dir).ok();
                match load_dir(&dir) {
                    Ok((config, errors)) => {
                        for e in &errors {
                            tracing::warn!(error = %e, "rejected config");
                        }
                        let current = tx.borrow().clone();
                        if !current.synced || current.config != config || current.errors != errors {
                            generation += 1;
                            tracing::info!(dir = %dir.display(), generation, counts = ?config.counts(), rejected = errors.len(), "config loaded");
                            tx.send_replace(Arc::new(ConfigSnapshot {
                                config,
                                errors,
                                generation,
                                synced: true,
                            }));
                        }
                    }
                    Err(e) => {
                        tracing::error!(dir = %dir.display(), "cannot read config folder: {e}")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                // Report once per outage, not on every poll; the last config keeps serving.
                if !unreadable {
                    tracing::error!(dir = %dir.display(), "cannot read config folder (serving the last config): {e}");
                    unreadable = true;
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}
