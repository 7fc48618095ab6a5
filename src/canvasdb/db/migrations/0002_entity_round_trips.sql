-- One round trip for reading or writing one entity.
--
-- Each function sets the org of its own (implicit) transaction before it touches a
-- table, then runs as its caller (SECURITY INVOKER), so row-level security applies
-- exactly as in a transaction the application opened itself. No BEGIN, set_config
-- or COMMIT statement travels separately.

-- The entity, the caller's project role (for org members) and its type declaration.
CREATE FUNCTION entity_read(p_org uuid, p_id uuid, p_user uuid)
RETURNS TABLE (org_id uuid, id uuid, project_id uuid, type text, data jsonb, version integer,
               keyframe_version integer, deleted boolean, created_at timestamptz,
               updated_at timestamptz, created_by uuid, updated_by uuid, member_role text,
               entity_type jsonb)
LANGUAGE sql VOLATILE AS $$
    SELECT set_config('canvasdb.org_id', p_org::text, true);
    SELECT e.*,
           (SELECT m.role FROM project_members m WHERE m.org_id = e.org_id
               AND m.project_id = e.project_id AND m.user_id = p_user),
           to_jsonb(t)
    FROM entities e LEFT JOIN entity_types t ON t.org_id = e.org_id AND t.name = e.type
    WHERE e.org_id = p_org AND e.id = p_id;
$$;

-- A new version, only if the entity is still at p_expected (optimistic concurrency):
-- updates the row and appends the version row together, and returns the data as
-- stored (jsonb normalises numbers). No row back: someone else wrote first.
CREATE FUNCTION entity_write(p_org uuid, p_id uuid, p_expected integer, p_data jsonb,
                             p_deleted boolean, p_op text, p_actor uuid, p_patch jsonb,
                             p_keyframe boolean)
RETURNS TABLE (version integer, updated_at timestamptz, data jsonb)
LANGUAGE sql VOLATILE AS $$
    SELECT set_config('canvasdb.org_id', p_org::text, true);
    WITH u AS (
        UPDATE entities e SET data = p_data, version = e.version + 1,
            keyframe_version = CASE WHEN p_keyframe THEN e.version + 1 ELSE e.keyframe_version END,
            deleted = p_deleted, updated_by = p_actor,
            updated_at = greatest(clock_timestamp(), e.updated_at + interval '1 microsecond')
        WHERE e.org_id = p_org AND e.id = p_id AND e.version = p_expected
        RETURNING e.org_id, e.id, e.version, e.updated_at, e.updated_by, e.deleted, e.data
    ), v AS (
        INSERT INTO entity_versions (org_id, entity_id, version, op, at, actor, deleted, patch, keyframe)
        SELECT u.org_id, u.id, u.version, p_op, u.updated_at, u.updated_by, u.deleted, p_patch,
               CASE WHEN p_keyframe THEN u.data END
        FROM u
    )
    SELECT u.version, u.updated_at, u.data FROM u;
$$;

GRANT EXECUTE ON FUNCTION entity_read(uuid, uuid, uuid) TO canvasdb_app;
GRANT EXECUTE ON FUNCTION entity_write(uuid, uuid, integer, jsonb, boolean, text, uuid, jsonb, boolean)
    TO canvasdb_app;

-- Version times strictly increase with the version number, so "the version at time T"
-- walks the primary key backwards; a second index would only slow every write.
DROP INDEX entity_versions_by_time;
