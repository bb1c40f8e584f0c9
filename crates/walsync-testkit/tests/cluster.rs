use walsync_testkit::shared;

#[tokio::test]
async fn shared_cluster_is_logical_and_gives_fresh_databases() -> anyhow::Result<()> {
    let cluster = shared();
    let a = cluster.fresh_database().await?;
    let b = cluster.fresh_database().await?;
    assert_ne!(a.name, b.name);
    let client = a.connect().await?;
    let row = client.query_one("SHOW wal_level", &[]).await?;
    assert_eq!(row.get::<_, String>(0), "logical");
    let row = client.query_one("SELECT current_database()", &[]).await?;
    assert_eq!(row.get::<_, String>(0), a.name);
    Ok(())
}
