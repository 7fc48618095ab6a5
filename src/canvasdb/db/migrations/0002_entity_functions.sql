-- One round trip to read or to change one entity.
--
-- Each function sets the org of its own transaction before it touches a table, then
-- runs as its caller (SECURITY INVOKER), so row-level security applies exactly as in
-- a transaction the application opened itself; no BEGIN, set_config or COMMIT message
-- travels separately. A change is one statement: the merge, the RFC 6902 patch of the
-- new version and both row writes happen next to the data, under the row lock. Only a
-- type with a JSON Schema needs a second call: the would-be data goes back to the
-- application to be validated, then is written if the entity has not moved meanwhile.

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

-- RFC 7396 JSON Merge Patch. A patch with no objects and no nulls among its members
-- (the usual "set these fields") is a plain concatenation.
CREATE FUNCTION jsonb_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    merged jsonb;
    k text;
    v jsonb;
BEGIN
    IF jsonb_typeof(patch) IS DISTINCT FROM 'object' THEN
        RETURN patch;
    END IF;
    merged := CASE WHEN jsonb_typeof(target) = 'object' THEN target ELSE '{}'::jsonb END;
    IF NOT jsonb_path_exists(patch, '$.* ? (@.type() == "object" || @.type() == "null")') THEN
        RETURN merged || patch;
    END IF;
    FOR k, v IN SELECT * FROM jsonb_each(patch) LOOP
        IF jsonb_typeof(v) = 'null' THEN
            merged := merged - k;
        ELSE
            merged := jsonb_set(merged, ARRAY[k], jsonb_merge_patch(merged -> k, v));
        END IF;
    END LOOP;
    RETURN merged;
END $$;

-- An RFC 6902 patch from one document to another: objects member by member,
-- anything else that differs (arrays included) replaced whole.
CREATE FUNCTION jsonb_diff(old jsonb, new jsonb, path text DEFAULT '') RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    ops jsonb := '[]';
    k text;
    v jsonb;
    was jsonb;
    here text;
BEGIN
    IF jsonb_typeof(old) IS DISTINCT FROM 'object' OR jsonb_typeof(new) IS DISTINCT FROM 'object' THEN
        IF old = new THEN
            RETURN ops;
        END IF;
        RETURN jsonb_build_array(jsonb_build_object('op', 'replace', 'path', path, 'value', new));
    END IF;
    FOR k IN SELECT jsonb_object_keys(old) EXCEPT ALL SELECT jsonb_object_keys(new) LOOP
        here := path || '/' || replace(replace(k, '~', '~0'), '/', '~1');
        ops := ops || jsonb_build_array(jsonb_build_object('op', 'remove', 'path', here));
    END LOOP;
    FOR k, v IN SELECT * FROM jsonb_each(new) LOOP
        was := old -> k;
        CONTINUE WHEN was = v;
        here := path || '/' || replace(replace(k, '~', '~0'), '/', '~1');
        IF was IS NULL THEN
            ops := ops || jsonb_build_array(jsonb_build_object('op', 'add', 'path', here, 'value', v));
        ELSIF jsonb_typeof(was) = 'object' AND jsonb_typeof(v) = 'object' THEN
            ops := ops || jsonb_diff(was, v, here);
        ELSE
            ops := ops || jsonb_build_array(jsonb_build_object('op', 'replace', 'path', here, 'value', v));
        END IF;
    END LOOP;
    RETURN ops;
END $$;

-- Change one entity. p_op: 'merge' (p_value is a merge patch), 'replace', 'restore'
-- (p_value is the new data), 'delete', 'undelete'. The outcome says what happened:
-- 'done', 'unchanged', or why not: 'not_found', 'forbidden', 'conflict' (not at
-- p_if_version), 'gone' (deleted), 'too_large' (over p_max_bytes as PostgreSQL prints
-- it), 'validate' (the type has a schema and the data was not validated at this
-- version: r_data is the would-be data, r_type_json the type; nothing was written).
-- The other columns describe the entity after the call.
CREATE FUNCTION entity_change(p_org uuid, p_id uuid, p_actor uuid, p_admin boolean, p_op text,
                              p_value jsonb, p_if_version integer, p_validated_at integer,
                              p_keyframe_interval integer, p_max_bytes integer)
RETURNS TABLE (outcome text, r_project_id uuid, r_type text, r_data jsonb, r_version integer,
               r_deleted boolean, r_created_at timestamptz, r_updated_at timestamptz,
               r_created_by uuid, r_updated_by uuid, r_type_json jsonb)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    e record;
    member_role text;
    new_data jsonb;
    new_deleted boolean;
    keyframe boolean;
    flat boolean;
    patch jsonb;
