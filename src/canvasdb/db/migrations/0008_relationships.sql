-- The graph: typed, versioned relationships between entities of one org.
--
-- A relationship's ends, kind and the ends' projects never change (a project is fixed
-- for an entity's life), so traversals read one covering index per direction and check
-- access from the projects stored on the edge, without visiting entities. `live` is
-- false when the relationship was deleted or one of its ends is deleted: deleting an
-- entity hides its relationships, undeleting it brings back those it hid. Every change
-- (from the API, from an entity's reference fields, from an end's deletion) writes a
-- version row, so any traversal can run as of a past time.

-- Relationship kinds from entities of this type that may never form a cycle.
ALTER TABLE entity_types ADD COLUMN acyclic_kinds jsonb NOT NULL DEFAULT '[]';

CREATE TABLE relationships (
    org_id       uuid NOT NULL,
    id           uuid NOT NULL,
    src          uuid NOT NULL,
    dst          uuid NOT NULL,
    kind         text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_-]{0,62}(\.[a-z][a-z0-9_-]{0,62}){0,4}$'),
    data         jsonb NOT NULL DEFAULT '{}',
    src_project  uuid NOT NULL,
    dst_project  uuid NOT NULL,
    -- api: made through the API; field: kept by a reference field; board: a live board's edge
    origin       text NOT NULL DEFAULT 'api' CHECK (origin IN ('api', 'field', 'board')),
    deleted      boolean NOT NULL DEFAULT false,
    end_deleted  boolean NOT NULL DEFAULT false,
    live         boolean GENERATED ALWAYS AS (NOT deleted AND NOT end_deleted) STORED,
    version      integer NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_by   uuid,
    updated_by   uuid,
    PRIMARY KEY (org_id, id),
    FOREIGN KEY (org_id, src) REFERENCES entities (org_id, id),
    FOREIGN KEY (org_id, dst) REFERENCES entities (org_id, id)
);
-- One covering index per direction: a traversal step is an index-only scan.
CREATE INDEX relationships_out ON relationships (org_id, src, kind) INCLUDE (dst, dst_project, live, id);
CREATE INDEX relationships_in ON relationships (org_id, dst, kind) INCLUDE (src, src_project, live, id);

CREATE TABLE relationship_versions (
    org_id           uuid NOT NULL,
    relationship_id  uuid NOT NULL,
    version          integer NOT NULL,
    op               text NOT NULL CHECK (op IN ('create', 'update', 'delete', 'undelete')),
    at               timestamptz NOT NULL,
    actor            uuid,
    src              uuid NOT NULL,
    dst              uuid NOT NULL,
    kind             text NOT NULL,
    src_project      uuid NOT NULL,
    dst_project      uuid NOT NULL,
    data             jsonb NOT NULL,
    deleted          boolean NOT NULL,
    end_deleted      boolean NOT NULL,
    PRIMARY KEY (org_id, relationship_id, version)
);
-- As-of traversals: the versions of the edges leaving / entering a node up to a time.
CREATE INDEX relationship_versions_out ON relationship_versions (org_id, src, at);
CREATE INDEX relationship_versions_in ON relationship_versions (org_id, dst, at);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['relationships', 'relationship_versions'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I USING (org_id = current_org_id()) '
                       'WITH CHECK (org_id = current_org_id())', t);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO canvasdb_app', t);
    END LOOP;
END $$;

-- Every change of a relationship takes the next version number and a strictly later
-- time (a change that changes nothing is skipped); every insert or change then writes
-- its version row. The row is written AFTER, so an INSERT ... ON CONFLICT that turns
-- into an update writes one version, not two.
CREATE FUNCTION relationship_next_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.data = OLD.data AND NEW.deleted = OLD.deleted AND NEW.end_deleted = OLD.end_deleted THEN
        RETURN NULL;
    END IF;
    NEW.version := OLD.version + 1;
    NEW.updated_at := greatest(clock_timestamp(), OLD.updated_at + interval '1 microsecond');
    RETURN NEW;
END $$;
CREATE TRIGGER relationship_next_version BEFORE UPDATE ON relationships
    FOR EACH ROW EXECUTE FUNCTION relationship_next_version();

