//! `itamae-bench storage`: what an S3-compatible object store (`storage.objects`) costs against
//! the local data directory on one replica, through the same `BlobStore` calls the daemon makes.
//! The S3 side is s3s-fs on loopback (`scripts/services/s3.sh`), so the ratios show the
//! protocol's and the object layer's overhead, not a network's. PostgreSQL is a throwaway
//! cluster on loopback (`scripts/services/postgres.sh`); the job figures are in
//! [`crate::storage_jobs`].
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use itamae::adapters::{peft, Adapter, Lora, LoraConfig};
use itamae::jobs::backend::BlobStore;
use itamae::jobs::object_blob::{ObjectBlob, ObjectsConfig};
use itamae::jobs::storage::Storage;

/// The S3 server's client options: from `ITAMAE_TEST_S3_ENDPOINT` + `AWS_*` when set, else a
/// server started for this run (stopped when it exits).
fn s3_server(script: &Path) -> anyhow::Result<(Vec<(String, String)>, String)> {
    let vars: Vec<(String, String)> = if std::env::var_os("ITAMAE_TEST_S3_ENDPOINT").is_some() {
        std::env::vars().collect()
    } else {
        let out = std::process::Command::new(script)
            .args(["start", "--owner", &std::process::id().to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(out.status.success(), "{} start failed", script.display());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let get = |k: &str| {
        vars.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| anyhow::anyhow!("{k} is not set"))
    };
    let options = vec![
        ("aws_endpoint".into(), get("ITAMAE_TEST_S3_ENDPOINT")?),
        ("aws_access_key_id".into(), get("AWS_ACCESS_KEY_ID")?),
        (
            "aws_secret_access_key".into(),
            get("AWS_SECRET_ACCESS_KEY")?,
        ),
        ("aws_region".into(), "us-east-1".into()),
        ("aws_allow_http".into(), "true".into()),
    ];
    let bucket = get("ITAMAE_TEST_S3_BUCKET").unwrap_or_else(|_| "itamae-test".into());
    Ok((options, bucket))
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|es| {
            es.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Runs `f` (given the run's index; it returns the seconds it timed) `reps` times on each
/// store; prints the medians and their ratio.
fn compare(
    what: &str,
    stores: &[&dyn BlobStore; 2],
    reps: usize,
    f: &dyn Fn(&dyn BlobStore, usize) -> anyhow::Result<f64>,
) -> anyhow::Result<()> {
    let mut medians = Vec::new();
    for s in stores {
        let times = (0..reps)
            .map(|i| f(*s, i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        medians.push(median(times));
    }
    println!(
        "{what:<42} local {:>8.1} ms   s3 {:>8.1} ms   s3/local {:>6.2}x",
        medians[0] * 1e3,
        medians[1] * 1e3,
        medians[1] / medians[0]
    );
    Ok(())
}

pub(crate) fn storage(
    model_path: &Path,
    upload_mb: usize,
    reps: usize,
    cycles: usize,
    jobs: usize,
) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services/s3.sh");
    let (options, bucket) = s3_server(&script)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "itamae-bench-storage-{:016x}",
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir)?;
    let prefix = format!("bench-{:016x}", rand::random::<u64>());
    let objects = ObjectsConfig {
        url: format!("s3://{bucket}/{prefix}"),
        options,
    };
    let local = Storage::open(&dir.join("local"))?;
    let s3 = ObjectBlob::open(&objects, &dir.join("s3-cache"), rt.handle().clone())?;
    let stores: [&dyn BlobStore; 2] = [&local, &s3];

    // A LoRA checkpoint as the trainer writes one: the servable PEFT files, the trainable
    // parameters and Adam's two moments, and the trainer state.
    let device = candle_core::Device::Cpu;
    let loaded = itamae::model::load(model_path, &device, itamae::model::WeightsMode::default())?;
    let cfg = loaded.model.cfg.clone();
    let mut lora = Lora::init(&cfg, LoraConfig::default(), 1, &device)?;
    for p in lora.pairs.values_mut() {
        p.b = Tensor::randn(0f32, 0.01, p.b.dims(), &device)?;
    }
    let template = dir.join("checkpoint");
    peft::save(&template, &Adapter::Lora(lora), &cfg, &loaded.name)?;
    let weights = std::fs::read(template.join(peft::WEIGHTS_FILE))?;
    std::fs::write(template.join("trainable.safetensors"), &weights)?;
    let moments: Vec<u8> = weights
        .iter()
        .chain(weights.iter())
        .map(|b| b ^ 0x5a)
        .collect();
    std::fs::write(template.join("optimizer.safetensors"), moments)?;
    std::fs::write(template.join("trainer_state.json"), br#"{"step": 10}"#)?;
    println!(
        "s3s-fs on loopback vs the local data dir; median of {reps}; upload {upload_mb} MB; \
         LoRA checkpoint {:.1} MB (r=16 all-linear); figures taken on a shared machine",
        dir_bytes(&template) as f64 / 1e6
    );

    let payload: Vec<u8> = (0..upload_mb << 20).map(|i| (i % 253) as u8).collect();
    compare(
        &format!("upload of a {upload_mb} MB file"),
        &stores,
        reps,
        &|s, i| {
            let t = Instant::now();
            let mut w = s.begin_upload()?;
            for piece in payload.chunks(64 << 10) {
                w.write_all(piece)?;
            }
            w.commit(&format!("file-bench{i}"))?;
            Ok(t.elapsed().as_secs_f64())
        },
    )?;
    compare(
        &format!("read back the {upload_mb} MB file (cached)"),
        &stores,
        reps,
        &|s, i| {
            let t = Instant::now();
            let mut r = s.open_file(&format!("file-bench{i}"))?;
            std::io::copy(&mut r, &mut std::io::sink())?;
            Ok(t.elapsed().as_secs_f64())
        },
    )?;
    compare(
        "keep_checkpoint of the LoRA checkpoint",
        &stores,
        reps,
        &|s, i| {
            // The copy the trainer would have written is made outside the timing.
            let written = dir.join(format!(".written-{:016x}", rand::random::<u64>()));
            copy_dir(&template, &written)?;
            let t = Instant::now();
            s.keep_checkpoint("ftjob-bench", i + 1, &written)?;
            Ok(t.elapsed().as_secs_f64())
        },
    )?;

    // First load of a variant: the result published once, then each run starts from an empty
    // cache (a replica that never saw it) and ends with the adapter in memory.
    for s in stores {
        let out = s.local_result_dir("ftjob-variant");
        copy_dir(&template, &out)?;
        s.publish_result("ftjob-variant")?;
    }
    let fresh = |i: usize| -> anyhow::Result<Arc<ObjectBlob>> {
        Ok(Arc::new(ObjectBlob::open(
            &objects,
            &dir.join(format!("replica-{i}")),
            rt.handle().clone(),
        )?))
    };
    let replicas: Vec<Arc<ObjectBlob>> = (0..reps).map(fresh).collect::<anyhow::Result<_>>()?;
    let mut times = [Vec::new(), Vec::new()];
    for replica in &replicas {
        let t = Instant::now();
        let d = local
            .materialise_result("ftjob-variant")?
            .ok_or_else(|| anyhow::anyhow!("no local result"))?;
        peft::load(&d, &cfg, &device)?;
        times[0].push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let d = replica
            .materialise_result("ftjob-variant")?
            .ok_or_else(|| anyhow::anyhow!("no result in the object store"))?;
        peft::load(&d, &cfg, &device)?;
        times[1].push(t.elapsed().as_secs_f64());
    }
    let (l, o) = (median(times[0].clone()), median(times[1].clone()));
    println!(
        "{:<42} local {:>8.1} ms   s3 {:>8.1} ms   s3/local {:>6.2}x",
        "first load of a variant (fetch + parse)",
        l * 1e3,
        o * 1e3,
        o / l
    );

    // The per-request latencies behind these figures.
    let text = itamae::metrics::global().render();
    let series = itamae::metrics::parse_text(&text).map_err(|e| anyhow::anyhow!(e))?;
    for op in ["put", "put_multipart", "get", "list", "delete"] {
        let find = |n: &str| {
            series
                .iter()
                .find(|(s, _)| s == &format!("itamae_object_store_seconds_{n}{{op=\"{op}\"}}"))
                .map(|(_, v)| *v)
        };
        if let (Some(count), Some(sum)) = (find("count"), find("sum")) {
            if count > 0.0 {
                println!(
                    "  itamae_object_store_seconds{{op=\"{op}\"}}: {count:.0} requests, mean {:.2} ms",
                    sum / count * 1e3
                );
            }
        }
    }

    // The rows: PostgreSQL against SQLite, then whole jobs on both wirings.
    let pg_url = crate::storage_jobs::pg_database(&rt)?;
    if cycles > 0 {
        crate::storage_jobs::store_cycles(&rt, &dir, &pg_url, cycles, reps)?;
    }
    if jobs > 0 {
        let objects = ObjectsConfig {
            url: format!("s3://{bucket}/{prefix}-jobs"),
            ..objects
        };
        let pg_url = crate::storage_jobs::pg_database(&rt)?;
        crate::storage_jobs::whole_job_throughput(model_path, &dir, &pg_url, &objects, jobs)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
