-- An undeletion refused because it would close a cycle (0022) named the entity at the other
-- end of the edge that closed it, which may be in a project the caller cannot read. The
-- rule counts every edge of the org, so a refusal tells that some path exists; it no longer
-- tells through which entity.
CREATE OR REPLACE FUNCTION entity_undelete_keeps_acyclic() RETURNS trigger LANGUAGE plpgsql AS $$
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
            RAISE EXCEPTION 'undeleting entity % would close a % cycle', NEW.id, r.kind
                USING ERRCODE = 'check_violation', CONSTRAINT = 'relationships_acyclic';
        END IF;
    END LOOP;
    RETURN NULL;
END $$;
