-- An org reference that reads as a UUID is the org's id, never a slug. 0017 matched
-- `id = $ref OR slug = $ref` and took whichever row came first: since a slug could read as
-- a UUID, anyone could create an org whose slug was another org's id, and requests naming
-- that id could reach the impostor, depending only on the rows' order in the heap. Slugs
-- that read as a UUID are now refused (canvasdb.tenancy.check_slug), and this lookup no
-- longer reads slugs for such a reference.
CREATE OR REPLACE FUNCTION auth_principal(p_token_hash bytea, p_org_ref text, p_org_id uuid)
RETURNS TABLE (user_id uuid, org_id uuid, role text)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT t.user_id INTO user_id FROM api_tokens t
    WHERE t.token_hash = p_token_hash AND t.revoked_at IS NULL;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF p_org_id IS NULL THEN
        SELECT o.id INTO org_id FROM orgs o WHERE o.slug = p_org_ref;
    ELSE
        SELECT o.id INTO org_id FROM orgs o WHERE o.id = p_org_id;
    END IF;
    IF org_id IS NOT NULL THEN
        PERFORM set_config('canvasdb.org_id', org_id::text, true);
        SELECT m.role INTO role FROM org_members m
        WHERE m.org_id = auth_principal.org_id AND m.user_id = auth_principal.user_id;
    END IF;
    RETURN NEXT;
END $$;
