//! Starting, restarting and removing a throwaway cluster.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio_postgres::{Client, NoTls};

use crate::tls::TestCertificates;
use crate::{Result, TestkitError, binaries};

/// How to set up a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `logical` for walsync; `replica` to test the pre-flight check.
    pub wal_level: &'static str,
    /// Serve TLS only, with these certificates.
    pub tls: Option<TestCertificates>,
    /// Further `postgresql.conf` settings.
    pub settings: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            wal_level: "logical",
            tls: None,
            settings: Vec::new(),
        }
    }
}

/// A PostgreSQL server for tests: one this process started, or an existing one named by
/// `WALSYNC_TEST_PG_URL`.
#[derive(Debug)]
pub struct Cluster {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Local(Local),
    External {
        url: String,
    },
    /// A PostgreSQL container, kept for the life of the process (testcontainers' reaper removes
    /// it afterwards).
    #[cfg(feature = "testcontainers")]
    Container {
        url: String,
        _container: testcontainers_modules::testcontainers::Container<
            testcontainers_modules::postgres::Postgres,
        >,
    },
}

#[derive(Debug)]
struct Local {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    as_postgres: bool,
    tls: bool,
}

static SHARED: OnceLock<Cluster> = OnceLock::new();

/// The cluster shared by every test in this process, started on first use.
///
/// # Panics
/// When no cluster can be had: tests cannot run without one, and the message says why.
pub fn shared() -> &'static Cluster {
    SHARED.get_or_init(|| {
        let cluster = match std::env::var("WALSYNC_TEST_PG_URL") {
            Ok(url) if !url.is_empty() => Ok(Cluster {
                kind: Kind::External { url },
            }),
            _ => match Cluster::start(ClusterOptions::default()) {
                #[cfg(feature = "testcontainers")]
                Err(TestkitError::NoBinaries) => Cluster::container(),
                other => other,
            },
        };
        cluster.unwrap_or_else(|e| panic!("cannot start a test postgres: {e}"))
    })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn run(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestkitError::Io {
            what: "running a postgresql program",
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(TestkitError::Command {
            what: what.to_owned(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| TestkitError::Io {
        what: "finding a free port",
        source,
    })?;
    let port = l
        .local_addr()
        .map_err(|source| TestkitError::Io {
            what: "finding a free port",
            source,
        })?
        .port();
    if port == 5432 {
        return free_port();
    }
    Ok(port)
}

impl Local {
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl(&self, what: &str, args: &[&str]) -> Result<String> {
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(&self.dir).args(args);
        run(what, &mut c)
    }

    fn start(&self) -> Result<()> {
        let log = self.dir.join("server.log");
        let opts = format!("-p {} -k {}", self.port, self.dir.display());
        self.pg_ctl(
            "pg_ctl start",
            &[
                "-w",
                "-t",
                "60",
                "-l",
                &log.display().to_string(),
                "-o",
                &opts,
                "start",
            ],
        )
        .map_err(|e| match e {
            TestkitError::Command { what, detail } => TestkitError::Command {
                what,
                detail: format!(
                    "{detail}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            },
            e => e,
        })
        .map(drop)
    }
}

impl Cluster {
    /// Initialises and starts a new cluster on a free port. It is stopped and removed when the
    /// `Cluster` is dropped, or when this process exits.
    pub fn start(options: ClusterOptions) -> Result<Cluster> {
        let bin = binaries::bin_dir()?;
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("walsync-pg-")
            .tempdir()
            .map_err(|source| TestkitError::Io {
                what: "creating the cluster directory",
                source,
            })?
            .keep();
        if as_postgres {
            run(
                "chown",
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir),
            )?;
        }
        let data = dir.join("data");
        let mut local = Local {
            dir: data.clone(),
            port: free_port()?,
            bin,
            as_postgres,
            tls: options.tls.is_some(),
        };
        spawn_watchdog(&local, &dir)?;

        let mut initdb = local.command("initdb");
        initdb
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "-D",
            ])
            .arg(&data);
        run("initdb", &mut initdb)?;

        let host = if local.tls { "hostssl" } else { "host" };
        let hba = format!(
            "local all all trust\nlocal replication all trust\n\
             {host} all postgres 127.0.0.1/32 trust\n{host} replication postgres 127.0.0.1/32 trust\n\
             {host} all all 127.0.0.1/32 md5\n{host} replication all 127.0.0.1/32 md5\n"
        );
        write_as(&local, &data.join("pg_hba.conf"), &hba)?;

        let mut conf = vec![
            ("listen_addresses".to_owned(), "'127.0.0.1'".to_owned()),
            ("wal_level".to_owned(), options.wal_level.to_owned()),
            // Enough for many tests in parallel, each with its own slot and a snapshot connection.
            ("max_replication_slots".to_owned(), "100".to_owned()),
            ("max_wal_senders".to_owned(), "100".to_owned()),
            ("max_connections".to_owned(), "300".to_owned()),
            // Throwaway data: durability of the test cluster itself does not matter.
            ("fsync".to_owned(), "off".to_owned()),
            ("synchronous_commit".to_owned(), "off".to_owned()),
            ("full_page_writes".to_owned(), "off".to_owned()),
            ("shared_buffers".to_owned(), "'256MB'".to_owned()),
            ("max_wal_size".to_owned(), "'4GB'".to_owned()),
            ("wal_sender_timeout".to_owned(), "'60s'".to_owned()),
        ];
        if let Some(certs) = &options.tls {
            write_as(&local, &data.join("server.crt"), &certs.server_cert_pem)?;
            write_as(&local, &data.join("server.key"), &certs.server_key_pem)?;
            conf.push(("ssl".to_owned(), "on".to_owned()));
        }
        conf.extend(options.settings.iter().cloned());
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).map_err(|source| {
            TestkitError::Io {
                what: "reading postgresql.conf",
                source,
            }
        })?;
        for (k, v) in conf {
            text.push_str(&format!("{k} = {v}\n"));
        }
        write_as(&local, &data.join("postgresql.conf"), &text)?;

        // Another process may take the port between our probe and the server's bind: retry.
        let mut attempts = 0;
        loop {
            match local.start() {
                Ok(()) => break,
                Err(e) if attempts < 3 => {
                    tracing::warn!(error = %e, port = local.port, "test postgres did not start, trying another port");
                    attempts += 1;
                    local.port = free_port()?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Cluster {
            kind: Kind::Local(local),
        })
    }

    /// PostgreSQL 15 in Docker, for machines without PostgreSQL binaries.
    #[cfg(feature = "testcontainers")]
    fn container() -> Result<Cluster> {
        use testcontainers_modules::postgres::Postgres;
        use testcontainers_modules::testcontainers::ImageExt;
        use testcontainers_modules::testcontainers::runners::SyncRunner;
        let err = |e: testcontainers_modules::testcontainers::TestcontainersError| {
            TestkitError::Command {
                what: "starting a postgres container".into(),
                detail: e.to_string(),
            }
        };
        let container = Postgres::default()
            .with_host_auth()
            .with_tag("15")
            .with_cmd([
                "-c",
                "wal_level=logical",
                "-c",
                "max_replication_slots=100",
                "-c",
                "max_wal_senders=100",
                "-c",
                "fsync=off",
            ])
            .start()
            .map_err(err)?;
        let host = container.get_host().map_err(err)?;
        let port = container.get_host_port_ipv4(5432).map_err(err)?;
        let url = format!("postgres://postgres@{host}:{port}/postgres");
        Ok(Cluster {
            kind: Kind::Container {
                url,
                _container: container,
            },
        })
    }

    fn local(&self) -> Result<&Local> {
        match &self.kind {
            Kind::Local(l) => Ok(l),
            _ => Err(TestkitError::Unsupported(
                "this needs a cluster walsync started itself",
            )),
        }
    }

    /// Whether this process started the cluster (and so can restart it or change its settings).
    pub fn is_local(&self) -> bool {
        matches!(self.kind, Kind::Local(_))
    }

    /// A `postgres://` URL for `user` (with `password`, if any) to database `db` over TCP.
    pub fn url_as(&self, user: &str, password: Option<&str>, db: &str) -> String {
        match &self.kind {
            Kind::Local(l) => {
                let auth = match password {
                    Some(p) => format!("{user}:{p}"),
                    None => user.to_owned(),
                };
                format!("postgres://{auth}@127.0.0.1:{}/{db}", l.port)
            }
            Kind::External { url } => replace_db(url, db),
            #[cfg(feature = "testcontainers")]
            Kind::Container { url, .. } => replace_db(url, db),
        }
    }

    /// A superuser URL to database `db` over TCP.
    pub fn url(&self, db: &str) -> String {
        self.url_as("postgres", None, db)
    }

    /// The loopback port of a local cluster.
    pub fn port(&self) -> Option<u16> {
        self.local().ok().map(|l| l.port)
    }

    /// The directory of a local cluster's Unix socket.
    pub fn socket_dir(&self) -> Option<&Path> {
        self.local().ok().map(|l| l.dir.as_path())
    }

    /// A superuser connection to `db`; over the Unix socket for local clusters, so that it works
    /// on TLS-only clusters too.
    pub async fn connect(&self, db: &str) -> Result<Client> {
        let config = match &self.kind {
            Kind::Local(l) => format!(
                "host={} port={} user=postgres dbname={db}",
                l.dir.display(),
                l.port
            ),
            Kind::External { url } => replace_db(url, db),
            #[cfg(feature = "testcontainers")]
            Kind::Container { url, .. } => replace_db(url, db),
        };
        let (client, conn) = tokio_postgres::connect(&config, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "test connection closed");
            }
        });
        Ok(client)
    }

    /// Creates a new empty database for one test.
    pub async fn fresh_database(&self) -> Result<TestDatabase> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "walsync_t{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let admin = self.connect("postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        Ok(TestDatabase {
            url: self.url(&name),
            name,
        })
    }

    /// Stops the server (fast shutdown: clients are disconnected) and starts it again on the same
    /// port.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Stops the server as a crash would (immediate shutdown: nothing waits for clients) and
    /// starts it again on the same port, with crash recovery.
    pub fn crash_restart(&self) -> Result<()> {
        self.local()?
            .pg_ctl("pg_ctl stop", &["-w", "-m", "immediate", "stop"])?;
        self.start_again()
    }

    pub fn stop(&self) -> Result<()> {
        self.local()?
            .pg_ctl("pg_ctl stop", &["-w", "-m", "fast", "stop"])
            .map(drop)
    }

    pub fn start_again(&self) -> Result<()> {
        self.local()?.start()
    }

    /// Path of a PostgreSQL program of the installed version, e.g. `pg_recvlogical`.
    pub fn program(name: &str) -> Result<PathBuf> {
        binaries::program(name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Kind::Local(l) = &self.kind {
            let _ = l.pg_ctl("pg_ctl stop", &["-w", "-m", "immediate", "stop"]);
            if let Some(parent) = l.dir.parent() {
                let _ = std::fs::remove_dir_all(parent);
            }
        }
    }
}

fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

fn write_as(local: &Local, path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| TestkitError::Io {
        what: "writing cluster files",
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        TestkitError::Io {
            what: "writing cluster files",
            source,
        }
    })?;
    if local.as_postgres {
        run(
            "chown",
            Command::new("chown").arg("postgres:postgres").arg(path),
        )?;
    }
    Ok(())
}

/// Starts a detached shell that waits for this process to exit, then stops the cluster and
/// removes its directory: static clusters are never dropped, and a killed test never drops
/// anything.
fn spawn_watchdog(local: &Local, dir: &Path) -> Result<()> {
    let pg_ctl = local.bin.join("pg_ctl");
    let stop = if local.as_postgres {
        format!(
            "runuser -u postgres -- {} -D {} -m immediate stop",
            pg_ctl.display(),
            local.dir.display()
        )
    } else {
        format!(
            "{} -D {} -m immediate stop",
            pg_ctl.display(),
            local.dir.display()
        )
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display()
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| TestkitError::Io {
            what: "starting the cluster watchdog",
            source,
        })?;
    Ok(())
}

/// A database created for one test.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    pub name: String,
    /// Superuser URL over TCP.
    pub url: String,
}

impl TestDatabase {
    /// A superuser connection to this database.
    pub async fn connect(&self) -> Result<Client> {
        connect_url(&self.url).await
    }
}

async fn connect_url(url: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "test connection closed");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::replace_db;

    #[test]
    fn replaces_database_in_urls() {
        assert_eq!(
            replace_db("postgres://u@h:1/old", "new"),
            "postgres://u@h:1/new"
        );
        assert_eq!(
            replace_db("postgres://u@h:1/old?sslmode=require", "n"),
            "postgres://u@h:1/n?sslmode=require"
        );
        assert_eq!(replace_db("postgres://u@h:1", "n"), "postgres://u@h:1/n");
    }
}
