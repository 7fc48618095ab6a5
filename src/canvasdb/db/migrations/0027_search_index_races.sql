-- Search rows that race: a type re-declared while its entities are written, and a vector
-- stored while its entity's text goes.
--
-- A type's re-declaration re-indexes its entities (types.py) from what its statement sees:
-- an entity written meanwhile, not yet committed, kept the search row its write made with
-- the old declaration (a new entity was not seen at all), or had it overwritten from its
-- old data. Writes of a type's entities now hold a shared lock on (org, type) to their
-- commit, and a re-declaration takes it exclusively: it waits for the writes under way, and
-- those that follow read the new declaration.
--
-- The indexer stores a vector only where the search row still has the hash of the text it
-- embedded, and locks those rows first (indexer.py). A write that leaves no text to embed
-- deleted the entity's vector before updating its search row (0010), so a vector stored
-- between the two stayed, and semantic search found the entity by text it no longer had.
-- The vector is now deleted again once the row is updated (its lock held, the indexer's
-- vector committed and seen).

-- The advisory lock of an org's type.
CREATE FUNCTION search_type_lock_key(p_org uuid, p_type text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN hashtextextended('canvasdb.search_type:' || p_org::text || ':' || p_type, 0);

CREATE OR REPLACE FUNCTION entity_search_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(search_type_lock_key(NEW.org_id, NEW.type));
    PERFORM search_index_entity(NEW.org_id, NEW.id, NEW.project_id, NEW.type, NEW.data, NEW.deleted,
                                NEW.updated_at);
    RETURN NULL;
END $$;

-- Taken by a type's re-declaration before it re-indexes the type's entities.
CREATE FUNCTION search_type_redeclared(p_org uuid, p_type text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(search_type_lock_key(p_org, p_type))
$$;

CREATE FUNCTION search_docs_unembedded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM search_vectors WHERE org_id = NEW.org_id AND entity_id = NEW.entity_id;
    RETURN NULL;
END $$;

CREATE TRIGGER search_docs_unembedded AFTER UPDATE OF embed_md5 ON search_docs
    FOR EACH ROW WHEN (NEW.embed_md5 IS NULL AND OLD.embed_md5 IS NOT NULL)
    EXECUTE FUNCTION search_docs_unembedded();

GRANT EXECUTE ON FUNCTION search_type_lock_key(uuid, text), search_type_redeclared(uuid, text),
    search_docs_unembedded() TO canvasdb_app;
