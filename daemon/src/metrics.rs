//! Prometheus metrics: owns the process-wide registry and every `itamae_*` series (names, help,
//! labels, buckets), and the small recording API the HTTP layer, the engine, the adapters
//! endpoints and the job runner call. `GET /metrics` (`api::metrics`) renders [`Metrics::render`].
//!
//! Conventions (docs/candle-notes.md): prefix `itamae_`, units in the name, latency histograms from
//! 1 ms to 60 s, label `model` = the served variant id (never a request id), `job` = the
//! fine-tuning job id (bounded by the jobs that exist).
//!
//! One registry per process, reached through [`global`]: the engine thread and the job runner
//! record without any handle being threaded through them. Tests that need isolation build their
//! own [`Metrics::new`].
use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds: 1 ms … 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];
/// Sequences per engine step.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Every series; cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    e2e: HistogramVec,
    queue: HistogramVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    requests_started: IntCounterVec,
    requests_cancelled: IntCounterVec,
    running: IntGauge,
    waiting: IntGauge,
    batch_size: Histogram,
    prefill_batch_size: Histogram,
    adapters_resident: IntGauge,
    adapters_resident_bytes: IntGauge,
    model_weight_bytes: IntGauge,
    adapter_loads: IntCounterVec,
    adapter_load_seconds: Histogram,
    object_store_seconds: HistogramVec,
    lease_seconds: HistogramVec,
    leases_lost: IntCounter,
    lease_takeovers: IntCounter,
    jobs_owned: IntGauge,
    adapter_evictions: IntCounter,
    adapter_swaps: IntCounterVec,
    prompt_cache_hits: IntCounter,
    prompt_cache_cached_tokens: IntCounter,
    prompt_cache_bytes: IntGauge,
    training_jobs: IntGaugeVec,
    training_step: IntGaugeVec,
    training_loss: GaugeVec,
    training_valid_loss: GaugeVec,
    training_lr: GaugeVec,
    training_tps: GaugeVec,
    training_yield: prometheus::CounterVec,
}

/// The process-wide metrics (created on first use, with the process collector registered).
pub fn global() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(|| {
        let m = Metrics::new();
        m.register_process_collector();
        m
    })
}

/// Job statuses whose gauge is always exported (0 when no job has it), so dashboards see
/// every series from the first scrape.
pub const JOB_STATUSES: &[&str] = &[
    "validating_files",
    "queued",
    "running",
    "paused",
    "succeeded",
    "failed",
    "cancelled",
];

// The metric definitions are constants: a failure to build or register one is a programming
// error caught by the unit tests, so these helpers may panic.
fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("registering a metric (names are constant and unique)");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"),
    )
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    reg(
        r,
        GaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"),
    )
}

fn int_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"),
    )
}

fn hist_vec(r: &Registry, name: &str, help: &str, labels: &[&str], b: &[f64]) -> HistogramVec {
    reg(
        r,
        HistogramVec::new(HistogramOpts::new(name, help).buckets(b.to_vec()), labels)
            .expect("valid histogram"),
    )
}

