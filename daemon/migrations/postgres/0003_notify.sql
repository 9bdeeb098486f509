-- Change notifications (daemon/src/jobs/pg_store.rs): every replica LISTENs on `itamae_jobs`,
-- whose payload is a job id, and wakes its live event streams and its idle runner. Sent by
-- triggers so that no write path can forget one; delivered when the writing transaction commits.
CREATE FUNCTION itamae_notify_job() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF TG_TABLE_NAME = 'events' THEN
        PERFORM pg_notify('itamae_jobs', NEW.job_id);
    ELSE
        PERFORM pg_notify('itamae_jobs', NEW.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION itamae_notify_job();
CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION itamae_notify_job();
CREATE TRIGGER jobs_notify_status AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION itamae_notify_job();
