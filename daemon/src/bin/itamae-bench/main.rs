//! `itamae-bench`: benchmarks that print figures, with a peer measured in the same invocation
//! when available (never timed tests). `decode`, `train` and `batch` drive the library in
//! process; `swap` and `job-swap` start an in-process daemon and talk to it over HTTP through
//! the `itamae-client` crate, as any client would.
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use itamae::config::{self, KernelArgs};

mod batch;
mod decode;
mod job_swap;
mod memory;
mod quant;
mod server;
mod storage;
mod storage_jobs;
mod structured;
mod swap;
mod train;

#[derive(Parser)]
#[command(
    name = "itamae-bench",
    version,
    about = "itamae benchmarks: figures, and ratios against a peer when it is installed"
)]
struct Cli {
    #[command(flatten)]
    kernels: KernelArgs,
    #[command(subcommand)]
    which: BenchCommand,
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
        #[command(flatten)]
        weights: config::WeightsArg,
    },
    /// Structured outputs: aggregate decode tok/s of N streams under a JSON schema vs the same
    /// N streams unconstrained, same run.
    Structured {
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
        #[command(flatten)]
        weights: config::WeightsArg,
        /// The prompt cache during each job's swap: `both` alternates on (even jobs) and off
        /// (odd jobs) so the two figures come from one run.
        #[arg(long, value_enum, default_value = "both")]
        prompt_cache: job_swap::CacheMode,
    },
    /// LoRA SFT tokens/s and peak RSS (r=16, all-linear) on the f32 base and on the base as
    /// stored (QLoRA-style), side by side with HF PEFT; the sides' steps interleave.
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
        /// Weights modes of the itamae sides, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "f32,auto")]
        modes: Vec<itamae::model::WeightsMode>,
        /// Run each mode under each of these process allocators (mimalloc, glibc,
        /// glibc-tuned), comma-separated; default: this process's (`ITAMAE_ALLOCATOR`).
        #[arg(long, value_delimiter = ',')]
        allocators: Vec<itamae::alloc::Choice>,
        /// Python of a venv with torch, transformers and peft (scripts/setup-peft-venv.sh).
        #[arg(long, env = "ITAMAE_PEFT_PYTHON")]
        peer_python: Option<PathBuf>,
        /// Be one itamae side in this weights mode (what each child runs).
        #[arg(long, hide = true)]
        worker: Option<itamae::model::WeightsMode>,
    },
    /// Resident set after load in each weights mode (a child process each) vs the GGUF file
    /// plus a KV cache.
    Memory {
        #[arg(long, env = "ITAMAE_MODEL", default_value = config::DEFAULT_MODEL)]
        model: PathBuf,
        /// Positions of the KV cache counted in the target.
        #[arg(long, default_value_t = 2048)]
        kv_tokens: usize,
        /// Measure this one mode in this process (what each child runs).
        #[arg(long, hide = true)]
        only: Option<itamae::model::WeightsMode>,
    },
    /// One projection's product in every block type (candle's quantized matmul vs dequantize
    /// + BLAS vs the f32 weight) at decode and prefill row counts.
    Quant {
        #[arg(long, default_value_t = 1536)]
        out: usize,
        #[arg(long, default_value_t = 576)]
        inp: usize,
        #[arg(long, default_value_t = 20)]
        reps: usize,
    },
    /// PostgreSQL + S3 (on loopback) against SQLite + the local data dir on one replica:
    /// uploads, checkpoints, first loads of a variant, job throughput.
    Storage {
        #[arg(long, env = "ITAMAE_MODEL", default_value = config::DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long, default_value_t = 10)]
        upload_mb: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Store cycles of a job's rows per repetition (SQLite vs PostgreSQL); 0 skips them.
        #[arg(long, default_value_t = 40)]
        cycles: usize,
        /// Whole tiny LoRA jobs per wiring (local vs PostgreSQL + S3); 0 skips them.
        #[arg(long, default_value_t = 3)]
        jobs: usize,
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
        #[command(flatten)]
        weights: config::WeightsArg,
    },
}

fn main() {
    let cli = Cli::parse();
    // The daemon's start-up, so that figures are those of `itamaed` on this machine.
    config::start_process(&cli.kernels.resolve(&Default::default()));
    itamae::alloc::check_env();
    print_machine();
    let result = match cli.which {
        BenchCommand::Decode {
            model,
            tokens,
            runs,
            peer_python,
            weights,
        } => decode::decode(
            &model,
            weights.resolve(None),
            tokens,
            runs,
            peer_python.as_deref(),
        ),
        BenchCommand::Batch {
            model,
            streams,
            tokens,
            weights,
        } => batch::batch(&model, streams, tokens, weights.resolve(None)),
        BenchCommand::Structured {
            model,
            streams,
            tokens,
        } => structured::structured(&model, streams, tokens),
        BenchCommand::Quant { out, inp, reps } => quant::quant(out, inp, reps),
        BenchCommand::Storage {
            model,
            upload_mb,
            reps,
            cycles,
            jobs,
        } => storage::storage(&model, upload_mb, reps, cycles, jobs),
        BenchCommand::Memory {
            model,
            kv_tokens,
            only,
        } => match only {
            Some(mode) => memory::measure_one(&model, mode, kv_tokens),
            None => memory::memory(&model, kv_tokens),
        },
        BenchCommand::Swap {
            model,
            clients,
            secs,
            every_ms,
            tokens,
        } => swap::swap(&model, clients, secs, every_ms, tokens),
        BenchCommand::JobSwap {
            model,
            clients,
            jobs,
            tokens,
            weights,
            prompt_cache,
        } => job_swap::job_swap(
            &model,
            clients,
            jobs,
            tokens,
            weights.resolve(None),
            prompt_cache,
        ),
        BenchCommand::Train {
            model,
            seq,
            batch,
            steps,
            modes,
            allocators,
            peer_python,
            worker,
        } => {
            let shape = train::Shape { seq, batch, steps };
            match worker {
                Some(mode) => train::worker(&model, mode, shape),
                None => train::train(&model, &modes, &allocators, shape, peer_python.as_deref()),
            }
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// What a figure depends on: the CPU, the instruction sets the kernels may use, and the
/// OpenBLAS kernel set (and whether BLAS carries the matmuls at all).
fn print_machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("cpu: {cpu} ({threads} threads)");
    println!("instruction sets: {}", instruction_sets().join(" "));
    println!("allocator: {}", itamae::alloc::choice().name());
    println!(
        "quantized kernels (ops::qdot): {}",
        itamae::ops::qdot::path().name()
    );
    let blas = itamae::ops::blas::preferred();
    println!(
        "blas: OpenBLAS core type {} ({}; OPENBLAS_CORETYPE={})",
        itamae::ops::blas::core_name(),
        if blas {
            "carries the f32 matmuls"
        } else {
            "not used: candle's matmul"
        },
        std::env::var("OPENBLAS_CORETYPE").unwrap_or_else(|_| "unset".into())
    );
}

fn instruction_sets() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut sets = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! detect {
            ($($f:tt),*) => {
                $(if std::arch::is_x86_feature_detected!($f) {
                    sets.push($f);
                })*
            };
        }
        detect!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512dq",
            "avx512vl",
            "avx512vnni"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            sets.push("neon");
        }
    }
    sets
}
