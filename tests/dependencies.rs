//! The crates depend one way, along the pipeline: a crate may depend only on crates earlier in
//! [`ORDER`] (the same order as ARCHITECTURE.md's crate table), and never on those
//! [`FORBIDDEN`] names for it. Read from `cargo metadata`, so a new dependency that breaks the
//! layering fails here.

use std::collections::BTreeMap;

/// The pipeline, first to last. The testkit comes first: anything may use it, it uses nothing.
const ORDER: &[&str] = &[
    "walsync-testkit",
    "walsync-types",
    "walsync-protocol",
    "walsync-source",
    "walsync-rules",
    "walsync-storage",
    "walsync-replicator",
    "walsync-sync",
    "walsync-write",
    "walsync-server",
    "walsync-client",
    "walsync",
    "walsync-bench",
    "walsync-tests",
];

/// Edges the order allows that the layering does not: storage keeps buckets without knowing the
/// rules; the server serves the sync core without knowing where changes come from.
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "walsync-storage",
        &["walsync-rules", "walsync-source", "walsync-protocol"],
    ),
    ("walsync-sync", &["walsync-source", "walsync-replicator"]),
    // Uploads go to PostgreSQL, never to the store or the sync core.
    (
        "walsync-write",
        &[
            "walsync-storage",
            "walsync-sync",
            "walsync-replicator",
            "walsync-source",
            "walsync-rules",
        ],
    ),
    (
        "walsync-server",
        &["walsync-source", "walsync-replicator", "walsync-rules"],
    ),
    (
        "walsync-client",
        &[
            "walsync-storage",
            "walsync-sync",
            "walsync-server",
            "walsync-replicator",
            "walsync-source",
        ],
    ),
];

#[test]
fn crates_depend_only_on_crates_before_them_in_the_pipeline() -> anyhow::Result<()> {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rank: BTreeMap<&str, usize> = ORDER.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut seen = Vec::new();
    let mut wrong = Vec::new();
    for package in meta["packages"].as_array().into_iter().flatten() {
        let name = package["name"].as_str().unwrap_or_default();
        let Some(&mine) = rank.get(name) else {
            wrong.push(format!(
                "{name} is not in the pipeline order: add it to ORDER"
            ));
            continue;
        };
        seen.push(name.to_owned());
        for dep in package["dependencies"].as_array().into_iter().flatten() {
            let dep_name = dep["name"].as_str().unwrap_or_default();
            let Some(&theirs) = rank.get(dep_name) else {
                continue;
            };
            let kind = dep["kind"].as_str().unwrap_or("normal");
            // Tests may use the testkit and anything earlier; every kind follows the order.
            if theirs >= mine {
                wrong.push(format!(
                    "{name} depends ({kind}) on {dep_name}, which comes after it"
                ));
            }
            let forbidden = FORBIDDEN
                .iter()
                .filter(|(who, _)| *who == name)
                .flat_map(|(_, deps)| deps.iter());
            if kind != "dev" && forbidden.into_iter().any(|d| *d == dep_name) {
                wrong.push(format!("{name} must not depend on {dep_name}"));
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
    assert_eq!(
        seen.len(),
        ORDER.len(),
        "every crate of the order exists: {seen:?}"
    );
    Ok(())
}

#[test]
fn the_order_stands_in_the_architecture_document() -> anyhow::Result<()> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../ARCHITECTURE.md"))?;
    let mut at = 0;
    for name in ORDER {
        let needle = format!("| `{name}` |");
        let found = doc[at..].find(&needle).ok_or_else(|| {
            anyhow::anyhow!("ARCHITECTURE.md's crate table lists {name} after the crates before it")
        })?;
        at += found + needle.len();
    }
    Ok(())
}
