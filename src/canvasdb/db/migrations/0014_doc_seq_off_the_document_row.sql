-- The op log's sequence numbers no longer live on the document's row.
--
-- Every group commit used to update documents.last_seq. An update leaves a new row
-- version behind, and while any transaction stays open anywhere in the database (a long
-- report, a logical dump), vacuum may remove none of them: every later commit of that
-- document walked the growing chain, and one document's commits fell from 3,800/s to
-- 300/s within minutes in a test. A commit now only inserts: it takes an advisory lock
-- of the document for the rest of its transaction (appenders of one document queue
-- there, as they queued on the row lock) and continues from the last sequence number
-- in the log, or in the newest snapshot once retention has pruned the log (the newest
-- snapshot always stays, and prunes only cover updates a snapshot holds).

-- The document's last sequence number (0 before its first update). The log's primary
-- key and the snapshots' answer it from the end of an index each.
CREATE FUNCTION doc_last_seq(p_org uuid, p_doc text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT greatest(
        (SELECT max(u.seq) FROM doc_updates u WHERE u.org_id = p_org AND u.doc_id = p_doc),
        (SELECT max(s.seq) FROM doc_snapshots s WHERE s.org_id = p_org AND s.doc_id = p_doc),
        0)
$$;

-- As in 0007, with advisory locks instead of row updates. A document's lock key is
-- (0x63646232 "cdb2", a hash of org and document): a shared hash only makes two
-- documents take turns. A batch takes all its locks first, in key order, so that
-- batches of several documents (from several gateways) never wait on each other in a
-- circle; the last numbers are read after, by statements whose snapshots see what the
-- previous holders committed.
CREATE OR REPLACE FUNCTION doc_append(
    p_orgs uuid[], p_docs text[], p_counts integer[],
    p_payloads bytea[], p_users uuid[], p_clients bigint[], p_origin text
) RETURNS TABLE (org_id uuid, doc_id text, seq bigint, at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    i     integer;
    n     integer;
    first integer := 0;  -- offset of document i's updates in the flat arrays
    last  bigint;
    key   integer;
BEGIN
    FOR key IN SELECT DISTINCT hashtext(o::text || '/' || d) FROM unnest(p_orgs, p_docs) AS t(o, d)
               ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(x'63646232'::integer, key);
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(p_docs, 1), 0) LOOP
        n := p_counts[i];
        -- RLS: each org's rows under its own setting, local to this transaction.
        PERFORM set_config('canvasdb.org_id', p_orgs[i]::text, true);
        SELECT doc_last_seq(d.org_id, d.id) INTO last FROM documents d
        WHERE d.org_id = p_orgs[i] AND d.id = p_docs[i];
        IF FOUND THEN  -- (a document that no longer exists is skipped)
            RETURN QUERY
            INSERT INTO doc_updates AS u (org_id, doc_id, seq, payload, user_id, client_id)
            SELECT p_orgs[i], p_docs[i], last + k, p_payloads[first + k], p_users[first + k],
                   p_clients[first + k]
            FROM generate_series(1, n) AS k
            RETURNING u.org_id, u.doc_id, u.seq, u.at;
            PERFORM pg_notify('canvasdb_docs',
                              'u ' || p_orgs[i] || ' ' || (last + n) || ' ' || p_origin || ' ' || p_docs[i]);
        END IF;
        first := first + n;
    END LOOP;
END
$$;

ALTER TABLE documents DROP COLUMN last_seq;

GRANT EXECUTE ON FUNCTION doc_last_seq(uuid, text) TO canvasdb_app;
