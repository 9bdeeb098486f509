//! The HTTP API: OpenAI-style chat and text completions, the model list, and health probes.
//!
//! Routes (see `openapi/openapi.yaml`):
//! - `GET /healthz`, `GET /readyz`
//! - `GET /v1/models`, `GET /v1/models/{id}`, `DELETE /v1/models/{id}` (tuned variants only)
//! - `POST /v1/chat/completions`, `POST /v1/completions` (both stream with `"stream": true`)
//! - `/v1/files…` and `/v1/fine_tuning/jobs…` ([`files`], [`jobs`]; the service behind them is
//!   `crate::jobs::Jobs`, registered as app data when the server has a data directory)
//! - `/v1/adapters…` ([`adapters`]: imported PEFT adapters, load/unload, downloads)
//! - `GET /metrics` ([`metrics`], Prometheus text)
//! - `GET /`, `GET /console`, `GET /console/assets/{name}` ([`console`]: the embedded web console)
//!
//! [`serve`] wraps every route in one middleware that checks the API key ([`auth`]) and records
//! `itamae_http_*` metrics by matched route pattern.
//!
//! Every error is `{"error":{"message","type","param","code"}}`, built by [`ApiError`].
pub mod adapters;
pub mod auth;
pub mod console;
pub mod error;
pub mod fields;
pub mod files;
pub mod guided;
pub mod handlers;
pub mod jobs;
pub mod logprobs;
pub mod metrics;
pub mod request;
pub mod response;

use std::time::Instant;

use actix_web::dev::Service;
use actix_web::http::header;
use actix_web::{web, App, HttpServer, ResponseError};

pub use error::ApiError;

use crate::engine::EngineHandle;

/// Largest accepted JSON request body.
pub const JSON_LIMIT: usize = 4 * 1024 * 1024;
/// HTTP worker threads (the model runs on the engine's own thread).
pub const WORKERS: usize = 2;

/// The JSON extractor settings: size limit, any content type, OpenAI-style errors.
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(JSON_LIMIT)
        .content_type_required(false)
        .error_handler(error::json_error)
}

/// Registers every route, the JSON settings and the 404 fallback. The engine is looked up as
/// `web::Data<EngineHandle>` app data, which the caller registers.
pub fn configure(cfg: &mut web::ServiceConfig) {
    fn resource(path: &str) -> actix_web::Resource {
        web::resource(path).default_service(web::to(handlers::method_not_allowed))
    }
    cfg.app_data(json_config())
        .service(resource("/healthz").route(web::get().to(handlers::healthz)))
        .service(resource("/readyz").route(web::get().to(handlers::readyz)))
        .service(resource("/v1/models").route(web::get().to(handlers::list_models)))
        // Model ids may hold `/` and `:` (tuned variants).
        .service(
            resource("/v1/models/{id:.+}")
                .route(web::get().to(handlers::get_model))
                .route(web::delete().to(adapters::delete_model)),
        )
        .service(resource("/v1/chat/completions").route(web::post().to(handlers::chat_completions)))
        .service(resource("/v1/completions").route(web::post().to(handlers::completions)))
        .configure(files::configure)
        .configure(jobs::configure)
        .configure(adapters::configure)
        .configure(metrics::configure)
        .configure(console::configure)
        .default_service(web::to(handlers::not_found));
}

/// How [`serve`] stops.
pub struct Shutdown {
    /// After SIGTERM/SIGINT, how long running requests (streams included) may take to finish
    /// before their connections are cut.
    pub grace: std::time::Duration,
    /// Called once when the signal arrives, before the requests drain (e.g. to checkpoint
    /// training meanwhile).
    pub on_signal: Box<dyn FnOnce() + Send>,
}

