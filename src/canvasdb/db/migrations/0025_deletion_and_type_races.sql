-- Races that 0018 left open: an undeletion, and a type's new search fields.
--
-- 1. An undeletion did not wait for the makers of relationships (0018 made only a deletion
--    wait): a reference written to an entity while it was being undeleted was made hidden
--    (its target was deleted when read), and the undeletion, not seeing it, never brought it
--    back. A change of `deleted` either way now locks the entity FOR UPDATE first. (A write
--    adding references of an acyclic kind to two entities, one being undeleted and having
--    edges of that kind, can now deadlock with that undeletion: the writer holds the kind's
--    turn while it waits for the second target, which the undeletion holds while it waits
--    for the turn. PostgreSQL cancels one of them, which answers 409 with `retry`.)
-- 2. Whether a relationship is hidden was decided from the other end as the change's
--    statement first saw it: undeleting one end while the other was deleted (or undeleted) at
--    once, the second to update the relationship waited for the first's row lock, then wrote
--    what it had computed before that commit, and left the relationship live with a deleted
--    end (or hidden with both ends live). A change of `deleted` now locks its relationships
--    (in id order, as every such change does) before the entity row changes, so the
--    statements of entity_relationships_sync that follow read the other end as committed by
--    whoever held them before.
-- 3. Registering a type whose search fields changed indexes its entities again in the same
--    transaction, but an entity written meanwhile was indexed by its writer with the old
--    fields, and by the registration with its data before that write: the entity stayed
--    indexed by the old fields or by its old data (whichever wrote the search row last).
--    Writing an entity now holds its type's lock shared until the commit (taken by the search
--    trigger before it reads the type), and registering takes it alone first
--    (entity_type_lock_key), so either comes after the other's commit.

CREATE OR REPLACE FUNCTION entity_delete_waits_for_relationships() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM FROM entities e WHERE e.org_id = OLD.org_id AND e.id = OLD.id FOR UPDATE;
    PERFORM FROM relationships r WHERE r.org_id = OLD.org_id AND (r.src = OLD.id OR r.dst = OLD.id)
    ORDER BY r.id FOR NO KEY UPDATE;
    RETURN NEW;
END $$;
DROP TRIGGER entity_delete_waits_for_relationships ON entities;
CREATE TRIGGER entity_delete_waits_for_relationships BEFORE UPDATE OF deleted ON entities
    FOR EACH ROW WHEN (OLD.deleted IS DISTINCT FROM NEW.deleted)
    EXECUTE FUNCTION entity_delete_waits_for_relationships();

-- The advisory lock of one type of one org: taken shared to index its entities, alone to
-- change what search reads of it.
CREATE FUNCTION entity_type_lock_key(p_org uuid, p_type text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hashtextextended('canvasdb.type:' || p_org::text || ':' || p_type, 0);
$$;

-- As in 0010, with the type's lock taken (shared) before search_index_entity reads the type.
CREATE OR REPLACE FUNCTION entity_search_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(entity_type_lock_key(NEW.org_id, NEW.type));
    PERFORM search_index_entity(NEW.org_id, NEW.id, NEW.project_id, NEW.type, NEW.data, NEW.deleted,
                                NEW.updated_at);
    RETURN NULL;
END $$;

GRANT EXECUTE ON FUNCTION entity_type_lock_key(uuid, text) TO canvasdb_app;
