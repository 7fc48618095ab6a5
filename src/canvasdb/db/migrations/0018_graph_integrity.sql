-- Graph integrity: what the checks of 0008 left to chance.
--
-- 1. Races. Making a relationship read its ends, and for an acyclic kind searched for a
--    cycle, without holding anything until its commit: two concurrent edges a -> b and
--    b -> a each found no cycle and both were written, and an edge made while its end was
--    being deleted stayed live (the deletion hid the relationships it could see, not the
--    uncommitted one). Now the makers of relationships (the reference-field trigger below,
--    and the application's create, which calls the same functions) lock both ends FOR KEY
--    SHARE, and deleting an entity first locks it FOR UPDATE, which waits for those locks
--    (FOR KEY SHARE does not conflict with the FOR NO KEY UPDATE that entity_change takes,
--    so edits of an end do not wait, and two entities referencing each other do not
--    deadlock; only a deletion waits). Whichever comes second sees the first: a deletion
--    hides the new relationship, or the maker finds the end deleted. Makers of an edge of
--    an acyclic kind take turns per (org, kind) on an advisory lock held to the commit,
--    taken before the cycle check, so the check sees every edge committed before it.
-- 2. The cycle check gave up after 1,000 steps, so a chain of 1,001 could be closed. It is
--    now exhaustive: a recursive CTE whose UNION visits each node once, stopping at the
--    first sight of the target, bounded by the statement timeout.
-- 3. A reference field accepted any existing entity of the org, even one of a project the
--    writer cannot read (answering 422 for a random id but not for a hidden one told the
--    writer which ids exist). A target the writer cannot read now answers exactly like a
--    missing one, unless the writer is an org owner or admin (or the local operator, no
--    user: updated_by NULL). Readable means as in the application: a row in
--    project_members (editor or viewer) for the target's project.

-- Creations of relationships of one acyclic kind in one org take turns until commit.
CREATE FUNCTION relationship_kind_lock(p_org uuid, p_kind text) RETURNS void
LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock(hashtextextended('canvasdb.acyclic:' || p_org::text || ':' || p_kind, 0));
$$;

-- Does `from` reach `to` through live relationships of `kind`? Every node is expanded once
-- (UNION keeps the set of nodes seen), cycles included, and the search stops as soon as `to`
-- turns up. p_max (NULL: no limit) bounds the depth, for callers that want a bounded search;
-- the cycle check passes none.
CREATE OR REPLACE FUNCTION relationship_reaches(p_org uuid, p_from uuid, p_to uuid, p_kind text,
                                                p_max integer DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_from = p_to THEN
        RETURN true;
    END IF;
    IF p_max IS NULL THEN
        RETURN EXISTS (
            WITH RECURSIVE r(id) AS (
                SELECT p_from
                UNION
                SELECT e.dst FROM r JOIN relationships e
                    ON e.org_id = p_org AND e.src = r.id AND e.kind = p_kind AND e.live)
            SELECT FROM r WHERE r.id = p_to);
    END IF;
    RETURN EXISTS (
        WITH RECURSIVE r(id, d) AS (
            SELECT p_from, 0
            UNION
            SELECT e.dst, r.d + 1 FROM r JOIN relationships e
                ON e.org_id = p_org AND e.src = r.id AND e.kind = p_kind AND e.live
            WHERE r.d < p_max)
        SELECT FROM r WHERE r.id = p_to);
END $$;

-- Deleting an entity waits for the transactions that locked it FOR KEY SHARE to make a
-- relationship to or from it (see 1. above), so that the deletion's trigger sees their
-- relationships and hides them. Taken before the row changes: a lock taken on the new
-- version would not see the locks held on the old one.
CREATE FUNCTION entity_delete_waits_for_relationships() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM FROM entities e WHERE e.org_id = OLD.org_id AND e.id = OLD.id FOR UPDATE;
    RETURN NEW;
END $$;
CREATE TRIGGER entity_delete_waits_for_relationships BEFORE UPDATE OF deleted ON entities
    FOR EACH ROW WHEN (NOT OLD.deleted AND NEW.deleted)
    EXECUTE FUNCTION entity_delete_waits_for_relationships();

-- As in 0008, with the target of each new reference locked and checked for the writer's
-- access, and the cycle check taken in turn.
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
    sees_all boolean;  -- the writer reads every project: an owner, an admin, or no user
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
            sees_all := NEW.updated_by IS NULL OR EXISTS (
                SELECT FROM org_members m WHERE m.org_id = NEW.org_id AND m.user_id = NEW.updated_by
                  AND m.role IN ('owner', 'admin'));
        END IF;
        IF NOT FOUND OR NOT (sees_all OR EXISTS (
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

GRANT EXECUTE ON FUNCTION relationship_kind_lock(uuid, text), entity_delete_waits_for_relationships()
    TO canvasdb_app;