CREATE FUNCTION relationship_versioned() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO relationship_versions (org_id, relationship_id, version, op, at, actor, src, dst, kind,
                                       src_project, dst_project, data, deleted, end_deleted)
    VALUES (NEW.org_id, NEW.id, NEW.version,
            CASE WHEN TG_OP = 'INSERT' THEN 'create'
                 WHEN NEW.live AND NOT OLD.live THEN 'undelete'
                 WHEN OLD.live AND NOT NEW.live THEN 'delete'
                 ELSE 'update' END,
            NEW.updated_at, NEW.updated_by, NEW.src, NEW.dst, NEW.kind, NEW.src_project,
            NEW.dst_project, NEW.data, NEW.deleted, NEW.end_deleted);
    RETURN NULL;
END $$;
CREATE TRIGGER relationship_versioned AFTER INSERT OR UPDATE ON relationships
    FOR EACH ROW EXECUTE FUNCTION relationship_versioned();

-- Does `from` reach `to` through live relationships of `kind` (within p_max steps)?
-- Frontier at a time, visited nodes kept in an array; the answer to "would src -> dst
-- create a cycle?" is relationship_reaches(dst, src).
CREATE FUNCTION relationship_reaches(p_org uuid, p_from uuid, p_to uuid, p_kind text,
                                     p_max integer DEFAULT 1000) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    frontier uuid[] := ARRAY[p_from];
    seen uuid[] := ARRAY[p_from];
    step integer := 0;
BEGIN
    IF p_from = p_to THEN
        RETURN true;
    END IF;
    WHILE cardinality(frontier) > 0 AND step < p_max LOOP
        SELECT coalesce(array_agg(DISTINCT r.dst), '{}') INTO frontier
        FROM relationships r
        WHERE r.org_id = p_org AND r.src = ANY (frontier) AND r.kind = p_kind AND r.live
          AND NOT r.dst = ANY (seen);
        IF p_to = ANY (frontier) THEN
            RETURN true;
        END IF;
        seen := seen || frontier;
        step := step + 1;
    END LOOP;
    RETURN false;
END $$;

-- Keep relationships in step with an entity: its deletion hides (and its undeletion
-- restores) every relationship it is an end of; its reference fields (JSON paths
-- declared by its type, the kind being the path's last name) are mirrored as
-- relationships of origin 'field' from it.
CREATE FUNCTION entity_relationships_sync() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    refs jsonb;
    acyclic jsonb;
    w record;
    kinds text[] := '{}';
    dsts uuid[] := '{}';
    paths text[] := '{}';
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
    -- References that came back or are new, each checked for a cycle when its kind forbids them.
    FOR w IN
        SELECT x.kind, x.dst, x.path, d.project_id, d.deleted, r.id AS existing, r.deleted AS was_deleted
        FROM unnest(kinds, dsts, paths) x(kind, dst, path)
        LEFT JOIN entities d ON d.org_id = NEW.org_id AND d.id = x.dst
        LEFT JOIN relationships r ON r.org_id = NEW.org_id AND r.src = NEW.id AND r.kind = x.kind
                                 AND r.dst = x.dst AND r.origin = 'field'
    LOOP
        CONTINUE WHEN w.existing IS NOT NULL AND NOT w.was_deleted;
        IF w.project_id IS NULL THEN
            RAISE EXCEPTION 'reference field % points to entity %, which does not exist', w.path, w.dst
                USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'relationships_dst_fkey';
        END IF;
        IF acyclic ? w.kind AND relationship_reaches(NEW.org_id, w.dst, NEW.id, w.kind) THEN
            RAISE EXCEPTION 'reference field % would make a % cycle through entity %', w.path, w.kind, w.dst
                USING ERRCODE = 'check_violation', CONSTRAINT = 'relationships_acyclic';
        END IF;
        IF w.existing IS NOT NULL THEN
            UPDATE relationships SET deleted = false, updated_by = NEW.updated_by
            WHERE org_id = NEW.org_id AND id = w.existing;
        ELSE
            INSERT INTO relationships (org_id, id, src, dst, kind, src_project, dst_project, origin,
                                       end_deleted, created_by, updated_by)
            VALUES (NEW.org_id, gen_random_uuid(), NEW.id, w.dst, w.kind, NEW.project_id, w.project_id,
                    'field', NEW.deleted OR w.deleted, NEW.updated_by, NEW.updated_by);
        END IF;
    END LOOP;
    RETURN NULL;
END $$;
CREATE TRIGGER entity_relationships_sync AFTER INSERT OR UPDATE OF data, deleted ON entities
    FOR EACH ROW EXECUTE FUNCTION entity_relationships_sync();

GRANT EXECUTE ON FUNCTION relationship_next_version(), relationship_versioned(),
    relationship_reaches(uuid, uuid, uuid, text, integer),
    entity_relationships_sync() TO canvasdb_app;
