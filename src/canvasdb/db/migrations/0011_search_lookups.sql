-- Search lookups that use their indexes.
--
-- search_match, search_facets and search_similar_terms run as the schema's owner
-- (SECURITY DEFINER) and keep to the org of the caller's transaction themselves, as
-- the row-level security policy would. Under row-level security PostgreSQL only lets
-- leakproof operators into an index scan, and neither the text match (@@) nor
-- pg_trgm's similarity (%) is one: as the application role, every text query would
-- read the whole table. The owner must therefore not be subject to row-level security
-- (a superuser, or BYPASSRLS).

-- Does `data` pass the filters? p_filter holds an SQL/JSON path predicate and its
-- variables ({"path": "$.\"status\" == $v0_0", "vars": {"v0_0": "done"}}).
CREATE FUNCTION search_data_filter(p_data jsonb, p_filter jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_filter IS NULL
        OR jsonb_path_match(p_data, (p_filter ->> 'path')::jsonpath, p_filter -> 'vars', true)
$$;

-- Does the entity's data pass search_data_filter? (A function of its own, so that
-- search_in_scope, having no subquery, is inlined into the queries that call it.)
CREATE FUNCTION search_entity_passes(p_org uuid, p_id uuid, p_data jsonb) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT FROM entities e WHERE e.org_id = p_org AND e.id = p_id
                                            AND search_data_filter(e.data, p_data))
$$;

-- Is a search row within the filters (NULL: no such filter)? Inlined where it is used.
CREATE FUNCTION search_in_scope(s search_docs, p_projects uuid[], p_types text[], p_modules text[],
                                p_after timestamptz, p_before timestamptz, p_data jsonb) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT (p_projects IS NULL OR s.project_id = ANY (p_projects))
       AND (p_types IS NULL OR s.type = ANY (p_types))
       AND (p_modules IS NULL OR s.module = ANY (p_modules))
       AND (p_after IS NULL OR s.updated_at > p_after)
       AND (p_before IS NULL OR s.updated_at < p_before)
       AND (p_data IS NULL OR search_entity_passes(s.org_id, s.entity_id, p_data))
$$;

-- The words of each row's A-weight fields (its titles), for the title sub-bucket of
-- the ranking: a word common in bodies is far rarer in titles, so the first page of a
-- broad query reads a short posting list.
CREATE INDEX search_docs_titles ON search_docs USING gin (ts_filter(tsv, '{a}'));

-- Matches of a text query (minus those of p_unless) within the filters, at most p_limit.
-- p_titles: true, rows whose titles match; false, rows that match elsewhere only; NULL,
-- all matching rows. (Each branch runs only when its one-time condition holds.)
CREATE FUNCTION search_match(p_match text, p_unless text, p_titles boolean, p_projects uuid[],
                             p_types text[], p_modules text[], p_after timestamptz,
                             p_before timestamptz, p_data jsonb, p_limit integer)
RETURNS TABLE (entity_id uuid, project_id uuid, type text, module text, tsv tsvector)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT * FROM (
        SELECT t.* FROM (
            SELECT s.entity_id, s.project_id, s.type, s.module, s.tsv
            FROM search_docs s
            WHERE p_titles AND s.org_id = current_org_id()
              AND ts_filter(s.tsv, '{a}') @@ to_tsquery('english', p_match)
              AND (p_unless IS NULL OR NOT s.tsv @@ to_tsquery('english', p_unless))
              AND search_in_scope(s, p_projects, p_types, p_modules, p_after, p_before, p_data)
            OFFSET 0  -- a fence: the check below reads each row, not the long posting lists
        ) t WHERE t.tsv @@ to_tsquery('english', p_match)  -- the whole text too: "-word" excludes body words
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

-- The size of a result set and its facet counts: the matches of p_match (a text query)
-- and the rows of p_also (semantic hits); with neither, every row within the filters.
-- Rows: ('total', NULL, n), n above p_cap meaning "more than p_cap", then (facet, value,
-- n) over p_cap rows for each facet asked for in p_facets (type, module, project, tag).
-- Counted here, inside one query, rather than handed row by row to the caller: a broad
-- word matches many rows.
CREATE FUNCTION search_facets(p_match text, p_also uuid[], p_projects uuid[], p_types text[],
                              p_modules text[], p_after timestamptz, p_before timestamptz,
                              p_data jsonb, p_cap integer, p_facets text[])
RETURNS TABLE (facet text, value text, n bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH m AS MATERIALIZED (
        (SELECT s.entity_id, s.type, s.module, s.project_id, s.tags FROM search_docs s
         WHERE s.org_id = current_org_id() AND s.tsv @@ to_tsquery('english', p_match)
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

-- Dictionary words that look like p_word (trigram similarity over the caller's
-- pg_trgm.similarity_threshold), most similar first: candidates for a typo correction.
CREATE FUNCTION search_similar_terms(p_word text, p_min_length integer, p_max_length integer,
                                     p_limit integer) RETURNS SETOF text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT term FROM search_terms
    WHERE org_id = current_org_id() AND term % p_word
      AND length(term) BETWEEN p_min_length AND p_max_length
    ORDER BY similarity(term, p_word) DESC, term
    LIMIT p_limit
$$;

REVOKE ALL ON FUNCTION
    search_match(text, text, boolean, uuid[], text[], text[], timestamptz, timestamptz, jsonb, integer),
    search_facets(text, uuid[], uuid[], text[], text[], timestamptz, timestamptz, jsonb, integer, text[]),
    search_similar_terms(text, integer, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    search_match(text, text, boolean, uuid[], text[], text[], timestamptz, timestamptz, jsonb, integer),
    search_facets(text, uuid[], uuid[], text[], text[], timestamptz, timestamptz, jsonb, integer, text[]),
    search_similar_terms(text, integer, integer, integer), search_data_filter(jsonb, jsonb)
    TO canvasdb_app;
