-- Runs once per shard at first start (as the postgres superuser, in database "app").
-- These policies read the unverified setting: for the verified context run
-- `pgtenant shard init` against the shard, set context_key_file, and make the policies read
-- (SELECT pgtenant.tenant_id()) (README, "Security model").
CREATE ROLE pgtenant_app LOGIN PASSWORD 'change-me' NOSUPERUSER NOBYPASSRLS;
CREATE TABLE items (
    id bigserial PRIMARY KEY,
    tenant_id uuid NOT NULL DEFAULT current_setting('app.current_tenant_id')::uuid,
    name text NOT NULL
);
ALTER TABLE items ENABLE ROW LEVEL SECURITY;
ALTER TABLE items FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON items
    USING (tenant_id = NULLIF(current_setting('app.current_tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('app.current_tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON items TO pgtenant_app;
GRANT USAGE ON SEQUENCE items_id_seq TO pgtenant_app;
