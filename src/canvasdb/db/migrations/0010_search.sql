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

REVOKE ALL ON FUNCTION search_model_index(text, integer), search_model_drop_index(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION search_model_index(text, integer), search_model_drop_index(text),
    search_strings(jsonb, text), search_vector(jsonb, jsonb), search_embed_text(jsonb, jsonb, jsonb),
    search_words(jsonb, jsonb), search_index_entity(uuid, uuid, uuid, text, jsonb, boolean, timestamptz),
    entity_search_sync() TO canvasdb_app;