BEGIN
    PERFORM set_config('canvasdb.org_id', p_org::text, true);
    SELECT x.*, EXISTS (SELECT FROM entity_types t WHERE t.org_id = x.org_id AND t.name = x.type
                        AND t.json_schema IS NOT NULL) AS has_schema
    INTO e FROM entities x WHERE x.org_id = p_org AND x.id = p_id FOR NO KEY UPDATE OF x;
    IF NOT FOUND THEN
        outcome := 'not_found';
        RETURN NEXT;
        RETURN;
    END IF;
    IF NOT p_admin THEN
        SELECT m.role INTO member_role FROM project_members m
        WHERE m.org_id = p_org AND m.project_id = e.project_id AND m.user_id = p_actor;
        IF member_role IS DISTINCT FROM 'editor' THEN
            outcome := CASE WHEN member_role IS NULL THEN 'not_found' ELSE 'forbidden' END;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    r_project_id := e.project_id; r_type := e.type; r_created_at := e.created_at;
    r_created_by := e.created_by; r_data := e.data; r_version := e.version;
    r_deleted := e.deleted; r_updated_at := e.updated_at; r_updated_by := e.updated_by;

    IF p_if_version IS NOT NULL AND p_if_version <> e.version THEN
        outcome := 'conflict';
    ELSIF p_op IN ('merge', 'replace') AND e.deleted THEN
        outcome := 'gone';
    END IF;
    IF outcome IS NOT NULL THEN
        RETURN NEXT;
        RETURN;
    END IF;

    -- The usual edit, "set these fields", merges by concatenation and needs no diff.
    flat := p_op = 'merge'
        AND NOT jsonb_path_exists(p_value, '$.* ? (@.type() == "object" || @.type() == "null")');
    new_data := CASE WHEN flat THEN e.data || p_value
                     WHEN p_op = 'merge' THEN jsonb_merge_patch(e.data, p_value)
                     WHEN p_op IN ('replace', 'restore') THEN p_value
                     ELSE e.data END;
    new_deleted := p_op = 'delete';
    IF new_data = e.data AND new_deleted = e.deleted THEN
        outcome := 'unchanged';
    ELSIF p_op = 'merge' AND octet_length(new_data::text) > p_max_bytes THEN
        outcome := 'too_large';
    ELSIF e.has_schema AND new_data <> e.data AND p_validated_at IS DISTINCT FROM e.version THEN
        SELECT to_jsonb(t) INTO r_type_json FROM entity_types t
        WHERE t.org_id = p_org AND t.name = e.type;
        outcome := 'validate';
        r_data := new_data;
    END IF;
    IF outcome IS NOT NULL THEN
        RETURN NEXT;
        RETURN;
    END IF;

    IF flat THEN
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'op', CASE WHEN e.data ? k THEN 'replace' ELSE 'add' END,
                   'path', '/' || replace(replace(k, '~', '~0'), '/', '~1'), 'value', v)), '[]')
        INTO patch FROM jsonb_each(p_value) AS m(k, v) WHERE (e.data -> k) IS DISTINCT FROM v;
    ELSE
        patch := jsonb_diff(e.data, new_data);
    END IF;
    keyframe := e.version + 1 - e.keyframe_version >= p_keyframe_interval;
    UPDATE entities x SET data = new_data, version = x.version + 1, deleted = new_deleted,
        keyframe_version = CASE WHEN keyframe THEN x.version + 1 ELSE x.keyframe_version END,
        updated_by = p_actor,
        updated_at = greatest(clock_timestamp(), x.updated_at + interval '1 microsecond')
    WHERE x.org_id = p_org AND x.id = p_id
    RETURNING x.data, x.version, x.deleted, x.updated_at, x.updated_by
    INTO r_data, r_version, r_deleted, r_updated_at, r_updated_by;
    INSERT INTO entity_versions (org_id, entity_id, version, op, at, actor, deleted, patch, keyframe)
    VALUES (p_org, p_id, r_version, CASE WHEN p_op IN ('merge', 'replace') THEN 'update' ELSE p_op END,
            r_updated_at, p_actor, new_deleted, patch,
            CASE WHEN keyframe THEN new_data END);
    outcome := 'done';
    RETURN NEXT;
END $$;

GRANT EXECUTE ON FUNCTION entity_read(uuid, uuid, uuid), jsonb_merge_patch(jsonb, jsonb),
    jsonb_diff(jsonb, jsonb, text),
    entity_change(uuid, uuid, uuid, boolean, text, jsonb, integer, integer, integer, integer)
    TO canvasdb_app;

-- Version times strictly increase with the version number, so "the version at time T"
-- walks the primary key backwards; a second index would only slow every write.
DROP INDEX entity_versions_by_time;
