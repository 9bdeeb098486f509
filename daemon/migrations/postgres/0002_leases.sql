-- Job leases (daemon/src/jobs/lease.rs): the replica that trains a job and until when its claim
-- holds, in milliseconds since the epoch by the database's clock (so replicas' clocks may
-- differ); a heartbeat extends it.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at BIGINT;

CREATE FUNCTION itamae_now_ms() RETURNS BIGINT
    LANGUAGE sql VOLATILE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT $$;
