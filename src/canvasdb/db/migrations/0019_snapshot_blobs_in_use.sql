-- Snapshots too large for their row live in the blob store beside attachments, and content
-- with the same bytes is one blob (content-addressed). blob_in_use asked only about
-- attachments: deleting an attachment whose bytes were a snapshot's deleted the snapshot's
-- blob, and the document could no longer be loaded. It now answers for snapshots too, and
-- the blob of a snapshot that retention deletes is collected like an attachment's.

GRANT SELECT (blob_sha256) ON doc_snapshots TO canvasdb_blob_gc;
CREATE POLICY blob_gc_read ON doc_snapshots FOR SELECT TO canvasdb_blob_gc USING (true);
CREATE INDEX doc_snapshots_by_blob ON doc_snapshots (blob_sha256) WHERE blob_sha256 IS NOT NULL;

CREATE OR REPLACE FUNCTION blob_in_use(p_sha256 text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT FROM public.attachments WHERE sha256 = p_sha256)
        OR EXISTS (SELECT FROM public.doc_snapshots WHERE blob_sha256 = p_sha256)
$$;
