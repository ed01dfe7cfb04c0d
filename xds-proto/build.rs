//! Finds the descriptor set that `envoy-types` ships in its package (`src/generated/types.bin`)
//! and copies it into OUT_DIR, so the JSON mapping can reflect over every Envoy message without
//! any `.proto` file living in this repository. `envoy-types` does not export the bytes itself.
//!
//! The package is located from the version in the workspace's Cargo.lock under cargo's registry
//! sources (`$CARGO_HOME/registry/src/*/envoy-types-<version>`). Builds from a vendored tree set
//! `WEFT_ENVOY_DESCRIPTOR_SET` to the file instead.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=WEFT_ENVOY_DESCRIPTOR_SET");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let src = match std::env::var("WEFT_ENVOY_DESCRIPTOR_SET") {
        Ok(p) => PathBuf::from(p),
        Err(_) => locate().unwrap_or_else(|e| {
            panic!(
                "cannot find envoy-types' descriptor set: {e}; set WEFT_ENVOY_DESCRIPTOR_SET to the path of its src/generated/types.bin"
            )
        }),
    };
    println!("cargo:rerun-if-changed={}", src.display());
    std::fs::copy(&src, out.join("envoy_types.bin"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
}

fn locate() -> Result<PathBuf, String> {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let lock_path = manifest_dir
        .parent()
        .ok_or("no workspace root")?
        .join("Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock_path.display());
    let lock = std::fs::read_to_string(&lock_path)
        .map_err(|e| format!("reading {}: {e}", lock_path.display()))?;
    let version = envoy_types_version(&lock).ok_or("envoy-types is not in Cargo.lock")?;
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map_err(|_| "neither CARGO_HOME nor HOME is set")?;
    let registry = cargo_home.join("registry/src");
    let entries =
        std::fs::read_dir(&registry).map_err(|e| format!("reading {}: {e}", registry.display()))?;
    for entry in entries.flatten() {
        let candidate = entry
            .path()
            .join(format!("envoy-types-{version}"))
            .join("src/generated/types.bin");
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "envoy-types-{version} is not unpacked under {}",
        registry.display()
    ))
}

fn envoy_types_version(lock: &str) -> Option<String> {
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"envoy-types\"" {
            let v = lines
                .next()?
                .trim()
                .strip_prefix("version = \"")?
                .strip_suffix('"')?;
            return Some(v.to_string());
        }
    }
    None
}
