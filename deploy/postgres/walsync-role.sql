-- The least-privileged role walsync needs: it replicates, reads the published tables for the
-- initial copy, and (with create_publication = true) may create the publication, which needs
-- ownership of the tables or a publication made by their owner instead:
--   CREATE PUBLICATION walsync FOR TABLE projects, project_members, ...;  -- as the owner
CREATE ROLE walsync WITH LOGIN REPLICATION PASSWORD 'walsync';
GRANT CONNECT ON DATABASE app TO walsync;
GRANT USAGE ON SCHEMA public TO walsync;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO walsync;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO walsync;
-- The publication, made here by the tables' owner so that walsync needs no ownership.
CREATE PUBLICATION walsync FOR ALL TABLES WITH (publish_via_partition_root = true);
-- The schema of a store kept in PostgreSQL (storage.postgres, a scaled-out walsync), made
-- here so that walsync needs no CREATE on the database; walsync makes its tables in it.
CREATE SCHEMA walsync_store AUTHORIZATION walsync;
