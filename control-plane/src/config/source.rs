//! The universal-mode config source: a folder of YAML files, read on start and re-read when any
//! file's size or modification time changes. Changes are noticed at once through inotify, and by
//! polling as well (which works on every filesystem, and inside containers where inotify is
//! unavailable or exhausted).

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

/// How long after its last modification a file whose size and modification time are unchanged
/// is taken to be unchanged (timestamps are coarser than writes).
const SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

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
            // A file rewritten within the file system's timestamp granularity can keep its size
            // and modification time: only a file last modified a while ago is trusted as is.
            let settled = mtime.is_some_and(|m| {
                SystemTime::now()
                    .duration_since(m)
                    .is_ok_and(|age| age > SETTLED)
            });
            let file = match self.files.get(&path) {
                Some((l, m, p)) if *l == len && *m == mtime && settled => p.clone(),
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
            // Sorted per file, the folder's sort merges sorted runs.
            set.sort();
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

/// inotify on the config folder (any file created, written, moved or deleted in it), read by
/// a thread of its own that reports each batch of events; the thread ends when the folder
/// itself goes away (the watch is then re-created on the new folder).
struct DirEvents(tokio::sync::mpsc::Receiver<()>);

impl DirEvents {
    fn new(dir: &Path) -> std::io::Result<DirEvents> {
        use nix::sys::inotify::{AddWatchFlags as F, InitFlags};
        let ino = nix::sys::inotify::Inotify::init(InitFlags::IN_CLOEXEC)
            .map_err(std::io::Error::from)?;
        ino.add_watch(
            dir,
            F::IN_CREATE
                | F::IN_MODIFY
                | F::IN_CLOSE_WRITE
                | F::IN_MOVED_TO
                | F::IN_MOVED_FROM
                | F::IN_DELETE
                | F::IN_ATTRIB
                | F::IN_DELETE_SELF
                | F::IN_MOVE_SELF,
        )
        .map_err(std::io::Error::from)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        std::thread::Builder::new()
            .name("weftd-config-watch".into())
            .spawn(move || {
                while let Ok(events) = ino.read_events() {
                    // A full channel already holds a wake-up: that is enough.
                    if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = tx.try_send(())
                    {
                        return;
                    }
                    if events.iter().any(|e| e.mask.contains(F::IN_IGNORED)) {
                        return;
                    }
                }
            })?;
        Ok(DirEvents(rx))
    }

    /// Waits for the next batch of events; an error when the watch has ended.
    async fn next(&mut self) -> std::io::Result<()> {
        self.0.recv().await.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "the folder's watch ended")
        })
    }
}

/// Waits until the folder has been quiet for `quiet` (each event starts the wait over), at
/// most `MAX_SETTLE` in all: a burst of writes (an editor's save, a copy of several files)
/// becomes one reload.
async fn settle(events: &mut DirEvents, quiet: Duration) {
    const MAX_SETTLE: Duration = Duration::from_secs(1);
    let deadline = tokio::time::Instant::now() + MAX_SETTLE;
    loop {
        let until = (tokio::time::Instant::now() + quiet).min(deadline);
        match tokio::time::timeout_at(until, events.next()).await {
            Ok(Ok(())) if tokio::time::Instant::now() < deadline => continue,
            _ => return,
        }
    }
}

/// Loads `dir` once, publishes it, then keeps publishing a new snapshot whenever the folder's
/// content changes. Changes are debounced: the folder must be quiet for `debounce` (with
/// inotify, measured from the last write; without, a fixed wait after the change is seen).
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
    let mut events = None;
    let mut told_no_inotify = false;
    loop {
        if events.is_none() && dir.is_dir() {
            match DirEvents::new(&dir) {
                Ok(e) => events = Some(e),
                Err(e) if !told_no_inotify => {
                    told_no_inotify = true;
                    tracing::warn!(dir = %dir.display(), "no inotify on the config folder ({e}); changes are seen by polling every {poll:?}");
                }
                Err(_) => {}
            }
        }
        let print = fingerprint(&dir);
        if print.is_ok() {
            unreadable = false;
        }
        match print {
            Ok(print) if Some(&print) != last_print.as_ref() => {
                if last_print.is_some() {
                    // Let a burst of writes (an editor's save, `cp` of several files) settle.
                    match &mut events {
                        Some(ev) => settle(ev, debounce).await,
                        None => tokio::time::sleep(debounce).await,
                    }
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
                // The folder may come back as a new directory: watch that one then.
                events = None;
            }
        }
        match &mut events {
            Some(ev) => {
                if let Ok(Err(_)) = tokio::time::timeout(poll, ev.next()).await {
                    // The folder was removed or replaced: watch the new one next round.
                    events = None;
                }
            }
            None => tokio::time::sleep(poll).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rewrite that keeps the file's size and modification time (two writes within one tick
    /// of the file system's clock) is still read.
    #[test]
    fn a_same_size_rewrite_within_one_timestamp_is_not_missed() {
        let dir = std::env::temp_dir().join(format!("weft-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vs.yaml");
        std::fs::write(&file, GOOD.replacen("hosts: [a]", "hosts: [a, a1]", 1)).unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        let mut cache = FileCache::default();
        assert_eq!(names(&cache.load(&dir).unwrap().0)[0], "a:a,a1");
        std::fs::write(&file, GOOD.replacen("hosts: [a]", "hosts: [a, a2]", 1)).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(names(&cache.load(&dir).unwrap().0)[0], "a:a,a2");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With polling as good as off (one minute), a change is still seen at once (inotify), and
    /// a burst of writes within the quiet period is one reload.
    #[tokio::test]
    async fn changes_are_seen_through_inotify_and_bursts_become_one_reload() {
        let dir = std::env::temp_dir().join(format!("weft-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vs.yaml"), GOOD).unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(ConfigSnapshot::default()));
        tokio::spawn(watch_dir(
            dir.clone(),
            tx,
            Duration::from_secs(60),
            Duration::from_millis(300),
        ));
        let first = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.synced))
            .await
            .unwrap()
            .unwrap()
            .generation;
        // Three writes 10 ms apart (well within the 300 ms quiet period, even on a busy
        // machine): one new generation.
        let started = std::time::Instant::now();
        for hosts in ["[a, a1]", "[a, a2]", "[a, a3]"] {
            std::fs::write(
                dir.join("vs.yaml"),
                GOOD.replacen("hosts: [a]", &format!("hosts: {hosts}"), 1),
            )
            .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let next = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|s| s.generation > first),
        )
        .await
        .expect("reloaded without waiting for the poll")
        .unwrap()
        .clone();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(next.generation, first + 1);
        assert_eq!(
            names(&next.config)[0],
            "a:a,a3",
            "the last write of the burst"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            rx.borrow().generation,
            first + 1,
            "no second reload for the burst"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

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
