-- How far each board's projection into entities has got: the op log entries up to
-- projected_seq are reflected in its board.node and board.edge entities.
ALTER TABLE documents ADD COLUMN projected_seq bigint NOT NULL DEFAULT 0;

-- The projected entities of one board, found without reading the rest of the project.
CREATE INDEX entities_by_board ON entities (org_id, (data ->> 'doc'))
    WHERE type IN ('board.node', 'board.edge');
