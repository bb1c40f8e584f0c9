//! `walsync demo`, the README's one-command quick start, runs and shows clients following their
//! buckets: checkpoints with verified checksums, buckets added and removed as members come and go,
//! and interviewers writing through walsync: applied uploads over both transports, a denied
//! one, a conflict left for a person.

#[test]
fn demo_runs_and_clients_follow_their_buckets() {
    if std::env::var("WALSYNC_TEST_PG_URL").is_ok_and(|u| !u.is_empty()) {
        eprintln!("skipped: the demo starts its own PostgreSQL");
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walsync-cli"))
        .args(["demo", "--seconds", "14"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs walsync demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("checksums ok"), "{stdout}");
    assert!(
        stdout.contains("added user_projects["),
        "a member joining shows as an added bucket: {stdout}"
    );
    assert!(
        stdout.contains("removed user_projects["),
        "a member leaving shows as a removed bucket: {stdout}"
    );
    assert!(!stdout.contains("differs"), "{stdout}");
    assert!(
        stdout.contains("curl -N -X POST http://"),
        "a curl line: {stdout}"
    );
    assert!(
        stdout.contains("grpcurl -plaintext"),
        "a grpcurl line: {stdout}"
    );
    assert!(
        stdout.contains("[grpc]") && stdout.contains("[http]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[http] applied") && stdout.contains("[grpc] applied"),
        "uploads over both transports: {stdout}"
    );
    assert!(
        stdout.contains("rejected denied"),
        "a denied upload: {stdout}"
    );
    assert!(
        stdout.contains("conflict on answer (manual)"),
        "a conflict left for a person: {stdout}"
    );
}
