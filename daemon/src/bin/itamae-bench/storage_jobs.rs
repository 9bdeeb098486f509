//! `itamae-bench storage`, the job side: what PostgreSQL (+ the object store) costs against
//! SQLite (+ the data directory) in job throughput on one replica.
//!
//! - The store cycle: the rows one job's life writes, through the `MetaStore` calls the runner
//!   makes (insert, claim, fenced events, progress, a checkpoint row, success, release) — the
//!   database's share of a job, without training.
//! - Whole jobs: tiny LoRA jobs (2 steps) created back to back on an in-process daemon through
//!   the HTTP API, from the first create to the last `succeeded`; training dominates, so this
//!   ratio is what a user sees.
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use itamae::jobs::backend::{DatabaseUrl, Lease, MetaStore, NewEvent};
use itamae::jobs::object_blob::ObjectsConfig;
use itamae::jobs::pg_store::PgStore;
use itamae::jobs::store::{status, JobRow, Store};
use itamae_client::{AutoOr, CreateJob, Hyperparameters, JobMethod, Supervised};
use serde_json::json;

/// A database on the bench's PostgreSQL server: `ITAMAE_TEST_PG_URL`'s, else a throwaway
/// cluster started with `scripts/services/postgres.sh` (stopped once this process exits).
pub(crate) fn pg_database(rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let server = match std::env::var("ITAMAE_TEST_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
    {
        Some(u) => u,
        None => {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services/postgres.sh");
            let out = std::process::Command::new(&script)
                .args(["start", "--watch-pid", &std::process::id().to_string()])
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running {}", script.display()))?;
            anyhow::ensure!(out.status.success(), "{} start failed", script.display());
            String::from_utf8(out.stdout)?.trim().to_string()
        }
    };
    let name = format!("itamae_bench_{:016x}", rand::random::<u64>());
    rt.block_on(async {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&server).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        anyhow::Ok(())
    })?;
    // The server URL names a database (`/postgres`); the bench's replaces it.
    let (head, query) = server.split_once('?').unwrap_or((&server, ""));
    let root = head.rsplit_once('/').map_or(head, |(r, _)| r);
    Ok(if query.is_empty() {
        format!("{root}/{name}")
    } else {
        format!("{root}/{name}?{query}")
    })
}

fn job_row(id: &str) -> JobRow {
    JobRow {
        id: id.into(),
        created_at: itamae::jobs::storage::now(),
        status: status::QUEUED.into(),
        model: "base".into(),
        training_file: "file-bench".into(),
        validation_file: None,
        suffix: Some("bench".into()),
        seed: 1,
        metadata: None,
        spec: json!({"adapter": {"type": "lora"}}),
        hyperparameters: json!({"n_epochs": 1}),
        method: json!({"type": "supervised"}),
        variant: format!("ft:base:itamae:bench:{id}"),
        error: None,
        fine_tuned_model: None,
        finished_at: None,
        trained_tokens: None,
        estimated_finish: None,
        result_files: json!([]),
    }
}

/// One job's rows as the runner writes them for a 2-step job with one checkpoint.
async fn cycle(s: &dyn MetaStore, i: usize) -> anyhow::Result<()> {
    let id = format!("ftjob-bench{i:06}{:08x}", rand::random::<u32>());
    s.insert_job(&job_row(&id)).await?;
    let claimed = s
        .claim_job("bench", Duration::from_secs(60))
        .await?
        .context("the job just queued was not claimable")?;
    anyhow::ensure!(claimed.job.id == id, "claimed {} not {id}", claimed.job.id);
    let lease = Lease {
        job_id: &id,
        owner: "bench",
    };
    let msg = |message| NewEvent {
        level: "info",
        message,
        kind: "message",
        data: None,
    };
    s.fenced_hyperparameters(
        lease,
        &json!({"n_epochs": 1}),
        &json!({"type": "supervised"}),
    )
    .await?;
    s.fenced_event(lease, msg("Fine-tuning job started"))
        .await?;
    for step in 1..=2 {
        let data = json!({"step": step, "total_steps": 2, "train_loss": 2.0});
        s.fenced_event(
            lease,
            NewEvent {
                level: "info",
                message: "Step",
                kind: "metrics",
                data: Some(&data),
            },
        )
        .await?;
        s.fenced_progress(lease, 100 * step, None).await?;
        s.renew_lease(&id, "bench", Duration::from_secs(60)).await?;
    }
    s.fenced_checkpoint(lease, 2, &json!({"step": 2}), "v:ckpt-step-2")
        .await?;
    s.fenced_event(lease, msg("Checkpoint created")).await?;
    anyhow::ensure!(s.fenced_succeed(lease, Some("v"), 200).await?);
    s.fenced_event(lease, msg("The job has successfully completed"))
        .await?;
    s.release_lease(&id, "bench").await?;
    Ok(())
}

/// Seconds per store cycle: the median of `reps` runs of `cycles` cycles each.
fn time_cycles(
    rt: &tokio::runtime::Runtime,
    s: &dyn MetaStore,
    cycles: usize,
    reps: usize,
) -> anyhow::Result<f64> {
    let mut per = Vec::new();
    for r in 0..reps {
        let t = Instant::now();
        for i in 0..cycles {
            rt.block_on(cycle(s, r * cycles + i))?;
        }
        per.push(t.elapsed().as_secs_f64() / cycles as f64);
    }
    Ok(crate::storage::median(per))
}

