//! The deploy kit (`deploy/`): its files parse and say what walsync needs; the Kubernetes
//! ConfigMap's configuration, with secrets from the environment as the manifests give them,
//! runs the real binary; every metric the Grafana dashboard and the alert rules read is one
//! that running walsync exports; the alert rules pass `promtool check rules` and their unit
//! tests (`promtool test rules`); the systemd unit passes `systemd-analyze verify`.
//! `.ci/run` installs promtool (Debian's `prometheus`); where a tool is missing here, its check
//! says so and is skipped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use support::process::{Killed, free_port, wait_ready};
use support::seed;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml(path: &str) -> anyhow::Result<serde_yaml_ng::Value> {
    let text = std::fs::read_to_string(deploy().join(path))?;
    serde_yaml_ng::from_str(&text).map_err(|e| anyhow::anyhow!("{path}: {e}"))
}

/// Whether `tool` can be run here.
fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The ConfigMap's data (walsync.toml, sync_rules.yaml).
fn config_map() -> anyhow::Result<serde_yaml_ng::Value> {
    let map = yaml("kubernetes/configmap.yaml")?;
    Ok(map["data"].clone())
}

#[test]
fn the_compose_file_and_the_manifests_parse_and_say_what_walsync_needs() -> anyhow::Result<()> {
    let compose = yaml("docker-compose.yml")?;
    for service in ["postgres", "walsync", "prometheus", "grafana"] {
        assert!(
            compose["services"][service].is_mapping(),
            "no {service} service"
        );
    }
    let postgres: Vec<&str> = compose["services"]["postgres"]["command"]
        .as_sequence()
        .map(|c| c.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert!(postgres.contains(&"wal_level=logical"), "{postgres:?}");
    // Every file the compose file mounts exists.
    for service in compose["services"]
        .as_mapping()
        .into_iter()
        .flat_map(|m| m.values())
    {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let Some(source) = volume.as_str().and_then(|v| v.split(':').next()) else {
                continue;
            };
            if source.starts_with('.') {
                assert!(
                    deploy().join(source).exists(),
                    "the compose file mounts {source}, which does not exist"
                );
            }
        }
    }
    let build = &compose["services"]["walsync"]["build"];
    assert!(
        deploy()
            .join(build["context"].as_str().unwrap_or_default())
            .join(build["dockerfile"].as_str().unwrap_or_default())
            .exists()
    );

    // The manifests: each a known kind; the probes ask the endpoints walsync serves.
    let mut kinds = BTreeSet::new();
    let kustomization = yaml("kubernetes/kustomization.yaml")?;
    for resource in kustomization["resources"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        let file = format!("kubernetes/{}", resource.as_str().unwrap_or_default());
        {
            let doc = yaml(&file)?;
            assert!(doc["apiVersion"].is_string(), "{file}: no apiVersion");
            kinds.insert(doc["kind"].as_str().unwrap_or_default().to_owned());
            if doc["kind"] == "StatefulSet" {
                assert_eq!(
                    doc["spec"]["replicas"].as_u64(),
                    Some(1),
                    "one slot, one reader"
                );
                let pod = &doc["spec"]["template"];
                assert_eq!(
                    pod["metadata"]["annotations"]["prometheus.io/path"].as_str(),
                    Some("/metrics")
                );
                let container = &pod["spec"]["containers"][0];
                assert_eq!(
                    container["livenessProbe"]["httpGet"]["path"].as_str(),
                    Some("/health/live")
                );
                assert_eq!(
                    container["readinessProbe"]["httpGet"]["path"].as_str(),
                    Some("/health/ready")
                );
            }
        }
    }
    assert_eq!(
        kinds,
        ["ConfigMap", "Secret", "Service", "StatefulSet"]
            .map(String::from)
            .into(),
    );
    scaled_out(&compose)?;
    for path in [
        "prometheus/prometheus.yml",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/walsync.yml",
    ] {
        yaml(path)?;
    }
    // The deploy kit's own configuration file loads as walsync reads it.
    let config = walsync::Config::load(&deploy().join("walsync.toml"))?;
    assert_eq!(config.server.listen.port(), 8080);
    assert!(config.wal_guard.budget_bytes.is_some());
    Ok(())
}

