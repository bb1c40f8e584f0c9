-- The seed app's row-level security, for `[writes] mode = "postgres_rls"`: the same rules as
-- the predicates in examples/walsync.toml, enforced by PostgreSQL. Uploads run as role
-- `authenticated` with the token's claims set; auth.uid() is the token's subject (walsync
-- creates it when the database has none, as on Supabase). Run after walsync first started
-- with writes in this mode, or after creating auth.uid() yourself.

DO $$ BEGIN
  CREATE ROLE authenticated NOLOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
GRANT authenticated TO CURRENT_USER;
GRANT USAGE ON SCHEMA public TO authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO authenticated;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO authenticated;
-- Only walsync writes the dead letters.
REVOKE ALL ON rejected_writes FROM authenticated;

-- The user's role in a project (null: not a member). SECURITY DEFINER: a policy on
-- project_members that read project_members itself would recurse.
CREATE OR REPLACE FUNCTION public.project_role(p bigint) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
  SELECT role FROM project_members WHERE project_id = p AND user_id = auth.uid()::text
$$;
CREATE OR REPLACE FUNCTION public.project_has_members(p bigint) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
  SELECT EXISTS (SELECT 1 FROM project_members WHERE project_id = p)
$$;

ALTER TABLE projects ENABLE ROW LEVEL SECURITY;
CREATE POLICY projects_read ON projects FOR SELECT USING (project_role(id) IS NOT NULL);
CREATE POLICY projects_create ON projects FOR INSERT WITH CHECK (true);
CREATE POLICY projects_edit ON projects FOR UPDATE USING (project_role(id) IN ('owner', 'editor'));
CREATE POLICY projects_delete ON projects FOR DELETE USING (project_role(id) = 'owner');

ALTER TABLE project_members ENABLE ROW LEVEL SECURITY;
CREATE POLICY members_read ON project_members FOR SELECT USING (project_role(project_id) IS NOT NULL);
CREATE POLICY members_add ON project_members FOR INSERT WITH CHECK (
  project_role(project_id) = 'owner'
  OR (NOT project_has_members(project_id) AND user_id = auth.uid()::text AND role = 'owner'));
CREATE POLICY members_edit ON project_members FOR UPDATE
  USING (project_role(project_id) = 'owner') WITH CHECK (project_role(project_id) = 'owner');
CREATE POLICY members_remove ON project_members FOR DELETE
  USING (project_role(project_id) = 'owner' OR user_id = auth.uid()::text);

-- Any member writes a project's responses (the seed plan's own policy).
ALTER TABLE assessment_responses ENABLE ROW LEVEL SECURITY;
CREATE POLICY responses_members ON assessment_responses FOR ALL
  USING (project_role(project_id) IS NOT NULL) WITH CHECK (project_role(project_id) IS NOT NULL);

-- Owners and editors write assessments, teams and approvals; members read them.
ALTER TABLE assessments ENABLE ROW LEVEL SECURITY;
CREATE POLICY assessments_read ON assessments FOR SELECT USING (project_role(project_id) IS NOT NULL);
CREATE POLICY assessments_write ON assessments FOR ALL
  USING (project_role(project_id) IN ('owner', 'editor')) WITH CHECK (project_role(project_id) IN ('owner', 'editor'));
ALTER TABLE teams ENABLE ROW LEVEL SECURITY;
CREATE POLICY teams_read ON teams FOR SELECT USING (project_role(project_id) IS NOT NULL);
CREATE POLICY teams_write ON teams FOR ALL
  USING (project_role(project_id) IN ('owner', 'editor')) WITH CHECK (project_role(project_id) IN ('owner', 'editor'));
ALTER TABLE sow_section_approvals ENABLE ROW LEVEL SECURITY;
CREATE POLICY approvals_read ON sow_section_approvals FOR SELECT USING (project_role(project_id) IS NOT NULL);
CREATE POLICY approvals_write ON sow_section_approvals FOR ALL
  USING (project_role(project_id) IN ('owner', 'editor')) WITH CHECK (project_role(project_id) IN ('owner', 'editor'));

-- A user's own stakeholder record.
ALTER TABLE stakeholders ENABLE ROW LEVEL SECURITY;
CREATE POLICY stakeholders_own ON stakeholders FOR ALL
  USING (user_id = auth.uid()::text) WITH CHECK (user_id = auth.uid()::text);
