//! Daemon configuration: a TOML file (`configs/itamae.toml` documents every key) overridden by
//! environment variables, overridden by command-line flags. Resolution lives here so that every
//! entry point (serve, bench) reads settings the same way.
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub data_dir: Option<PathBuf>,
    /// The `organization_id` of jobs and the `{org}` of tuned model names.
    pub organization_id: Option<String>,
    /// Size limit of one uploaded file (datasets, adapter weights).
    pub max_upload_bytes: Option<u64>,
}

/// `[auth]`: API keys and their scopes (see `api::auth`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    #[serde(default)]
    pub keys: Vec<ApiKeyEntry>,
    /// Serve `/metrics` without a key.
    #[serde(default)]
    pub metrics_public: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    pub key: String,
    /// `admin` or `inference`.
    pub scope: String,
}

impl AuthSection {
    /// The config's keys plus `ITAMAE_API_KEYS` (`scope:key,...`, given as `env`).
    pub fn resolve(&self, env: Option<&str>) -> Result<crate::api::auth::Auth, String> {
        use crate::api::auth::{parse_env_keys, Auth, Scope};
        let mut keys = self
            .keys
            .iter()
            .map(|k| Ok((k.key.clone(), Scope::parse(&k.scope)?)))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| format!("[auth] keys: {e}"))?;
        if let Some(v) = env {
            keys.extend(parse_env_keys(v)?);
        }
        Auth::new(keys, self.metrics_public)
    }
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

/// Settings after flag > env > file > default resolution. Flags and env vars arrive together
/// through clap (`#[arg(env = ...)]`), which already gives flags precedence.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    pub model: PathBuf,
    pub host: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub device: String,
    pub shutdown_grace: std::time::Duration,
    /// In (0, 1].
    pub training_max_share: f64,
    /// None: no limit.
    pub adapters_max_resident_bytes: Option<u64>,
}

/// Values given on the command line or in the environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub model: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub data_dir: Option<PathBuf>,
    pub device: Option<String>,
    pub shutdown_grace_secs: Option<u64>,
    pub training_max_share: Option<f64>,
    pub adapters_max_resident_bytes: Option<u64>,
}

impl ServeConfig {
    /// Errors name the setting (`training.max_share`) when a value is out of range.
    pub fn resolve(file: FileConfig, o: Overrides) -> Result<Self, ConfigError> {
        let share = o
            .training_max_share
            .or(file.training.max_share)
            .unwrap_or(DEFAULT_TRAINING_MAX_SHARE);
        if !(share.is_finite() && share > 0.0 && share <= 1.0) {
            return Err(ConfigError::Value {
                key: "training.max_share",
                message: format!("must be greater than 0 and at most 1, got {share}"),
            });
        }
        Ok(Self {
            shutdown_grace: std::time::Duration::from_secs(
                o.shutdown_grace_secs
                    .or(file.server.shutdown_grace_secs)
                    .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECS),
            ),
            training_max_share: share,
            adapters_max_resident_bytes: o
                .adapters_max_resident_bytes
                .or(file.adapters.max_resident_bytes)
                .filter(|&b| b > 0),
            model: o
                .model
                .or(file.model.path)
                .unwrap_or_else(|| DEFAULT_MODEL.into()),
            host: o
                .host
                .or(file.server.host)
                .unwrap_or_else(|| DEFAULT_HOST.into()),
            port: o.port.or(file.server.port).unwrap_or(DEFAULT_PORT),
            data_dir: o
                .data_dir
                .or(file.storage.data_dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            device: o
                .device
                .or(file.model.device)
                .unwrap_or_else(|| "cpu".into()),
        })
    }
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

    #[test]
    fn flag_over_file_over_default() {
        let file: FileConfig = toml::from_str(
            "[server]\nport = 9000\nhost = \"0.0.0.0\"\n[model]\npath = \"m.gguf\"\n",
        )
        .unwrap();
        let c = ServeConfig::resolve(
            file,
            Overrides {
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
    }

    #[test]
    fn training_and_adapter_settings() {
        let file: FileConfig = toml::from_str(
            "[server]\nshutdown_grace_secs = 5\n[training]\nmax_share = 0.25\n[adapters]\nmax_resident_bytes = 1000\n",
        )
        .unwrap();
        let c = ServeConfig::resolve(file, Overrides::default()).unwrap();
        assert_eq!(c.shutdown_grace.as_secs(), 5);
        assert_eq!(c.training_max_share, 0.25);
        assert_eq!(c.adapters_max_resident_bytes, Some(1000));
        for bad in ["0", "1.5", "-1", "nan"] {
            let file: FileConfig =
                toml::from_str(&format!("[training]\nmax_share = {bad}\n")).unwrap();
            let e = ServeConfig::resolve(file, Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("training.max_share"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_and_devices_are_errors() {
        assert!(toml::from_str::<FileConfig>("[server]\nprot = 1\n").is_err());
        assert!(matches!(device("tpu"), Err(ConfigError::Device(_))));
        assert!(device("cpu").is_ok());
    }

    #[test]
    fn shipped_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/itamae.toml");
        let c = FileConfig::read(&p).unwrap();
        // The shipped file documents keys but configures none: auth is off on loopback.
        assert!(!c.auth.resolve(None).unwrap().enabled());
        assert!(!c.auth.metrics_public);
        assert_eq!(c.storage.organization_id.as_deref(), Some("itamae"));
    }

    #[test]
    fn auth_section_and_env_keys() {
        let c: FileConfig = toml::from_str(
            "[auth]\nmetrics_public = true\nkeys = [{ key = \"0123456789abcdef-admin\", scope = \"admin\" }]\n",
        )
        .unwrap();
        let a = c
            .auth
            .resolve(Some("inference:0123456789abcdef-infer"))
            .unwrap();
        assert!(a.enabled());
        assert_eq!(
            a.lookup("0123456789abcdef-infer"),
            Some(crate::api::auth::Scope::Inference)
        );
        assert_eq!(
            a.lookup("0123456789abcdef-admin"),
            Some(crate::api::auth::Scope::Admin)
        );
        let bad: FileConfig =
            toml::from_str("[auth]\nkeys = [{ key = \"0123456789abcdef\", scope = \"root\" }]\n")
                .unwrap();
        assert!(bad.auth.resolve(None).unwrap_err().contains("root"));
        assert!(toml::from_str::<FileConfig>("[auth]\nkey = 1\n").is_err());
    }
}
