-- Job leases (daemon/src/jobs/lease.rs): the runner that trains a job and until when its claim
-- holds (milliseconds since the epoch); a heartbeat extends it.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at INTEGER;