/// Serves the API on `host:port` until SIGINT/SIGTERM: then the listener closes at once (new
/// connections are refused), `shutdown.on_signal` runs, and running requests get
/// `shutdown.grace` to finish before they are cut.
/// Without `jobs`, the files and fine-tuning routes answer 503; without `adapters`, the adapter
/// routes do. `auth` decides which key may call which route (see [`auth::Auth`]).
/// Must run inside an actix system.
pub async fn serve(
    engine: EngineHandle,
    host: String,
    port: u16,
    jobs: Option<crate::jobs::Jobs>,
    adapters: Option<crate::jobs::AdapterStore>,
    auth: auth::Auth,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    auth.check_bind(&host)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
    if !auth.enabled() {
        tracing::warn!("no API keys configured: every route is open (loopback only)");
    }
    let data = web::Data::new(engine);
    let jobs = jobs.map(web::Data::new);
    let adapters = adapters.map(web::Data::new);
    let server = HttpServer::new(move || {
        let app = App::new().app_data(data.clone());
        let app = match &jobs {
            Some(j) => app.app_data(j.clone()),
            None => app,
        };
        let app = match &adapters {
            Some(a) => app.app_data(a.clone()),
            None => app,
        };
        let auth = auth.clone();
        app.wrap_fn(move |req, srv| {
            let started = Instant::now();
            let method = req.method().clone();
            let path = req.path().to_owned();
            // The pattern the router will match, found on the percent-decoded path as the
            // router sees it: bounded metric labels, and the key check cannot be dodged by
            // spelling a path differently.
            let pattern = req.resource_map().match_pattern(req.match_info().as_str());
            let verdict = auth.check(
                &method,
                pattern.as_deref(),
                req.headers()
                    .get(header::AUTHORIZATION)
                    .map(|h| h.as_bytes()),
            );
            let call = match verdict {
                Ok(()) => Ok(srv.call(req)),
                Err(e) => Err((req, e)),
            };
            async move {
                let res = match call {
                    Ok(fut) => fut.await.map(|r| r.map_into_boxed_body()),
                    Err((req, e)) => Ok(req.into_response(e.error_response())),
                };
                let route = pattern.as_deref().unwrap_or("unmatched");
                let secs = started.elapsed().as_secs_f64();
                match &res {
                    Ok(r) => {
                        crate::metrics::global().observe_http(
                            route,
                            method.as_str(),
                            r.status().as_u16(),
                            secs,
                        );
                        tracing::info!(
                            %method,
                            %path,
                            status = r.status().as_u16(),
                            elapsed_ms = (secs * 1000.0) as u64,
                            "request"
                        )
                    }
                    Err(e) => {
                        let status = e.as_response_error().status_code().as_u16();
                        crate::metrics::global().observe_http(route, method.as_str(), status, secs);
                        tracing::warn!(%method, %path, "request failed: {e}")
                    }
                }
                res
            }
        })
        .configure(configure)
    })
    .workers(WORKERS)
    // Abort a connection as soon as the client closes it, so that a non-streamed generation
    // whose client went away is dropped (and thereby cancelled) instead of running to the end.
    .h1_allow_half_closed(false)
    // Signals are handled below, so that `on_signal` runs as the drain starts.
    .disable_signals()
    .shutdown_timeout(shutdown.grace.as_secs())
    .bind((host.as_str(), port))?
    .run();
    tracing::info!("listening on http://{host}:{port}");
    let handle = server.handle();
    let on_signal = shutdown.on_signal;
    actix_web::rt::spawn(async move {
        let which = match stop_signal().await {
            Ok(which) => which,
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM/SIGINT: {e}");
                return;
            }
        };
        tracing::info!(
            signal = which,
            grace_secs = shutdown.grace.as_secs(),
            "shutting down: refusing new connections, letting running requests finish"
        );
        on_signal();
        handle.stop(true).await;
    });
    server.await
}

/// Resolves at the first SIGTERM or SIGINT, naming it.
async fn stop_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[cfg(test)]
mod tests {
    use actix_web::http::StatusCode;
    use actix_web::test;
    use serde_json::{json, Value};

    use super::*;

    async fn call(req: test::TestRequest) -> (StatusCode, Value) {
        // No engine attached: these requests must be answered before the engine is needed.
        let app = test::init_service(App::new().configure(configure)).await;
        let res = test::call_service(&app, req.to_request()).await;
        let status = res.status();
        let body = test::read_body(res).await;
        let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, v)
    }

    fn post(path: &str, body: &str) -> test::TestRequest {
        test::TestRequest::post()
            .uri(path)
            .insert_header(("content-type", "application/json"))
            .set_payload(body.to_owned())
    }

    #[actix_web::test]
    async fn healthz_is_ok() {
        let (s, v) = call(test::TestRequest::get().uri("/healthz")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v, json!({"status": "ok"}));
    }

    #[actix_web::test]
    async fn unknown_route_is_openai_404() {
        let (s, v) = call(test::TestRequest::get().uri("/v1/nope")).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("/v1/nope"));
    }

    #[actix_web::test]
    async fn wrong_method_is_405() {
        let (s, v) = call(test::TestRequest::get().uri("/v1/chat/completions")).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        assert!(v["error"]["message"].is_string());
    }

    #[actix_web::test]
    async fn malformed_json_is_400() {
        for body in ["{\"model\": ", "", "not json", "{\"model\": \"m\",}"] {
            let (s, v) = call(post("/v1/chat/completions", body)).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{body:?}");
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("could not parse"));
        }
    }

    #[actix_web::test]
    async fn any_content_type_is_read_as_json() {
        let req = test::TestRequest::post()
            .uri("/v1/completions")
            .insert_header(("content-type", "application/x-www-form-urlencoded"))
            .set_payload("{\"model\": \"m\", \"prompt\": \"x\", \"best_of\": 2}");
        let (s, v) = call(req).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["param"], "best_of");
    }

    #[actix_web::test]
    async fn oversized_body_is_413() {
        let big = format!("{{\"model\": \"{}\"}}", "x".repeat(JSON_LIMIT + 1));
        let (s, v) = call(post("/v1/completions", &big)).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(v["error"]["message"].is_string());
    }

    #[actix_web::test]
    async fn validation_errors_name_the_param() {
        let cases = [
            (
                "/v1/chat/completions",
                r#"{"model":"m","messages":[]}"#,
                "messages",
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"x","content":"b"}]}"#,
                "messages[1].role",
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"m","messages":[{"role":"user","content":"a"}],"temperature":5}"#,
                "temperature",
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"m","messages":[{"role":"user","content":"a"}],"n":17}"#,
                "n",
            ),
            (
                "/v1/completions",
                r#"{"model":"m","prompt":"a","max_tokens":0}"#,
                "max_tokens",
            ),
        ];
        for (path, body, param) in cases {
            let (s, v) = call(post(path, body)).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(v["error"]["param"], param, "{body}");
            assert_eq!(v["error"]["code"], Value::Null);
        }
    }

    #[actix_web::test]
    async fn model_ids_may_hold_slashes() {
        // Routed to the model handler (which then needs the engine), not to the 404 fallback.
        let (s, v) = call(test::TestRequest::get().uri("/v1/models/org/name:v1")).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(v["error"]["message"].as_str().unwrap().contains("engine"));
    }
}