fn hist(r: &Registry, name: &str, help: &str, b: &[f64]) -> Histogram {
    reg(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(b.to_vec()))
            .expect("valid histogram"),
    )
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    reg(r, IntGauge::new(name, help).expect("valid gauge"))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every `itamae_*` series (no process collector).
    pub fn new() -> Self {
        let r = Registry::new();
        let model = &["model"];
        // not `job`: Prometheus sets that target label itself and would rename ours to `exported_job`
        let job = &["job_id"];
        let inner = Inner {
            http_requests: counter_vec(
                &r,
                "itamae_http_requests_total",
                "HTTP requests answered, by matched route pattern, method and status",
                &["route", "method", "status"],
            ),
            http_duration: hist_vec(
                &r,
                "itamae_http_request_duration_seconds",
                "Time to produce the HTTP response head (streams: until the stream starts)",
                &["route", "method"],
                LATENCY_BUCKETS,
            ),
            ttft: hist_vec(
                &r,
                "itamae_time_to_first_token_seconds",
                "Time from request arrival to the first generated token",
                model,
                LATENCY_BUCKETS,
            ),
            itl: hist_vec(
                &r,
                "itamae_inter_token_latency_seconds",
                "Time between two generated tokens of one request",
                model,
                LATENCY_BUCKETS,
            ),
            e2e: hist_vec(
                &r,
                "itamae_e2e_request_latency_seconds",
                "Time from request arrival to its last token",
                model,
                LATENCY_BUCKETS,
            ),
            queue: hist_vec(
                &r,
                "itamae_request_queue_time_seconds",
                "Time a request waited before its prefill started",
                model,
                LATENCY_BUCKETS,
            ),
            prompt_tokens: counter_vec(
                &r,
                "itamae_prompt_tokens_total",
                "Prompt tokens processed",
                model,
            ),
            generation_tokens: counter_vec(
                &r,
                "itamae_generation_tokens_total",
                "Tokens generated",
                model,
            ),
            requests_started: counter_vec(
                &r,
                "itamae_requests_total",
                "Generation requests accepted",
                model,
            ),
            requests_cancelled: counter_vec(
                &r,
                "itamae_requests_cancelled_total",
                "Generations dropped because their client went away",
                model,
            ),
            running: int_gauge(
                &r,
                "itamae_num_requests_running",
                "Sequences being generated",
            ),
            waiting: int_gauge(
                &r,
                "itamae_num_requests_waiting",
                "Requests queued, not yet started",
            ),
            batch_size: hist(
                &r,
                "itamae_batch_size",
                "Sequences per engine step",
                BATCH_BUCKETS,
            ),
            prefill_batch_size: hist(
                &r,
                "itamae_prefill_batch_size",
                "Prompts prefilled together in one forward",
                BATCH_BUCKETS,
            ),
            adapters_resident: int_gauge(
                &r,
                "itamae_adapters_resident",
                "Adapters loaded in memory and servable",
            ),
            adapters_resident_bytes: int_gauge(
                &r,
                "itamae_adapters_resident_bytes",
                "Bytes of adapter weights loaded in memory",
            ),
            model_weight_bytes: int_gauge(
                &r,
                "itamae_model_weight_bytes",
                "Bytes of the base model's weights as held (model.weights)",
            ),
            adapter_loads: counter_vec(
                &r,
                "itamae_adapter_loads_total",
                "Adapter loads from disk into memory",
                model,
            ),
            adapter_load_seconds: hist(
                &r,
                "itamae_adapter_load_seconds",
                "Time to load an adapter from disk",
                LATENCY_BUCKETS,
            ),
            object_store_seconds: hist_vec(
                &r,
                "itamae_object_store_seconds",
                "Latency of one object-store request (storage.objects), by operation",
                &["op"],
                LATENCY_BUCKETS,
            ),
            lease_seconds: hist_vec(
                &r,
                "itamae_lease_seconds",
                "Latency of one job-lease operation (claim, renew, release) of this replica's runner",
                &["op"],
                LATENCY_BUCKETS,
            ),
            leases_lost: reg(
                &r,
                IntCounter::new(
                    "itamae_leases_lost_total",
                    "Jobs this replica stopped training because another replica took its lease over",
                )
                .expect("valid counter"),
            ),
            lease_takeovers: reg(
                &r,
                IntCounter::new(
                    "itamae_lease_takeovers_total",
                    "Interrupted jobs (their runner died or stopped) this replica claimed to resume",
                )
                .expect("valid counter"),
            ),
            jobs_owned: int_gauge(
                &r,
                "itamae_lease_jobs_owned",
                "Jobs whose lease this replica's runner holds",
            ),
            prompt_cache_hits: reg(
                &r,
                IntCounter::new(
                    "itamae_prompt_cache_hits_total",
                    "Prefills that reused a cached prompt prefix (engine.prompt_cache_mb)",
                )
                .expect("valid counter"),
            ),
            prompt_cache_cached_tokens: reg(
                &r,
                IntCounter::new(
                    "itamae_prompt_cache_cached_tokens_total",
                    "Prompt tokens whose keys and values came from the prompt cache instead of a prefill",
                )
                .expect("valid counter"),
            ),
            prompt_cache_bytes: int_gauge(
                &r,
                "itamae_prompt_cache_bytes",
                "Bytes of keys and values the prompt cache holds",
            ),
            adapter_evictions: reg(
                &r,
                IntCounter::new(
                    "itamae_adapter_evictions_total",
                    "Adapters unloaded from memory (explicitly or to stay within the budget)",
                )
                .expect("valid counter"),
            ),
            adapter_swaps: counter_vec(
                &r,
                "itamae_adapter_swaps_total",
                "Served adapters replaced in place by a new generation",
                model,
            ),
            training_jobs: int_gauge_vec(
                &r,
                "itamae_training_jobs",
                "Fine-tuning jobs by status",
                &["status"],
            ),
            training_step: int_gauge_vec(
                &r,
                "itamae_training_step",
                "Current optimizer step of a fine-tuning job",
                job,
            ),
            training_loss: gauge_vec(
                &r,
                "itamae_training_loss",
                "Latest training loss of a job",
                job,
            ),
            training_valid_loss: gauge_vec(
                &r,
                "itamae_training_valid_loss",
                "Latest validation loss of a job",
                job,
            ),
            training_lr: gauge_vec(
                &r,
                "itamae_training_learning_rate",
                "Current learning rate of a job",
                job,
            ),
            training_tps: gauge_vec(
                &r,
                "itamae_training_tokens_per_second",
                "Training throughput of a job",
                job,
            ),
            training_yield: reg(
                &r,
                prometheus::CounterVec::new(
                    Opts::new(
                        "itamae_training_yield_seconds_total",
                        "Time a job's trainer paused between micro-batches to give the device to serving",
                    ),
                    job,
                )
                .expect("valid counter"),
            ),
            registry: r,
        };
        for s in JOB_STATUSES {
            inner.training_jobs.with_label_values(&[s]).set(0);
        }
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Adds `process_resident_memory_bytes`, `process_cpu_seconds_total`, … (Linux `/proc`).
    fn register_process_collector(&self) {
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            if let Err(e) = self.inner.registry.register(Box::new(pc)) {
                tracing::warn!("process metrics are unavailable: {e}");
            }
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.inner.registry.gather(), &mut buf) {
            tracing::warn!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    // --- HTTP -----------------------------------------------------------------------------

    /// One answered request. `route` must be a route pattern (bounded), never the raw path.
    pub fn observe_http(&self, route: &str, method: &str, status: u16, secs: f64) {
        let i = &self.inner;
        i.http_requests
            .with_label_values(&[route, method, &status.to_string()])
            .inc();
        i.http_duration
            .with_label_values(&[route, method])
            .observe(secs);
    }

    // --- Generation, per variant ------------------------------------------------------------

    pub fn request_started(&self, model: &str) {
        self.inner
            .requests_started
            .with_label_values(&[model])
            .inc();
    }

    /// The engine dropped a sequence (waiting or running) whose client had gone away.
    pub fn request_cancelled(&self, model: &str) {
        self.inner
            .requests_cancelled
            .with_label_values(&[model])
            .inc();
    }

    pub fn observe_ttft(&self, model: &str, secs: f64) {
        self.inner.ttft.with_label_values(&[model]).observe(secs);
    }

    pub fn observe_itl(&self, model: &str, secs: f64) {
        self.inner.itl.with_label_values(&[model]).observe(secs);
    }

    pub fn observe_e2e(&self, model: &str, secs: f64) {
        self.inner.e2e.with_label_values(&[model]).observe(secs);
    }

    pub fn observe_queue(&self, model: &str, secs: f64) {
        self.inner.queue.with_label_values(&[model]).observe(secs);
    }

    pub fn add_prompt_tokens(&self, model: &str, n: u64) {
        self.inner
            .prompt_tokens
            .with_label_values(&[model])
            .inc_by(n);
    }

    pub fn add_generation_tokens(&self, model: &str, n: u64) {
        self.inner
            .generation_tokens
            .with_label_values(&[model])
            .inc_by(n);
    }

    pub fn set_running(&self, n: usize) {
        self.inner.running.set(n as i64);
    }

    pub fn set_waiting(&self, n: usize) {
        self.inner.waiting.set(n as i64);
    }

    pub fn observe_batch_size(&self, n: usize) {
        self.inner.batch_size.observe(n as f64);
    }

    pub fn observe_prefill_batch(&self, n: usize) {
        self.inner.prefill_batch_size.observe(n as f64);
    }

    // --- Adapters ---------------------------------------------------------------------------

    pub fn set_adapters_resident(&self, n: usize) {
        self.inner.adapters_resident.set(n as i64);
    }

    pub fn set_adapters_resident_bytes(&self, n: u64) {
        self.inner.adapters_resident_bytes.set(n as i64);
    }

    pub fn set_model_weight_bytes(&self, n: u64) {
        self.inner.model_weight_bytes.set(n as i64);
    }

    /// An adapter was read from disk into memory in `secs`.
    pub fn adapter_loaded(&self, model: &str, secs: f64) {
        self.inner.adapter_loads.with_label_values(&[model]).inc();
        self.inner.adapter_load_seconds.observe(secs);
    }

    /// One object-store request `op` (`put`, `get`, `list`, ...) took `secs`.
    pub fn object_store_op(&self, op: &str, secs: f64) {
        self.inner
            .object_store_seconds
            .with_label_values(&[op])
            .observe(secs);
    }

    /// One lease operation `op` (`claim`, `renew`, `release`) took `secs`.
    pub fn lease_op(&self, op: &str, secs: f64) {
        self.inner
            .lease_seconds
            .with_label_values(&[op])
            .observe(secs);
    }

    /// This runner found its job taken over (by the heartbeat or a fenced write).
    pub fn lease_lost(&self) {
        self.inner.leases_lost.inc();
    }

    /// This runner claimed a job; `interrupted`: one another runner had been training.
    pub fn lease_claimed(&self, interrupted: bool) {
        if interrupted {
            self.inner.lease_takeovers.inc();
        }
    }

    pub fn set_jobs_owned(&self, n: usize) {
        self.inner.jobs_owned.set(n as i64);
    }

    /// A prefill reused `tokens` cached prompt tokens.
    pub fn prompt_cache_hit(&self, tokens: usize) {
        self.inner.prompt_cache_hits.inc();
        self.inner.prompt_cache_cached_tokens.inc_by(tokens as u64);
    }

    pub fn set_prompt_cache_bytes(&self, n: u64) {
        self.inner.prompt_cache_bytes.set(n as i64);
    }

    pub fn adapter_evicted(&self) {
        self.inner.adapter_evictions.inc();
    }

    /// A served variant was replaced by a new generation under the same name.
    pub fn adapter_swapped(&self, model: &str) {
        self.inner.adapter_swaps.with_label_values(&[model]).inc();
    }

    // --- Training ---------------------------------------------------------------------------

    /// Sets the per-status job gauges; statuses missing from `counts` read 0.
    pub fn set_training_jobs(&self, counts: &[(&str, usize)]) {
        for s in JOB_STATUSES {
            let n = counts
                .iter()
                .filter(|(st, _)| st == s)
                .map(|(_, n)| *n)
                .sum::<usize>();
            self.inner
                .training_jobs
                .with_label_values(&[s])
                .set(n as i64);
        }
    }

    /// A training step of `job` finished.
    pub fn training_step(&self, job: &str, step: usize, loss: f64, lr: f64, tokens_per_sec: f64) {
        let i = &self.inner;
        i.training_step.with_label_values(&[job]).set(step as i64);
        i.training_loss.with_label_values(&[job]).set(loss);
        i.training_lr.with_label_values(&[job]).set(lr);
        i.training_tps.with_label_values(&[job]).set(tokens_per_sec);
    }

    pub fn training_eval(&self, job: &str, valid_loss: f64) {
        self.inner
            .training_valid_loss
            .with_label_values(&[job])
            .set(valid_loss);
    }

    /// The trainer of `job` yielded to serving for `secs`.
    pub fn training_yielded(&self, job: &str, secs: f64) {
        self.inner
            .training_yield
            .with_label_values(&[job])
            .inc_by(secs);
    }

    /// A job ended: its throughput is no longer current (the last step and losses stay).
    pub fn training_finished(&self, job: &str) {
        let _ = self.inner.training_tps.remove_label_values(&[job]);
    }
}

/// Parses Prometheus text into `(name{labels}, value)` pairs; every non-comment line must be
/// `name[{labels}] value`. Used by tests to check what a scrape returns.
pub fn parse_text(text: &str) -> Result<Vec<(String, f64)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("line {}: no value: {line}", n + 1))?;
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !name_ok || (name_end < series.len() && !series.ends_with('}')) {
            return Err(format!("line {}: bad series `{series}`", n + 1));
        }
        let v = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse::<f64>()
                .map_err(|e| format!("line {}: bad value `{v}`: {e}", n + 1))?,
        };
        out.push((series.to_string(), v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exported_and_parses() {
        let m = Metrics::new();
        m.observe_http("/v1/models", "GET", 200, 0.002);
        m.request_started("base");
        m.request_cancelled("base");
        m.training_yielded("ftjob-1", 0.5);
        m.observe_ttft("base", 0.05);
        m.observe_itl("base", 0.01);
        m.observe_e2e("base", 0.5);
        m.observe_queue("base", 0.001);
        m.add_prompt_tokens("base", 12);
        m.add_generation_tokens("base", 7);
        m.set_running(2);
        m.set_waiting(1);
        m.observe_batch_size(2);
        m.observe_prefill_batch(3);
        m.set_adapters_resident(1);
        m.set_adapters_resident_bytes(4096);
        m.set_model_weight_bytes(8192);
        m.adapter_loaded("ad", 0.02);
        m.adapter_evicted();
        m.adapter_swapped("ad");
        m.object_store_op("put", 0.003);
        m.lease_op("renew", 0.003);
        m.lease_lost();
        m.lease_claimed(true);
        m.lease_claimed(false);
        m.set_jobs_owned(1);
        m.set_training_jobs(&[("running", 1), ("queued", 2)]);
        m.training_step("ftjob-1", 3, 2.5, 1e-4, 100.0);
        m.training_eval("ftjob-1", 2.6);
        let text = m.render();
        for needle in [
            r#"itamae_http_requests_total{method="GET",route="/v1/models",status="200"} 1"#,
            r#"itamae_http_request_duration_seconds_bucket{method="GET",route="/v1/models",le="0.0025"} 1"#,
            r#"itamae_time_to_first_token_seconds_bucket{model="base",le="0.001"} 0"#,
            r#"itamae_time_to_first_token_seconds_bucket{model="base",le="60"} 1"#,
            r#"itamae_inter_token_latency_seconds_count{model="base"} 1"#,
            r#"itamae_e2e_request_latency_seconds_sum{model="base"} 0.5"#,
            r#"itamae_request_queue_time_seconds_count{model="base"} 1"#,
            r#"itamae_prompt_tokens_total{model="base"} 12"#,
            r#"itamae_generation_tokens_total{model="base"} 7"#,
            r#"itamae_requests_cancelled_total{model="base"} 1"#,
            r#"itamae_object_store_seconds_bucket{op="put",le="0.0025"} 0"#,
            r#"itamae_object_store_seconds_bucket{op="put",le="0.005"} 1"#,
            r#"itamae_lease_seconds_bucket{op="renew",le="0.005"} 1"#,
            "itamae_leases_lost_total 1",
            "itamae_lease_takeovers_total 1",
            "itamae_lease_jobs_owned 1",
            "itamae_num_requests_running 2",
            "itamae_num_requests_waiting 1",
            "itamae_batch_size_count 1",
            "itamae_prefill_batch_size_sum 3",
            "itamae_adapters_resident 1",
            "itamae_adapters_resident_bytes 4096",
            "itamae_model_weight_bytes 8192",
            r#"itamae_adapter_loads_total{model="ad"} 1"#,
            "itamae_adapter_load_seconds_count 1",
            "itamae_adapter_evictions_total 1",
            r#"itamae_adapter_swaps_total{model="ad"} 1"#,
            r#"itamae_training_jobs{status="queued"} 2"#,
            r#"itamae_training_jobs{status="failed"} 0"#,
            r#"itamae_training_step{job_id="ftjob-1"} 3"#,
            r#"itamae_training_loss{job_id="ftjob-1"} 2.5"#,
            r#"itamae_training_valid_loss{job_id="ftjob-1"} 2.6"#,
            r#"itamae_training_learning_rate{job_id="ftjob-1"} 0.0001"#,
            r#"itamae_training_tokens_per_second{job_id="ftjob-1"} 100"#,
            r#"itamae_training_yield_seconds_total{job_id="ftjob-1"} 0.5"#,
        ] {
            assert!(text.contains(needle), "missing {needle}\n{text}");
        }
        let parsed = parse_text(&text).unwrap();
        assert!(parsed.len() > 50);
        m.training_finished("ftjob-1");
        assert!(!m.render().contains("itamae_training_tokens_per_second{"));
    }

    #[test]
    fn global_has_process_metrics_on_linux() {
        let text = global().render();
        if cfg!(target_os = "linux") {
            assert!(text.contains("process_resident_memory_bytes"), "{text}");
            assert!(text.contains("process_cpu_seconds_total"), "{text}");
        }
        assert!(text.contains("itamae_num_requests_running"));
    }

    #[test]
    fn parser_rejects_garbage() {
        assert!(parse_text("# HELP x y\nx 1\ny{a=\"b\"} 2.5\nz +Inf\n").is_ok());
        assert!(parse_text("novalue\n").is_err());
        assert!(parse_text("x{a=\"b\" 1\n").is_err());
        assert!(parse_text("x abc\n").is_err());
    }
}
