-- One lock order for every maker, changer, deleter and undeleter of relationships.
--
-- The deadlocks this removes (PostgreSQL cancelled one side, which answered 409 with
-- `retry`):
-- 1. A write adding references of an acyclic kind to a and b (in id order) while b, which
--    has edges of that kind, was undeleted (0025, point 1): the writer took the kind's turn
--    after locking a, then waited for b, which the undeletion held while it waited for the
--    turn before its own cycle check (0022).
-- 2. Two writes adding references of two acyclic kinds, each took the turn of a kind at its
--    first target and waited for the other's at its second (their targets' id orders gave
--    the kinds in opposite orders).
-- 3. Restoring a deleted entity to a version with references (an undeletion and a write at
--    once) locked its relationships first (0025, point 2), then the targets: a deletion or
--    undeletion of a target, holding it, waited for a relationship between the two. And it
--    took the turns of its new references' kinds, then those of its relationships' (0022),
--    each set in kind order but not the two together.
-- (A relationship made through the API locked its source, then its target: a group commit
-- deleting both, in id order, deadlocked with one from the later to the earlier. The
-- application now locks the two ends in id order.)
--
-- The order, which every path now follows:
--   a. entity rows: the entity written, deleted, undeleted or restored (its own row, FOR
--      UPDATE when `deleted` changes); then the entities it newly references, or a new
--      relationship's two ends, FOR KEY SHARE, in id order;
--   b. relationship rows: a deletion's or undeletion's, in id order (0025), those that a
--      write of references deletes, brings back or makes, and the one the API changes
--      (PATCH, DELETE, undelete: locked before If-Match is checked);
--   c. the turns of acyclic kinds (relationship_kind_lock), in kind order, each taken
--      before the cycle checks of its kind. A new relationship of a reference is checked
--      after it is written, which finds the same cycles: a path from its target back to
--      its source never needs the new edge, which leaves the source. (The API's creation
--      takes the turn, then inserts: a new row, which no one else can be waiting for.)
-- An entity write also takes its type's search lock (0025, point 3), shared: writers never
-- wait for each other on it, and a type's registration, which takes it alone, holds none
-- of the locks above (a shared request queued behind a waiting registration is let pass by
-- PostgreSQL's deadlock check, not cancelled). A group commit changes its entities one
-- after the other (in (org, id) order), so one change's turns may come before the next
-- one's rows: a deadlock there fails the batch, and each change is written again alone
-- (entities/changes.py).

-- The references of `p_data` under the reference fields `p_refs`: the kind (the field's
-- last name, lower case), the value as text (an entity id, unchecked) and the field.
CREATE FUNCTION entity_reference_targets(p_refs jsonb, p_data jsonb)
RETURNS TABLE (kind text, target text, path text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT DISTINCT lower(substring(p.path FROM '([A-Za-z_][A-Za-z0-9_]*)(\[\*\])?$')), v #>> '{}', p.path
    FROM jsonb_array_elements_text(p_refs) AS p(path),
         jsonb_path_query(p_data, p.path::jsonpath) AS v
    WHERE jsonb_typeof(v) <> 'null'
$$;

-- As in 0025, and a restore (`deleted` and `data` changed at once) locks the targets of its
-- references (in id order) before its relationships, as a write of references does (3.).
CREATE OR REPLACE FUNCTION entity_delete_waits_for_relationships() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM FROM entities e WHERE e.org_id = OLD.org_id AND e.id = OLD.id FOR UPDATE;
    IF OLD.data IS DISTINCT FROM NEW.data THEN
        PERFORM FROM entities d WHERE d.org_id = NEW.org_id AND d.id IN (
            SELECT x.target::uuid
            FROM entity_types t, entity_reference_targets(t.reference_fields, NEW.data) x
            WHERE t.org_id = NEW.org_id AND t.name = NEW.type
              AND x.target ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$')
        ORDER BY d.id FOR KEY SHARE;
    END IF;
    PERFORM FROM relationships r WHERE r.org_id = OLD.org_id AND (r.src = OLD.id OR r.dst = OLD.id)
    ORDER BY r.id FOR NO KEY UPDATE;
    RETURN NEW;
END $$;

-- As in 0024, in the order above: every new target is locked and checked first, then the
-- relationships are written (the new ones in one statement), then each acyclic kind's turn
-- is taken and its new relationships checked. Nothing is added for a write without new
-- references, and nothing of c. for one without references of an acyclic kind.
CREATE OR REPLACE FUNCTION entity_relationships_sync() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    refs jsonb;
    acyclic jsonb;
    w record;
    kinds text[] := '{}';
    dsts uuid[] := '{}';
    paths text[] := '{}';
    revived uuid[] := '{}';  -- relationships of references that came back
    new_kinds text[] := '{}';  -- references that are new: kind, target, target's project and deleted
    new_dsts uuid[] := '{}';
    new_projects uuid[] := '{}';
    new_deleted boolean[] := '{}';
    check_kinds text[] := '{}';  -- references new or back, of an acyclic kind
    check_dsts uuid[] := '{}';
    check_paths text[] := '{}';
    turn text;  -- the kind whose turn was taken last
    target_project uuid;
    target_deleted boolean;
    sees_all boolean;  -- the writer reads every project: an owner, an admin, or no user (not a board's)
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.deleted IS DISTINCT FROM NEW.deleted THEN
        UPDATE relationships r
        SET end_deleted = NEW.deleted OR EXISTS (
                SELECT FROM entities o WHERE o.org_id = r.org_id AND o.deleted
                  AND o.id = CASE WHEN r.src = NEW.id THEN r.dst ELSE r.src END),
            updated_by = NEW.updated_by
        WHERE r.org_id = NEW.org_id AND r.src = NEW.id;
        UPDATE relationships r
        SET end_deleted = NEW.deleted OR EXISTS (
                SELECT FROM entities o WHERE o.org_id = r.org_id AND o.id = r.src AND o.deleted),
            updated_by = NEW.updated_by
        WHERE r.org_id = NEW.org_id AND r.dst = NEW.id AND r.src <> NEW.id;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.data IS NOT DISTINCT FROM NEW.data THEN
        RETURN NULL;
    END IF;
    SELECT t.reference_fields, t.acyclic_kinds INTO refs, acyclic
    FROM entity_types t WHERE t.org_id = NEW.org_id AND t.name = NEW.type;
    IF refs IS NULL OR jsonb_array_length(refs) = 0 THEN
        RETURN NULL;
    END IF;
    FOR w IN SELECT * FROM entity_reference_targets(refs, NEW.data) LOOP
        IF w.target IS NULL OR w.target !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
            RAISE EXCEPTION 'reference field % holds %, not an entity id', w.path, left(coalesce(w.target, 'null'), 80)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        kinds := kinds || w.kind;
        dsts := dsts || w.target::uuid;
        paths := paths || w.path;
    END LOOP;
    -- a. References that came back or are new: each target locked (in id order) and checked
    -- for the writer's access.
    FOR w IN
        SELECT x.kind, x.dst, x.path, r.id AS existing, r.deleted AS was_deleted
        FROM unnest(kinds, dsts, paths) x(kind, dst, path)
        LEFT JOIN relationships r ON r.org_id = NEW.org_id AND r.src = NEW.id AND r.kind = x.kind
                                 AND r.dst = x.dst AND r.origin = 'field'
        ORDER BY x.dst, x.kind
    LOOP
        CONTINUE WHEN w.existing IS NOT NULL AND NOT w.was_deleted;
        SELECT d.project_id, d.deleted INTO target_project, target_deleted
        FROM entities d WHERE d.org_id = NEW.org_id AND d.id = w.dst FOR KEY SHARE;
        IF FOUND AND sees_all IS NULL THEN
            sees_all := (NEW.updated_by IS NULL AND NEW.board_doc IS NULL) OR EXISTS (
                SELECT FROM org_members m WHERE m.org_id = NEW.org_id AND m.user_id = NEW.updated_by
                  AND m.role IN ('owner', 'admin'));
        END IF;
        IF NOT FOUND OR NOT (sees_all OR target_project = NEW.project_id OR EXISTS (
                SELECT FROM project_members m WHERE m.org_id = NEW.org_id
                  AND m.project_id = target_project AND m.user_id = NEW.updated_by)) THEN
            RAISE EXCEPTION 'reference field % points to entity %, which does not exist', w.path, w.dst
                USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'relationships_dst_fkey';
        END IF;
        IF w.existing IS NOT NULL THEN
            revived := revived || w.existing;
        ELSE
            new_kinds := new_kinds || w.kind;
            new_dsts := new_dsts || w.dst;
            new_projects := new_projects || target_project;
            new_deleted := new_deleted || target_deleted;
        END IF;
        IF acyclic ? w.kind THEN
            check_kinds := check_kinds || w.kind;
            check_dsts := check_dsts || w.dst;
            check_paths := check_paths || w.path;
        END IF;
    END LOOP;
    -- b. References that went away: their relationships are deleted (a version, not erased);
    -- those that came back are undeleted, and the new ones made.
    UPDATE relationships r SET deleted = true, updated_by = NEW.updated_by
    WHERE r.org_id = NEW.org_id AND r.src = NEW.id AND r.origin = 'field' AND NOT r.deleted
      AND NOT EXISTS (SELECT FROM unnest(kinds, dsts) x(kind, dst) WHERE x.kind = r.kind AND x.dst = r.dst);
    IF cardinality(revived) > 0 THEN
        UPDATE relationships SET deleted = false, updated_by = NEW.updated_by
        WHERE org_id = NEW.org_id AND id = ANY(revived);
    END IF;
    IF cardinality(new_dsts) > 0 THEN
        INSERT INTO relationships (org_id, id, src, dst, kind, src_project, dst_project, origin,
                                   end_deleted, created_by, updated_by)
        SELECT NEW.org_id, gen_random_uuid(), NEW.id, x.dst, x.kind, NEW.project_id, x.project, 'field',
               NEW.deleted OR x.deleted, NEW.updated_by, NEW.updated_by
        FROM unnest(new_kinds, new_dsts, new_projects, new_deleted) x(kind, dst, project, deleted);
    END IF;
    -- c. Each acyclic kind's turn, in kind order, then its cycle checks: does the target
    -- reach this entity? Not for a restore: entity_undelete_keeps_acyclic, next, checks every
    -- live relationship of the entity, the new ones among them, taking all its kinds' turns in
    -- one kind order (taken here first, one could come after another kind's, in its order).
    IF cardinality(check_dsts) > 0 AND NOT (TG_OP = 'UPDATE' AND OLD.deleted AND NOT NEW.deleted) THEN
        FOR w IN
            SELECT x.kind, x.dst, x.path FROM unnest(check_kinds, check_dsts, check_paths) x(kind, dst, path)
            ORDER BY x.kind, x.dst
        LOOP
            IF turn IS DISTINCT FROM w.kind THEN
                PERFORM relationship_kind_lock(NEW.org_id, w.kind);
                turn := w.kind;
            END IF;
            IF relationship_reaches(NEW.org_id, w.dst, NEW.id, w.kind) THEN
                RAISE EXCEPTION 'reference field % would make a % cycle through entity %', w.path, w.kind, w.dst
                    USING ERRCODE = 'check_violation', CONSTRAINT = 'relationships_acyclic';
            END IF;
        END LOOP;
    END IF;
    RETURN NULL;
END $$;

GRANT EXECUTE ON FUNCTION entity_reference_targets(jsonb, jsonb) TO canvasdb_app;
