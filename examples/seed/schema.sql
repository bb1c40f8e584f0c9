-- The seed app's schema: an offline-first interview-assessment app (see the sync architecture
-- plan). Every synced table has a primary key and the sync metadata columns; a trigger bumps
-- _version on each update.

CREATE TABLE projects (
  id BIGSERIAL PRIMARY KEY,
  name TEXT NOT NULL,
  organization_name TEXT,
  description TEXT,
  transformation_path TEXT,
  status TEXT,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  _version BIGINT NOT NULL DEFAULT 1,
  _last_modified_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  _last_modified_by TEXT
);

CREATE TABLE project_members (
  id BIGSERIAL PRIMARY KEY,
  project_id BIGINT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
  user_id TEXT NOT NULL,
  role TEXT NOT NULL CHECK (role IN ('owner', 'editor', 'viewer')),
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  _version BIGINT NOT NULL DEFAULT 1,
  _last_modified_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  _last_modified_by TEXT,
  UNIQUE (project_id, user_id)
);

CREATE TABLE stakeholders (
  id BIGSERIAL PRIMARY KEY,
  user_id TEXT NOT NULL,
  name TEXT NOT NULL,
  title TEXT,
  email TEXT,
  _version BIGINT NOT NULL DEFAULT 1,
  _last_modified_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  _last_modified_by TEXT
);

CREATE TABLE teams (
  id BIGSERIAL PRIMARY KEY,
  project_id BIGINT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  _version BIGINT NOT NULL DEFAULT 1,
  _last_modified_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  _last_modified_by TEXT
);

CREATE TABLE assessments (
  id BIGSERIAL PRIMARY KEY,
  project_id BIGINT NOT NULL REFERENCES projects(id),
  phase TEXT,
  tier TEXT,
  completion_percentage INT NOT NULL DEFAULT 0,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  _version BIGINT NOT NULL DEFAULT 1,
  _last_modified_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  _last_modified_by TEXT
);

CREATE TABLE assessment_responses (
  id BIGSERIAL PRIMARY KEY,
  assessment_id BIGINT REFERENCES assessments(id),
  project_id BIGINT REFERENCES projects(id),
  question_id TEXT,
  question_text TEXT,
  answer TEXT,
  notes TEXT,
  priority TEXT,
  answered_by BIGINT REFERENCES stakeholders(id),
  answered_at TIMESTAMPTZ,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  _version BIGINT NOT NULL DEFAULT 1,
  _last_modified_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  _last_modified_by TEXT
);

CREATE TABLE sow_section_approvals (
  id BIGSERIAL PRIMARY KEY,
  project_id BIGINT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
  section TEXT NOT NULL,
  approved_by TEXT,
  approved_at TIMESTAMPTZ,
  _version BIGINT NOT NULL DEFAULT 1,
  _last_modified_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  _last_modified_by TEXT
);

-- Write conflicts left for a person to decide (walsync's `manual` strategy). walsync creates
-- this table when it is missing; declaring it here gives `scope` the type of a project id, so
-- the sync rules put each conflict in its project's bucket.
CREATE TABLE write_conflicts (
  id BIGSERIAL PRIMARY KEY,
  table_name TEXT NOT NULL,
  row_id TEXT NOT NULL,
  column_name TEXT NOT NULL,
  base_value TEXT,
  client_value TEXT,
  server_value TEXT,
  scope BIGINT,
  user_id TEXT NOT NULL,
  client_id TEXT NOT NULL,
  op_id BIGINT,
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  resolution TEXT,
  resolved_by TEXT,
  resolved_at TIMESTAMPTZ
);

-- Uploads walsync rejected (its dead letters), each whole with who sent it, when and why.
-- walsync creates this table when it is missing; declaring it here lets the sync rules give
-- each to its author before the first upload.
CREATE TABLE rejected_writes (
  id BIGSERIAL PRIMARY KEY,
  user_id TEXT NOT NULL,
  client_id TEXT NOT NULL,
  tx_key TEXT NOT NULL,
  ops JSONB NOT NULL,
  code TEXT NOT NULL,
  message TEXT NOT NULL,
  op_id BIGINT,
  claims JSONB NOT NULL DEFAULT '{}',
  rejected_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  replayed_at TIMESTAMPTZ
);

CREATE OR REPLACE FUNCTION increment_version() RETURNS trigger AS $$
BEGIN
  NEW._version := OLD._version + 1;
  NEW._last_modified_at := now();
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['projects', 'project_members', 'stakeholders', 'teams', 'assessments',
                           'assessment_responses', 'sow_section_approvals'] LOOP
    EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE ON %I FOR EACH ROW EXECUTE FUNCTION increment_version()',
                   t || '_version', t);
  END LOOP;
END $$;
