//! `itamaed`: the daemon (`serve`) and its in-process tools (train, chat, eval, export). The
//! benchmarks are a separate binary, `itamae-bench`.
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use itamae::config::{self, KernelArgs, ServeArgs, ServeConfig};
use itamae::engine::EngineHandle;

#[derive(Parser)]
#[command(
    name = "itamaed",
    version,
    about = "itamae daemon: one base model, tuned and served"
)]
struct Cli {
    #[command(flatten)]
    kernels: KernelArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the base model and serve the OpenAI-style API.
    Serve(Box<ServeArgs>),
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
        #[command(flatten)]
        weights: config::WeightsArg,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
    },
}

fn main() {
    let Cli {
        kernels: kernel_args,
        command,
    } = Cli::parse();
    // All configuration is resolved here, once (serve also reads its config file), before
    // `start_process` may re-execute the process and before any BLAS call.
    let serve_cfg = match &command {
        Command::Serve(args) => {
            let args = ServeArgs {
                kernels: kernel_args.clone(),
                ..(**args).clone()
            };
            match ServeConfig::load(args) {
                Ok(cfg) => Some(cfg),
                Err(e) => {
                    eprintln!("error: {:#}", anyhow::Error::from(e));
                    std::process::exit(1);
                }
            }
        }
        _ => None,
    };
    let kernels = match &serve_cfg {
        Some(cfg) => cfg.kernels.clone(),
        None => kernel_args.resolve(&Default::default()),
    };
    config::start_process(&kernels);
    itamae::alloc::check_env();
    let result = match (command, serve_cfg) {
        (Command::Serve(_), Some(cfg)) => serve(cfg),
        (Command::Serve(_), None) => unreachable!("serve's configuration is resolved above"),
        (Command::Train(a), _) => itamae::commands::train(*a),
        (Command::Chat(a), _) => itamae::commands::chat(a),
        (Command::Eval(a), _) => itamae::eval::eval(a),
        (Command::ExportHf { model, out }, _) => itamae::commands::export_hf(&model, &out),
        (
            Command::Logits {
                model,
                weights,
                adapter,
                prompt,
            },
            _,
        ) => itamae::commands::logits(&model, &weights, adapter.as_deref(), &prompt),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// After the HTTP drain, how long the running job may take to finish its step and checkpoint.
const SHUTDOWN_CHECKPOINT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    // Checked before the model loads: a misconfigured exposed daemon must not start at all.
    let auth = itamae::api::auth::Auth::from_config(&cfg.auth)
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
    let engine = EngineHandle::start(cfg.model.clone(), device, cfg.weights);
    // The HTTP server is up (and /readyz says 503) while the model loads; a failed load ends
    // the process with the loader's message rather than serving nothing.
    let watcher = engine.clone();
    let budget = cfg.adapters_max_resident_bytes;
    let prompt_cache_mb = cfg.prompt_cache_mb;
    let adapters = cfg.adapters.clone();
    std::thread::spawn(move || {
        if let Err(e) = watcher.wait_loaded() {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        if let Err(e) = watcher.set_adapter_budget(budget) {
            tracing::warn!("cannot set the adapter memory budget: {e}");
        }
        if let Err(e) = watcher.set_prompt_cache_bytes(prompt_cache_mb << 20) {
            tracing::warn!("cannot set the prompt cache budget: {e}");
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
    if let Some(org) = cfg.organization_id.clone() {
        jobs_cfg.organization_id = org;
    }
    if let Some(n) = cfg.max_upload_bytes {
        jobs_cfg.max_upload_bytes = n;
    }
    jobs_cfg.training_max_share = cfg.training_max_share;
    jobs_cfg.base_model_id = cfg.hub_id.clone();
    jobs_cfg.database = cfg.database_url.clone();
    jobs_cfg.replica_id = cfg.replica_id.clone();
    jobs_cfg.job_lease = cfg.job_lease;
    jobs_cfg.objects = cfg.objects.clone();
    let max_upload = jobs_cfg.max_upload_bytes;
    let jobs = itamae::jobs::Jobs::open(jobs_cfg, engine.clone())?;
    // Imported adapters (`/v1/adapters`) are served again once the model is loaded.
    let adapters = itamae::jobs::AdapterStore::open_on(
        &cfg.data_dir,
        engine.clone(),
        max_upload,
        jobs.blobs(),
        jobs.registry(),
    )?;
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
