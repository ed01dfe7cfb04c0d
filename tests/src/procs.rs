//! Processes under test.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The folder cargo put the workspace binaries in: a test executable lives in its `deps/`, a
/// harness binary (benches) beside them.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary; the test command builds them (`cargo build --workspace`) first.
/// `WEFT_PROXY_BIN` runs the tests against another weft-proxy build (the profile-guided one:
/// `WEFT_PROXY_BIN=$PWD/target/pgo/weft-proxy`, an absolute path).
pub fn bin(name: &str) -> PathBuf {
    let chosen = (name == "weft-proxy")
        .then(|| std::env::var_os("WEFT_PROXY_BIN"))
        .flatten()
        .map(PathBuf::from);
    let p = chosen.unwrap_or_else(|| target_dir().join(name));
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the end-to-end tests",
        p.display()
    );
    p
}

/// The Envoy binary: $WEFT_ENVOY, the test script's venv (.venv/bin/envoy), or `envoy` on PATH.
pub fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WEFT_ENVOY") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/envoy");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("envoy")
}

/// A stock Envoy on a bootstrap file, one worker, its hot-restart id `base_id` (unique among
/// the Envoys running at once), logging at info into `log_dir/<name>.log`.
pub fn start_envoy(name: &str, bootstrap: &Path, base_id: u32, log_dir: &Path) -> Proc {
    let path_s = bootstrap.display().to_string();
    let base_id = base_id.to_string();
    Proc::start(
        name,
        &envoy_bin(),
        &[
            "-c",
            &path_s,
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--base-id",
            &base_id,
            "-l",
            "info",
        ],
        log_dir,
    )
}

/// A port that was free (TCP and UDP) a moment ago, outside the kernel's ephemeral range
/// (32768-60999), so the many outgoing connections of parallel tests never take it meanwhile.
pub fn free_port(ip: &str) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % 10_000) as u16;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (start + n.wrapping_mul(7)) % 12_000;
        if TcpListener::bind((ip, port)).is_ok() && std::net::UdpSocket::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running process, killed on drop; its output goes to a log file that a failing test prints.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn start(name: &str, program: &Path, args: &[&str], log_dir: &Path) -> Proc {
        std::fs::create_dir_all(log_dir).expect("log dir");
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(program)
            .args(args)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({}): {e}", program.display()));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.logs()
            );
        }
    }
}

/// Runs `openssl` with `args` in `dir` (certificates for tests); panics with its complaint.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (apt install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The arguments of `openssl req` that make a new EC P-256 key without a passphrase.
const NEW_EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

/// A self-signed certificate with a new EC P-256 key in `dir`: the key in `key`, the
/// certificate in `cert`, with `subject`, valid two days; `extra`: more `openssl req` arguments
/// (`-addext subjectAltName=...`).
pub fn openssl_self_signed(dir: &Path, key: &str, cert: &str, subject: &str, extra: &[&str]) {
    std::fs::create_dir_all(dir).expect("certificate dir");
    let args = [
        &["req", "-x509"][..],
        &NEW_EC_KEY,
        &["-keyout", key, "-out", cert],
    ]
    .concat();
    let args = [&args[..], &["-days", "2", "-subj", subject], extra].concat();
    openssl(dir, &args);
}

/// A self-signed EC P-256 CA with `subject` in `dir`: `ca.key` and `ca.pem`, valid two days.
pub fn openssl_ca(dir: &Path, subject: &str) {
    openssl_self_signed(dir, "ca.key", "ca.pem", subject, &[]);
}

/// A certificate request with a new EC P-256 key in `dir`: the key in `key`, the request in
/// `csr`, with `subject`; `extra`: more `openssl req` arguments.
pub fn openssl_csr(dir: &Path, key: &str, csr: &str, subject: &str, extra: &[&str]) {
    let args = [&["req"][..], &NEW_EC_KEY, &["-keyout", key, "-out", csr]].concat();
    let args = [&args[..], &["-subj", subject], extra].concat();
    openssl(dir, &args);
}

/// A certificate from `dir`'s CA (see [`openssl_ca`]): a new EC P-256 key in `key`, the
/// certificate in `cert`, with `subject` and the extension lines `ext`
/// (`subjectAltName=URI:...`).
pub fn openssl_issue(dir: &Path, key: &str, cert: &str, subject: &str, ext: &str) {
    let csr = format!("{cert}.csr");
    let ext_file = format!("{cert}.ext");
    openssl_csr(dir, key, &csr, subject, &[]);
    std::fs::write(dir.join(&ext_file), ext).expect("extension file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            cert,
            "-extfile",
            &ext_file,
        ],
    );
}