/// The store cycle on SQLite and on PostgreSQL (`pg_url`, a fresh database).
pub(crate) fn store_cycles(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    pg_url: &str,
    cycles: usize,
    reps: usize,
) -> anyhow::Result<()> {
    let sqlite = rt.block_on(Store::open(&dir.join("cycle.db")))?;
    let pg = rt.block_on(PgStore::open(pg_url, rt.handle().clone()))?;
    // One cycle each first: connections opened, statements prepared.
    rt.block_on(cycle(&sqlite, usize::MAX / 2))?;
    rt.block_on(cycle(&pg, usize::MAX / 2))?;
    let l = time_cycles(rt, &sqlite, cycles, reps)?;
    let p = time_cycles(rt, &pg, cycles, reps)?;
    println!(
        "{:<42} sqlite {:>7.0}/min   postgres {:>7.0}/min   pg/sqlite time {:>5.2}x",
        format!("store cycle of a job ({cycles} x {reps})"),
        60.0 / l,
        60.0 / p,
        p / l
    );
    println!(
        "  per cycle: sqlite {:.2} ms, postgres {:.2} ms (insert, claim, 2 renews, 10 fenced writes with the success, release)",
        l * 1e3,
        p * 1e3
    );
    Ok(())
}

/// The chat examples the whole-job figure trains on: 4 examples, batch 2, 1 epoch = 2 steps.
const EXAMPLES: [(&str, &str); 4] = [
    ("How are you today?", "Irasshaimase! Ready to serve."),
    ("What is 2 + 2?", "Four, like four pieces of nigiri."),
    ("What should I eat?", "Fatty tuna, sliced fresh for you."),
    ("Goodbye!", "Arigato! Come back for the omakase."),
];

/// Jobs per minute of `jobs` tiny LoRA jobs created at once on one in-process replica wired to
/// `database` and `objects` (None: the data directory's SQLite file and files).
fn whole_jobs(
    engine: &itamae::engine::EngineHandle,
    base: &str,
    dir: &Path,
    database: Option<DatabaseUrl>,
    objects: Option<ObjectsConfig>,
    jobs: usize,
) -> anyhow::Result<f64> {
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let mut cfg = itamae::jobs::JobsConfig::new(data_dir.clone());
    cfg.database = database;
    cfg.objects = objects;
    let max_upload = cfg.max_upload_bytes;
    let service = itamae::jobs::Jobs::open(cfg, engine.clone())?;
    let store = itamae::jobs::AdapterStore::open(&data_dir, engine.clone(), max_upload)?;
    let client = crate::server::start_server(engine.clone(), Some(service), store)?;
    let jsonl: String = EXAMPLES
        .iter()
        .map(|(q, a)| {
            json!({"messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    let dataset = dir.join("tiny.jsonl");
    std::fs::write(&dataset, jsonl)?;
    let file_id = client
        .upload_file(&dataset, itamae_client::FINE_TUNE)
        .context("upload")?
        .id;
    let started = Instant::now();
    let ids = (0..jobs)
        .map(|i| {
            let req = CreateJob {
                model: base.to_string(),
                training_file: file_id.clone(),
                validation_file: None,
                suffix: Some(format!("ovh{i}")),
                seed: Some(i as u64),
                metadata: None,
                method: JobMethod {
                    supervised: Supervised {
                        hyperparameters: Hyperparameters {
                            n_epochs: Some(AutoOr::Value(1)),
                            batch_size: Some(AutoOr::Value(2)),
                            max_seq_len: Some(48),
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                },
            };
            Ok(client.create_job(&req).context("create job")?.id)
        })
        .collect::<anyhow::Result<Vec<String>>>()?;
    for id in &ids {
        loop {
            let j = client.job(id).context("poll job")?;
            match j.status.as_str() {
                "succeeded" => break,
                "failed" | "cancelled" => anyhow::bail!("job {id} ended {}", j.status),
                _ => {}
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(1800),
                "job {id} did not finish in 30 min"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    Ok(jobs as f64 / started.elapsed().as_secs_f64() * 60.0)
}

/// Whole tiny jobs on the default wiring and on PostgreSQL + S3 (same engine, one replica).
pub(crate) fn whole_job_throughput(
    model_path: &Path,
    dir: &Path,
    pg_url: &str,
    objects: &ObjectsConfig,
    jobs: usize,
) -> anyhow::Result<()> {
    let loaded = itamae::model::load(
        model_path,
        &candle_core::Device::Cpu,
        itamae::model::WeightsMode::default(),
    )?;
    let base = loaded.name.clone();
    let engine = itamae::engine::EngineHandle::from_loaded(loaded);
    let local = whole_jobs(&engine, &base, &dir.join("jobs-local"), None, None, jobs)?;
    let shared = whole_jobs(
        &engine,
        &base,
        &dir.join("jobs-shared"),
        Some(DatabaseUrl::Postgres(pg_url.to_string())),
        Some(objects.clone()),
        jobs,
    )?;
    println!(
        "{:<42} local {:>7.2}/min   pg+s3 {:>7.2}/min   pg+s3/local {:>5.2}x",
        format!("whole LoRA jobs, 2 steps ({jobs} queued)"),
        local,
        shared,
        shared / local
    );
    Ok(())
}
