-- Undeleting an entity brings back the relationships its deletion hid, and those were not
-- checked for cycles: while the entity was deleted, a path the other way could be made (its
-- edges were hidden, so no cycle was seen then), and the undeletion closed the cycle that an
-- acyclic kind forbids. The check runs after entity_relationships_sync has brought them back
-- (AFTER triggers fire in name order), in turn with the other makers of the kind (0018).
CREATE FUNCTION entity_undelete_keeps_acyclic() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT e.src, e.dst, e.kind FROM relationships e
        JOIN entities s ON s.org_id = e.org_id AND s.id = e.src
        JOIN entity_types t ON t.org_id = s.org_id AND t.name = s.type
        WHERE e.org_id = NEW.org_id AND (e.src = NEW.id OR e.dst = NEW.id) AND e.live
          AND t.acyclic_kinds ? e.kind
        ORDER BY e.kind, e.src, e.dst
    LOOP
        PERFORM relationship_kind_lock(NEW.org_id, r.kind);
        IF relationship_reaches(NEW.org_id, r.dst, r.src, r.kind) THEN
            RAISE EXCEPTION 'undeleting entity % would close a % cycle through entity %', NEW.id, r.kind,
                CASE WHEN r.src = NEW.id THEN r.dst ELSE r.src END
                USING ERRCODE = 'check_violation', CONSTRAINT = 'relationships_acyclic';
        END IF;
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER entity_undelete_keeps_acyclic AFTER UPDATE OF deleted ON entities
    FOR EACH ROW WHEN (OLD.deleted AND NOT NEW.deleted)
    EXECUTE FUNCTION entity_undelete_keeps_acyclic();

GRANT EXECUTE ON FUNCTION entity_undelete_keeps_acyclic() TO canvasdb_app;
