-- Search: full text computed in the write transaction, words and meaning indexed after.
--
-- Each live entity whose type declares text (or embedding) fields has a row in
-- search_docs: its weighted full-text vector, the facet columns (type, module, project,
-- tags) and a hash of the text that feeds its embedding. The entities table keeps its
-- own indexes on immutable columns only (so its updates stay HOT); the search row is
-- narrow, so broad matches and facets scan little. A deleted entity loses its row at
-- once, an undeleted one gets it back.
--
-- What is slow or may fail waits in search_queue: adding the entity's words to the
-- org's term dictionary (typo corrections) and computing its embedding (a model call).
-- A worker drains it; the queue's size per org is the indexing backlog.

CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE search_docs (
    org_id      uuid NOT NULL,
    entity_id   uuid NOT NULL,
    project_id  uuid NOT NULL,
    type        text NOT NULL,
    module      text NOT NULL,
    tags        text[] NOT NULL DEFAULT '{}',
    tsv         tsvector NOT NULL,
    embed_md5   uuid,                 -- NULL: nothing to embed
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (org_id, entity_id)
);
CREATE INDEX search_docs_tsv ON search_docs USING gin (tsv);
CREATE INDEX search_docs_recent ON search_docs (org_id, updated_at DESC, entity_id);

-- The org's words (as written, lower case, 4+ letters): where typo corrections come from.
CREATE TABLE search_terms (
    org_id  uuid NOT NULL,
    term    text NOT NULL,
    PRIMARY KEY (org_id, term)
);
CREATE INDEX search_terms_trgm ON search_terms USING gin (term gin_trgm_ops);

CREATE TABLE search_queue (
    org_id           uuid NOT NULL,
    entity_id        uuid NOT NULL,
    needs_terms      boolean NOT NULL,
    embed_md5        uuid,              -- the text to embed, as of the last change; NULL: none
    queued_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (org_id, entity_id)
);

