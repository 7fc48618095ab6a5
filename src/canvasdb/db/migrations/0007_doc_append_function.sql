-- One group commit of the op log as one statement (one round trip, one implicit
-- transaction): for each document, take n sequence numbers under its row lock, insert
-- its n updates with them, and notify canvasdb_docs, which fires when the transaction
-- commits. Documents are given in order with their org and update count; the updates'
-- columns are flat arrays in the same order. A document that no longer exists is
-- skipped (no rows come back for it).
CREATE FUNCTION doc_append(
    p_orgs uuid[], p_docs text[], p_counts integer[],
    p_payloads bytea[], p_users uuid[], p_clients bigint[], p_origin text
) RETURNS TABLE (org_id uuid, doc_id text, seq bigint, at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    i     integer;
    n     integer;
    first integer := 0;  -- offset of document i's updates in the flat arrays
    last  bigint;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_docs, 1), 0) LOOP
        n := p_counts[i];
        -- RLS: each org's rows under its own setting, local to this transaction.
        PERFORM set_config('canvasdb.org_id', p_orgs[i]::text, true);
        UPDATE documents d SET last_seq = d.last_seq + n
        WHERE d.org_id = p_orgs[i] AND d.id = p_docs[i]
        RETURNING d.last_seq INTO last;
        IF FOUND THEN
            RETURN QUERY
            INSERT INTO doc_updates AS u (org_id, doc_id, seq, payload, user_id, client_id)
            SELECT p_orgs[i], p_docs[i], last - n + k, p_payloads[first + k], p_users[first + k],
                   p_clients[first + k]
            FROM generate_series(1, n) AS k
            RETURNING u.org_id, u.doc_id, u.seq, u.at;
            PERFORM pg_notify('canvasdb_docs',
                              'u ' || p_orgs[i] || ' ' || last || ' ' || p_origin || ' ' || p_docs[i]);
        END IF;
        first := first + n;
    END LOOP;
END
$$;
