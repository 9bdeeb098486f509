//! A typed, blocking client for the `itamaed` HTTP API (OpenAI-style): one method per route,
//! typed request and response structs, and an [`Error`] that carries the server's
//! `{"error":{"message","type","param","code"}}` with the HTTP status.
//!
//! Response structs keep every field the server sent that they do not name in `extra`, so
//! re-serialising one (the CLI's `--json`) loses nothing.
//!
//! ```no_run
//! use itamae_client::{ChatRequest, Client, Message};
//! let client = Client::new("http://127.0.0.1:8080", None)?;
//! let model = client.models()?.data.remove(0).id;
//! let req = ChatRequest::new(&model, vec![Message::user("Hi!")]).max_tokens(30);
//! println!("{}", client.chat(&req)?.text().unwrap_or_default());
//! # Ok::<(), itamae_client::Error>(())
//! ```
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use eventsource_stream::{EventStreamError, Eventsource};
use reqwest::blocking::{multipart, RequestBuilder, Response};
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub mod load;
pub mod methods;
pub use methods::{AdapterConfig, FieldError};

/// The two files of a PEFT adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The file purpose fine-tuning jobs accept.
pub const FINE_TUNE: &str = "fine-tune";

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error body; `message` is its `error.message`.
    #[error("{message}")]
    Api {
        status: u16,
        message: String,
        kind: Option<String>,
        param: Option<String>,
        code: Option<String>,
    },
    /// The connection failed (daemon not running, wrong URL, ...).
    #[error("could not reach the server: {0}")]
    Http(#[from] reqwest::Error),
    /// Reading a streamed response failed.
    #[error("reading the response failed: {0}")]
    Io(#[from] std::io::Error),
    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The base URL is not usable.
    #[error("invalid server URL `{url}`: {reason}")]
    Url { url: String, reason: String },
    /// The server answered something this client does not understand.
    #[error("unexpected response from the server: {0}")]
    Protocol(String),
}

impl Error {
    /// The HTTP status of a server error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn file(path: &Path, source: std::io::Error) -> Self {
        Error::File {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Fields of a response object this client does not name.
pub type Extra = Map<String, Value>;

/// `{"object":"list","data":[...],"has_more":...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct List<T> {
    pub data: Vec<T>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(flatten)]
    pub extra: Extra,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A served model (`GET /v1/models`): the base, or a variant whose `parent` is the base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub owned_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    pub stream: bool,
}

impl ChatRequest {
    pub fn new(model: &str, messages: Vec<Message>) -> Self {
        Self {
            model: model.to_string(),
            messages,
            max_tokens: None,
            temperature: None,
            stream: false,
        }
    }
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }
    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = Some(t);
        self
    }
}

/// A chat completion (`chat.completion`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    pub id: String,
    pub model: String,
    pub choices: Vec<Value>,
    #[serde(default)]
    pub usage: Option<Value>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl ChatCompletion {
    /// The first choice's message content.
    pub fn text(&self) -> Option<String> {
        self.choices.first()?["message"]["content"]
            .as_str()
            .map(str::to_owned)
    }
}

/// An uploaded file (`file`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileObject {
    pub id: String,
    pub bytes: u64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The answer to a delete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deleted {
    pub id: String,
    pub deleted: bool,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub param: Option<String>,
}

/// A fine-tuning job (`fine_tuning.job`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub created_at: i64,
    pub status: String,
    pub model: String,
    #[serde(default)]
    pub error: Option<JobError>,
    #[serde(default)]
    pub fine_tuned_model: Option<String>,
    #[serde(default)]
    pub finished_at: Option<i64>,
    #[serde(default)]
    pub trained_tokens: Option<u64>,
    #[serde(default)]
    pub training_file: String,
    #[serde(default)]
    pub validation_file: Option<String>,
    #[serde(default)]
    pub estimated_finish: Option<i64>,
    #[serde(default)]
    pub hyperparameters: Value,
    #[serde(default)]
    pub method: Value,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The statuses after which a job never changes again.
pub const TERMINAL_STATUSES: [&str; 3] = ["succeeded", "failed", "cancelled"];