-- One vector per entity and model (the mean of its chunks' vectors). Vectors of every
-- model share the table: each model has its own partial HNSW index over the
-- expression `embedding::halfvec(<dimension>)` (see search_model_index).
CREATE TABLE search_vectors (
    org_id       uuid NOT NULL,
    model        text NOT NULL,
    entity_id    uuid NOT NULL,
    project_id   uuid NOT NULL,
    type         text NOT NULL,
    embed_md5    uuid NOT NULL,
    embedding    halfvec NOT NULL,
    embedded_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (org_id, model, entity_id)
);

-- The embedding models vectors were made with. Search uses the active one; a newly
-- configured model is 'building' until every entity has its vector, then takes over.
CREATE TABLE search_models (
    model         text PRIMARY KEY,
    kind          text NOT NULL,
    url           text,
    dimension     integer NOT NULL CHECK (dimension BETWEEN 1 AND 4000),
    state         text NOT NULL CHECK (state IN ('active', 'building', 'retired')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    activated_at  timestamptz
);
CREATE UNIQUE INDEX search_models_one_active ON search_models ((true)) WHERE state = 'active';

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['search_docs', 'search_terms', 'search_queue', 'search_vectors'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I USING (org_id = current_org_id()) '
                       'WITH CHECK (org_id = current_org_id())', t);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO canvasdb_app', t);
    END LOOP;
END $$;
GRANT SELECT, INSERT, UPDATE, DELETE ON search_models TO canvasdb_app;

-- The strings at a dotted field path ('title', 'meta.tags'), nested ones included.
CREATE FUNCTION search_strings(p_data jsonb, p_field text) RETURNS SETOF text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT v #>> '{}'
    FROM jsonb_path_query(p_data, ('strict $."' || replace(p_field, '.', '"."')
                                   || '".** ? (@.type() == "string" || @.type() == "number")')::jsonpath,
                          '{}', true) AS v
$$;

-- The weighted full-text vector of an entity: each text field with its weight A-D.
CREATE FUNCTION search_vector(p_data jsonb, p_text_fields jsonb) RETURNS tsvector
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    v tsvector := '';
    f record;
BEGIN
    FOR f IN SELECT key, value #>> '{}' AS weight FROM jsonb_each(p_text_fields) ORDER BY value, key LOOP
        v := v || setweight(to_tsvector('english', coalesce(
                     (SELECT string_agg(s, ' ') FROM search_strings(p_data, f.key) s), '')),
                 f.weight::"char");
    END LOOP;
    RETURN v;
END $$;

-- The text that feeds the embedding: the embed fields, or else the text fields by weight.
CREATE FUNCTION search_embed_text(p_data jsonb, p_text_fields jsonb, p_embed_fields jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT string_agg(s.s, E'\n' ORDER BY f.ord, s.ord)
    FROM (SELECT value #>> '{}' AS field, ord FROM jsonb_array_elements(p_embed_fields) WITH ORDINALITY AS e(value, ord)
          WHERE jsonb_array_length(p_embed_fields) > 0
          UNION ALL
          SELECT key, row_number() OVER (ORDER BY value, key) FROM jsonb_each(p_text_fields)
          WHERE jsonb_array_length(p_embed_fields) = 0) AS f,
         LATERAL search_strings(p_data, f.field) WITH ORDINALITY AS s(s, ord)
    WHERE s.s <> ''
$$;

-- The distinct words (4 to 40 letters, lower case, not stemmed) of an entity's text.
CREATE FUNCTION search_words(p_data jsonb, p_text_fields jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(DISTINCT w), '{}')
    FROM jsonb_object_keys(p_text_fields) AS f,
         LATERAL search_strings(p_data, f) AS s,
         LATERAL unnest(tsvector_to_array(to_tsvector('simple', s))) AS w
    WHERE length(w) BETWEEN 4 AND 40 AND w !~ '[0-9_]'
$$;

-- Bring an entity's search row in step with its data (or remove it), and queue what
-- the worker must do. Called by the trigger below and when a type's declaration changes.
CREATE FUNCTION search_index_entity(p_org uuid, p_id uuid, p_project uuid, p_type text, p_data jsonb,
                                    p_deleted boolean, p_updated_at timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t record;
    new_tsv tsvector;
    new_md5 uuid;
    old record;
BEGIN
    SELECT module, text_fields, embed_fields, tag_field INTO t
    FROM entity_types WHERE org_id = p_org AND name = p_type;
    IF p_deleted OR NOT FOUND OR (t.text_fields = '{}' AND t.embed_fields = '[]') THEN
        -- Not (or no longer) searchable. Queue rows and vectors exist only beside a search row.
        DELETE FROM search_docs WHERE org_id = p_org AND entity_id = p_id;
        IF FOUND THEN
            DELETE FROM search_queue WHERE org_id = p_org AND entity_id = p_id;
            DELETE FROM search_vectors WHERE org_id = p_org AND entity_id = p_id;
        END IF;
        RETURN;
    END IF;
    new_tsv := search_vector(p_data, t.text_fields);
    new_md5 := md5(search_embed_text(p_data, t.text_fields, t.embed_fields))::uuid;
    IF new_md5 IS NULL THEN  -- no text left to embed: no vector either
        DELETE FROM search_vectors WHERE org_id = p_org AND entity_id = p_id;
    END IF;
    SELECT tsv, embed_md5 INTO old FROM search_docs WHERE org_id = p_org AND entity_id = p_id;
    IF FOUND THEN
        UPDATE search_docs SET tsv = new_tsv, embed_md5 = new_md5, module = t.module,
               tags = CASE WHEN t.tag_field IS NULL THEN '{}'
                           ELSE ARRAY(SELECT s FROM search_strings(p_data, t.tag_field) s LIMIT 100) END,
               updated_at = p_updated_at
        WHERE org_id = p_org AND entity_id = p_id;
    ELSE
        INSERT INTO search_docs (org_id, entity_id, project_id, type, module, tags, tsv, embed_md5, updated_at)
        VALUES (p_org, p_id, p_project, p_type, t.module,
                CASE WHEN t.tag_field IS NULL THEN '{}'
                     ELSE ARRAY(SELECT s FROM search_strings(p_data, t.tag_field) s LIMIT 100) END,
                new_tsv, new_md5, p_updated_at);
    END IF;
    IF old.tsv IS DISTINCT FROM new_tsv OR old.embed_md5 IS DISTINCT FROM new_md5 THEN
        INSERT INTO search_queue (org_id, entity_id, needs_terms, embed_md5)
        VALUES (p_org, p_id, old.tsv IS DISTINCT FROM new_tsv, new_md5)
        ON CONFLICT (org_id, entity_id) DO UPDATE
            SET needs_terms = search_queue.needs_terms OR EXCLUDED.needs_terms,
                embed_md5 = EXCLUDED.embed_md5;
    END IF;
END $$;

CREATE FUNCTION entity_search_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM search_index_entity(NEW.org_id, NEW.id, NEW.project_id, NEW.type, NEW.data, NEW.deleted,
                                NEW.updated_at);
    RETURN NULL;
END $$;

CREATE TRIGGER entity_search_sync AFTER INSERT OR UPDATE OF data, deleted ON entities
    FOR EACH ROW EXECUTE FUNCTION entity_search_sync();

-- Does `data` pass the filters? p_filter holds an SQL/JSON path predicate and its
-- variables ({"path": "$.\"status\" == $v0_0", "vars": {"v0_0": "done"}}).
CREATE FUNCTION search_data_filter(p_data jsonb, p_filter jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_filter IS NULL
        OR jsonb_path_match(p_data, (p_filter ->> 'path')::jsonpath, p_filter -> 'vars', true)
$$;

-- The two lookups below run as the schema's owner (SECURITY DEFINER) and keep to the
-- org of the caller's transaction themselves, as the row-level security policy would.
-- Under row-level security PostgreSQL only lets leakproof operators into an index scan,
-- and neither the text match (@@) nor pg_trgm's similarity (%) is one: as the
-- application role, every text query would read the whole table. The owner must
-- therefore not be subject to row-level security (a superuser, or BYPASSRLS).

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

-- Matches of a text query (minus those of p_unless) within the filters, at most p_limit.
CREATE FUNCTION search_match(p_match text, p_unless text, p_projects uuid[], p_types text[],
                             p_modules text[], p_after timestamptz, p_before timestamptz,
                             p_data jsonb, p_limit integer)
RETURNS TABLE (entity_id uuid, project_id uuid, type text, module text, tsv tsvector)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT s.entity_id, s.project_id, s.type, s.module, s.tsv
    FROM search_docs s
    WHERE s.org_id = current_org_id()
      AND s.tsv @@ to_tsquery('english', p_match)
      AND (p_unless IS NULL OR NOT s.tsv @@ to_tsquery('english', p_unless))
      AND search_in_scope(s, p_projects, p_types, p_modules, p_after, p_before, p_data)
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

-- The HNSW index of one model's vectors (cosine distance on half-precision floats).
-- Owned by the schema's owner, so the application role may ask for it.
CREATE FUNCTION search_model_index(p_model text, p_dimension integer) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    name text := 'search_vectors_hnsw_' || left(md5(p_model), 16);
BEGIN
    IF p_dimension NOT BETWEEN 1 AND 4000 THEN
        RAISE EXCEPTION 'bad dimension %', p_dimension;
    END IF;
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON search_vectors USING hnsw '
                   '((embedding::halfvec(%s)) halfvec_cosine_ops) WITH (m = 16, ef_construction = 64) '
                   'WHERE model = %L', name, p_dimension, p_model);
    RETURN name;
END $$;

-- Drop a retired model's index (its vectors are deleted by the application).
CREATE FUNCTION search_model_drop_index(p_model text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    EXECUTE format('DROP INDEX IF EXISTS %I', 'search_vectors_hnsw_' || left(md5(p_model), 16));
END $$;

REVOKE ALL ON FUNCTION search_model_index(text, integer), search_model_drop_index(text),
    search_match(text, text, uuid[], text[], text[], timestamptz, timestamptz, jsonb, integer),
    search_facets(text, uuid[], uuid[], text[], text[], timestamptz, timestamptz, jsonb, integer, text[]),
    search_similar_terms(text, integer, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION search_model_index(text, integer), search_model_drop_index(text),
    search_match(text, text, uuid[], text[], text[], timestamptz, timestamptz, jsonb, integer),
    search_facets(text, uuid[], uuid[], text[], text[], timestamptz, timestamptz, jsonb, integer, text[]),
    search_similar_terms(text, integer, integer, integer), search_data_filter(jsonb, jsonb),
    search_strings(jsonb, text), search_vector(jsonb, jsonb), search_embed_text(jsonb, jsonb, jsonb),
    search_words(jsonb, jsonb), search_index_entity(uuid, uuid, uuid, text, jsonb, boolean, timestamptz),
    entity_search_sync() TO canvasdb_app;
