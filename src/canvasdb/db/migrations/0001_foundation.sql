-- Foundation: tenants, access, entity types, entities and their version history.
-- Released migrations are never edited: a checksum in schema_migrations guards this.

-- The role the application runs as (SET ROLE on every pooled connection). It owns
-- nothing and is not a superuser, so the row-level security below applies to it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'canvasdb_app') THEN
        CREATE ROLE canvasdb_app NOLOGIN NOSUPERUSER NOBYPASSRLS;
    END IF;
END $$;
GRANT canvasdb_app TO CURRENT_USER;

-- The tenant of the current transaction: set with set_config('canvasdb.org_id', id, true).
CREATE FUNCTION current_org_id() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(current_setting('canvasdb.org_id', true), '')::uuid $$;

-- Global tables: the tenant registry and identities. No org_id, no RLS.
CREATE TABLE orgs (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug        text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email       text NOT NULL CHECK (length(email) BETWEEN 3 AND 320),
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email ON users (lower(email));

CREATE TABLE api_tokens (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash  bytea NOT NULL UNIQUE,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- Tenant tables: org_id first in every primary key, RLS on org_id (see bottom).
CREATE TABLE org_members (
    org_id      uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, user_id)
);

CREATE TABLE projects (
    org_id      uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    id          uuid NOT NULL DEFAULT gen_random_uuid(),
    slug        text NOT NULL CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  uuid,
    PRIMARY KEY (org_id, id),
    UNIQUE (org_id, slug)
);

CREATE TABLE project_members (
    org_id      uuid NOT NULL,
    project_id  uuid NOT NULL,
    user_id     uuid NOT NULL,
    role        text NOT NULL CHECK (role IN ('editor', 'viewer')),
    PRIMARY KEY (org_id, project_id, user_id),
    FOREIGN KEY (org_id, project_id) REFERENCES projects (org_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, user_id) REFERENCES org_members (org_id, user_id) ON DELETE CASCADE
);

CREATE TABLE entity_types (
    org_id            uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name              text NOT NULL,
    module            text NOT NULL DEFAULT '',
    json_schema       jsonb,
    text_fields       jsonb NOT NULL DEFAULT '{}',
    reference_fields  jsonb NOT NULL DEFAULT '[]',
    embed_fields      jsonb NOT NULL DEFAULT '[]',
    tag_field         text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, name)
);

-- The current state of each entity. Only immutable columns are indexed, so updates
-- stay HOT (no index writes) when the page has room: hence the fill factor.
CREATE TABLE entities (
    org_id            uuid NOT NULL,
    id                uuid NOT NULL,
    project_id        uuid NOT NULL,
    type              text NOT NULL,
    data              jsonb NOT NULL,
    version           integer NOT NULL,
    keyframe_version  integer NOT NULL,
    deleted           boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    created_by        uuid,
    updated_by        uuid,
    PRIMARY KEY (org_id, id),
    FOREIGN KEY (org_id, project_id) REFERENCES projects (org_id, id)
) WITH (fillfactor = 80);
CREATE INDEX entities_by_project ON entities (org_id, project_id, id);
CREATE INDEX entities_by_project_type ON entities (org_id, project_id, type, id);

-- One row per version: an RFC 6902 patch from the previous version, and a full
-- keyframe every K versions so that reconstruction reads at most K rows.
CREATE TABLE entity_versions (
    org_id      uuid NOT NULL,
    entity_id   uuid NOT NULL,
    version     integer NOT NULL,
    op          text NOT NULL CHECK (op IN ('create', 'update', 'delete', 'undelete', 'restore')),
    at          timestamptz NOT NULL,
    actor       uuid,
    deleted     boolean NOT NULL,
    patch       jsonb,
    keyframe    jsonb,
    PRIMARY KEY (org_id, entity_id, version),
    CHECK (patch IS NOT NULL OR keyframe IS NOT NULL)
);
CREATE INDEX entity_versions_by_time ON entity_versions (org_id, entity_id, at);

-- Row-level security on every tenant table.
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['org_members', 'projects', 'project_members', 'entity_types',
                             'entities', 'entity_versions'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I USING (org_id = current_org_id()) '
                       'WITH CHECK (org_id = current_org_id())', t);
    END LOOP;
END $$;

GRANT USAGE ON SCHEMA public TO canvasdb_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON orgs, users, api_tokens, org_members, projects,
    project_members, entity_types, entities, entity_versions TO canvasdb_app;
GRANT EXECUTE ON FUNCTION current_org_id() TO canvasdb_app;