impl Job {
    pub fn is_finished(&self) -> bool {
        TERMINAL_STATUSES.contains(&self.status.as_str())
    }

    /// The adapter type from `method.supervised.adapter.type` (LoRA when absent).
    pub fn adapter_type(&self) -> &str {
        self.method["supervised"]["adapter"]["type"]
            .as_str()
            .unwrap_or("lora")
    }
}

/// A job event (`fine_tuning.job.event`); `kind` is `message` or `metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub id: String,
    pub created_at: i64,
    pub level: String,
    pub message: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub data: Value,
    #[serde(flatten)]
    pub extra: Extra,
}

/// A job checkpoint (`fine_tuning.job.checkpoint`), servable under its own model name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: String,
    pub created_at: i64,
    pub fine_tuned_model_checkpoint: String,
    pub step_number: u64,
    #[serde(default)]
    pub metrics: Value,
    pub fine_tuning_job_id: String,
    #[serde(flatten)]
    pub extra: Extra,
}

/// A PEFT adapter known to the server (`adapter`): imported, or a job's result or checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Adapter {
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub generation: Option<u64>,
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    pub resident: bool,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub fine_tuning_job_id: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// A hyperparameter that may be left to the server ("auto").
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AutoOr<T> {
    Auto,
    Value(T),
}

impl<T: Serialize> Serialize for AutoOr<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            AutoOr::Auto => s.serialize_str("auto"),
            AutoOr::Value(v) => v.serialize(s),
        }
    }
}

/// `method.supervised.hyperparameters`: OpenAI's three, then itamae's extensions.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Hyperparameters {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_epochs: Option<AutoOr<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<AutoOr<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate_multiplier: Option<AutoOr<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_seq_len: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
}

impl Hyperparameters {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `method.supervised`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Supervised {
    #[serde(skip_serializing_if = "Hyperparameters::is_empty")]
    pub hyperparameters: Hyperparameters,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterConfig>,
}

/// `method`: always `{"type":"supervised","supervised":{...}}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobMethod {
    pub supervised: Supervised,
}

impl Serialize for JobMethod {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("type", "supervised")?;
        m.serialize_entry("supervised", &self.supervised)?;
        m.end()
    }
}

/// `POST /v1/fine_tuning/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CreateJob {
    pub model: String,
    pub training_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    pub method: JobMethod,
}

/// A blocking client for one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    url: Url,
    api_key: Option<String>,
    http: reqwest::blocking::Client,
}

