//! The [`MetaStore`] contract, run against every backend: the SQLite file and a real
//! PostgreSQL (`ITAMAE_TEST_PG_URL`, else a throwaway cluster this test binary starts once with
//! `scripts/services/postgres.sh`; each test gets a database of its own).
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;

use super::backend::{FenceError, FileQuery, Lease, MetaStore, NewEvent};
use super::pg_store::PgStore;
use super::storage::{new_id, now};
use super::store::{status, FileRow, JobRow, Store};

/// Where a test's store lives; opening it twice reaches the same rows.
pub(super) enum Backend {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Backend {
    pub(super) async fn open(&self) -> Box<dyn MetaStore> {
        match self {
            Backend::Sqlite(path) => Box::new(Store::open(path).await.unwrap()),
            Backend::Postgres(url) => Box::new(
                PgStore::open(url, tokio::runtime::Handle::current())
                    .await
                    .unwrap(),
            ),
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Sqlite(path) = self {
            if let Some(dir) = path.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// The server's URL: the environment's, or a cluster started for this test binary (stopped by
/// the script once this process exits).
fn pg_server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Some(u) = std::env::var("ITAMAE_TEST_PG_URL")
            .ok()
            .filter(|u| !u.is_empty())
        {
            return u;
        }
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/services/postgres.sh"
        );
        let out = std::process::Command::new(script)
            .args(["start", "--watch-pid", &std::process::id().to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("running scripts/services/postgres.sh");
        assert!(out.status.success(), "postgres.sh start failed");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// A fresh database on the test server.
pub(super) async fn pg_database() -> String {
    use sqlx::Connection;
    let server = pg_server();
    let mut admin = sqlx::PgConnection::connect(server).await.unwrap();
    let name = format!("itamae_test_{}", new_id("").to_lowercase());
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .unwrap();
    let base = server.split('?').next().unwrap_or(server);
    let prefix = &base[..base
        .rfind('/')
        .filter(|&i| i > "postgres://".len())
        .unwrap_or(base.len())];
    format!("{prefix}/{name}")
}

fn sqlite_file() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("itamae-store-{}", new_id("")));
    std::fs::create_dir_all(&d).unwrap();
    d.join("itamae.db")
}

/// Both backends, each fresh.
pub(super) async fn backends() -> Vec<Backend> {
    vec![
        Backend::Sqlite(sqlite_file()),
        Backend::Postgres(pg_database().await),
    ]
}

fn job(id: &str, status: &str) -> JobRow {
    JobRow {
        id: id.into(),
        created_at: now(),
        status: status.into(),
        model: "base".into(),
        training_file: "file-a".into(),
        validation_file: None,
        suffix: Some("s".into()),
        seed: 42,
        metadata: Some(json!({"k": "v"})),
        spec: json!({"adapter": {"type": "lora"}}),
        hyperparameters: json!({"n_epochs": "auto"}),
        method: json!({"type": "supervised"}),
        variant: format!("ft:base:itamae:s:{id}"),
        error: None,
        fine_tuned_model: None,
        finished_at: None,
        trained_tokens: None,
        estimated_finish: None,
        result_files: json!([]),
    }
}

fn msg<'a>(message: &'a str) -> NewEvent<'a> {
    NewEvent {
        level: "info",
        message,
        kind: "message",
        data: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_round_trip_and_page_newest_first() {
    for b in backends().await {
        let s = b.open().await;
        let name = b.name();
        for i in 0..5 {
            s.insert_job(&job(&format!("ftjob-{i}"), status::QUEUED))
                .await
                .unwrap();
        }
        let got = s.get_job("ftjob-2").await.unwrap().unwrap();
        let mut want = job("ftjob-2", status::QUEUED);
        want.created_at = got.created_at;
        assert_eq!(got, want, "{name}");
        let p = s.list_jobs(None, 2).await.unwrap();
        let ids: Vec<_> = p.data.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["ftjob-4", "ftjob-3"], "{name}");
        assert!(p.has_more);
        let p = s.list_jobs(Some("ftjob-3"), 10).await.unwrap();
        let ids: Vec<_> = p.data.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["ftjob-2", "ftjob-1", "ftjob-0"], "{name}");
        assert!(!p.has_more);
        // queue order is oldest first
        let q = s.jobs_with_status(&[status::QUEUED]).await.unwrap();
        assert_eq!(q[0].id, "ftjob-0", "{name}");
        // a transition only happens from the expected states
        assert!(s
            .transition("ftjob-0", &[status::QUEUED], status::RUNNING)
            .await
            .unwrap());
        assert!(!s
            .transition("ftjob-0", &[status::QUEUED], status::RUNNING)
            .await
            .unwrap());
        let error = json!({"code": "x", "message": "m", "param": null});
        assert!(s
            .finish_unsuccessfully(
                "ftjob-0",
                &[status::RUNNING],
                status::CANCELLED,
                Some(&error)
            )
            .await
            .unwrap());
        let j = s.get_job("ftjob-0").await.unwrap().unwrap();
        assert_eq!(j.error, Some(error), "{name}");
        // a cancelled job cannot then succeed
        assert!(!s.succeed("ftjob-0", Some("m"), 10).await.unwrap());
        // the oldest queued job goes to a runner, which records what "auto" resolved to
        let c = s
            .claim_job("r", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.job.id.as_str(), c.interrupted),
            ("ftjob-1", false),
            "{name}"
        );
        let lease = Lease {
            job_id: "ftjob-1",
            owner: "r",
        };
        s.fenced_hyperparameters(lease, &json!({"n_epochs": 3}), &json!({"type": "x"}))
            .await
            .unwrap();
        assert!(s.succeed("ftjob-1", Some("m"), 10).await.unwrap());
        let j = s.get_job("ftjob-1").await.unwrap().unwrap();
        assert_eq!(j.status, status::SUCCEEDED, "{name}");
        assert_eq!(j.trained_tokens, Some(10));
        assert_eq!(j.hyperparameters, json!({"n_epochs": 3}), "{name}");
        assert_eq!(j.method, json!({"type": "x"}), "{name}");
        assert!(j.finished_at.is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interface_reaches_every_table() {
    for b in backends().await {
        let s = b.open().await;
        let name = b.name();
        let mut changes = s.subscribe();
        let f = FileRow {
            id: "file-x".into(),
            bytes: 3,
            created_at: now(),
            filename: "x.jsonl".into(),
            purpose: "fine-tune".into(),
        };
        s.insert_file(&f).await.unwrap();
        assert_eq!(s.get_file("file-x").await.unwrap(), Some(f), "{name}");
        let q = FileQuery {
            purpose: Some("fine-tune"),
            limit: 10,
            ..Default::default()
        };
        assert_eq!(s.list_files(q).await.unwrap().data.len(), 1);
        s.insert_job(&job("ftjob-i", status::QUEUED)).await.unwrap();
        changes.borrow_and_update();
        assert!(s
            .transition("ftjob-i", &[status::QUEUED], status::RUNNING)
            .await
            .unwrap());
        assert!(changes.has_changed().unwrap(), "{name}");
        changes.borrow_and_update();
        let e = s.add_event("ftjob-i", msg("hello")).await.unwrap();
        assert!(changes.has_changed().unwrap(), "{name}");
        assert_eq!(
            s.events_since("ftjob-i", 0).await.unwrap(),
            vec![e],
            "{name}"
        );
        // running without a lease (as after a crash): a runner claims it to resume
        let c = s
            .claim_job("r", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.job.id.as_str(), c.interrupted),
            ("ftjob-i", true),
            "{name}"
        );
        let lease = Lease {
            job_id: "ftjob-i",
            owner: "r",
        };
        let ck = s
            .fenced_checkpoint(lease, 3, &json!({"step": 3}), "m:ckpt-step-3")
            .await
            .unwrap();
        assert_eq!(s.all_checkpoints().await.unwrap(), vec![ck], "{name}");
        s.fenced_progress(lease, 7, Some(1)).await.unwrap();
        let j = s.get_job("ftjob-i").await.unwrap().unwrap();
        assert_eq!((j.trained_tokens, j.estimated_finish), (Some(7), Some(1)));
        assert!(s.succeed("ftjob-i", Some("m"), 9).await.unwrap());
        let j = s.get_job("ftjob-i").await.unwrap().unwrap();
        assert_eq!(
            (j.status.as_str(), j.trained_tokens, j.estimated_finish),
            (status::SUCCEEDED, Some(9), None),
            "{name}"
        );
        assert_eq!(
            s.jobs_with_status(&[status::SUCCEEDED, status::FAILED])
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(s.delete_file("file-x").await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_newest_first_and_stream_oldest_first() {
    for b in backends().await {
        let s = b.open().await;
        let name = b.name();
        let mut ids = Vec::new();
        for i in 0..4 {
            let e = s.add_event("ftjob-a", msg(&format!("m{i}"))).await.unwrap();
            ids.push(e.id);
        }
        let data = json!({"step": 1});
        s.add_event(
            "ftjob-b",
            NewEvent {
                level: "info",
                message: "other",
                kind: "metrics",
                data: Some(&data),
            },
        )
        .await
        .unwrap();
        let p = s.list_events("ftjob-a", None, 3).await.unwrap();
        let msgs: Vec<_> = p.data.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(msgs, ["m3", "m2", "m1"], "{name}");
        assert!(p.has_more);
        let p = s.list_events("ftjob-a", Some(&ids[1]), 10).await.unwrap();
        assert_eq!(p.data.len(), 1, "{name}");
        assert_eq!(p.data[0].message, "m0");
        let all = s.events_since("ftjob-a", 0).await.unwrap();
        assert_eq!(all.len(), 4, "{name}");
        let later = s.events_since("ftjob-a", all[1].seq).await.unwrap();
        let msgs: Vec<_> = later.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(msgs, ["m2", "m3"], "{name}");
        let b_events = s.events_since("ftjob-b", 0).await.unwrap();
        assert_eq!(b_events[0].data, Some(json!({"step": 1})));
        assert_eq!(b_events[0].kind, "metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_reopen_and_files_page() {
    for b in backends().await {
        let name = b.name();
        {
            let s = b.open().await;
            for i in 0..3 {
                s.insert_file(&FileRow {
                    id: format!("file-{i}"),
                    bytes: i,
                    created_at: now(),
                    filename: "a.jsonl".into(),
                    purpose: "fine-tune".into(),
                })
                .await
                .unwrap();
            }
            s.insert_job(&job("ftjob-r", status::RUNNING))
                .await
                .unwrap();
            s.claim_job("r", Duration::from_secs(60))
                .await
                .unwrap()
                .unwrap();
            let lease = Lease {
                job_id: "ftjob-r",
                owner: "r",
            };
            s.fenced_checkpoint(lease, 2, &json!({"step": 2}), "m:ckpt-step-2")
                .await
                .unwrap();
            // the same step again (a resumed run) replaces, not duplicates
            s.fenced_checkpoint(lease, 2, &json!({"step": 2, "x": 1}), "m:ckpt-step-2")
                .await
                .unwrap();
            s.fenced_checkpoint(lease, 4, &json!({"step": 4}), "m:ckpt-step-4")
                .await
                .unwrap();
        }
        // reopening runs no migration twice and finds everything
        let s = b.open().await;
        let running = s
            .jobs_with_status(&[status::RUNNING, status::PAUSED])
            .await
            .unwrap();
        assert_eq!(running.len(), 1, "{name}");
        let c = s.list_checkpoints("ftjob-r").await.unwrap();
        assert_eq!(
            c.iter().map(|c| c.step).collect::<Vec<_>>(),
            [4, 2],
            "{name}"
        );
        assert_eq!(c[1].metrics["x"], 1);
        let p = s
            .list_files(FileQuery {
                limit: 2,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(p.data[0].id, "file-2", "{name}");
        assert!(p.has_more);
        let p = s
            .list_files(FileQuery {
                purpose: Some("fine-tune"),
                after: Some("file-0"),
                limit: 10,
                ascending: true,
            })
            .await
            .unwrap();
        let ids: Vec<_> = p.data.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["file-1", "file-2"], "{name}");
        assert!(s.delete_file("file-1").await.unwrap());
        assert!(!s.delete_file("file-1").await.unwrap());
        assert!(s.get_file("file-1").await.unwrap().is_none());
    }
}

/// Claims: interrupted jobs first, then the queue oldest first; a held lease keeps a job from
/// other runners until it expires; the old owner's heartbeat then finds the job gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_give_each_job_to_one_runner_at_a_time() {
    let long = Duration::from_secs(60);
    let short = Duration::from_secs(2);
    for b in backends().await {
        let s = b.open().await;
        let name = b.name();
        assert_eq!(s.claim_job("a", long).await.unwrap(), None, "{name}");
        s.insert_job(&job("ftjob-q0", status::QUEUED))
            .await
            .unwrap();
        s.insert_job(&job("ftjob-v", status::VALIDATING))
            .await
            .unwrap();
        s.insert_job(&job("ftjob-q1", status::QUEUED))
            .await
            .unwrap();
        // running with no lease: interrupted before leases existed
        s.insert_job(&job("ftjob-r", status::RUNNING))
            .await
            .unwrap();

        let c = s.claim_job("a", short).await.unwrap().unwrap();
        assert_eq!(
            (c.job.id.as_str(), c.interrupted),
            ("ftjob-r", true),
            "{name}"
        );
        assert_eq!(c.job.status, status::RUNNING);
        let c = s.claim_job("b", long).await.unwrap().unwrap();
        assert_eq!(
            (c.job.id.as_str(), c.interrupted),
            ("ftjob-q0", false),
            "{name}"
        );
        assert_eq!(c.job.status, status::RUNNING, "{name}");
        assert_eq!(
            s.get_job("ftjob-q0").await.unwrap().unwrap().status,
            status::RUNNING
        );
        // the owner's heartbeat reads the status others set (pause from another replica)
        assert_eq!(
            s.renew_lease("ftjob-q0", "b", long)
                .await
                .unwrap()
                .as_deref(),
            Some(status::RUNNING)
        );
        assert!(s
            .transition("ftjob-q0", &[status::RUNNING], status::PAUSED)
            .await
            .unwrap());
        assert_eq!(
            s.renew_lease("ftjob-q0", "b", long)
                .await
                .unwrap()
                .as_deref(),
            Some(status::PAUSED),
            "{name}"
        );
        assert_eq!(s.renew_lease("ftjob-q0", "a", long).await.unwrap(), None);
        // a paused job under a live lease is nobody else's
        let c = s.claim_job("c", long).await.unwrap().unwrap();
        assert_eq!(c.job.id, "ftjob-q1", "{name}");
        assert_eq!(s.claim_job("c", long).await.unwrap(), None, "{name}");

        // `a` stops beating: once its lease is over, another runner takes the job over
        tokio::time::sleep(short * 2).await;
        let c = s.claim_job("d", long).await.unwrap().unwrap();
        assert_eq!(
            (c.job.id.as_str(), c.interrupted),
            ("ftjob-r", true),
            "{name}"
        );
        assert_eq!(
            s.renew_lease("ftjob-r", "a", long).await.unwrap(),
            None,
            "{name}"
        );
        assert!(s.renew_lease("ftjob-r", "d", long).await.unwrap().is_some());
        // releasing (an orderly stop) frees the job at once, for anyone but a stale owner
        s.release_lease("ftjob-r", "a").await.unwrap();
        assert_eq!(s.claim_job("e", long).await.unwrap(), None, "{name}");
        s.release_lease("ftjob-r", "d").await.unwrap();
        let c = s.claim_job("e", long).await.unwrap().unwrap();
        assert_eq!(
            (c.job.id.as_str(), c.interrupted),
            ("ftjob-r", true),
            "{name}"
        );
        // a cancelled job is never claimed; its owner's beat sees the terminal status
        assert!(s
            .finish_unsuccessfully("ftjob-r", &[status::RUNNING], status::CANCELLED, None)
            .await
            .unwrap());
        assert_eq!(
            s.renew_lease("ftjob-r", "e", long)
                .await
                .unwrap()
                .as_deref(),
            Some(status::CANCELLED)
        );
        s.release_lease("ftjob-r", "e").await.unwrap();
        assert_eq!(s.claim_job("f", long).await.unwrap(), None, "{name}");
    }
}

/// Fencing: once `a`'s lease expired and `b` took the job over, every write `a` still makes
/// about it (terminal status, progress, hyperparameters, event, checkpoint row) is refused
/// with `LeaseLost` and leaves `b`'s state as it was; `b`'s own writes go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_owner_cannot_write_over_the_new_one() {
    let long = Duration::from_secs(60);
    let short = Duration::from_millis(500);
    fn lost<T>(r: Result<T, FenceError>) -> bool {
        matches!(r, Err(FenceError::LeaseLost { .. }))
    }
    for b in backends().await {
        let s = b.open().await;
        let name = b.name();
        s.insert_job(&job("ftjob-f", status::QUEUED)).await.unwrap();
        let a = Lease {
            job_id: "ftjob-f",
            owner: "a",
        };
        let bb = Lease {
            job_id: "ftjob-f",
            owner: "b",
        };
        let c = s.claim_job("a", short).await.unwrap().unwrap();
        assert_eq!(c.job.id, "ftjob-f");
        // while `a` holds it, its writes land
        s.fenced_event(a, msg("a started")).await.unwrap();
        s.fenced_progress(a, 5, None).await.unwrap();
        s.fenced_checkpoint(a, 1, &json!({"by": "a"}), "v:ckpt-step-1")
            .await
            .unwrap();
        // `a` stalls past its lease; `b` takes the job over and writes its own state
        tokio::time::sleep(short * 2).await;
        let c = s.claim_job("b", long).await.unwrap().unwrap();
        assert_eq!((c.job.id.as_str(), c.interrupted), ("ftjob-f", true));
        s.fenced_event(bb, msg("b resumed")).await.unwrap();
        s.fenced_progress(bb, 10, Some(99)).await.unwrap();
        s.fenced_checkpoint(bb, 1, &json!({"by": "b"}), "v:ckpt-step-1")
            .await
            .unwrap();
        s.fenced_checkpoint(bb, 2, &json!({"by": "b"}), "v:ckpt-step-2")
            .await
            .unwrap();
        let before = s.get_job("ftjob-f").await.unwrap().unwrap();
        let events_before = s.events_since("ftjob-f", 0).await.unwrap();

        // `a`'s late writes are all refused
        assert!(lost(s.fenced_event(a, msg("a late")).await), "{name}");
        let data = json!({"step": 9});
        let metrics = NewEvent {
            level: "info",
            message: "Step 9",
            kind: "metrics",
            data: Some(&data),
        };
        assert!(
            lost(s.fenced_event(a, metrics).await),
            "{name}: metrics event"
        );
        assert!(lost(
            s.fenced_checkpoint(a, 2, &json!({"by": "a"}), "v:ckpt-step-2")
                .await
        ));
        assert!(lost(
            s.fenced_checkpoint(a, 3, &json!({"by": "a"}), "v:ckpt-step-3")
                .await
        ));
        assert!(lost(s.fenced_progress(a, 1, None).await), "{name}");
        assert!(lost(
            s.fenced_hyperparameters(a, &json!({"n_epochs": 7}), &json!({}))
                .await
        ));
        assert!(lost(s.fenced_succeed(a, Some("v"), 1).await), "{name}");
        assert!(lost(
            s.fenced_finish(
                a,
                &[status::RUNNING, status::PAUSED],
                status::FAILED,
                Some(&json!({"code": "x"})),
            )
            .await
        ));
        // and `b`'s state is intact
        assert_eq!(
            s.get_job("ftjob-f").await.unwrap().unwrap(),
            before,
            "{name}"
        );
        assert_eq!(before.status, status::RUNNING);
        assert_eq!(before.trained_tokens, Some(10));
        assert_eq!(s.events_since("ftjob-f", 0).await.unwrap(), events_before);
        let cks = s.list_checkpoints("ftjob-f").await.unwrap();
        assert_eq!(
            cks.iter()
                .map(|c| (c.step, c.metrics["by"].as_str().unwrap()))
                .collect::<Vec<_>>(),
            vec![(2, "b"), (1, "b")],
            "{name}"
        );

        // `b` ends the job; a write after its release is refused too (nobody owns it)
        assert!(s.fenced_succeed(bb, Some("v"), 12).await.unwrap(), "{name}");
        s.fenced_event(bb, msg("done")).await.unwrap();
        let done = s.get_job("ftjob-f").await.unwrap().unwrap();
        assert_eq!(
            (done.status.as_str(), done.fine_tuned_model.as_deref()),
            (status::SUCCEEDED, Some("v"))
        );
        s.release_lease("ftjob-f", "b").await.unwrap();
        assert!(
            lost(s.fenced_event(bb, msg("after release")).await),
            "{name}"
        );
    }
}

/// The owner's terminal write after a client's cancel is no fencing matter: the lease holds,
/// the status moved on, so it is `false` (as unfenced) and the owner may still say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_is_not_a_lost_lease() {
    for b in backends().await {
        let s = b.open().await;
        let name = b.name();
        s.insert_job(&job("ftjob-c", status::QUEUED)).await.unwrap();
        s.claim_job("a", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        let a = Lease {
            job_id: "ftjob-c",
            owner: "a",
        };
        assert!(s
            .finish_unsuccessfully("ftjob-c", &[status::RUNNING], status::CANCELLED, None)
            .await
            .unwrap());
        assert!(!s.fenced_succeed(a, Some("v"), 3).await.unwrap(), "{name}");
        assert!(!s
            .fenced_finish(a, &[status::RUNNING], status::FAILED, None)
            .await
            .unwrap());
        s.fenced_event(a, msg("Fine-tuning job cancelled"))
            .await
            .unwrap();
        let j = s.get_job("ftjob-c").await.unwrap().unwrap();
        assert_eq!(
            (j.status.as_str(), j.fine_tuned_model),
            (status::CANCELLED, None),
            "{name}"
        );
    }
}

/// Many runners claiming at once each get a different job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_claims_never_share_a_job() {
    for b in backends().await {
        let name = b.name();
        let s: std::sync::Arc<dyn MetaStore> = b.open().await.into();
        for i in 0..12 {
            s.insert_job(&job(&format!("ftjob-{i:02}"), status::QUEUED))
                .await
                .unwrap();
        }
        let runners: Vec<_> = (0..6)
            .map(|r| {
                let s = s.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    while let Some(c) = s
                        .claim_job(&format!("r{r}"), Duration::from_secs(60))
                        .await
                        .unwrap()
                    {
                        got.push(c.job.id);
                    }
                    got
                })
            })
            .collect();
        let mut all = Vec::new();
        for r in runners {
            all.extend(r.await.unwrap());
        }
        all.sort();
        let want: Vec<_> = (0..12).map(|i| format!("ftjob-{i:02}")).collect();
        assert_eq!(all, want, "{name}");
    }
}

/// A SQLite file belongs to one daemon: leases an earlier run left are void at the next open.
#[tokio::test]
async fn sqlite_frees_leases_of_an_earlier_run() {
    let b = Backend::Sqlite(sqlite_file());
    {
        let s = b.open().await;
        s.insert_job(&job("ftjob-r", status::QUEUED)).await.unwrap();
        let c = s
            .claim_job("old-pid", Duration::from_secs(600))
            .await
            .unwrap();
        assert!(c.is_some());
    }
    let s = b.open().await;
    let c = s
        .claim_job("new-pid", Duration::from_secs(600))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((c.job.id.as_str(), c.interrupted), ("ftjob-r", true));
}

/// Replicas starting together migrate once; one replica's writes reach another's
/// subscribers by NOTIFY, well before the reconciliation tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_migrate_once_and_notify_each_other() {
    let b = Backend::Postgres(pg_database().await);
    let (a, r2, r3) = tokio::join!(b.open(), b.open(), b.open());
    drop(r3);
    let mut changes = r2.subscribe();
    // the listener's first reconciliation tick
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    for what in ["insert", "event", "status"] {
        tokio::time::sleep(Duration::from_millis(50)).await;
        changes.borrow_and_update();
        let sent = std::time::Instant::now();
        match what {
            "insert" => a
                .insert_job(&job("ftjob-n", status::QUEUED))
                .await
                .map(|_| ()),
            "event" => a.add_event("ftjob-n", msg("hi")).await.map(|_| ()),
            _ => a
                .transition("ftjob-n", &[status::QUEUED], status::RUNNING)
                .await
                .map(|_| ()),
        }
        .unwrap();
        tokio::time::timeout(Duration::from_millis(1500), changes.changed())
            .await
            .unwrap_or_else(|_| panic!("no notification of the {what}"))
            .unwrap();
        assert!(sent.elapsed() < Duration::from_millis(1500));
    }
    if let Backend::Postgres(url) = &b {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM itamae_migrations ORDER BY version")
                .fetch_all(&mut c)
                .await
                .unwrap();
        assert_eq!(versions, [1, 2, 3, 4]);
    }
}

/// A database that cannot be reached is named in the error without its password.
#[tokio::test]
async fn open_errors_hide_the_password() {
    let err = PgStore::open(
        "postgres://app:hunter2@127.0.0.1:1/itamae",
        tokio::runtime::Handle::current(),
    )
    .await
    .err()
    .expect("nothing listens on port 1");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("app:***@127.0.0.1:1"), "{shown}");
}
