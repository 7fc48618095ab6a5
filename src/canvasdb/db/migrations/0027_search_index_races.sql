-- A vector stored while its entity's text goes. (A type re-declared while its entities are
-- written is 0025's: writes hold the type's lock shared, a re-declaration takes it alone.)
--
-- The indexer stores a vector only where the search row still has the hash of the text it
-- embedded, and locks those rows first (indexer.py). A write that leaves no text to embed
-- deleted the entity's vector before updating its search row (0010), so a vector stored
-- between the two stayed, and semantic search found the entity by text it no longer had.
-- The vector is now deleted again once the row is updated (its lock held, the indexer's
-- vector committed and seen).

CREATE FUNCTION search_docs_unembedded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM search_vectors WHERE org_id = NEW.org_id AND entity_id = NEW.entity_id;
    RETURN NULL;
END $$;

CREATE TRIGGER search_docs_unembedded AFTER UPDATE OF embed_md5 ON search_docs
    FOR EACH ROW WHEN (NEW.embed_md5 IS NULL AND OLD.embed_md5 IS NOT NULL)
    EXECUTE FUNCTION search_docs_unembedded();

GRANT EXECUTE ON FUNCTION search_docs_unembedded() TO canvasdb_app;
