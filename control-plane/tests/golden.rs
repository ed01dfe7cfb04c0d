//! Golden tests: for each case under tests/golden/, the xDS weftd generates for each listed
//! proxy is rendered as Envoy's JSON and compared with the checked-in file. A difference fails
//! the test and prints the first lines that differ; `WEFT_BLESS=1 cargo test -p
//! weft-control-plane --test golden` rewrites the files, to be reviewed in the diff.
//!
//! A case is a folder with `case.yaml`:
//!   config: [paths of YAML files or folders, relative to the case folder]
//!   proxies: { file-stem: node id, ... }
//!   metadata: { file-stem: { KEY: string value, ... } }   (optional node metadata)
//! and one `<file-stem>.json` per proxy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use weft_control_plane::config::ConfigSet;
use weft_control_plane::generate::{ProxyNode, generate};
use weft_control_plane::model::Mesh;
use weft_xds_proto::envoy::config::cluster::v3::Cluster;
use weft_xds_proto::envoy::config::core::v3::Node;
use weft_xds_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use weft_xds_proto::envoy::config::listener::v3::Listener;
use weft_xds_proto::envoy::config::route::v3::RouteConfiguration;
use weft_xds_proto::{to_json, type_url, unpack};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    config: Vec<PathBuf>,
    proxies: BTreeMap<String, String>,
    #[serde(default)]
    metadata: BTreeMap<String, BTreeMap<String, String>>,
}

fn load(case_dir: &Path, case: &Case) -> ConfigSet {
    let mut set = ConfigSet::default();
    let mut files = Vec::new();
    for p in &case.config {
        let p = case_dir.join(p);
        if p.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .map(|e| e.expect("dir entry").path())
                .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            in_dir.sort();
            files.extend(in_dir);
        } else {
            files.push(p);
        }
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let errors = set.add_file(&f, &text);
        assert!(errors.is_empty(), "{}: {errors:?}", f.display());
    }
    set.sort();
    set
}

fn render(
    mesh: &Mesh,
    node_id: &str,
    metadata: Option<&BTreeMap<String, String>>,
) -> serde_json::Value {
    use weft_xds_proto::wkt::{Struct, Value, value::Kind};
    let node = Node {
        id: node_id.to_string(),
        metadata: metadata.map(|m| Struct {
            fields: m
                .iter()
                .map(|(k, v)| {
                    let v = Value {
                        kind: Some(Kind::StringValue(v.clone())),
                    };
                    (k.clone(), v)
                })
                .collect(),
        }),
        ..Default::default()
    };
    let proxy = ProxyNode::identify(&node, mesh).unwrap_or_else(|e| panic!("{node_id}: {e}"));
    let g = generate(mesh, &proxy);
    fn all<M: prost::Message + prost::Name + Default>(
        g: &weft_control_plane::generate::Generated,
        url: &str,
    ) -> Vec<serde_json::Value> {
        g.of_type(url)
            .into_iter()
            .flat_map(|m| m.values())
            .map(|r| to_json(&unpack::<M>(&r.any).expect("decodes")).expect("to JSON"))
            .collect()
    }
    serde_json::json!({
        "warnings": g.warnings,
        "clusters": all::<Cluster>(&g, type_url::CLUSTER),
        "endpoints": all::<ClusterLoadAssignment>(&g, type_url::CLUSTER_LOAD_ASSIGNMENT),
        "listeners": all::<Listener>(&g, type_url::LISTENER),
        "routes": all::<RouteConfiguration>(&g, type_url::ROUTE_CONFIGURATION),
    })
}

/// The first few differing lines, numbered, for a readable failure.
fn diff(want: &str, got: &str) -> String {
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let mut out = String::new();
    let mut shown = 0;
    for i in 0..w.len().max(g.len()) {
        let (a, b) = (w.get(i), g.get(i));
        if a != b {
            out.push_str(&format!(
                "line {}:\n  - {}\n  + {}\n",
                i + 1,
                a.unwrap_or(&"<end>"),
                b.unwrap_or(&"<end>")
            ));
            shown += 1;
            if shown == 8 {
                break;
            }
        }
    }
    out
}

#[test]
fn generated_xds_matches_the_reviewed_golden_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("WEFT_BLESS").is_some();
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/golden")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("case.yaml").is_file())
        .collect();
    cases.sort();
    assert!(
        !cases.is_empty(),
        "no golden cases under {}",
        root.display()
    );
    let mut failures = Vec::new();
    let mut checked = 0;
    for dir in cases {
        let case: Case = serde_yaml::from_str(
            &std::fs::read_to_string(dir.join("case.yaml")).expect("case.yaml"),
        )
        .unwrap_or_else(|e| panic!("{}/case.yaml: {e}", dir.display()));
        let mesh = Mesh::build(&load(&dir, &case));
        for (stem, node_id) in &case.proxies {
            let file = dir.join(format!("{stem}.json"));
            let rendered = render(&mesh, node_id, case.metadata.get(stem));
            let got = serde_json::to_string_pretty(&rendered).expect("JSON") + "\n";
            checked += 1;
            if bless {
                std::fs::write(&file, &got).expect("write golden file");
                continue;
            }
            match std::fs::read_to_string(&file) {
                Ok(want) if want == got => {}
                Ok(want) => failures.push(format!(
                    "{} differs from what weftd generates now:\n{}",
                    file.display(),
                    diff(&want, &got)
                )),
                Err(e) => failures.push(format!(
                    "{}: {e} (run with WEFT_BLESS=1 to create it)",
                    file.display()
                )),
            }
        }
    }
    assert!(checked > 0);
    assert!(
        failures.is_empty(),
        "{}\nIf the change is intended, re-run with WEFT_BLESS=1 and review the diff.",
        failures.join("\n")
    );
}
