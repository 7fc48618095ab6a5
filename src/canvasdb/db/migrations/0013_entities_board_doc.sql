-- An update whose indexed columns keep their values is done in place (a HOT update): no
-- new index entries, less WAL. entities_by_board indexed an expression of `data`, so every
-- edit of any entity's data wrote new entries in all four indexes of entities. The board
-- a projected entity belongs to now lives in a generated column, which keeps its value
-- across edits (and is NULL for every other entity).
ALTER TABLE entities ADD COLUMN board_doc text GENERATED ALWAYS AS (
    CASE WHEN type IN ('board.node', 'board.edge') THEN data ->> 'doc' END) STORED;
DROP INDEX entities_by_board;
CREATE INDEX entities_by_board ON entities (org_id, board_doc) WHERE board_doc IS NOT NULL;

-- As in 0002, with the columns named: `e.*` now includes board_doc.
CREATE OR REPLACE FUNCTION entity_read(p_org uuid, p_id uuid, p_user uuid)
RETURNS TABLE (org_id uuid, id uuid, project_id uuid, type text, data jsonb, version integer,
               keyframe_version integer, deleted boolean, created_at timestamptz,
               updated_at timestamptz, created_by uuid, updated_by uuid, member_role text,
               entity_type jsonb)
LANGUAGE sql VOLATILE AS $$
    SELECT set_config('canvasdb.org_id', p_org::text, true);
    SELECT e.org_id, e.id, e.project_id, e.type, e.data, e.version, e.keyframe_version, e.deleted,
           e.created_at, e.updated_at, e.created_by, e.updated_by,
           (SELECT m.role FROM project_members m WHERE m.org_id = e.org_id
               AND m.project_id = e.project_id AND m.user_id = p_user),
           to_jsonb(t)
    FROM entities e LEFT JOIN entity_types t ON t.org_id = e.org_id AND t.name = e.type
    WHERE e.org_id = p_org AND e.id = p_id;
$$;
