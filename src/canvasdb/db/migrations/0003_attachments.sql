-- Attachments: an org's named keys, each pointing at content in the blob store.
-- The content is addressed by its SHA-256 and shared by every key, in any org, that
-- holds the same bytes; it is removed when the last row that points at it is gone.

CREATE TABLE attachments (
    org_id        uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    key           text NOT NULL CHECK (length(key) BETWEEN 1 AND 512 AND key ~ '^[A-Za-z0-9._/-]+$'),
    sha256        text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size          bigint NOT NULL CHECK (size >= 0),
    content_type  text NOT NULL CHECK (length(content_type) BETWEEN 1 AND 255),
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    uuid,
    PRIMARY KEY (org_id, key)
);
-- For one question only, asked across orgs: does any row still point at this content?
CREATE INDEX attachments_by_sha256 ON attachments (sha256);

ALTER TABLE attachments ENABLE ROW LEVEL SECURITY;
ALTER TABLE attachments FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON attachments
    USING (org_id = current_org_id()) WITH CHECK (org_id = current_org_id());
GRANT SELECT, INSERT, UPDATE, DELETE ON attachments TO canvasdb_app;

-- Whether content is still referenced is a question about every org, which canvasdb_app
-- cannot see (and FORCE makes even the tables' owner subject to the policy above). So a
-- dedicated role, which no login uses and canvasdb_app is not a member of, may read the
-- sha256 column of every row, and owns the one function that asks; the application gets
-- nothing from it but a boolean about a hash it already knows.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'canvasdb_blob_gc') THEN
        CREATE ROLE canvasdb_blob_gc NOLOGIN NOSUPERUSER NOBYPASSRLS;
    END IF;
END $$;
GRANT canvasdb_blob_gc TO CURRENT_USER;
GRANT USAGE ON SCHEMA public TO canvasdb_blob_gc;
GRANT SELECT (sha256) ON attachments TO canvasdb_blob_gc;
CREATE POLICY blob_gc_read ON attachments FOR SELECT TO canvasdb_blob_gc USING (true);

CREATE FUNCTION blob_in_use(p_sha256 text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT FROM public.attachments WHERE sha256 = p_sha256)
$$;
-- Changing the owner needs CREATE on the schema for a moment; the role keeps none.
GRANT CREATE ON SCHEMA public TO canvasdb_blob_gc;
ALTER FUNCTION blob_in_use(text) OWNER TO canvasdb_blob_gc;
REVOKE CREATE ON SCHEMA public FROM canvasdb_blob_gc;
REVOKE ALL ON FUNCTION blob_in_use(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION blob_in_use(text) TO canvasdb_app;
