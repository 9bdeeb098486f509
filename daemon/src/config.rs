//! Daemon configuration, resolved once at start-up into one struct: command-line flag >
//! environment variable > TOML file (`configs/itamae.toml` documents every key) > default.
//!
//! Flags and environment variables arrive together through clap (`#[arg(env = ...)]` on every
//! field of [`ServeArgs`] and [`KernelArgs`]), which already gives flags precedence; the file
//! fills what neither set. Nothing else in the crate reads the environment for a setting: the
//! kernel-tuning switches are handed to `ops` once ([`start_process`]), and API keys are plain
//! data here that `api::auth` turns into its checker.
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::jobs::backend::DatabaseUrl;
use crate::model::WeightsMode;
use crate::ops::blas::KernelConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Value { key: &'static str, message: String },
    #[error("invalid device `{0}` (expected `cpu`, `cuda` or `cuda:N`)")]
    Device(String),
    #[error("device `{device}` is not available: {message}")]
    DeviceUnavailable { device: String, message: String },
    #[error("--adapter expects NAME=DIR, got `{0}`")]
    Adapter(String),
    #[error("API keys: {0}")]
    ApiKeys(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub training: TrainingSection,
    #[serde(default)]
    pub adapters: AdaptersSection,
    #[serde(default)]
    pub kernels: KernelsSection,
    #[serde(default)]
    pub engine: EngineSection,
}

/// `[engine]`: serving.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    /// MiB of recent prompts' keys and values kept for reuse (prompt caching); 0 disables.
    pub prompt_cache_mb: Option<u64>,
}

/// `[training]`: how fine-tuning shares the machine with serving.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// The share of time training keeps while requests compete for the device (0 < x ≤ 1).
    pub max_share: Option<f64>,
}

/// `[adapters]`: the memory budget of loaded adapters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptersSection {
    /// Bytes of adapter weights kept in memory; 0 means no limit.
    pub max_resident_bytes: Option<u64>,
}

/// `[kernels]`: CPU kernel tuning (A/B measurements, or working around a misbehaving BLAS).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelsSection {
    /// false: keep every matmul on candle's own kernels instead of OpenBLAS.
    pub blas: Option<bool>,
    /// false: send 2-16-row f32 products (decode steps) to OpenBLAS too, not our kernel.
    pub skinny: Option<bool>,
    /// `auto` or an OpenBLAS core type to re-execute with (see `ops::blas::ensure_coretype_env`).
    pub openblas_coretype: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub host: Option<String>,
    pub port: Option<u16>,
    /// On SIGTERM, how long running requests may take to finish before they are cut.
    pub shutdown_grace_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub path: Option<PathBuf>,
    pub device: Option<String>,
    /// What saved adapters name as their base (`base_model_name_or_path`); default: the hub id
    /// the model files carry, else the served name.
    pub hub_id: Option<String>,
    /// How the weights are held: `auto` (as stored, the default), `f32` (what full fine-tuning
    /// needs), `bf16`, `f16`, `q8_0`, `q4_k`.
    pub weights: Option<WeightsMode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub data_dir: Option<PathBuf>,
    /// The `organization_id` of jobs and the `{org}` of tuned model names.
    pub organization_id: Option<String>,
    /// Size limit of one uploaded file (datasets, adapter weights).
    pub max_upload_bytes: Option<u64>,
    /// `sqlite://PATH` (default: `<data_dir>/itamae.db`) or `postgres://…` shared by replicas.
    pub database_url: Option<String>,
    /// This replica's name in job leases; default: hostname and process id.
    pub replica_id: Option<String>,
    /// How long a replica's claim on a running job lasts without a heartbeat.
    pub job_lease_secs: Option<u64>,
    /// Where uploads, checkpoints, results and imported adapters' bytes go: unset = the data
    /// directory; `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix` or
    /// `file:///dir`.
    pub objects: Option<String>,
    /// Options of the object store's client (credentials, region, endpoint), keys as the
    /// `object_store` crate spells them; they override the `AWS_*`/`GOOGLE_*`/`AZURE_*`
    /// environment.
    #[serde(default)]
    pub object_options: std::collections::BTreeMap<String, String>,
}

