//! The universal-mode config source: a folder of YAML files, read on start and re-read when any
//! file's size or modification time changes (polled, which works on every filesystem and inside
//! containers where inotify is unavailable or exhausted).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::{ConfigError, ConfigSet};

/// One consistent view of the config folder.
#[derive(Debug, Clone, Default)]
pub struct ConfigSnapshot {
    pub config: Arc<ConfigSet>,
    pub errors: Vec<ConfigError>,
    /// Increases by one on every change that is served.
    pub generation: u64,
    /// False until the source has been read once (DNS answers SERVFAIL, readiness fails).
    pub synced: bool,
}

/// Reads every `*.yaml` / `*.yml` file directly in `dir` (sorted by name).
pub fn load_dir(dir: &Path) -> std::io::Result<(ConfigSet, Vec<ConfigError>)> {
    FileCache::default().load(dir)
}

/// One file's parsed objects and errors.
type Parsed = (ConfigSet, Vec<ConfigError>);

/// Parsed files by path, kept while their size and modification time stay the same, so a change
/// to one file re-parses only that file.
#[derive(Default)]
pub struct FileCache {
    files: HashMap<PathBuf, (u64, Option<SystemTime>, Arc<Parsed>)>,
}

impl FileCache {
    pub fn load(&mut self, dir: &Path) -> std::io::Result<(ConfigSet, Vec<ConfigError>)> {
        let mut parsed = Vec::new();
        let mut files = HashMap::new();
        for path in yaml_files(dir)? {
            let md = std::fs::metadata(&path).ok();
            let len = md.as_ref().map(|m| m.len()).unwrap_or(0);
            let mtime = md.and_then(|m| m.modified().ok());
            let file = match self.files.get(&path) {
                Some((l, m, p)) if *l == len && *m == mtime && mtime.is_some() => p.clone(),
                Some((_, _, previous)) => Arc::new(keep_last_good(parse_file(&path), previous)),
                None => Arc::new(parse_file(&path)),
            };
            files.insert(path, (len, mtime, file.clone()));
            parsed.push(file);
        }
        self.files = files;
        let mut set = ConfigSet::default();
        let mut errors = Vec::new();
        for p in parsed {
            set.extend_from(&p.0);
            errors.extend_from_slice(&p.1);
        }
        set.sort();
        Ok((set, errors))
    }
}

/// A bad edit does not take objects away: an object whose new version is rejected keeps its
/// last valid version (as a rejected update leaves the stored object alone in Kubernetes), and
/// when the file stops parsing part-way (a YAML syntax error) every object of the last good
/// parse that the new one lacks is kept too. The errors say so.
fn keep_last_good(mut parsed: Parsed, previous: &Parsed) -> Parsed {
    if parsed.1.is_empty() {
        return parsed;
    }
    let rejected: std::collections::HashSet<String> = parsed
        .1
        .iter()
        .filter(|e| !e.object.is_empty())
        .map(|e| e.object.clone())
        .collect();
    let stream_broken = parsed.1.iter().any(|e| e.object.is_empty());
    let present = parsed.0.ids();
    let carried = parsed.0.carry_over(&previous.0, |id| {
        !present.contains(id) && (stream_broken || rejected.contains(id))
    });
    if carried.is_empty() {
        return parsed;
    }
    for e in &mut parsed.1 {
        if carried.contains(&e.object) {
            e.reason
                .push_str("; its last valid version keeps being served");
        } else if e.object.is_empty() {
            e.reason.push_str(&format!(
                "; the last valid versions of {} keep being served",
                carried.join(", ")
            ));
        }
    }
    parsed.0.sort();
    parsed
}

fn parse_file(path: &Path) -> Parsed {
    let mut set = ConfigSet::default();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let errors = set.add_file(path, &text);
            (set, errors)
        }
        Err(e) => (
            set,
            vec![ConfigError {
                file: path.to_path_buf(),
                document: 0,
                object: String::new(),
                field: String::new(),
                reason: format!("cannot read file: {e}"),
            }],
        ),
    }
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
    let mut cache = FileCache::default();
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
                let started = std::time::Instant::now();
                match cache.load(&dir) {
                    Ok((config, errors)) => {
                        for e in &errors {
                            tracing::warn!(error = %e, "rejected config");
                        }
                        let current = tx.borrow().clone();
                        if !current.synced
                            || !current.config.same_as(&config)
                            || current.errors != errors
                        {
                            generation += 1;
                            tracing::info!(dir = %dir.display(), generation, counts = ?config.counts(), rejected = errors.len(), took_ms = started.elapsed().as_secs_f64() * 1000.0, "config loaded");
                            tx.send_replace(Arc::new(ConfigSnapshot {
                                config: Arc::new(config),
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: a }\nspec:\n  hosts: [a]\n  http: [{ route: [{ destination: { host: a } }] }]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: b }\nspec:\n  hosts: [b]\n  http: [{ route: [{ destination: { host: b } }] }]\n";

    fn names(set: &ConfigSet) -> Vec<String> {
        set.virtual_services
            .iter()
            .map(|v| format!("{}:{}", v.meta.name, v.spec.hosts.join(",")))
            .collect()
    }

    #[test]
    fn a_bad_edit_keeps_the_last_valid_objects_and_says_so() {
        let dir = std::env::temp_dir().join(format!("weft-source-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vs.yaml");
        let mut cache = FileCache::default();
        std::fs::write(&file, GOOD).unwrap();
        let (set, errors) = cache.load(&dir).unwrap();
        assert!(errors.is_empty());
        assert_eq!(names(&set), ["a:a", "b:b"]);

        // `a` gets an invalid weight, `b` a new host: `b` changes, `a` keeps its last version.
        let bad_a = GOOD
            .replace(
                "{ host: a } }]",
                "{ host: a }, weight: 150 }, { destination: { host: a }, weight: 1 }]",
            )
            .replace("hosts: [b]", "hosts: [b, bee]");
        std::fs::write(&file, bad_a).unwrap();
        let (set, errors) = cache.load(&dir).unwrap();
        assert_eq!(names(&set), ["a:a", "b:b,bee"]);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .reason
                .contains("last valid version keeps being served"),
            "{}",
            errors[0]
        );

        // A YAML syntax error part-way: everything of the last good parse stays.
        std::fs::write(&file, "apiVersion: v1\nkind: [unclosed\n").unwrap();
        let (set, errors) = cache.load(&dir).unwrap();
        assert_eq!(names(&set), ["a:a", "b:b,bee"]);
        assert!(
            errors[0].reason.contains("keep being served"),
            "{}",
            errors[0]
        );

        // A valid file without `a` deletes it.
        let only_b = &GOOD[GOOD.find("---\n").unwrap() + 4..];
        std::fs::write(&file, only_b).unwrap();
        let (set, errors) = cache.load(&dir).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(names(&set), ["b:b"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
