//! Finding PostgreSQL's server binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, TestkitError};

/// The directory holding `initdb`, `pg_ctl` and `postgres`.
pub(crate) fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("WALSYNC_PG_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").exists() && dir.join("pg_ctl").exists() {
                // Debian links only some binaries onto PATH: prefer the real directory.
                let real = std::fs::canonicalize(dir.join("initdb")).ok();
                return Ok(real
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .unwrap_or(dir));
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .ok_or(TestkitError::NoBinaries)
}

/// A PostgreSQL client or server program, e.g. `pg_recvlogical`.
pub(crate) fn program(name: &str) -> Result<PathBuf> {
    let p = bin_dir()?.join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(TestkitError::NoBinaries)
    }
}
