-- Title matches in shards, so that a broad word or prefix stops early.
--
-- A GIN index answers a query with a bitmap of every match, built in full before the
-- first row: for "zod" typed as a prefix, 161,000 titles at a million entities, about
-- 70 ms, though the ranking reads only the first 2,000 (the rank cutoff). Here each
-- title word is indexed with its row's shard (one of 16, from a hash of the entity id)
-- in front: "zod" in a row of shard b is indexed as "bzod". The title lookups ask the
-- shards one after the other, and stop as soon as they have enough rows: a broad word
-- reads a sixteenth of its posting lists, a rare one sixteen short lists.

-- p_tsv with the shard of p_id in front of every lexeme: "zod" becomes "bzod" in shard
-- b. Positions and weights are kept, so a phrase is checked by the index's recheck as on
-- the row. (In the text of a tsvector or a tsquery, each lexeme is quoted, with quotes
-- and backslashes inside doubled.)
CREATE FUNCTION search_sharded(p_tsv tsvector, p_id uuid) RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN regexp_replace(p_tsv::text, $re$'((?:[^'\\]|''|\\.)*)'$re$,
                      '''' || to_hex(uuid_hash(p_id) & 15) || '\1''', 'g')::tsvector;

-- p_query for the rows of shard p_shard (0-15): the shard in front of every lexeme.
CREATE FUNCTION search_shard_query(p_query tsquery, p_shard integer) RETURNS tsquery
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN regexp_replace(p_query::text, $re$'((?:[^'\\]|''|\\.)*)'$re$,
                      '''' || to_hex(p_shard) || '\1''', 'g')::tsquery;

DROP INDEX search_docs_titles;
CREATE INDEX search_docs_title_shards ON search_docs
    USING gin (search_sharded(ts_filter(tsv, '{a}'), entity_id));

-- Rows whose titles match p_query, within the filters, shard after shard, at most p_limit.
-- The whole text is checked too: -word excludes a word anywhere. (One SQL statement, so
-- the function is inlined into its callers, and their LIMIT stops the shards early.)
CREATE FUNCTION search_title_match(p_query tsquery, p_unless tsquery, p_projects uuid[],
                                   p_types text[], p_modules text[], p_after timestamptz,
                                   p_before timestamptz, p_data jsonb, p_limit integer)
RETURNS SETOF search_docs
LANGUAGE sql STABLE AS $$
    SELECT s.* FROM generate_series(0, 15) AS shard,
    LATERAL (SELECT * FROM (
                 SELECT s.* FROM search_docs s
                 WHERE s.org_id = current_org_id()
                   AND search_sharded(ts_filter(s.tsv, '{a}'), s.entity_id) @@ search_shard_query(p_query, shard)
                   AND (p_unless IS NULL OR NOT s.tsv @@ p_unless)
                   AND search_in_scope(s, p_projects, p_types, p_modules, p_after, p_before, p_data)
                 OFFSET 0  -- a fence: the check below reads each row, not the long posting lists
             ) t WHERE t.tsv @@ p_query LIMIT p_limit) s
    LIMIT p_limit
$$;

-- As in 0011, with the title branch through the shards.
CREATE OR REPLACE FUNCTION search_match(p_match text, p_unless text, p_titles boolean, p_projects uuid[],
                                        p_types text[], p_modules text[], p_after timestamptz,
                                        p_before timestamptz, p_data jsonb, p_limit integer)
RETURNS TABLE (entity_id uuid, project_id uuid, type text, module text, tsv tsvector)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT * FROM (
        SELECT t.entity_id, t.project_id, t.type, t.module, t.tsv
        FROM search_title_match(to_tsquery('english', p_match), to_tsquery('english', p_unless),
                                p_projects, p_types, p_modules, p_after, p_before, p_data, p_limit) t
        WHERE p_titles
        UNION ALL
        SELECT s.entity_id, s.project_id, s.type, s.module, s.tsv
        FROM search_docs s
        WHERE p_titles IS NOT TRUE AND s.org_id = current_org_id()
          AND s.tsv @@ to_tsquery('english', p_match)
          AND (p_titles IS NULL OR NOT ts_filter(s.tsv, '{a}') @@ to_tsquery('english', p_match))
          AND (p_unless IS NULL OR NOT s.tsv @@ to_tsquery('english', p_unless))
          AND search_in_scope(s, p_projects, p_types, p_modules, p_after, p_before, p_data)
    ) m
    LIMIT p_limit
$$;

-- As in 0011, but the matches counted are the title matches first (through the shards),
-- and the other matches only when there are at most p_cap title matches: a broad word's
-- long posting lists are not read to count past the cap.
CREATE OR REPLACE FUNCTION search_facets(p_match text, p_also uuid[], p_projects uuid[], p_types text[],
                                         p_modules text[], p_after timestamptz, p_before timestamptz,
                                         p_data jsonb, p_cap integer, p_facets text[])
RETURNS TABLE (facet text, value text, n bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH titles AS MATERIALIZED (
        SELECT t.entity_id, t.type, t.module, t.project_id, t.tags
        FROM search_title_match(to_tsquery('english', p_match), NULL, p_projects, p_types, p_modules,
                                p_after, p_before, p_data, p_cap + 1) t
        WHERE p_match IS NOT NULL
    ), m AS MATERIALIZED (
        SELECT * FROM titles
        UNION
        (SELECT s.entity_id, s.type, s.module, s.project_id, s.tags FROM search_docs s
         WHERE (SELECT count(*) FROM titles) <= p_cap
           AND s.org_id = current_org_id() AND s.tsv @@ to_tsquery('english', p_match)
           AND search_in_scope(s, p_projects, p_types, p_modules, p_after, p_before, p_data)
         LIMIT p_cap + 1)
        UNION
        (SELECT s.entity_id, s.type, s.module, s.project_id, s.tags FROM search_docs s
         WHERE s.org_id = current_org_id() AND s.entity_id = ANY (p_also)
           AND search_in_scope(s, p_projects, p_types, p_modules, p_after, p_before, p_data))
        UNION
        (SELECT s.entity_id, s.type, s.module, s.project_id, s.tags FROM search_docs s
         WHERE s.org_id = current_org_id() AND p_match IS NULL AND p_also IS NULL
           AND search_in_scope(s, p_projects, p_types, p_modules, p_after, p_before, p_data)
         LIMIT p_cap + 1)
    ), f AS (SELECT * FROM m LIMIT p_cap)
    SELECT 'total', NULL, count(*) FROM m
    UNION ALL
    SELECT CASE WHEN grouping(type) = 0 THEN 'type' WHEN grouping(module) = 0 THEN 'module'
                ELSE 'project' END, coalesce(type, module, project_id::text), count(*)
    FROM f WHERE p_facets && ARRAY['type', 'module', 'project']
    GROUP BY GROUPING SETS ((type), (module), (project_id))
    HAVING CASE WHEN grouping(type) = 0 THEN 'type' WHEN grouping(module) = 0 THEN 'module'
                ELSE 'project' END = ANY (p_facets)
    UNION ALL
    SELECT 'tag', tag, count(*) FROM f, unnest(f.tags) AS tag WHERE 'tag' = ANY (p_facets) GROUP BY tag
$$;
