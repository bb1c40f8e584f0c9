//! The seed app's PostgreSQL side, written once for the tests, the benchmarks and `walsync demo`:
//! its schema and sync rules (`examples/seed/`), sample data, a random workload, and, read from
//! PostgreSQL directly, the buckets a user should have and where each row belongs.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

/// The seed app's schema.
pub const SCHEMA: &str = include_str!("../../../examples/seed/schema.sql");
/// The seed app's sync rules.
pub const RULES: &str = include_str!("../../../examples/seed/sync_rules.yaml");
/// Where the rules file lies (for configurations that name a file).
pub const RULES_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/seed/sync_rules.yaml"
);
/// The tables the rules read.
pub const TABLES: &[&str] = &[
    "projects",
    "project_members",
    "stakeholders",
    "teams",
    "assessments",
    "assessment_responses",
    "sow_section_approvals",
    "write_conflicts",
    "rejected_writes",
];
/// The users the sample data and the workload name.
pub const USERS: &[&str] = &["u1", "u2", "u3", "u4"];

/// Sample data: projects, memberships, stakeholders, assessments and 200 responses.
pub const SAMPLE_DATA: &str = "
INSERT INTO projects (id, name) SELECT i, 'project ' || i FROM generate_series(1, 6) i;
INSERT INTO project_members (project_id, user_id, role) VALUES (1, 'u1', 'owner'), (2, 'u1', 'editor'), (2, 'u2', 'owner'), (3, 'u3', 'viewer');
INSERT INTO stakeholders (id, user_id, name) VALUES (1, 'u1', 'Ada'), (2, 'u2', 'Grace');
INSERT INTO assessments (id, project_id, phase) SELECT i, 1 + i % 6, 'discovery' FROM generate_series(1, 12) i;
INSERT INTO assessment_responses (assessment_id, project_id, question_id, answer)
  SELECT 1 + i % 12, 1 + (1 + i % 12) % 6, 'q' || i, repeat('a', 50) FROM generate_series(1, 200) i;";

/// A deterministic random workload: inserts, updates, deletes, assessments moving between
/// projects, members added and removed.
pub async fn workload(sql: &Client, seed: u64, steps: usize) -> Result<(), tokio_postgres::Error> {
    let mut s = seed | 1;
    let mut next = |n: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % n
    };
    for _ in 0..steps {
        let stmt = match next(9) {
            0 => format!(
                "INSERT INTO project_members (project_id, user_id, role) VALUES ({}, '{}', 'editor') ON CONFLICT DO NOTHING",
                1 + next(6),
                USERS[next(4) as usize]
            ),
            1 => format!(
                "DELETE FROM project_members WHERE id = (SELECT id FROM project_members ORDER BY id OFFSET {} LIMIT 1)",
                next(5)
            ),
            2 => format!(
                "UPDATE assessments SET project_id = {} WHERE id = {}",
                1 + next(6),
                1 + next(12)
            ),
            3 => format!(
                "UPDATE assessment_responses SET answer = 'v{}' WHERE id % 17 = {}",
                next(1000),
                next(17)
            ),
            4 => format!(
                "INSERT INTO assessment_responses (assessment_id, project_id, question_id, answer) VALUES ({}, {}, 'new', 'x')",
                1 + next(12),
                1 + next(6)
            ),
            5 => format!(
                "DELETE FROM assessment_responses WHERE id % 23 = {}",
                next(23)
            ),
            6 => format!(
                "UPDATE projects SET description = 'd{}' WHERE id = {}",
                next(100),
                1 + next(6)
            ),
            7 => format!(
                "BEGIN; UPDATE assessments SET tier = 't{0}' WHERE project_id = {1}; INSERT INTO teams (project_id, name) VALUES ({1}, 'team{0}'); COMMIT;",
                next(10),
                1 + next(6)
            ),
            _ => format!(
                "UPDATE stakeholders SET title = 't{}' WHERE id = {}",
                next(10),
                1 + next(2)
            ),
        };
        sql.batch_execute(&stmt).await?;
    }
    Ok(())
}

/// The buckets the seed rules give `user`, read from PostgreSQL: `me["<user>"]` and
/// `user_projects[<id>]` for each project they are a member of.
pub async fn user_buckets(
    sql: &Client,
    user: &str,
) -> Result<BTreeSet<String>, tokio_postgres::Error> {
    let rows = sql
        .query(
            "SELECT DISTINCT project_id FROM project_members WHERE user_id = $1",
            &[&user],
        )
        .await?;
    let mut buckets: BTreeSet<String> = rows
        .iter()
        .map(|r| format!("user_projects[{}]", r.get::<_, i64>(0)))
        .collect();
    buckets.insert(format!("me[\"{user}\"]"));
    Ok(buckets)
}

/// Where the seed rules place each row, computed in SQL from PostgreSQL alone (not through the
/// rules engine): bucket → (object type, object id). A project's rows go to
/// `user_projects[<project id>]`, a stakeholder and a rejected upload to `me["<user id>"]`.
pub async fn expected_placements(
    sql: &Client,
) -> Result<BTreeMap<String, BTreeSet<(String, String)>>, tokio_postgres::Error> {
    let rows = sql
        .query(
            "SELECT 'user_projects[' || id || ']', 'projects', id::text FROM projects
             UNION ALL SELECT 'user_projects[' || project_id || ']', 'assessments', id::text FROM assessments WHERE project_id IS NOT NULL
             UNION ALL SELECT 'user_projects[' || project_id || ']', 'assessment_responses', id::text FROM assessment_responses WHERE project_id IS NOT NULL
             UNION ALL SELECT 'user_projects[' || project_id || ']', 'project_members', id::text FROM project_members WHERE project_id IS NOT NULL
             UNION ALL SELECT 'user_projects[' || project_id || ']', 'teams', id::text FROM teams WHERE project_id IS NOT NULL
             UNION ALL SELECT 'user_projects[' || project_id || ']', 'sow_section_approvals', id::text FROM sow_section_approvals WHERE project_id IS NOT NULL
             UNION ALL SELECT 'user_projects[' || scope || ']', 'write_conflicts', id::text FROM write_conflicts WHERE scope IS NOT NULL
             UNION ALL SELECT 'me[' || to_json(user_id)::text || ']', 'stakeholders', id::text FROM stakeholders WHERE user_id IS NOT NULL
             UNION ALL SELECT 'me[' || to_json(user_id)::text || ']', 'rejected_writes', id::text FROM rejected_writes",
            &[],
        )
        .await?;
    let mut out: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for r in rows {
        out.entry(r.get(0))
            .or_default()
            .insert((r.get(1), r.get(2)));
    }
    Ok(out)
}
