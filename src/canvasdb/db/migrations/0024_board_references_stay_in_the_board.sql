-- A board's references stay in the board's project.
--
-- A type's reference fields are mirrored by entity_relationships_sync (0018), which lets
-- a writer reference an entity of a project it cannot read only if it reads every project:
-- an owner, an admin, or a write with no user. A board's projection writes its node and
-- edge entities with no user, so an org that declared reference fields for board.node let
-- any editor of a board link, by drawing on it, to entities of projects it cannot read (a
-- relationship the API refuses that editor with 422), and learn from which nodes were
-- projected which ids exist there. A write with no user of a board's entity (board_doc set:
-- the projection, or the operator writing such an entity) now references only entities of
-- the board's own project, as the projection reads and writes nothing else; any other
-- target answers as a missing one, and the projection skips that node. A reference that
-- exists already (made through the API by someone who may) is not checked again.

CREATE OR REPLACE FUNCTION entity_relationships_sync() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    refs jsonb;
    acyclic jsonb;
    w record;
    kinds text[] := '{}';
    dsts uuid[] := '{}';
    paths text[] := '{}';
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
    FOR w IN
        SELECT DISTINCT lower(substring(p.path FROM '([A-Za-z_][A-Za-z0-9_]*)(\[\*\])?$')) AS kind,
               v #>> '{}' AS target, p.path
        FROM jsonb_array_elements_text(refs) AS p(path),
             jsonb_path_query(NEW.data, p.path::jsonpath) AS v
        WHERE jsonb_typeof(v) <> 'null'
    LOOP
        IF w.target IS NULL OR w.target !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
            RAISE EXCEPTION 'reference field % holds %, not an entity id', w.path, left(coalesce(w.target, 'null'), 80)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        kinds := kinds || w.kind;
        dsts := dsts || w.target::uuid;
        paths := paths || w.path;
    END LOOP;
    -- References that went away: their relationships are deleted (a version, not erased).
    UPDATE relationships r SET deleted = true, updated_by = NEW.updated_by
    WHERE r.org_id = NEW.org_id AND r.src = NEW.id AND r.origin = 'field' AND NOT r.deleted
      AND NOT EXISTS (SELECT FROM unnest(kinds, dsts) x(kind, dst) WHERE x.kind = r.kind AND x.dst = r.dst);
    -- References that came back or are new: each target locked (in id order), checked for
    -- the writer's access, and checked for a cycle when its kind forbids them.
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
        IF acyclic ? w.kind THEN
            PERFORM relationship_kind_lock(NEW.org_id, w.kind);
            IF relationship_reaches(NEW.org_id, w.dst, NEW.id, w.kind) THEN
                RAISE EXCEPTION 'reference field % would make a % cycle through entity %', w.path, w.kind, w.dst
                    USING ERRCODE = 'check_violation', CONSTRAINT = 'relationships_acyclic';
            END IF;
        END IF;
        IF w.existing IS NOT NULL THEN
            UPDATE relationships SET deleted = false, updated_by = NEW.updated_by
            WHERE org_id = NEW.org_id AND id = w.existing;
        ELSE
            INSERT INTO relationships (org_id, id, src, dst, kind, src_project, dst_project, origin,
                                       end_deleted, created_by, updated_by)
            VALUES (NEW.org_id, gen_random_uuid(), NEW.id, w.dst, w.kind, NEW.project_id, target_project,
                    'field', NEW.deleted OR target_deleted, NEW.updated_by, NEW.updated_by);
        END IF;
    END LOOP;
    RETURN NULL;
END $$;
