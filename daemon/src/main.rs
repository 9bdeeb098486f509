//! `itamaed`: the daemon (`serve`) and its benchmarks (`bench`).
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use itamae::config::{self, FileConfig, Overrides, ServeConfig};
use itamae::engine::EngineHandle;

#[derive(Parser)]
#[command(
    name = "itamaed",
    version,
    about = "itamae daemon: one base model, tuned and served"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the base model and serve the OpenAI-style API.
    Serve {
        /// TOML config file (see configs/itamae.toml).
        #[arg(long, env = "ITAMAE_CONFIG")]
        config: Option<PathBuf>,
        /// Base model: a GGUF file or an HF directory.
        #[arg(long, env = "ITAMAE_MODEL")]
        model: Option<PathBuf>,
        #[arg(long, env = "ITAMAE_HOST")]
        host: Option<String>,
        #[arg(long, env = "ITAMAE_PORT")]
        port: Option<u16>,
        #[arg(long, env = "ITAMAE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
        #[arg(long, env = "ITAMAE_DEVICE")]
        device: Option<String>,
        /// Serve a PEFT adapter directory as a variant: `NAME=DIR` (repeatable).
        #[arg(long = "adapter", value_name = "NAME=DIR")]
        adapters: Vec<String>,
        /// On SIGTERM, seconds running requests get to finish ([server] shutdown_grace_secs).
        #[arg(long, env = "ITAMAE_SHUTDOWN_GRACE_SECS")]
        shutdown_grace_secs: Option<u64>,
        /// Share of time training keeps while requests are served ([training] max_share).
        #[arg(long, env = "ITAMAE_TRAINING_MAX_SHARE")]
        training_max_share: Option<f64>,
        /// Memory budget of loaded adapters in bytes, 0 = none ([adapters] max_resident_bytes).
        #[arg(long, env = "ITAMAE_ADAPTERS_MAX_RESIDENT_BYTES")]
        adapters_max_resident_bytes: Option<u64>,
    },
    /// Fine-tune the model on a JSONL dataset and save the result (PEFT adapter or model dir).
    Train(Box<itamae::commands::TrainArgs>),
    /// Chat in-process with the base model or a PEFT adapter.
    Chat(itamae::commands::ChatArgs),
    /// Validation loss and mean token accuracy of the base model or an adapter on a JSONL file.
    Eval(itamae::eval::EvalArgs),
    /// Write the base model as an HF directory (config.json, model.safetensors, tokenizer files).
    ExportHf {
        #[arg(long, env = "ITAMAE_MODEL", default_value = config::DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print every position's logits for a raw-text prompt as JSON (interop checks).
    Logits {
        #[arg(long, env = "ITAMAE_MODEL", default_value = config::DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
    },
    /// Benchmarks that print figures (and ratios against a peer when it is installed).
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Aggregate decode tok/s: N concurrent streams on the base vs on N different LoRA variants.
    Batch {
        #[arg(long, env = "ITAMAE_MODEL", default_value = config::DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long, default_value_t = 8)]
        streams: usize,
        #[arg(long, default_value_t = 64)]
        tokens: usize,
    },
    /// Hot-swap under load: replace a served LoRA repeatedly while clients stream from it;
    /// swap latency, failed requests, throughput against the same loop without swaps.
    Swap {
        #[arg(long, env = "ITAMAE_MODEL", default_value = config::DEFAULT_MODEL)]
        model: PathBuf,
        /// Concurrent streaming clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Seconds per phase (without swaps, then with).
        #[arg(long, default_value_t = 20.0)]
        secs: f64,
        /// Milliseconds between two swaps.
        #[arg(long, default_value_t = 1000)]
        every_ms: u64,
        /// Tokens per chat.
        #[arg(long, default_value_t = 32)]
        tokens: usize,
    },
    /// Issue 4's hot-swap figure: fine-tuning job success to the first token served with its
    /// adapter, while clients stream chats on the base model; failed requests, throughput.
    JobSwap {
        #[arg(long, env = "ITAMAE_MODEL", default_value = config::DEFAULT_MODEL)]
        model: PathBuf,
        /// Concurrent streaming clients on the base model.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Fine-tuning jobs, one after the other.
        #[arg(long, default_value_t = 5)]
        jobs: usize,
        /// Tokens per chat.
        #[arg(long, default_value_t = 32)]
        tokens: usize,
    },
    /// LoRA SFT tokens/s and peak RSS (r=16, all-linear), side by side with HF PEFT.
    Train {
        #[arg(long, env = "ITAMAE_MODEL", default_value = config::DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long, default_value_t = 512)]
        seq: usize,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Timed steps (one more warm-up step runs first).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Python of a venv with torch, transformers and peft (scripts/setup-peft-venv.sh).
        #[arg(long, env = "ITAMAE_PEFT_PYTHON")]
        peer_python: Option<PathBuf>,
    },
    /// Prompt and decode tokens/s for greedy generation, side by side with llama-cpp-python.
    Decode {
        #[arg(long, env = "ITAMAE_MODEL", default_value = config::DEFAULT_MODEL)]
        model: PathBuf,
        /// Tokens to generate.
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        /// Timed repetitions (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Python of a venv with llama-cpp-python installed (scripts/setup-bench-venv.sh).
        #[arg(long, env = "ITAMAE_BENCH_PYTHON")]
        peer_python: Option<PathBuf>,
    },
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // OpenBLAS reads its CPU core type only when it loads: re-exec with it set when this CPU
    // would be misdetected (docs/candle-notes.md). Must come before any BLAS call.
    if let Err(e) = itamae::ops::blas::ensure_coretype_env() {
        eprintln!("warning: could not re-execute with OPENBLAS_CORETYPE set: {e}");
    }
    // candle's elementwise thread pool spins 25k iterations before parking; on 2 cores that
    // spinning starves the BLAS and rayon threads between ops. Park sooner unless told otherwise.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    // Without it candle asks num_cpus for the physical core count on every matmul, which parses
    // /proc/cpuinfo each time: 5% of a decode step, more per small matmul.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,actix_server=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Serve {
            config,
            model,
            host,
            port,
            data_dir,
            device,
            adapters,
            shutdown_grace_secs,
            training_max_share,
            adapters_max_resident_bytes,
        } => serve(
            config,
            adapters,
            Overrides {
                model,
                host,
                port,
                data_dir,
                device,
                shutdown_grace_secs,
                training_max_share,
                adapters_max_resident_bytes,
            },
        ),
        Command::Train(a) => itamae::commands::train(*a),
        Command::Chat(a) => itamae::commands::chat(a),
        Command::Eval(a) => itamae::eval::eval(a),
        Command::ExportHf { model, out } => itamae::commands::export_hf(&model, &out),
        Command::Logits {
            model,
            adapter,
            prompt,
        } => itamae::commands::logits(&model, adapter.as_deref(), &prompt),
        Command::Bench {
            which:
                BenchCommand::Decode {
                    model,
                    tokens,
                    runs,
                    peer_python,
                },
        } => itamae::bench::decode(&model, tokens, runs, peer_python.as_deref()),
        Command::Bench {
            which:
                BenchCommand::Batch {
                    model,
                    streams,
                    tokens,
                },
        } => itamae::bench::batch(&model, streams, tokens),
        Command::Bench {
            which:
                BenchCommand::Swap {
                    model,
                    clients,
                    secs,
                    every_ms,
                    tokens,
                },
        } => itamae::bench::swap(&model, clients, secs, every_ms, tokens),
        Command::Bench {
            which:
                BenchCommand::JobSwap {
                    model,
                    clients,
                    jobs,
                    tokens,
                },
        } => itamae::bench::job_swap(&model, clients, jobs, tokens),
        Command::Bench {
            which:
                BenchCommand::Train {
                    model,
                    seq,
                    batch,
                    steps,
                    peer_python,
                },
        } => itamae::bench::train(&model, seq, batch, steps, peer_python.as_deref()),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// After the HTTP drain, how long the running job may take to finish its step and checkpoint.
