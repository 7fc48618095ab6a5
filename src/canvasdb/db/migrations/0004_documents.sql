-- Live Yjs documents: each update appended to an op log before it is acknowledged;
-- snapshots (by compaction) cover a prefix of the log.

CREATE TABLE documents (
    org_id        uuid NOT NULL,
    id            text NOT NULL CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$'),
    project_id    uuid NOT NULL,
    kind          text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_-]{0,31}$'),
    entity_id     uuid,
    last_seq      bigint NOT NULL DEFAULT 0,   -- the newest update's sequence number
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_by    uuid,
    PRIMARY KEY (org_id, id),
    FOREIGN KEY (org_id, project_id) REFERENCES projects (org_id, id)
);

-- The op log. seq is dense per document (1, 2, ...), assigned under the row lock of
-- documents.last_seq, so several gateways appending to one document never collide.
CREATE TABLE doc_updates (
    org_id     uuid NOT NULL,
    doc_id     text NOT NULL,
    seq        bigint NOT NULL,
    payload    bytea NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    user_id    uuid,
    client_id  bigint,
    PRIMARY KEY (org_id, doc_id, seq)
);

-- A snapshot holds the document's whole state after update `seq`: inline, or in the
-- blob store (blob_sha256) when large.
CREATE TABLE doc_snapshots (
    org_id       uuid NOT NULL,
    doc_id       text NOT NULL,
    seq          bigint NOT NULL,
    state        bytea,
    blob_sha256  text,
    size         bigint NOT NULL,
    at           timestamptz NOT NULL,   -- time of update `seq`
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (org_id, doc_id, seq),
    CHECK ((state IS NULL) <> (blob_sha256 IS NULL))
);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['documents', 'doc_updates', 'doc_snapshots'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I USING (org_id = current_org_id()) '
                       'WITH CHECK (org_id = current_org_id())', t);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO canvasdb_app', t);
    END LOOP;
END $$;