impl Client {
    /// `base_url` such as `http://127.0.0.1:8080` (a trailing `/` or `/v1` is accepted).
    pub fn new(base_url: &str, api_key: Option<String>) -> Result<Self> {
        let mut base = base_url.trim().trim_end_matches('/').to_string();
        if let Some(stripped) = base.strip_suffix("/v1") {
            base = stripped.to_string();
        }
        let bad = |reason: String| Error::Url {
            url: base_url.to_string(),
            reason,
        };
        let url = Url::parse(&base).map_err(|e| bad(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            return Err(bad("use an http:// or https:// URL".into()));
        }
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Generations and event streams can take long.
            .timeout(None)
            .build()?;
        Ok(Self {
            base,
            url,
            api_key,
            http,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The URL of `segments` below the base, each percent-encoded as one path segment (model and
    /// adapter names hold `:`; nothing a user types can add a segment).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        let mut rb = self.http.request(method, self.url(segments));
        if let Some(key) = &self.api_key {
            rb = rb.bearer_auth(key);
        }
        rb
    }

    /// Sends a request; a non-2xx answer becomes [`Error::Api`].
    fn send(&self, rb: RequestBuilder) -> Result<Response> {
        let res = rb.send()?;
        if res.status().is_success() {
            Ok(res)
        } else {
            let status = res.status().as_u16();
            let text = res.text().unwrap_or_default();
            Err(api_error(status, &text))
        }
    }

    fn json<T: DeserializeOwned>(&self, rb: RequestBuilder, what: &str) -> Result<T> {
        let text = self.send(rb)?.text()?;
        serde_json::from_str(&text).map_err(|e| Error::Protocol(format!("{what}: {e}: {text}")))
    }

    fn get<T: DeserializeOwned>(&self, segments: &[&str], what: &str) -> Result<T> {
        self.json(self.request(Method::GET, segments), what)
    }

    fn post<T: DeserializeOwned>(&self, segments: &[&str], what: &str) -> Result<T> {
        self.json(self.request(Method::POST, segments), what)
    }

    /// `GET /healthz` succeeded.
    pub fn health(&self) -> Result<()> {
        self.send(self.request(Method::GET, &["healthz"]))?;
        Ok(())
    }

    // ---- models and chat ----

    /// `GET /v1/models`.
    pub fn models(&self) -> Result<List<ModelInfo>> {
        self.get(&["v1", "models"], "model list")
    }

    /// `GET /v1/models/{id}`.
    pub fn model(&self, id: &str) -> Result<ModelInfo> {
        self.get(&["v1", "models", id], "model")
    }

    /// The base model: the one listed without a parent.
    pub fn base_model(&self) -> Result<String> {
        self.models()?
            .data
            .into_iter()
            .find(|m| m.parent.is_none())
            .map(|m| m.id)
            .ok_or_else(|| {
                Error::Protocol("the server lists no model yet (is it still loading?)".into())
            })
    }

    /// `POST /v1/chat/completions` (its `stream` flag is ignored: this is the whole answer).
    pub fn chat(&self, req: &ChatRequest) -> Result<ChatCompletion> {
        let body = ChatRequest {
            stream: false,
            ..req.clone()
        };
        self.json(
            self.request(Method::POST, &["v1", "chat", "completions"])
                .json(&body),
            "chat completion",
        )
    }

    /// `POST /v1/chat/completions` with `stream: true`: calls `on_delta` with each piece of text
    /// as it arrives and returns the whole answer. An error from `on_delta` (e.g. the reader of
    /// our output went away) stops reading and closes the connection, which makes the server
    /// drop the generation instead of producing the rest of it for nobody.
    pub fn chat_stream(
        &self,
        req: &ChatRequest,
        mut on_delta: impl FnMut(&str) -> std::io::Result<()>,
    ) -> Result<String> {
        let body = ChatRequest {
            stream: true,
            ..req.clone()
        };
        let res = self.send(
            self.request(Method::POST, &["v1", "chat", "completions"])
                .json(&body),
        )?;
        let mut text = String::new();
        read_sse(res, |data| {
            let delta = chat_delta(data)?;
            if !delta.is_empty() {
                on_delta(&delta).map_err(Error::Io)?;
                text.push_str(&delta);
            }
            Ok(())
        })?;
        Ok(text)
    }

    // ---- files ----

    /// `POST /v1/files` (multipart): uploads a local file.
    pub fn upload_file(&self, path: &Path, purpose: &str) -> Result<FileObject> {
        let form = multipart::Form::new()
            .text("purpose", purpose.to_string())
            .file("file", path)
            .map_err(|e| Error::file(path, e))?;
        self.json(
            self.request(Method::POST, &["v1", "files"]).multipart(form),
            "file",
        )
    }

    /// `GET /v1/files`, newest first.
    pub fn files(&self) -> Result<List<FileObject>> {
        self.get(&["v1", "files"], "file list")
    }

    /// `GET /v1/files/{id}`.
    pub fn file(&self, id: &str) -> Result<FileObject> {
        self.get(&["v1", "files", id], "file")
    }

    /// `DELETE /v1/files/{id}`.
    pub fn delete_file(&self, id: &str) -> Result<Deleted> {
        self.json(self.request(Method::DELETE, &["v1", "files", id]), "delete")
    }

    /// `GET /v1/files/{id}/content` into `out`; returns the byte count.
    pub fn file_content(&self, id: &str, out: &mut impl Write) -> Result<u64> {
        let mut res = self.send(self.request(Method::GET, &["v1", "files", id, "content"]))?;
        Ok(std::io::copy(&mut res, out)?)
    }

    // ---- fine-tuning jobs ----

    /// `POST /v1/fine_tuning/jobs`.
    pub fn create_job(&self, req: &CreateJob) -> Result<Job> {
        self.json(
            self.request(Method::POST, &["v1", "fine_tuning", "jobs"])
                .json(req),
            "job",
        )
    }

    /// `GET /v1/fine_tuning/jobs` (newest first; `after` a job id).
    pub fn jobs(&self, after: Option<&str>, limit: Option<u32>) -> Result<List<Job>> {
        let rb = self.request(Method::GET, &["v1", "fine_tuning", "jobs"]);
        self.json(page(rb, after, limit), "job list")
    }

    /// `GET /v1/fine_tuning/jobs/{id}`.
    pub fn job(&self, id: &str) -> Result<Job> {
        self.get(&["v1", "fine_tuning", "jobs", id], "job")
    }

    /// `POST /v1/fine_tuning/jobs/{id}/cancel`.
    pub fn cancel_job(&self, id: &str) -> Result<Job> {
        self.post(&["v1", "fine_tuning", "jobs", id, "cancel"], "job")
    }

    /// `POST /v1/fine_tuning/jobs/{id}/pause`.
    pub fn pause_job(&self, id: &str) -> Result<Job> {
        self.post(&["v1", "fine_tuning", "jobs", id, "pause"], "job")
    }

    /// `POST /v1/fine_tuning/jobs/{id}/resume`.
    pub fn resume_job(&self, id: &str) -> Result<Job> {
        self.post(&["v1", "fine_tuning", "jobs", id, "resume"], "job")
    }

    /// `GET /v1/fine_tuning/jobs/{id}/events` (newest first; `after` an event id).
    pub fn job_events(
        &self,
        id: &str,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<List<JobEvent>> {
        let rb = self.request(Method::GET, &["v1", "fine_tuning", "jobs", id, "events"]);
        self.json(page(rb, after, limit), "event list")
    }

    /// `GET /v1/fine_tuning/jobs/{id}/events?stream=true`: every event oldest first, then the
    /// live ones, until the job has ended and the server closes the stream.
    pub fn stream_job_events(
        &self,
        id: &str,
        mut on_event: impl FnMut(JobEvent) -> Result<()>,
    ) -> Result<()> {
        let rb = self
            .request(Method::GET, &["v1", "fine_tuning", "jobs", id, "events"])
            .query(&[("stream", "true")]);
        let res = self.send(rb)?;
        read_sse(res, |data| {
            let ev: JobEvent = serde_json::from_str(data)
                .map_err(|e| Error::Protocol(format!("bad job event {data:?}: {e}")))?;
            on_event(ev)
        })
    }

    /// `GET /v1/fine_tuning/jobs/{id}/checkpoints` (newest step first).
    pub fn job_checkpoints(
        &self,
        id: &str,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<List<Checkpoint>> {
        let rb = self.request(
            Method::GET,
            &["v1", "fine_tuning", "jobs", id, "checkpoints"],
        );
        self.json(page(rb, after, limit), "checkpoint list")
    }

    // ---- adapters ----

    /// `GET /v1/adapters`.
    pub fn adapters(&self) -> Result<List<Adapter>> {
        self.get(&["v1", "adapters"], "adapter list")
    }

    /// `GET /v1/adapters/{id}`.
    pub fn adapter(&self, id: &str) -> Result<Adapter> {
        self.get(&["v1", "adapters", id], "adapter")
    }

    /// `POST /v1/adapters/{id}/load`.
    pub fn load_adapter(&self, id: &str) -> Result<Adapter> {
        self.post(&["v1", "adapters", id, "load"], "adapter")
    }

    /// `POST /v1/adapters/{id}/unload`.
    pub fn unload_adapter(&self, id: &str) -> Result<Adapter> {
        self.post(&["v1", "adapters", id, "unload"], "adapter")
    }

    /// `DELETE /v1/adapters/{id}`.
    pub fn delete_adapter(&self, id: &str) -> Result<Deleted> {
        self.json(
            self.request(Method::DELETE, &["v1", "adapters", id]),
            "delete",
        )
    }

    /// `POST /v1/adapters` (multipart): imports the PEFT directory `dir` as `name`.
    /// `if_generation` makes it a compare-and-set (0: the name must be free).
    pub fn import_adapter(
        &self,
        name: &str,
        dir: &Path,
        if_generation: Option<u64>,
    ) -> Result<Adapter> {
        let mut form = multipart::Form::new().text("name", name.to_string());
        for file in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
            let path = dir.join(file);
            form = form.file(file, &path).map_err(|e| Error::file(&path, e))?;
        }
        if let Some(g) = if_generation {
            form = form.text("if_generation", g.to_string());
        }
        self.json(
            self.request(Method::POST, &["v1", "adapters"])
                .multipart(form),
            "adapter",
        )
    }

    /// `GET /v1/adapters/{id}/files/{name}` into `out`; returns the byte count.
    pub fn adapter_file(&self, id: &str, name: &str, out: &mut impl Write) -> Result<u64> {
        let mut res =
            self.send(self.request(Method::GET, &["v1", "adapters", id, "files", name]))?;
        Ok(std::io::copy(&mut res, out)?)
    }

    /// Downloads both PEFT files of `id` into `dir` (created if needed). Each file is written
    /// to a temporary sibling and renamed into place only once both downloads are complete.
    pub fn export_adapter(&self, id: &str, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let mut temps = Vec::new();
        let result = (|| {
            for name in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
                let tmp = dir.join(format!(".{name}.part-{}", std::process::id()));
                temps.push((tmp.clone(), dir.join(name)));
                let mut f = std::fs::File::create(&tmp).map_err(|e| Error::file(&tmp, e))?;
                self.adapter_file(id, name, &mut f)?;
                f.sync_all().map_err(|e| Error::file(&tmp, e))?;
            }
            for (tmp, dest) in &temps {
                std::fs::rename(tmp, dest).map_err(|e| Error::file(dest, e))?;
            }
            Ok(temps.iter().map(|(_, d)| d.clone()).collect())
        })();
        if result.is_err() {
            for (tmp, _) in &temps {
                let _ = std::fs::remove_file(tmp);
            }
        }
        result
    }
}

fn page(rb: RequestBuilder, after: Option<&str>, limit: Option<u32>) -> RequestBuilder {
    let mut q: Vec<(&str, String)> = Vec::new();
    if let Some(a) = after {
        q.push(("after", a.to_string()));
    }
    if let Some(l) = limit {
        q.push(("limit", l.to_string()));
    }
    if q.is_empty() {
        rb
    } else {
        rb.query(&q)
    }
}

/// The text of one `chat.completion.chunk`; an `error` object in the stream becomes
/// [`Error::Api`].
pub fn chat_delta(data: &str) -> Result<String> {
    let v: Value = serde_json::from_str(data)
        .map_err(|e| Error::Protocol(format!("bad stream event {data:?}: {e}")))?;
    if v.get("error").is_some() {
        return Err(api_error(200, data));
    }
    Ok(v["choices"][0]["delta"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// A reader as a stream of byte chunks, each handed on as soon as `read` returns it.
struct Chunks<R>(R);

impl<R: Read> Iterator for Chunks<R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            return match self.0.read(&mut buf) {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some(Ok(buf))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Some(Err(e)),
            };
        }
    }
}

/// Reads a Server-Sent Events body, passing each event's data on until `data: [DONE]`; a body
/// that ends before it is an error (the server or the connection went away).
pub fn read_sse(reader: impl Read, mut on_data: impl FnMut(&str) -> Result<()>) -> Result<()> {
    let events = futures::stream::iter(Chunks(reader)).eventsource();
    for ev in futures::executor::block_on_stream(events) {
        let ev = ev.map_err(|e| match e {
            EventStreamError::Transport(e) => Error::Io(e),
            other => Error::Protocol(format!("bad event stream: {other}")),
        })?;
        if ev.data == "[DONE]" {
            return Ok(());
        }
        on_data(&ev.data)?;
    }
    Err(Error::Protocol(
        "the stream ended before the server said it was done".to_string(),
    ))
}

/// Builds [`Error::Api`] from an error body, falling back to the raw text.
pub fn api_error(status: u16, body: &str) -> Error {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let err = parsed.as_ref().and_then(|v| v.get("error"));
    let field = |k: &str| {
        err.and_then(|e| e.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let message = field("message").unwrap_or_else(|| {
        if body.trim().is_empty() {
            format!("the server answered HTTP {status}")
        } else {
            format!("HTTP {status}: {}", body.trim())
        }
    });
    Error::Api {
        status,
        message,
        kind: field("type"),
        param: field("param"),
        code: field("code"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn base_url_normalised() {
        for url in [
            "http://h:1",
            "http://h:1/",
            "http://h:1/v1",
            "http://h:1/v1/",
        ] {
            let c = Client::new(url, None).unwrap();
            assert_eq!(c.base_url(), "http://h:1");
            assert_eq!(
                c.url(&["v1", "models"]).as_str(),
                "http://h:1/v1/models",
                "{url}"
            );
        }
        let c = Client::new("https://proxy/itamae/", None).unwrap();
        assert_eq!(
            c.url(&["v1", "files"]).as_str(),
            "https://proxy/itamae/v1/files"
        );
        for bad in ["", "localhost:8080", "ftp://h", "not a url"] {
            assert!(
                matches!(Client::new(bad, None), Err(Error::Url { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn path_segments_are_encoded() {
        let c = Client::new("http://h", None).unwrap();
        assert_eq!(
            c.url(&["v1", "adapters", "ft:base:itamae:chef:ftjob-1", "load"])
                .as_str(),
            "http://h/v1/adapters/ft:base:itamae:chef:ftjob-1/load"
        );
        // A `/` or `?` typed by the user stays inside its segment.
        assert_eq!(
            c.url(&["v1", "files", "../x?y"]).as_str(),
            "http://h/v1/files/..%2Fx%3Fy"
        );
    }

    #[test]
    fn api_errors_carry_the_server_message() {
        let e = api_error(
            400,
            r#"{"error":{"message":"bad role","type":"invalid_request_error","param":"messages[0].role","code":null}}"#,
        );
        assert_eq!(e.to_string(), "bad role");
        assert_eq!(e.status(), Some(400));
        match e {
            Error::Api {
                status,
                param,
                kind,
                code,
                ..
            } => {
                assert_eq!(status, 400);
                assert_eq!(param.as_deref(), Some("messages[0].role"));
                assert_eq!(kind.as_deref(), Some("invalid_request_error"));
                assert_eq!(code, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            api_error(502, "").to_string(),
            "the server answered HTTP 502"
        );
        assert_eq!(api_error(500, "oops").to_string(), "HTTP 500: oops");
    }

    fn collect(stream: &str) -> Result<Vec<String>> {
        let mut seen = Vec::new();
        read_sse(stream.as_bytes(), |d| {
            seen.push(d.to_string());
            Ok(())
        })
        .map(|()| seen)
    }

    #[test]
    fn sse_reading() {
        let stream =
            "data: {\"a\":1}\n\n: comment\ndata:{\"a\":2}\n\ndata: [DONE]\n\ndata: {\"a\":3}\n\n";
        assert_eq!(collect(stream).unwrap(), vec!["{\"a\":1}", "{\"a\":2}"]);
        // CRLF line ends, a multi-line data field, an event name and id.
        let stream = "event: x\r\nid: 7\r\ndata: {\"b\":\r\ndata: 1}\r\n\r\ndata: [DONE]\r\n\r\n";
        assert_eq!(collect(stream).unwrap(), vec!["{\"b\":\n1}"]);
        assert!(matches!(collect("data: {}\n\n"), Err(Error::Protocol(_))));
        assert!(matches!(collect(""), Err(Error::Protocol(_))));
    }

    #[test]
    fn sse_events_split_across_reads() {
        /// Hands out one byte per read, as a slow network might.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                match self.0.split_first() {
                    Some((b, rest)) if !buf.is_empty() => {
                        buf[0] = *b;
                        self.0 = rest;
                        Ok(1)
                    }
                    _ => Ok(0),
                }
            }
        }
        let text = "data: {\"t\":\"sushi 🍣\"}\n\ndata: [DONE]\n\n";
        let mut seen = Vec::new();
        read_sse(Trickle(text.as_bytes()), |d| {
            seen.push(d.to_string());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec!["{\"t\":\"sushi 🍣\"}"]);
    }

    #[test]
    fn chat_deltas() {
        let chunk = r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#;
        assert_eq!(chat_delta(chunk).unwrap(), "Hi");
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#;
        assert_eq!(chat_delta(role).unwrap(), "");
        let err = chat_delta(r#"{"error":{"message":"engine stopped","type":"server_error"}}"#)
            .unwrap_err();
        assert_eq!(err.to_string(), "engine stopped");
        assert!(matches!(chat_delta("nope"), Err(Error::Protocol(_))));
    }

    #[test]
    fn chat_body_shape() {
        let r = ChatRequest::new("m", vec![Message::user("hi")])
            .max_tokens(5)
            .temperature(0.0);
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                   "stream": false, "max_tokens": 5, "temperature": 0.0})
        );
        let b = serde_json::to_value(ChatRequest::new("m", vec![])).unwrap();
        assert!(b.get("max_tokens").is_none() && b.get("temperature").is_none());
    }

    #[test]
    fn create_job_body_shape() {
        let req = CreateJob {
            model: "base".into(),
            training_file: "file-a".into(),
            validation_file: None,
            suffix: Some("chef".into()),
            seed: Some(7),
            metadata: None,
            method: JobMethod {
                supervised: Supervised {
                    hyperparameters: Hyperparameters {
                        n_epochs: Some(AutoOr::Auto),
                        batch_size: Some(AutoOr::Value(2)),
                        learning_rate_multiplier: Some(AutoOr::Value(0.5)),
                        max_steps: Some(4),
                        ..Default::default()
                    },
                    adapter: Some(AdapterConfig::Lora(methods::LoraConfig {
                        r: Some(8),
                        target_modules: Some(vec!["q_proj".into(), "v_proj".into()]),
                        ..Default::default()
                    })),
                },
            },
        };
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            json!({"model": "base", "training_file": "file-a", "suffix": "chef", "seed": 7,
                   "method": {"type": "supervised", "supervised": {
                       "hyperparameters": {"n_epochs": "auto", "batch_size": 2,
                                           "learning_rate_multiplier": 0.5, "max_steps": 4},
                       "adapter": {"type": "lora", "r": 8,
                                   "target_modules": ["q_proj", "v_proj"]}}}})
        );
        let bare = CreateJob {
            method: JobMethod::default(),
            suffix: None,
            seed: None,
            ..req
        };
        assert_eq!(
            serde_json::to_value(&bare).unwrap(),
            json!({"model": "base", "training_file": "file-a",
                   "method": {"type": "supervised", "supervised": {}}})
        );
        assert_eq!(
            serde_json::to_value(AdapterConfig::Full).unwrap(),
            json!({"type": "full"})
        );
    }

    #[test]
    fn responses_keep_unknown_fields() {
        let j = json!({"object": "fine_tuning.job", "id": "ftjob-1", "created_at": 1,
                       "status": "running", "model": "m", "training_file": "file-1",
                       "error": null, "fine_tuned_model": null, "seed": 3,
                       "method": {"type": "supervised",
                                  "supervised": {"adapter": {"type": "prompt_tuning"}}}});
        let job: Job = serde_json::from_value(j.clone()).unwrap();
        assert_eq!(job.adapter_type(), "prompt_tuning");
        assert!(!job.is_finished());
        let back = serde_json::to_value(&job).unwrap();
        assert_eq!(back["seed"], 3);
        assert_eq!(back["object"], "fine_tuning.job");
        assert_eq!(back["method"], j["method"]);
        let ev: JobEvent = serde_json::from_value(json!({
            "object": "fine_tuning.job.event", "id": "ftevent-1", "created_at": 2,
            "level": "info", "message": "Step 1/4", "type": "metrics",
            "data": {"step": 1, "total_steps": 4}}))
        .unwrap();
        assert_eq!(ev.kind, "metrics");
        assert_eq!(ev.data["total_steps"], 4);
    }
}