const SHUTDOWN_CHECKPOINT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

fn serve(
    config_path: Option<PathBuf>,
    adapters: Vec<String>,
    overrides: Overrides,
) -> anyhow::Result<()> {
    let adapters: Vec<(String, PathBuf)> = adapters
        .iter()
        .map(|a| match a.split_once('=') {
            Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
                Ok((name.to_string(), PathBuf::from(dir)))
            }
            _ => Err(anyhow::anyhow!("--adapter expects NAME=DIR, got `{a}`")),
        })
        .collect::<anyhow::Result<_>>()?;
    let mut file = match &config_path {
        Some(p) => FileConfig::read(p)?,
        None => FileConfig::default(),
    };
    let auth_section = std::mem::take(&mut file.auth);
    let organization_id = file.storage.organization_id.take();
    let hub_id = file.model.hub_id.take();
    let max_upload_bytes = file.storage.max_upload_bytes.take();
    let cfg = ServeConfig::resolve(file, overrides)?;
    // Checked before the model loads: a misconfigured exposed daemon must not start at all.
    let auth = auth_section
        .resolve(std::env::var("ITAMAE_API_KEYS").ok().as_deref())
        .map_err(|e| anyhow::anyhow!("API keys: {e}"))?;
    auth.check_bind(&cfg.host).map_err(anyhow::Error::msg)?;
    if !cfg.model.exists() {
        anyhow::bail!(
            "model {} not found (run scripts/fetch-model.sh for the default model, or pass --model)",
            cfg.model.display()
        );
    }
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create data directory {}: {e}",
            cfg.data_dir.display()
        )
    })?;
    let device = config::device(&cfg.device)?;
    tracing::info!(model = %cfg.model.display(), host = %cfg.host, port = cfg.port, "starting itamaed");
    let engine = EngineHandle::start(cfg.model.clone(), device);
    // The HTTP server is up (and /readyz says 503) while the model loads; a failed load ends
    // the process with the loader's message rather than serving nothing.
    let watcher = engine.clone();
    let budget = cfg.adapters_max_resident_bytes;
    std::thread::spawn(move || {
        if let Err(e) = watcher.wait_loaded() {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        if let Err(e) = watcher.set_adapter_budget(budget) {
            tracing::warn!("cannot set the adapter memory budget: {e}");
        }
        for (name, dir) in adapters {
            let loaded = watcher
                .model_config()
                .map_err(anyhow::Error::from)
                .and_then(|cfg| {
                    Ok(itamae::adapters::peft::load(
                        &dir,
                        &cfg,
                        &candle_core::Device::Cpu,
                    )?)
                })
                .and_then(|a| Ok(watcher.add_adapter_from(&name, a, &dir)?));
            match loaded {
                Ok(()) => tracing::info!(adapter = %name, dir = %dir.display(), "serving adapter"),
                Err(e) => {
                    eprintln!("error: adapter {name} ({}): {e}", dir.display());
                    std::process::exit(1);
                }
            }
        }
    });
    // Files, jobs and their results live in the data directory; the runner thread re-serves
    // finished jobs and resumes interrupted ones once the model is loaded.
    let mut jobs_cfg = itamae::jobs::JobsConfig::new(cfg.data_dir.clone());
    if let Some(org) = std::env::var("ITAMAE_ORGANIZATION_ID")
        .ok()
        .filter(|o| !o.is_empty())
        .or(organization_id)
    {
        jobs_cfg.organization_id = org;
    }
    let env_max_upload = match std::env::var("ITAMAE_MAX_UPLOAD_BYTES") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                eprintln!("error: ITAMAE_MAX_UPLOAD_BYTES={v:?} is not a number of bytes");
                std::process::exit(2);
            }
        },
        Err(_) => None,
    };
    if let Some(n) = env_max_upload.or(max_upload_bytes) {
        jobs_cfg.max_upload_bytes = n;
    }
    jobs_cfg.training_max_share = cfg.training_max_share;
    jobs_cfg.base_model_id = std::env::var("ITAMAE_MODEL_HUB_ID")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or(hub_id.filter(|h| !h.trim().is_empty()));
    let max_upload = jobs_cfg.max_upload_bytes;
    let jobs = itamae::jobs::Jobs::open(jobs_cfg, engine.clone())?;
    // Imported adapters (`/v1/adapters`) are served again once the model is loaded.
    let adapters =
        itamae::api::adapters::AdapterStore::open(&cfg.data_dir, engine.clone(), max_upload)?;
    {
        let adapters = adapters.clone();
        std::thread::Builder::new()
            .name("itamae-adapters".into())
            .spawn(move || adapters.restore())?;
    }
    let on_signal = {
        let jobs = jobs.clone();
        Box::new(move || jobs.begin_shutdown())
    };
    let engine_handle = engine.clone();
    actix_web::rt::System::new().block_on(itamae::api::serve(
        engine,
        cfg.host.clone(),
        cfg.port,
        Some(jobs.clone()),
        Some(adapters),
        auth,
        itamae::api::Shutdown {
            grace: cfg.shutdown_grace,
            on_signal,
        },
    ))?;
    // The running job was told to stop at the signal; its step may still be finishing.
    jobs.begin_shutdown();
    if !jobs.wait_stopped(SHUTDOWN_CHECKPOINT_TIMEOUT) {
        tracing::warn!(
            "no shutdown checkpoint of the running job after {SHUTDOWN_CHECKPOINT_TIMEOUT:?}; the job resumes from its previous checkpoint"
        );
    }
    // Connections cut at the end of the grace period may leave generations behind; the process
    // must not exit with the engine inside a BLAS call (OpenBLAS's exit handler would wait).
    if !engine_handle.shutdown(std::time::Duration::from_secs(30)) {
        tracing::warn!("the engine did not stop within 30 s");
    }
    tracing::info!("itamaed stopped");
    Ok(())
}
