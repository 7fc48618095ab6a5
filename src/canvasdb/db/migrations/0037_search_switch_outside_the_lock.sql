-- The switch of embedding model queues most entities before it takes the registry's lock.
--
-- The activation of a new model queued every entity with no vector of it (0033) while it
-- held the lock on search_models that every store of vectors waits for: a scan of every
-- org's search rows against the vectors, long on a large deployment (and cut by the
-- statement timeout there, so the model never became active). It now queues them first,
-- without the lock. What that pass missed is only what a store of another model took off
-- the queue meanwhile (a process still configured with the old model): such a store
-- left a vector stamped after the pass began, and the second pass, under the lock, looks
-- at those alone, found through the index below.
--
-- search_queue_unembedded(p_model, p_stored_since) queues, in every org, the entities with
-- text to embed and no current vector of p_model that have a vector of another model
-- stored at or after p_stored_since. (The one-argument form, every such entity, stays for
-- the first pass and for processes of the previous release during an upgrade.)

CREATE INDEX search_vectors_embedded_at ON search_vectors (embedded_at);

CREATE FUNCTION search_queue_unembedded(p_model text, p_stored_since timestamptz) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT coalesce(sum(search_queue_texts(u.org_id, u.entities, false)), 0)::bigint
    FROM (SELECT s.org_id, array_agg(s.entity_id) AS entities
          FROM (SELECT DISTINCT o.org_id, o.entity_id FROM search_vectors o
                WHERE o.embedded_at >= p_stored_since AND o.model <> p_model) o
          JOIN search_docs s ON s.org_id = o.org_id AND s.entity_id = o.entity_id
          WHERE s.embed_md5 IS NOT NULL
            AND NOT EXISTS (SELECT FROM search_vectors v WHERE v.org_id = s.org_id AND v.model = p_model
                            AND v.entity_id = s.entity_id AND v.embed_md5 = s.embed_md5)
          GROUP BY s.org_id ORDER BY s.org_id) u
$$;

REVOKE ALL ON FUNCTION search_queue_unembedded(text, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION search_queue_unembedded(text, timestamptz) TO canvasdb_app;