/// Where the objects live and how to reach them: the URL and the builder options of its
/// scheme (credentials among them). `Debug` shows option values only for keys known not to be
/// secret.
#[derive(Clone, Default, PartialEq)]
pub struct ObjectsConfig {
    pub url: String,
    /// Keys as the `object_store` builders spell them (`aws_access_key_id`, `aws_region`,
    /// `google_service_account`, `azure_storage_account_key`, ...); the environment
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`) is read first and these override it.
    pub options: Vec<(String, String)>,
}

/// Option keys whose values may be shown (everything else is assumed to be a secret).
const PUBLIC_OPTIONS: &[&str] = &[
    "aws_region",
    "region",
    "aws_default_region",
    "aws_endpoint",
    "aws_endpoint_url",
    "endpoint",
    "endpoint_url",
    "aws_allow_http",
    "allow_http",
    "aws_virtual_hosted_style_request",
    "virtual_hosted_style_request",
    "azure_storage_account_name",
    "account_name",
    "azure_use_emulator",
    "use_emulator",
];

impl std::fmt::Debug for ObjectsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: Vec<(&str, &str)> = self
            .options
            .iter()
            .map(|(k, v)| {
                let shown = PUBLIC_OPTIONS.contains(&k.to_ascii_lowercase().as_str());
                (k.as_str(), if shown { v.as_str() } else { "<redacted>" })
            })
            .collect();
        f.debug_struct("ObjectsConfig")
            .field("url", &self.url)
            .field("options", &options)
            .finish()
    }
}

/// `[auth]`: API keys and their scopes (checked by `api::auth`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    #[serde(default)]
    pub keys: Vec<ApiKeyEntry>,
    /// Serve `/metrics` without a key.
    #[serde(default)]
    pub metrics_public: bool,
}

/// One API key as configured. The scope stays text here: `api::auth` owns what scopes mean
/// and refuses unknown ones.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    pub key: String,
    /// `admin` or `inference`.
    pub scope: String,
}

impl std::fmt::Debug for ApiKeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("ApiKeyEntry")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Parses `ITAMAE_API_KEYS`: comma-separated `scope:key` entries (a key may hold `:`).
pub fn parse_env_keys(v: &str) -> Result<Vec<ApiKeyEntry>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (scope, key) = e.split_once(':').ok_or_else(|| {
                "ITAMAE_API_KEYS entries must be `scope:key` (scope `admin` or `inference`)"
                    .to_string()
            })?;
            Ok(ApiKeyEntry {
                key: key.to_string(),
                scope: scope.to_string(),
            })
        })
        .collect()
}

/// The API keys after resolution: the file's (`[auth] keys`) and the environment's
/// (`ITAMAE_API_KEYS`, added to them), kept apart so errors say where a bad key came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthConfig {
    pub file_keys: Vec<ApiKeyEntry>,
    pub env_keys: Vec<ApiKeyEntry>,
    pub metrics_public: bool,
}

impl FileConfig {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PORT: u16 = 8080;
pub const DEFAULT_DATA_DIR: &str = "data";
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
pub const DEFAULT_TRAINING_MAX_SHARE: f64 = 0.5;
pub const DEFAULT_JOB_LEASE_SECS: u64 = 30;

/// `hostname-pid`: unique among the replicas of one database as long as host names are.
pub fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "itamaed".into());
    format!("{host}-{}", std::process::id())
}

/// An on/off switch as the kernel variables have always read it: `0` or `off` turns it off,
/// anything else leaves it on.
fn switch(v: &str) -> Result<bool, String> {
    Ok(!matches!(v.trim(), "0" | "off"))
}

/// A byte count; surrounding blanks are ignored.
fn bytes(v: &str) -> Result<u64, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("{v:?} is not a number of bytes"))
}

/// Kernel-tuning flags, for every subcommand (each also read from its environment variable).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KernelArgs {
    /// `off`/`0`: keep every matmul on candle's own kernels instead of OpenBLAS ([kernels] blas).
    #[arg(long, env = "ITAMAE_BLAS", value_name = "on|off", value_parser = switch, global = true)]
    pub blas: Option<bool>,
    /// `off`/`0`: send 2-16-row products (decode steps) to OpenBLAS too ([kernels] skinny).
    #[arg(long, env = "ITAMAE_SKINNY", value_name = "on|off", value_parser = switch, global = true)]
    pub skinny: Option<bool>,
    /// `auto` or an OpenBLAS core type: re-execute with that OPENBLAS_CORETYPE when the
    /// inherited one runs slower kernels than the CPU has ([kernels] openblas_coretype).
    #[arg(
        long,
        env = "ITAMAE_OPENBLAS_CORETYPE",
        value_name = "auto|CORE",
        global = true
    )]
    pub openblas_coretype: Option<String>,
}

impl KernelArgs {
    /// Flags and environment over `file` over the defaults.
    pub fn resolve(&self, file: &KernelsSection) -> KernelConfig {
        let default = KernelConfig::default();
        KernelConfig {
            blas: self.blas.or(file.blas).unwrap_or(default.blas),
            skinny: self.skinny.or(file.skinny).unwrap_or(default.skinny),
            openblas_coretype: self
                .openblas_coretype
                .clone()
                .or_else(|| file.openblas_coretype.clone())
                .filter(|c| !c.trim().is_empty())
                .or(default.openblas_coretype),
        }
    }
}

/// `--weights` / `ITAMAE_WEIGHTS`: how the base model's weight matrices are held, for `serve`
/// (where `[model] weights` fills it) and every command that loads the model.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct WeightsArg {
    /// Base weights: auto (as stored: GGUF blocks stay quantized, safetensors keep bf16/f16),
    /// or f32, bf16, f16, q8_0, q4_k (converted at load). Default auto; full fine-tuning
    /// (`--method full`) needs f32 and is refused otherwise (`export-hf` always loads f32).
    #[arg(long = "weights", env = "ITAMAE_WEIGHTS", value_name = "MODE")]
    pub weights: Option<WeightsMode>,
}

impl WeightsArg {
    /// The mode given, else the file's, else the default.
    pub fn resolve(&self, file: Option<WeightsMode>) -> WeightsMode {
        self.weights.or(file).unwrap_or_default()
    }
}

/// `itamaed serve`'s flags, each with its environment variable. (No `Debug`: it holds the
/// API keys as given.)
#[derive(Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (see configs/itamae.toml).
    #[arg(long, env = "ITAMAE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Base model: a GGUF file or an HF directory.
    #[arg(long, env = "ITAMAE_MODEL")]
    pub model: Option<PathBuf>,
    #[arg(long, env = "ITAMAE_HOST")]
    pub host: Option<String>,
    #[arg(long, env = "ITAMAE_PORT")]
    pub port: Option<u16>,
    #[arg(long, env = "ITAMAE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, env = "ITAMAE_DEVICE")]
    pub device: Option<String>,
    #[command(flatten)]
    pub weights: WeightsArg,
    /// Serve a PEFT adapter directory as a variant: `NAME=DIR` (repeatable).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    /// On SIGTERM, seconds running requests get to finish ([server] shutdown_grace_secs).
    #[arg(long, env = "ITAMAE_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Share of time training keeps while requests are served ([training] max_share).
    #[arg(long, env = "ITAMAE_TRAINING_MAX_SHARE")]
    pub training_max_share: Option<f64>,
    /// Memory budget of loaded adapters in bytes, 0 = none ([adapters] max_resident_bytes).
    #[arg(long, env = "ITAMAE_ADAPTERS_MAX_RESIDENT_BYTES")]
    pub adapters_max_resident_bytes: Option<u64>,
    /// What saved adapters name as their base model ([model] hub_id).
    #[arg(long, env = "ITAMAE_MODEL_HUB_ID")]
    pub model_hub_id: Option<String>,
    /// The `organization_id` of jobs and the `{org}` of tuned model names
    /// ([storage] organization_id).
    #[arg(long, env = "ITAMAE_ORGANIZATION_ID")]
    pub organization_id: Option<String>,
    /// Size limit of one upload in bytes ([storage] max_upload_bytes).
    #[arg(long, env = "ITAMAE_MAX_UPLOAD_BYTES", value_parser = bytes)]
    pub max_upload_bytes: Option<u64>,
    /// sqlite://PATH or postgres://USER@HOST/DB ([storage] database_url; default: the data
    /// directory's itamae.db). The value is never shown: it may hold a password.
    #[arg(long, env = "ITAMAE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// This replica's name in job leases ([storage] replica_id; default: hostname-pid).
    #[arg(long, env = "ITAMAE_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Seconds a replica's claim on a running job lasts without a heartbeat
    /// ([storage] job_lease_secs).
    #[arg(long, env = "ITAMAE_JOB_LEASE_SECS")]
    pub job_lease_secs: Option<u64>,
    /// Object storage URL ([storage] objects): s3://bucket/prefix, gs://…, az://…, file:///dir;
    /// unset = the data directory.
    #[arg(long, env = "ITAMAE_OBJECTS", value_name = "URL")]
    pub objects: Option<String>,
    /// API keys `scope:key,...`, added to [auth] keys. Environment only: a flag would show
    /// them in the process list.
    #[arg(long, env = "ITAMAE_API_KEYS", hide = true, hide_env_values = true)]
    pub api_keys: Option<String>,
    /// MiB of recent prompts' keys and values kept for reuse, 0 = off
    /// ([engine] prompt_cache_mb).
    #[arg(long, env = "ITAMAE_PROMPT_CACHE_MB")]
    pub prompt_cache_mb: Option<u64>,
    /// Set from the top-level kernel flags (they apply to every subcommand).
    #[arg(skip)]
    pub kernels: KernelArgs,
}

/// Every setting of `itamaed serve` after flag > env > file > default resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    pub model: PathBuf,
    pub host: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub device: String,
    /// `model.weights`.
    pub weights: WeightsMode,
    pub shutdown_grace: std::time::Duration,
    /// In (0, 1].
    pub training_max_share: f64,
    /// None: no limit.
    pub adapters_max_resident_bytes: Option<u64>,
    /// PEFT directories served as variants at start-up: `(name, dir)`.
    pub adapters: Vec<(String, PathBuf)>,
    /// None: the hub id the model files carry, else the served name.
    pub hub_id: Option<String>,
    /// None: the jobs layer's default.
    pub organization_id: Option<String>,
    /// None: the jobs layer's default.
    pub max_upload_bytes: Option<u64>,
    /// None: `<data_dir>/itamae.db`.
    pub database_url: Option<DatabaseUrl>,
    pub replica_id: String,
    pub job_lease: std::time::Duration,
    /// None: the data directory holds the bytes (the embedded default).
    pub objects: Option<ObjectsConfig>,
    pub auth: AuthConfig,
    pub kernels: KernelConfig,
    /// Prompt cache budget in MiB (0: off).
    pub prompt_cache_mb: u64,
}

impl ServeConfig {
    /// Reads the config file the arguments name (if any) and resolves everything.
    pub fn load(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(p) => FileConfig::read(p)?,
            None => FileConfig::default(),
        };
        Self::resolve(file, args)
    }

    /// Errors name the setting (`training.max_share`) when a value is out of range.
    pub fn resolve(file: FileConfig, a: ServeArgs) -> Result<Self, ConfigError> {
        let adapters = a
            .adapters
            .iter()
            .map(|s| match s.split_once('=') {
                Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
                    Ok((name.to_string(), PathBuf::from(dir)))
                }
                _ => Err(ConfigError::Adapter(s.clone())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let share = a
            .training_max_share
            .or(file.training.max_share)
            .unwrap_or(DEFAULT_TRAINING_MAX_SHARE);
        if !(share.is_finite() && share > 0.0 && share <= 1.0) {
            return Err(ConfigError::Value {
                key: "training.max_share",
                message: format!("must be greater than 0 and at most 1, got {share}"),
            });
        }
        let env_keys = match &a.api_keys {
            Some(v) => parse_env_keys(v).map_err(ConfigError::ApiKeys)?,
            None => Vec::new(),
        };
        let non_blank = |s: &String| !s.trim().is_empty();
        let database_url = a
            .database_url
            .filter(non_blank)
            .or(file.storage.database_url.filter(non_blank))
            .map(|u| DatabaseUrl::parse(u.trim()))
            .transpose()
            .map_err(|message| ConfigError::Value {
                key: "storage.database_url",
                message,
            })?;
        let job_lease_secs = a
            .job_lease_secs
            .or(file.storage.job_lease_secs)
            .unwrap_or(DEFAULT_JOB_LEASE_SECS);
        if job_lease_secs == 0 {
            return Err(ConfigError::Value {
                key: "storage.job_lease_secs",
                message: "must be at least 1".into(),
            });
        }
        Ok(Self {
            database_url,
            replica_id: a
                .replica_id
                .filter(non_blank)
                .or(file.storage.replica_id.filter(non_blank))
                .unwrap_or_else(default_replica_id),
            job_lease: std::time::Duration::from_secs(job_lease_secs),
            shutdown_grace: std::time::Duration::from_secs(
                a.shutdown_grace_secs
                    .or(file.server.shutdown_grace_secs)
                    .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECS),
            ),
            training_max_share: share,
            adapters_max_resident_bytes: a
                .adapters_max_resident_bytes
                .or(file.adapters.max_resident_bytes)
                .filter(|&b| b > 0),
            model: a
                .model
                .or(file.model.path)
                .unwrap_or_else(|| DEFAULT_MODEL.into()),
            host: a
                .host
                .or(file.server.host)
                .unwrap_or_else(|| DEFAULT_HOST.into()),
            port: a.port.or(file.server.port).unwrap_or(DEFAULT_PORT),
            data_dir: a
                .data_dir
                .or(file.storage.data_dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            device: a
                .device
                .or(file.model.device)
                .unwrap_or_else(|| "cpu".into()),
            weights: a.weights.resolve(file.model.weights),
            adapters,
            // A blank value counts as unset at every level, as it always has.
            hub_id: a
                .model_hub_id
                .filter(non_blank)
                .or(file.model.hub_id.filter(non_blank)),
            organization_id: a
                .organization_id
                .filter(|o| !o.is_empty())
                .or(file.storage.organization_id),
            max_upload_bytes: a.max_upload_bytes.or(file.storage.max_upload_bytes),
            objects: a
                .objects
                .filter(non_blank)
                .or(file.storage.objects.filter(non_blank))
                .map(|url| ObjectsConfig {
                    url,
                    options: file.storage.object_options.into_iter().collect(),
                }),
            auth: AuthConfig {
                file_keys: file.auth.keys,
                env_keys,
                metrics_public: file.auth.metrics_public,
            },
            kernels: a.kernels.resolve(&file.kernels),
            prompt_cache_mb: a
                .prompt_cache_mb
                .or(file.engine.prompt_cache_mb)
                .unwrap_or(crate::engine::DEFAULT_PROMPT_CACHE_MB),
        })
    }
}

/// Process-wide settings every entry point applies first thing in `main`, before any BLAS call
/// or thread start: the OpenBLAS core type (which may re-execute the process), the thread-pool
/// defaults candle and rayon read from the environment, the kernel switches for `ops`, and the
/// log (`RUST_LOG`, default `info`, on stderr so stdout stays the command's own output).
pub fn start_process(kernels: &KernelConfig) {
    // OpenBLAS reads its CPU core type only when it loads: re-exec with it set when this CPU
    // would be misdetected (docs/candle-notes.md).
    if let Err(e) = crate::ops::blas::ensure_coretype_env(kernels.openblas_coretype.as_deref()) {
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
    crate::ops::blas::configure(kernels.clone());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,actix_server=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The compute device named in the config. CUDA needs a build with the `cuda` feature; without
/// it candle reports that it was not compiled in, and that message is passed on.
pub fn device(name: &str) -> Result<candle_core::Device, ConfigError> {
    let unavailable = |e: candle_core::Error| ConfigError::DeviceUnavailable {
        device: name.to_string(),
        message: e.to_string(),
    };
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => candle_core::Device::new_cuda(0).map_err(unavailable),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => candle_core::Device::new_cuda(n).map_err(unavailable),
            _ => Err(ConfigError::Device(other.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flag_over_file_over_default() {
        let file: FileConfig = toml::from_str(
            "[server]\nport = 9000\nhost = \"0.0.0.0\"\n[model]\npath = \"m.gguf\"\n",
        )
        .unwrap();
        let c = ServeConfig::resolve(
            file,
            ServeArgs {
                port: Some(1234),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.port, 1234);
        assert_eq!(c.shutdown_grace.as_secs(), DEFAULT_SHUTDOWN_GRACE_SECS);
        assert_eq!(c.training_max_share, DEFAULT_TRAINING_MAX_SHARE);
        assert_eq!(c.adapters_max_resident_bytes, None);
        assert_eq!(c.host, "0.0.0.0");
        assert_eq!(c.model, PathBuf::from("m.gguf"));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.kernels, KernelConfig::default());
    }

    #[test]
    fn storage_database_and_leases() {
        let c = ServeConfig::resolve(FileConfig::default(), ServeArgs::default()).unwrap();
        assert_eq!(c.database_url, None);
        assert_eq!(c.job_lease.as_secs(), DEFAULT_JOB_LEASE_SECS);
        assert!(c.replica_id.ends_with(&format!("-{}", std::process::id())));
        let file: FileConfig = toml::from_str(
            "[storage]\ndatabase_url = \"sqlite://f.db\"\nreplica_id = \"a\"\njob_lease_secs = 3\n",
        )
        .unwrap();
        let c = ServeConfig::resolve(
            file,
            ServeArgs {
                database_url: Some("postgres://u:hunter2@h/db".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            c.database_url,
            Some(DatabaseUrl::Postgres("postgres://u:hunter2@h/db".into()))
        );
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!((c.replica_id.as_str(), c.job_lease.as_secs()), ("a", 3));
        let file: FileConfig =
            toml::from_str("[storage]\ndatabase_url = \"mysql://u:pw@h/db\"\n").unwrap();
        let e = ServeConfig::resolve(file, ServeArgs::default()).unwrap_err();
        assert!(e.to_string().contains("storage.database_url"), "{e}");
        let file: FileConfig = toml::from_str("[storage]\njob_lease_secs = 0\n").unwrap();
        let e = ServeConfig::resolve(file, ServeArgs::default()).unwrap_err();
        assert!(e.to_string().contains("storage.job_lease_secs"), "{e}");
    }

    #[test]
    fn training_and_adapter_settings() {
        let file: FileConfig = toml::from_str(
            "[server]\nshutdown_grace_secs = 5\n[training]\nmax_share = 0.25\n[adapters]\nmax_resident_bytes = 1000\n",
        )
        .unwrap();
        let c = ServeConfig::resolve(file, ServeArgs::default()).unwrap();
        assert_eq!(c.shutdown_grace.as_secs(), 5);
        assert_eq!(c.training_max_share, 0.25);
        assert_eq!(c.adapters_max_resident_bytes, Some(1000));
        for bad in ["0", "1.5", "-1", "nan"] {
            let file: FileConfig =
                toml::from_str(&format!("[training]\nmax_share = {bad}\n")).unwrap();
            let e = ServeConfig::resolve(file, ServeArgs::default()).unwrap_err();
            assert!(e.to_string().contains("training.max_share"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_and_devices_are_errors() {
        assert!(toml::from_str::<FileConfig>("[server]\nprot = 1\n").is_err());
        assert!(toml::from_str::<FileConfig>("[kernels]\nblass = false\n").is_err());
        assert!(matches!(device("tpu"), Err(ConfigError::Device(_))));
        assert!(device("cpu").is_ok());
    }

    #[test]
    fn shipped_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/itamae.toml");
        let c = FileConfig::read(&p).unwrap();
        // The shipped file documents keys but configures none: auth is off on loopback.
        assert!(c.auth.keys.is_empty());
        assert!(!c.auth.metrics_public);
        assert_eq!(c.storage.organization_id.as_deref(), Some("itamae"));
        // It states the default weights mode, the kernel defaults, and pins no core type.
        assert_eq!(c.model.weights, Some(WeightsMode::default()));
        let k = KernelArgs::default().resolve(&c.kernels);
        assert_eq!(k, KernelConfig::default());
    }

    #[test]
    fn auth_section_and_env_keys() {
        let c: FileConfig = toml::from_str(
            "[auth]\nmetrics_public = true\nkeys = [{ key = \"0123456789abcdef-admin\", scope = \"admin\" }]\n",
        )
        .unwrap();
        let r = ServeConfig::resolve(
            c,
            ServeArgs {
                api_keys: Some("inference:0123456789abcdef-infer".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(r.auth.metrics_public);
        assert_eq!(r.auth.file_keys[0].key, "0123456789abcdef-admin");
        assert_eq!(r.auth.file_keys[0].scope, "admin");
        assert_eq!(r.auth.env_keys[0].key, "0123456789abcdef-infer");
        assert_eq!(r.auth.env_keys[0].scope, "inference");
        assert!(!format!("{r:?}").contains("0123456789abcdef"));
        let e = ServeConfig::resolve(
            FileConfig::default(),
            ServeArgs {
                api_keys: Some("justakey".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("API keys: "), "{e}");
        assert!(toml::from_str::<FileConfig>("[auth]\nkey = 1\n").is_err());
    }

    #[test]
    fn env_keys_parse() {
        let k = parse_env_keys(" admin:admin-key-0123456789 , inference:infer-key-0123456789,")
            .unwrap();
        let pairs: Vec<_> = k
            .iter()
            .map(|e| (e.key.as_str(), e.scope.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("admin-key-0123456789", "admin"),
                ("infer-key-0123456789", "inference")
            ]
        );
        // A key may itself hold `:`.
        let k = parse_env_keys("admin:a:b").unwrap();
        assert_eq!((k[0].key.as_str(), k[0].scope.as_str()), ("a:b", "admin"));
        assert!(parse_env_keys("justakey").is_err());
    }

    #[test]
    fn adapters_and_blank_values() {
        let file: FileConfig =
            toml::from_str("[model]\nhub_id = \"org/file\"\n[storage]\norganization_id = \"f\"\n")
                .unwrap();
        let c = ServeConfig::resolve(
            file,
            ServeArgs {
                adapters: vec!["a=dir/a".into()],
                model_hub_id: Some("  ".into()),
                organization_id: Some(String::new()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.adapters, vec![("a".to_string(), PathBuf::from("dir/a"))]);
        assert_eq!(c.hub_id.as_deref(), Some("org/file"));
        assert_eq!(c.organization_id.as_deref(), Some("f"));
        for bad in ["a", "=d", "a="] {
            let e = ServeConfig::resolve(
                FileConfig::default(),
                ServeArgs {
                    adapters: vec![bad.into()],
                    ..Default::default()
                },
            )
            .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("--adapter expects NAME=DIR, got `{bad}`")
            );
        }
    }

    /// `storage.objects`: flag over file, blank = unset (the data directory); the file's
    /// client options come along, and `Debug` never shows a secret one.
    #[test]
    fn objects_setting_resolves_and_redacts_secrets() {
        if std::env::var_os("ITAMAE_OBJECTS").is_some() {
            return; // set by whoever runs the tests: env outranks the file here
        }
        assert_eq!(resolve(&["itamaed", "serve"], "").objects, None);
        let file = "[storage]\nobjects = \"s3://b/p\"\n[storage.object_options]\n\
                    aws_secret_access_key = \"hunter2\"\naws_region = \"eu-west-1\"\n";
        let c = resolve(&["itamaed", "serve"], file);
        let o = c.objects.clone().unwrap();
        assert_eq!(o.url, "s3://b/p");
        assert_eq!(o.options.len(), 2);
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("eu-west-1"), "{shown}");
        let c = resolve(&["itamaed", "serve", "--objects", "gs://g/x"], file);
        assert_eq!(c.objects.unwrap().url, "gs://g/x");
        assert_eq!(
            resolve(&["itamaed", "serve", "--objects", " "], "").objects,
            None
        );
    }

    /// `itamaed`'s shape: kernel flags global on the top level, serve's flags on a subcommand.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kernels: KernelArgs,
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(clap::Subcommand)]
    enum Sub {
        Serve(ServeArgs),
    }

    fn resolve(argv: &[&str], file: &str) -> ServeConfig {
        let cli = Cli::try_parse_from(argv).unwrap();
        let Sub::Serve(mut args) = cli.command;
        args.kernels = cli.kernels;
        ServeConfig::resolve(toml::from_str(file).unwrap(), args).unwrap()
    }

    /// `model.weights`: flag over file over the `auto` default; unknown modes are refused at
    /// both levels, naming the accepted ones.
    #[test]
    fn weights_mode_resolves_and_unknown_modes_are_refused() {
        if std::env::var_os("ITAMAE_WEIGHTS").is_some() {
            return; // set by whoever runs the tests: env outranks the file here
        }
        assert_eq!(
            resolve(&["itamaed", "serve"], "").weights,
            WeightsMode::Auto
        );
        let file = "[model]\nweights = \"q8_0\"\n";
        assert_eq!(
            resolve(&["itamaed", "serve"], file).weights,
            WeightsMode::Q8_0
        );
        let c = resolve(&["itamaed", "serve", "--weights", "f32"], file);
        assert_eq!(c.weights, WeightsMode::F32);
        let e = Cli::try_parse_from(["itamaed", "serve", "--weights", "q3_k"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("q4_k"), "{e}");
        let e = toml::from_str::<FileConfig>("[model]\nweights = \"q3_k\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("weights") || e.contains("q3_k"), "{e}");
    }

    /// Flag > env > file > default for a server key, a training key and kernel keys. The only
    /// test here that sets these variables (tests run in parallel threads of one process).
    #[test]
    fn precedence_flag_env_file_default() {
        const VARS: [&str; 5] = [
            "ITAMAE_PORT",
            "ITAMAE_BLAS",
            "ITAMAE_TRAINING_MAX_SHARE",
            "ITAMAE_SKINNY",
            "ITAMAE_OPENBLAS_CORETYPE",
        ];
        let saved: Vec<_> = VARS.iter().map(std::env::var_os).collect();
        for v in VARS {
            std::env::remove_var(v);
        }
        let file = "[server]\nport = 9000\n[training]\nmax_share = 0.25\n[kernels]\nskinny = false\nblas = false\nopenblas_coretype = \"Haswell\"\n";

        // Default: no flag, no env, no file.
        let c = resolve(&["itamaed", "serve"], "");
        assert_eq!(c.port, DEFAULT_PORT);
        assert_eq!(c.training_max_share, DEFAULT_TRAINING_MAX_SHARE);
        assert!(c.kernels.skinny && c.kernels.blas);
        assert_eq!(c.kernels.openblas_coretype, None);
        // File over default.
        let c = resolve(&["itamaed", "serve"], file);
        assert_eq!(c.port, 9000);
        assert_eq!(c.training_max_share, 0.25);
        assert!(!c.kernels.skinny && !c.kernels.blas);
        assert_eq!(c.kernels.openblas_coretype.as_deref(), Some("Haswell"));
        // Env over file (any value but `0`/`off` turns a switch on, as it always has).
        std::env::set_var("ITAMAE_PORT", "9100");
        std::env::set_var("ITAMAE_TRAINING_MAX_SHARE", "0.75");
        std::env::set_var("ITAMAE_SKINNY", "1");
        std::env::set_var("ITAMAE_OPENBLAS_CORETYPE", "auto");
        let c = resolve(&["itamaed", "serve"], file);
        assert_eq!(c.port, 9100);
        assert_eq!(c.training_max_share, 0.75);
        assert!(c.kernels.skinny);
        assert!(!c.kernels.blas, "blas comes from the file still");
        assert_eq!(c.kernels.openblas_coretype.as_deref(), Some("auto"));
        // Flag over env, before or after the subcommand for the kernel flags.
        let c = resolve(
            &[
                "itamaed",
                "--skinny",
                "off",
                "serve",
                "--port",
                "9200",
                "--training-max-share",
                "1",
                "--openblas-coretype",
                "Zen",
            ],
            file,
        );
        assert_eq!(c.port, 9200);
        assert_eq!(c.training_max_share, 1.0);
        assert!(!c.kernels.skinny);
        assert_eq!(c.kernels.openblas_coretype.as_deref(), Some("Zen"));
        let c = resolve(&["itamaed", "serve", "--skinny", "0", "--blas", "on"], file);
        assert!(!c.kernels.skinny && c.kernels.blas);

        for (v, old) in VARS.iter().zip(saved) {
            match old {
                Some(o) => std::env::set_var(v, o),
                None => std::env::remove_var(v),
            }
        }
    }
}

#[cfg(test)]
mod prompt_cache_tests {
    use super::*;

    /// `engine.prompt_cache_mb`: flag over file over the default; 0 is a valid value (off).
    #[test]
    fn prompt_cache_budget_resolves() {
        if std::env::var_os("ITAMAE_PROMPT_CACHE_MB").is_some() {
            return; // set by whoever runs the tests: env outranks the file here
        }
        let resolve = |flag: Option<u64>, file: &str| {
            let args = ServeArgs {
                prompt_cache_mb: flag,
                ..Default::default()
            };
            ServeConfig::resolve(toml::from_str(file).unwrap(), args)
                .unwrap()
                .prompt_cache_mb
        };
        assert_eq!(resolve(None, ""), crate::engine::DEFAULT_PROMPT_CACHE_MB);
        let file = "[engine]\nprompt_cache_mb = 0\n";
        assert_eq!(resolve(None, file), 0);
        assert_eq!(resolve(Some(16), file), 16);
        assert!(toml::from_str::<FileConfig>("[engine]\nprompt_cache = 1\n").is_err());
    }
}
