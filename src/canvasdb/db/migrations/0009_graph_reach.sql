-- Reachability level at a time, for large answers: each level is one indexed query for the
-- whole frontier, minus what was already visited (a hashed EXCEPT), so every node is
-- expanded once. The recursive CTE expands a node once per depth it is reached at, which
-- costs it twice the probes on a hub's tens of thousands of dependents; on small answers
-- the CTE is faster (no per-level statement), so the application tries it first.
-- p_in: follow edges backwards (dependents). p_projects: the readable projects (NULL: all).
CREATE FUNCTION graph_reach(p_org uuid, p_starts uuid[], p_in boolean, p_kinds text[],
                            p_projects uuid[], p_depth integer, p_cap integer)
RETURNS TABLE (id uuid, depth integer)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    frontier uuid[] := p_starts;
    visited uuid[] := p_starts;
    level integer := 0;
    total integer := 0;
BEGIN
    WHILE level < p_depth AND cardinality(frontier) > 0 AND total < p_cap LOOP
        level := level + 1;
        IF p_in THEN
            frontier := ARRAY(
                SELECT e.src FROM relationships e
                WHERE e.org_id = p_org AND e.dst = ANY (frontier) AND e.live
                  AND (p_kinds IS NULL OR e.kind = ANY (p_kinds))
                  AND (p_projects IS NULL OR e.src_project = ANY (p_projects))
                EXCEPT SELECT unnest(visited));
        ELSE
            frontier := ARRAY(
                SELECT e.dst FROM relationships e
                WHERE e.org_id = p_org AND e.src = ANY (frontier) AND e.live
                  AND (p_kinds IS NULL OR e.kind = ANY (p_kinds))
                  AND (p_projects IS NULL OR e.dst_project = ANY (p_projects))
                EXCEPT SELECT unnest(visited));
        END IF;
        frontier := frontier[1:greatest(p_cap - total, 0)];
        visited := visited || frontier;
        total := total + cardinality(frontier);
        RETURN QUERY SELECT unnest(frontier), level;
    END LOOP;
END $$;

GRANT EXECUTE ON FUNCTION graph_reach(uuid, uuid[], boolean, text[], uuid[], integer, integer) TO canvasdb_app;
