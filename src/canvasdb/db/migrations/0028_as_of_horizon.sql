-- As-of reads of a past moment are repeatable (canvasdb/db/horizon.py).
--
-- A version's time is taken inside its transaction (clock_timestamp()), before the commit: a
-- transaction still open may yet commit a version stamped at a moment that an as-of read has
-- already answered for. as_of_horizon() answers the moment before which nothing can still
-- appear: the earliest start among the other sessions of this database that may still commit
-- a version, and the statement's own start when there are none. Such a session holds a
-- transaction id (a version is a row written), counted from its transaction's start; or it
-- runs a statement that has no id yet, counted from that statement's start (an INSERT takes
-- its default time before the row, and the id, exist). The sessions of other logins show
-- their start only to a role that has their privileges or pg_read_all_stats: the function
-- runs as its owner, the login that migrates (usually the application's own), and while a
-- session whose start it may not see holds a transaction id, it answers NULL: nothing more is
-- settled until that transaction ends. Autovacuum writes no versions, and runs long.

CREATE FUNCTION as_of_horizon() RETURNS timestamptz
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN NOT coalesce(bool_or(a.backend_xid IS NOT NULL AND a.xact_start IS NULL), false)
                THEN least(statement_timestamp(),
                           min(CASE WHEN a.backend_xid IS NOT NULL THEN a.xact_start
                                    WHEN a.state = 'active' THEN a.query_start END)) END
    FROM pg_stat_activity a
    WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
      AND a.backend_type IS DISTINCT FROM 'autovacuum worker'  -- (NULL: a session it may not see)
$$;

REVOKE EXECUTE ON FUNCTION as_of_horizon() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION as_of_horizon() TO canvasdb_app;