/// The scaled-out kit: the compose profile and the Kubernetes overlay run replicator candidates
/// and API nodes with the store in PostgreSQL, from keys the Secret has; the Service reaches
/// the API nodes only.
fn scaled_out(compose: &serde_yaml_ng::Value) -> anyhow::Result<()> {
    let args = |v: &serde_yaml_ng::Value| -> Vec<String> {
        v.as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(String::from))
            .collect()
    };
    for (service, role, replicas) in [
        ("walsync-replicator", "replicator", 2),
        ("walsync-api", "api", 3),
    ] {
        let s = &compose["services"][service];
        assert_eq!(s["profiles"][0].as_str(), Some("scale-out"), "{service}");
        let command = args(&s["command"]);
        assert!(
            command.ends_with(&["--role".into(), role.into()]),
            "{service}: {command:?}"
        );
        assert_eq!(
            s["deploy"]["replicas"].as_u64(),
            Some(replicas),
            "{service}"
        );
        assert!(
            s["environment"]["WALSYNC__STORAGE__POSTGRES__URL"].is_string(),
            "{service}: the store in postgres"
        );
    }
    let secret = yaml("kubernetes/secret.yaml")?;
    let kustomization = yaml("kubernetes/scale-out/kustomization.yaml")?;
    let mut roles = BTreeSet::new();
    for resource in kustomization["resources"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        let file = format!(
            "kubernetes/scale-out/{}",
            resource.as_str().unwrap_or_default()
        );
        let doc = yaml(&file)?;
        match doc["kind"].as_str() {
            Some("Deployment") => {
                let container = &doc["spec"]["template"]["spec"]["containers"][0];
                let command = args(&container["args"]);
                let role = command.last().cloned().unwrap_or_default();
                assert_eq!(command[command.len() - 2], "--role", "{file}");
                let replicas = doc["spec"]["replicas"].as_u64().unwrap_or_default();
                match role.as_str() {
                    "replicator" => assert_eq!(replicas, 2, "one active, one standby"),
                    "api" => {
                        assert!(replicas >= 2, "{file}");
                        assert_eq!(
                            container["readinessProbe"]["httpGet"]["path"].as_str(),
                            Some("/health/ready")
                        );
                    }
                    other => anyhow::bail!("{file}: role {other}"),
                }
                let mut has_storage = false;
                for env in container["env"].as_sequence().into_iter().flatten() {
                    has_storage |= env["name"] == "WALSYNC__STORAGE__POSTGRES__URL";
                    if let Some(key) = env["valueFrom"]["secretKeyRef"]["key"].as_str() {
                        assert!(
                            secret["stringData"][key].is_string(),
                            "{file} reads {key}, which the Secret lacks"
                        );
                    }
                }
                assert!(has_storage, "{file}: the store in postgres");
                roles.insert(role);
            }
            Some("Service") => assert_eq!(
                doc["spec"]["selector"]["app.kubernetes.io/component"].as_str(),
                Some("api"),
                "the Service reaches the API nodes only"
            ),
            _ => {}
        }
    }
    assert_eq!(roles, ["api", "replicator"].map(String::from).into());
    Ok(())
}

/// The `walsync_*` names a PromQL expression reads (a summary's quantile series by its own
/// name).
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("walsync_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        into.insert(expr[start..end].to_owned());
        i = end;
    }
}

/// What the dashboard and the alert rules read.
fn metrics_read() -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        deploy().join("grafana/dashboards/walsync.json"),
    )?)?;
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    assert!(panels.len() > 10, "a dashboard of {} panels", panels.len());
    for panel in &panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            metric_names(target["expr"].as_str().unwrap_or_default(), &mut names);
        }
    }
    let alerts = yaml("prometheus/alerts.yml")?;
    for group in alerts["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            metric_names(rule["expr"].as_str().unwrap_or_default(), &mut names);
            for text in rule["annotations"]
                .as_mapping()
                .into_iter()
                .flat_map(|m| m.values())
            {
                metric_names(text.as_str().unwrap_or_default(), &mut names);
            }
        }
    }
    Ok(names)
}

