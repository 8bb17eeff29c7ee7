//! The module graph stays a tree from `cli` down to `storage`: no module of the
//! crate depends, directly or through others, on a module that depends on it.
//! Read from the source (`crate::<module>` paths outside comments and unit
//! tests), so a change that adds a cycle fails here.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// The top-level modules each top-level module refers to.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    fn walk(dir: &Path, root: &Path, graph: &mut BTreeMap<String, BTreeSet<String>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, graph);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let module = first.trim_end_matches(".rs").to_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let deps = graph.entry(module.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    deps.insert(name);
                }
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    walk(&root, &root, &mut graph);
    graph
}

/// A cycle through `start`, if there is one.
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|p| p == node) {
        let mut cycle = path[i..].to_vec();
        cycle.push(node.to_owned());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    path.push(node.to_owned());
    for next in graph.get(node).into_iter().flatten() {
        if let Some(c) = cycle_from(graph, next, path, done) {
            return Some(c);
        }
    }
    path.pop();
    done.insert(node.to_owned());
    None
}

#[test]
fn the_module_graph_has_no_cycles() {
    let graph = module_graph();
    assert!(graph.len() > 10, "the source was read: {graph:?}");
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module, &mut Vec::new(), &mut done) {
            panic!("module cycle: {}", cycle.join(" -> "));
        }
    }
}

/// The layers, lowest first: a module may use modules of the layers below
/// its own, and of its own layer only along the edges in [`SAME_LAYER`]. The
/// map in `src/lib.rs` says the same in words.
const LAYERS: &[(&str, &[&str])] = &[
    // Pure building blocks: no I/O, nothing of the crate.
    (
        "foundation",
        &["metrics", "vhd", "estimate", "placement", "telemetry"],
    ),
    // The Azure client layer: accounts, signing, retry, limits, the outbound
    // call path, transport, errors.
    ("azure client", &["azure"]),
    // The configuration and the service clients, side by side.
    ("settings and services", &["config", "storage", "queue"]),
    // The job model: jobs, plans, documents, views.
    ("domain", &["job", "plan", "state", "views"]),
    // What a job publishes to and hands off through.
    ("integrations", &["gallery", "handoff", "batch"]),
    ("engine", &["engine"]),
    // The control plane: submissions, the queue consumer, garbage collection.
    ("control", &["control", "intake", "gc", "watch"]),
    // What people and programs talk to.
    ("surface", &["api", "pages", "daemon", "cli"]),
    // Tests and benchmarks only (feature `testkit`): stand-ins for services
    // and whole-daemon simulations, on everything below the surface.
    ("test kit", &["testkit"]),
];

/// The edges allowed inside one layer.
const SAME_LAYER: &[(&str, &str)] = &[
    ("config", "queue"),
    ("plan", "job"),
    ("state", "job"),
    ("views", "state"),
    ("handoff", "gallery"),
    ("batch", "handoff"),
    ("gc", "control"),
    ("watch", "control"),
    ("api", "pages"),
    ("daemon", "api"),
    ("cli", "daemon"),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// Every edge of the module graph goes down the layers (or along an allowed
/// edge inside one), and every module has a layer: a new `storage -> config`
/// or `azure -> storage` edge, or a module nobody placed, fails here.
#[test]
fn every_module_uses_only_the_layers_below_it() {
    let graph = module_graph();
    let mut wrong = Vec::new();
    for (module, deps) in &graph {
        if ["lib", "main"].contains(&module.as_str()) {
            continue;
        }
        let Some(own) = layer_of(module) else {
            wrong.push(format!("{module} is in no layer: place it in LAYERS"));
            continue;
        };
        for dep in deps {
            let Some(theirs) = layer_of(dep) else {
                continue;
            };
            let allowed = theirs < own
                || (theirs == own && SAME_LAYER.contains(&(module.as_str(), dep.as_str())));
            if !allowed {
                wrong.push(format!(
                    "{module} ({}) uses {dep} ({})",
                    LAYERS[own].0, LAYERS[theirs].0
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "edges against the layers:\n{}",
        wrong.join("\n")
    );
    // The table holds no stale names.
    for (_, modules) in LAYERS {
        for m in *modules {
            assert!(graph.contains_key(*m), "{m} is in LAYERS but not in src/");
        }
    }
}

/// The non-test code of every `.rs` file under `src/`, by path from `src/`.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().and_then(|e| e.to_str()) == Some("rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text
                    .split("#[cfg(test)]\nmod tests")
                    .next()
                    .unwrap()
                    .to_owned();
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, code));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out
}

/// One writer of a running job's document: inside the engine only the run
/// (`engine/run.rs`, with the checkpoint that writes it under its ETag) holds
/// the document's lock or changes a replica's state; elsewhere the stored
/// document is written only by the claim (`engine/lifecycle.rs`), a cancel
/// request (`control.rs`) and a poisoned message's failure (`intake.rs`).
#[test]
fn a_running_job_has_one_writer() {
    let files = sources();
    assert!(files.len() > 30, "the source was read");
    let owner = ["engine/run.rs", "engine/checkpoint.rs"];
    for (path, code) in &files {
        if owner.contains(&path.as_str()) || path.starts_with("state/") {
            continue;
        }
        for forbidden in [
            "expect(\"live doc lock\")",
            ".state = ReplicaState",
            ".enter(JobState",
            "fn with_replica",
        ] {
            let api_read = path == "api.rs" && forbidden == "expect(\"live doc lock\")";
            assert!(
                api_read || !code.contains(forbidden),
                "{path} writes a running job's document ({forbidden}); go through engine::run::JobRun"
            );
        }
    }
    let writers: BTreeSet<&str> = files
        .iter()
        .filter(|(p, _)| !p.starts_with("state/"))
        .filter(|(_, c)| {
            [
                "state.save(",
                "state.update(",
                "state.create(",
                ".state\n            .update(",
            ]
            .iter()
            .any(|w| c.contains(w))
        })
        .map(|(p, _)| p.as_str())
        .collect();
    assert_eq!(
        writers,
        BTreeSet::from([
            "control.rs",
            "engine/checkpoint.rs",
            "engine/lifecycle.rs",
            "intake.rs"
        ]),
        "modules that write job documents"
    );
}
