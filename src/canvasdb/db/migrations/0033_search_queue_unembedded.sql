-- A new model activated over entities with no vector of it.
--
-- A new model's build walks every entity, then the model becomes active and the old
-- vectors are deleted. An entity written once the walk had passed it, and embedded by a
-- process still configured with the old model, had only an old vector: deleted, it left
-- the entity out of semantic search until its next edit. The activation's transaction now
-- queues every entity with text to embed and no current vector of the new model, in every
-- org (hence the schema's owner, not subject to row-level security). A text queued
-- already stays queued as it is, and where it was in the queue.

CREATE FUNCTION search_queue_unembedded(p_model text) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH queued AS (
        INSERT INTO search_queue (org_id, entity_id, needs_terms, embed_md5)
        SELECT s.org_id, s.entity_id, false, s.embed_md5 FROM search_docs s
        WHERE s.embed_md5 IS NOT NULL
          AND NOT EXISTS (SELECT FROM search_vectors v WHERE v.org_id = s.org_id AND v.model = p_model
                          AND v.entity_id = s.entity_id AND v.embed_md5 = s.embed_md5)
        ON CONFLICT (org_id, entity_id) DO UPDATE
            SET embed_md5 = coalesce(search_queue.embed_md5, EXCLUDED.embed_md5)
        RETURNING 1)
    SELECT count(*) FROM queued
$$;

REVOKE ALL ON FUNCTION search_queue_unembedded(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION search_queue_unembedded(text) TO canvasdb_app;
