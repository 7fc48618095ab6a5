-- One statement queues entities' texts for embedding.
--
-- The indexer queued the texts its embedder failed alone (at the back of the queue, so
-- that they hold back no other), and the activation of a new model queued the entities
-- with no vector of it (0033, each where it was in the queue), with two copies of nearly
-- the same upsert. Both now call search_queue_texts.
--
-- search_queue_texts queues the current text of each of p_entities (those with text to
-- embed) in p_org. A text queued already stays queued as it is: it may be newer than the
-- one the caller saw (a write just made). p_to_back: the entities go behind everything
-- queued so far (those queued already too); otherwise a queued one keeps its place. The
-- rows are taken in id order, as writes lock them. It runs as its caller: under
-- row-level security for the application, in every org for search_queue_unembedded (the
-- schema's owner).

CREATE FUNCTION search_queue_texts(p_org uuid, p_entities uuid[], p_to_back boolean) RETURNS bigint
LANGUAGE sql SET search_path = public, pg_temp AS $$
    WITH queued AS (
        INSERT INTO search_queue AS q (org_id, entity_id, needs_terms, embed_md5)
        SELECT s.org_id, s.entity_id, false, s.embed_md5 FROM search_docs s
        WHERE s.org_id = p_org AND s.entity_id = ANY (p_entities) AND s.embed_md5 IS NOT NULL
        ORDER BY s.entity_id
        ON CONFLICT (org_id, entity_id) DO UPDATE
            SET embed_md5 = coalesce(q.embed_md5, EXCLUDED.embed_md5),
                queued_at = CASE WHEN p_to_back THEN EXCLUDED.queued_at ELSE q.queued_at END
        RETURNING 1)
    SELECT count(*) FROM queued
$$;

CREATE OR REPLACE FUNCTION search_queue_unembedded(p_model text) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT coalesce(sum(search_queue_texts(u.org_id, u.entities, false)), 0)::bigint
    FROM (SELECT s.org_id, array_agg(s.entity_id) AS entities FROM search_docs s
          WHERE s.embed_md5 IS NOT NULL
            AND NOT EXISTS (SELECT FROM search_vectors v WHERE v.org_id = s.org_id AND v.model = p_model
                            AND v.entity_id = s.entity_id AND v.embed_md5 = s.embed_md5)
          GROUP BY s.org_id ORDER BY s.org_id) u
$$;

REVOKE ALL ON FUNCTION search_queue_texts(uuid, uuid[], boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION search_queue_texts(uuid, uuid[], boolean) TO canvasdb_app;
