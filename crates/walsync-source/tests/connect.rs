//! Logging in, TLS and pre-flight checks against real PostgreSQL servers.

mod support;

use walsync_source::replication::ReplicationConnection;
use walsync_source::{PgConfig, PublicationScope, Resume, Source, SourceError};
use walsync_testkit::{Cluster, ClusterOptions, TestCertificates, shared};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text);";

async fn role(
    db: &support::Db,
    name: &str,
    encryption: &str,
    replication: bool,
) -> anyhow::Result<()> {
    let repl = if replication {
        "REPLICATION"
    } else {
        "NOREPLICATION"
    };
    db.sql
        .batch_execute(&format!(
            "SET password_encryption = '{encryption}';
             DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN
                 CREATE ROLE {name} LOGIN {repl} PASSWORD 'pw-{name}';
               END IF;
             END $$;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO {name};"
        ))
        .await?;
    Ok(())
}

#[tokio::test]
async fn scram_and_md5_logins_work_and_bad_passwords_fail_clearly() -> anyhow::Result<()> {
    let cluster = shared();
    if !cluster.is_local() {
        eprintln!("skipped: needs a cluster with the testkit's pg_hba.conf");
        return Ok(());
    }
    let db = support::database(cluster, ITEMS).await?;
    role(&db, "scram_user", "scram-sha-256", true).await?;
    role(&db, "md5_user", "md5", true).await?;
    for user in ["scram_user", "md5_user"] {
        let url = cluster.url_as(user, Some(&format!("pw-{user}")), &db.db.name);
        let mut conn = ReplicationConnection::connect(&url.parse::<PgConfig>()?).await?;
        let id = conn.identify_system().await?;
        assert_eq!(id.dbname.as_deref(), Some(db.db.name.as_str()), "{user}");
        conn.close().await?;

        let wrong = cluster
            .url_as(user, Some("wrong"), &db.db.name)
            .parse::<PgConfig>()?;
        match ReplicationConnection::connect(&wrong).await {
            Err(SourceError::Auth(msg)) => {
                assert!(msg.contains("password authentication failed"), "{msg}")
            }
            other => panic!("expected an auth error for {user}, got {other:?}"),
        }
        match wrong.connect().await {
            Err(SourceError::Auth(_)) => {}
            other => panic!("expected an auth error for {user}'s sql connection, got {other:?}"),
        }
    }

    // The whole source runs as a password user too.
    let url = cluster.url_as("scram_user", Some("pw-scram_user"), &db.db.name);
    let mut stream = support::start(&url, Resume::default()).await?;
    let mut c = support::Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    db.sql
        .batch_execute("INSERT INTO items VALUES (1, 'a')")
        .await?;
    c.until(&mut stream, |c| !c.txns.is_empty()).await?;
    stream.stop().await;

    let no_password = cluster
        .url_as("scram_user", None, &db.db.name)
        .parse::<PgConfig>()?;
    match ReplicationConnection::connect(&no_password).await {
        Err(SourceError::Auth(msg)) => assert!(msg.contains("none was given"), "{msg}"),
        other => panic!("expected an auth error, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn preflight_names_what_to_change() -> anyhow::Result<()> {
    let cluster = shared();
    let db = support::database(cluster, &format!("{ITEMS} CREATE TABLE keyless (v int);")).await?;

    // Published table without a key.
    let err = Source::start(support::config(&db.url), Resume::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Preflight(_)), "{err}");
    assert!(
        err.to_string().contains("public.keyless")
            && err.to_string().contains("REPLICA IDENTITY FULL"),
        "{err}"
    );
    db.sql
        .batch_execute("ALTER TABLE keyless REPLICA IDENTITY FULL")
        .await?;

    // Missing publication.
    let mut cfg = support::config(&db.url);
    cfg.publication = "nope".into();
    let err = Source::start(cfg.clone(), Resume::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("publication \"nope\" does not exist"),
        "{err}"
    );
    cfg.create_publication = Some(PublicationScope::Tables(vec!["itemz".into()]));
    let err = Source::start(cfg.clone(), Resume::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("\"itemz\""), "{err}");
    cfg.create_publication = Some(PublicationScope::Tables(vec!["items".into()]));
    let stream = Source::start(cfg, Resume::default()).await?;
    stream.stop().await;
    let tables: Vec<String> = db
        .sql
        .query(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'nope'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, ["items"]);

    // A role without REPLICATION.
    if cluster.is_local() {
        role(&db, "plain_user", "scram-sha-256", false).await?;
        let url = cluster.url_as("plain_user", Some("pw-plain_user"), &db.db.name);
        let err = Source::start(support::config(&url), Resume::default())
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("ALTER ROLE \"plain_user\" WITH REPLICATION"),
            "{err}"
        );
    }

    // Partitions published under their own names.
    db.sql
        .batch_execute(
            "CREATE TABLE parted (id int, k int, PRIMARY KEY (id, k)) PARTITION BY LIST (k);
             CREATE TABLE parted_1 PARTITION OF parted FOR VALUES IN (1);
             CREATE PUBLICATION leaves FOR TABLE parted",
        )
        .await?;
    let mut cfg = support::config(&db.url);
    cfg.publication = "leaves".into();
    let err = Source::start(cfg, Resume::default()).await.unwrap_err();
    assert!(
        err.to_string().contains("public.parted_1")
            && err
                .to_string()
                .contains("ALTER PUBLICATION \"leaves\" SET (publish_via_partition_root = true)"),
        "{err}"
    );

    db.sql.batch_execute("DROP TABLE parted").await?;

    // A table the rules read that the publication leaves out; a publication without deletes.
    db.sql
        .batch_execute(
            "CREATE PUBLICATION partial FOR TABLE items;
             CREATE PUBLICATION inserts_only FOR ALL TABLES WITH (publish = 'insert')",
        )
        .await?;
    let mut cfg = support::config(&db.url);
    cfg.publication = "partial".into();
    cfg.required_tables = vec!["public.items".into(), "public.keyless".into()];
    let err = Source::start(cfg.clone(), Resume::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not include public.keyless, which the sync rules read")
            && err
                .to_string()
                .contains("ALTER PUBLICATION \"partial\" ADD TABLE public.keyless"),
        "{err}"
    );
    cfg.create_publication = Some(PublicationScope::Tables(cfg.required_tables.clone()));
    let stream = Source::start(cfg.clone(), Resume::default()).await?;
    stream.stop().await;
    let added: i64 = db
        .sql
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'partial' AND tablename = 'keyless'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(added, 1, "walsync added the table to its publication");
    cfg.publication = "inserts_only".into();
    let err = Source::start(cfg, Resume::default()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("publish = 'insert, update, delete, truncate'"),
        "{err}"
    );

    // A database whose text is not UTF-8.
    let latin = format!("{}_latin1", db.db.name);
    db.sql
        .batch_execute(&format!(
            "CREATE DATABASE {latin} WITH ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
        ))
        .await?;
    let latin_url = db
        .url
        .replace(&format!("/{}", db.db.name), &format!("/{latin}"));
    anyhow::ensure!(
        latin_url != db.url,
        "the url names the database: {}",
        db.url
    );
    let err = Source::start(support::config(&latin_url), Resume::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("server_encoding is \"LATIN1\""),
        "{err}"
    );

    // A resumed source whose slot is gone says so, and does not retry.
    let mut cfg = support::config(&db.url);
    cfg.slot = format!("{}_gone", db.db.name);
    let mut stream = Source::start(
        cfg,
        Resume {
            durable: Some("0/1000".parse()?),
            owns_slot: true,
        },
    )
    .await?;
    match stream.next_batch().await {
        Some(Err(e @ SourceError::SlotLost { .. })) => assert!(!e.is_transient()),
        other => panic!("expected slot lost, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn wal_level_replica_is_refused_with_advice() -> anyhow::Result<()> {
    if shared_is_external() {
        return Ok(());
    }
    let cluster = Cluster::start(ClusterOptions {
        wal_level: "replica",
        ..ClusterOptions::default()
    })?;
    let db = cluster.fresh_database().await?;
    let err = Source::start(support::config(&db.url), Resume::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Preflight(_)));
    assert!(
        err.to_string().contains("wal_level is \"replica\"")
            && err.to_string().contains("wal_level = logical"),
        "{err}"
    );
    Ok(())
}

fn shared_is_external() -> bool {
    if std::env::var("WALSYNC_TEST_PG_URL").is_ok_and(|u| !u.is_empty()) {
        eprintln!("skipped: WALSYNC_TEST_PG_URL is set, and this test needs its own cluster");
        return true;
    }
    false
}

#[tokio::test]
async fn tls_only_cluster_with_verify_full() -> anyhow::Result<()> {
    if shared_is_external() {
        return Ok(());
    }
    let certs = TestCertificates::generate()?;
    let cluster = Cluster::start(ClusterOptions {
        tls: Some(certs.clone()),
        ..ClusterOptions::default()
    })?;
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &certs.ca_cert_pem)?;
    let wrong_ca = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, TestCertificates::generate()?.ca_cert_pem)?;

    let db = cluster.fresh_database().await?;
    let admin = cluster.connect(&db.name).await?;
    admin.batch_execute(ITEMS).await?;
    admin
        .batch_execute("CREATE PUBLICATION walsync FOR ALL TABLES")
        .await?;

    let url = |q: &str| format!("{}?{q}", db.url);
    // verify-full with the right CA: the whole source works over TLS.
    let good = url(&format!("sslmode=verify-full&sslrootcert={}", ca.display()));
    let mut stream = support::start(&good, Resume::default()).await?;
    let mut c = support::Collector::default();
    c.until(&mut stream, |c| c.snapshot_done.is_some()).await?;
    admin
        .batch_execute("INSERT INTO items VALUES (1, 'secret')")
        .await?;
    c.until(&mut stream, |c| !c.txns.is_empty()).await?;
    stream.stop().await;
    let ssl: bool = admin
        .query_one("SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE client_addr IS NOT NULL", &[])
        .await?
        .get::<_, Option<bool>>(0)
        .unwrap_or(true);
    assert!(ssl);

    // The wrong CA fails on both kinds of connection, as a TLS error naming the problem.
    let bad: PgConfig = url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        wrong_ca.display()
    ))
    .parse()?;
    match ReplicationConnection::connect(&bad).await {
        Err(SourceError::Tls(msg)) => assert!(msg.contains("certificate"), "{msg}"),
        other => panic!("expected a tls error, got {other:?}"),
    }
    match bad.connect().await {
        Err(SourceError::Tls(msg)) => assert!(msg.contains("certificate"), "{msg}"),
        other => panic!("expected a tls error, got {other:?}"),
    }
    let err = Source::start(
        support::config(&bad_url(&db.url, &wrong_ca)),
        Resume::default(),
    )
    .await
    .unwrap_err();
    assert!(
        !err.is_transient(),
        "a certificate problem is not retried: {err}"
    );

    // verify-ca and require also connect; disable is refused by the TLS-only server.
    for mode in [
        format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
        "sslmode=require".to_owned(),
    ] {
        let cfg: PgConfig = url(&mode).parse()?;
        ReplicationConnection::connect(&cfg).await?.close().await?;
        drop(cfg.connect().await?);
    }
    let plain: PgConfig = url("sslmode=disable").parse()?;
    match ReplicationConnection::connect(&plain).await {
        Err(SourceError::Auth(msg)) => assert!(msg.contains("no encryption"), "{msg}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

fn bad_url(base: &str, ca: &std::path::Path) -> String {
    format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display())
}

/// A server that takes the connection and never answers (half-open, a hung host behind a
/// proxy): logging in gives up after the connect timeout with an error to retry, on both kinds
/// of connection, instead of waiting forever.
#[tokio::test]
async fn a_server_that_never_answers_is_given_up_after_the_connect_timeout() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let held = tokio::spawn(async move {
        let mut silent = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            silent.push(socket);
        }
    });
    let pg: PgConfig =
        format!("postgres://walsync@127.0.0.1:{port}/app?connect_timeout=1").parse()?;
    let started = std::time::Instant::now();
    // (Bounded here too, so that a regression fails rather than hangs.)
    let sql = tokio::time::timeout(std::time::Duration::from_secs(30), pg.connect())
        .await
        .map_err(|_| anyhow::anyhow!("an ordinary connection waited 30 s for a silent server"))?;
    assert!(
        matches!(sql, Err(SourceError::Timeout(_))),
        "an ordinary connection: {:?}",
        sql.err()
    );
    let replication = ReplicationConnection::connect(&pg).await;
    assert!(
        matches!(replication, Err(SourceError::Timeout(_))),
        "a replication connection: {:?}",
        replication.err()
    );
    assert!(sql.is_err_and(|e| e.is_transient()));
    eprintln!("both gave up in {:?}", started.elapsed());
    held.abort();
    Ok(())
}