/// The real binary, configured by the Kubernetes ConfigMap with its secrets from the
/// environment as the StatefulSet passes them: it serves, and `/metrics` holds every metric the
/// dashboard and the alerts read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_read_only_what_walsync_exports() -> anyhow::Result<()> {
    let s = seed::setup().await?;
    // The slot's safe_wal_size exists only with a limit, set on this test binary's own cluster
    // (not on one given by WALSYNC_TEST_PG_URL).
    let own_cluster = std::env::var("WALSYNC_TEST_PG_URL").map_or(true, |u| u.is_empty());
    if own_cluster {
        s.sql
            .batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '4GB'")
            .await?;
        s.sql.batch_execute("SELECT pg_reload_conf()").await?;
    }
    let data = config_map()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("walsync.toml"),
        data["walsync.toml"].as_str().unwrap_or_default(),
    )?;
    std::fs::write(
        dir.path().join("sync_rules.yaml"),
        data["sync_rules.yaml"].as_str().unwrap_or_default(),
    )?;
    let port = free_port()?;
    let child = Command::new(env!("CARGO_BIN_EXE_walsync-cli"))
        .args(["serve", "--config"])
        .arg(dir.path().join("walsync.toml"))
        .env("WALSYNC__RULES", dir.path().join("sync_rules.yaml"))
        .env("WALSYNC__POSTGRES__URL", &s.url)
        .env("WALSYNC__POSTGRES__SLOT", &s.slot)
        .env("WALSYNC__STORAGE__DIR", dir.path().join("store"))
        .env("WALSYNC__STORAGE__COMPACT_INTERVAL_SECONDS", "1")
        .env("WALSYNC__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("WALSYNC__SERVER__ADMIN_TOKEN", "admin")
        .env("WALSYNC__AUTH__SECRET", "deploy-secret")
        .env("WALSYNC__METRICS__POLL_SECONDS", "1")
        .env("WALSYNC_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log.jsonl"))?)
        .spawn()?;
    let _child = Killed(child);
    wait_ready(port).await?;
    // Replicated transactions and a compaction pass fill the latency summaries.
    seed::workload(&s.sql, 3, 30).await?;
    let wanted = metrics_read()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let missing = loop {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await?
            .text()
            .await?;
        let exported: BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|name| !exported.contains(name.as_str()))
            .filter(|name| own_cluster || *name != "walsync_slot_safe_wal_size_bytes")
            .collect();
        if missing.is_empty() {
            break missing;
        }
        if std::time::Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert!(
        missing.is_empty(),
        "the dashboard or the alerts read what walsync does not export: {missing:?}"
    );
    assert!(wanted.len() > 25, "only {} metrics read", wanted.len());

    // The log: one JSON object a line, and a line for each change of the replication's state.
    let log = std::fs::read_to_string(dir.path().join("log.jsonl"))?;
    let lines: Vec<Value> = log
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("a log line is not JSON: {e}\n{log}"))?;
    let states: Vec<&str> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "replication state")
        .filter_map(|l| l["fields"]["state"].as_str())
        .collect();
    assert!(
        states.starts_with(&["snapshotting", "streaming"]),
        "replication states logged: {states:?}\n{log}"
    );
    if own_cluster {
        s.sql
            .batch_execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            .await?;
        s.sql.batch_execute("SELECT pg_reload_conf()").await?;
    }
    Ok(())
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() -> anyhow::Result<()> {
    if !have("promtool") {
        eprintln!("skipped: no promtool here (.ci/run installs Debian's prometheus)");
        return Ok(());
    }
    let dir = deploy().join("prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["check", "config", "prometheus.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()?;
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn the_systemd_unit_verifies() -> anyhow::Result<()> {
    if !have("systemd-analyze") {
        eprintln!("skipped: no systemd-analyze here");
        return Ok(());
    }
    let unit = std::fs::read_to_string(deploy().join("systemd/walsync.service"))?;
    assert!(unit.contains("ExecStart=/usr/local/bin/walsync serve --config"));
    // Verified with the binary built here in the installed one's place.
    let dir = tempfile::tempdir()?;
    let here = unit.replace("/usr/local/bin/walsync", env!("CARGO_BIN_EXE_walsync-cli"));
    std::fs::write(dir.path().join("walsync.service"), here)?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("walsync.service"))
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    Ok(())
}

/// The image cannot be built here (no registry for its base images): what it builds and runs
/// is checked against the workspace instead.
#[test]
fn the_dockerfile_builds_the_shipping_binary_and_runs_it_unprivileged() -> anyhow::Result<()> {
    let dockerfile = std::fs::read_to_string(deploy().join("Dockerfile"))?;
    assert!(dockerfile.contains("cargo build --release --locked -p walsync --bin walsync"));
    assert!(
        dockerfile.contains("COPY --from=build /src/target/release/walsync /usr/local/bin/walsync")
    );
    assert!(dockerfile.contains("USER walsync"), "not as root");
    let package = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/walsync/Cargo.toml"),
    )?;
    assert!(package.contains("name = \"walsync\""));
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../crates/walsync/src/main.rs")
            .exists(),
        "the package's binary target is walsync"
    );
    Ok(())
}
