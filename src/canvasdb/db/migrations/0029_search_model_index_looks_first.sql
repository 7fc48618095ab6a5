-- A process's first indexing registers its model, which asks for the model's HNSW index.
-- CREATE INDEX IF NOT EXISTS takes its table's SHARE lock before it finds the index there,
-- so each process start waited for the writes under way on search_vectors, and held up the
-- writes that came after it. The catalog is now read first: an index already there takes
-- no lock. Creators that both find it missing are serialised by the lock Models.register
-- holds on search_models, and IF NOT EXISTS stays for any other caller.

CREATE OR REPLACE FUNCTION search_model_index(p_model text, p_dimension integer) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    name text := 'search_vectors_hnsw_' || left(md5(p_model), 16);
BEGIN
    IF p_dimension NOT BETWEEN 1 AND 4000 THEN
        RAISE EXCEPTION 'bad dimension %', p_dimension;
    END IF;
    IF to_regclass(format('public.%I', name)) IS NULL THEN
        EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON search_vectors USING hnsw '
                       '((embedding::halfvec(%s)) halfvec_cosine_ops) WITH (m = 16, ef_construction = 64) '
                       'WHERE model = %L', name, p_dimension, p_model);
    END IF;
    RETURN name;
END $$;
