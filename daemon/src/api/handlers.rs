//! Route handlers. Handlers that generate parse and validate the body before they look up the
//! engine, so every validation error is answered without touching the model.
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde_json::{json, Value};

use super::error::ApiError;
use super::request::{parse_chat, parse_completion, Common};
use super::response::{collect, full_response, sse_stream, Kind, Meta, Tagged};
use crate::engine::{EngineHandle, GenEvent, GenerationRequest, ModelCard};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

fn engine(req: &HttpRequest) -> Result<EngineHandle, ApiError> {
    req.app_data::<web::Data<EngineHandle>>()
        .map(|d| d.get_ref().clone())
        .ok_or_else(|| ApiError::internal("No engine is attached to this server"))
}

/// `GET /healthz`: the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /readyz`: the model is loaded and requests can be served.
pub async fn readyz(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let jobs = req.app_data::<web::Data<crate::jobs::Jobs>>();
    if jobs.is_some_and(|j| !j.recovered()) && engine(&req)?.is_ready() {
        return Err(ApiError::not_ready(
            "The model is loaded; stored fine-tuned variants are being served again",
        ));
    }
    if engine(&req)?.is_ready() {
        Ok(HttpResponse::Ok().json(json!({"status": "ready"})))
    } else {
        Err(ApiError::not_ready("The model is still loading"))
    }
}

fn model_object(card: &ModelCard) -> Value {
    let mut v = json!({
        "id": card.id,
        "object": "model",
        "created": card.created,
        "owned_by": card.owned_by,
        "context_length": card.context_length,
    });
    if let (Some(obj), Some(parent)) = (v.as_object_mut(), &card.parent) {
        obj.insert("parent".into(), json!(parent));
        obj.insert("adapter_type".into(), json!(card.adapter_type));
    }
    if let (Some(obj), Some((mode, bytes))) = (v.as_object_mut(), card.weights) {
        obj.insert("weights".into(), json!(mode));
        obj.insert("weight_bytes".into(), json!(bytes));
    }
    v
}

/// The served models, each variant's `parent` being the model it was tuned from: the base,
/// or for continued fine-tuning the fine-tuned model the job started from.
async fn model_cards(req: &HttpRequest) -> Result<Vec<ModelCard>, ApiError> {
    let mut cards = engine(req)?.models();
    if let Some(jobs) = req.app_data::<web::Data<crate::jobs::Jobs>>() {
        let parents = jobs.model_parents().await?;
        for c in &mut cards {
            if let Some(p) = parents.get(&c.id) {
                c.parent = Some(p.clone());
            }
        }
    }
    Ok(cards)
}

/// `GET /v1/models`.
pub async fn list_models(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let data: Vec<Value> = model_cards(&req).await?.iter().map(model_object).collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

/// `GET /v1/models/{id}`.
pub async fn get_model(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    model_cards(&req)
        .await?
        .iter()
        .find(|c| c.id == id)
        .map(|c| HttpResponse::Ok().json(model_object(c)))
        .ok_or_else(|| ApiError::model_not_found(&id))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    req: HttpRequest,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    let parsed = parse_chat(&body)?;
    generate(&req, Kind::Chat, &parsed.common, parsed.generation()).await
}

/// `POST /v1/completions`.
pub async fn completions(
    req: HttpRequest,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    let parsed = parse_completion(&body)?;
    generate(&req, Kind::Text, &parsed.common, parsed.generation()).await
}

async fn generate(
    req: &HttpRequest,
    kind: Kind,
    common: &Common,
    gen: GenerationRequest,
) -> Result<HttpResponse, ApiError> {
    let started = std::time::Instant::now();
    let engine = engine(req)?;
    // A variant another replica stored in the shared object store is fetched on its first request.
    if let Some(a) = req.app_data::<web::Data<crate::jobs::AdapterStore>>() {
        let jobs = req
            .app_data::<web::Data<crate::jobs::Jobs>>()
            .map(|j| j.get_ref());
        a.serve_on_demand(jobs, &common.model).await;
    }
    // Template rendering and tokenization are CPU work: keep them off the I/O thread.
    let prepared = {
        let engine = engine.clone();
        web::block(move || engine.prepare(gen))
            .await?
            .map_err(|e| name_max_tokens(e.into(), common))?
    };
    let n = prepared.n;
    let rxs = engine.submit_choices(prepared)?;
    let mut rx = instrument(rxs, common.model.clone(), started);
    let mut meta = Meta::new(kind, common.model.clone(), common.include_usage);
    meta.logprobs = common.sampling.logprobs.is_some();
    meta.n = n;
    if common.stream {
        Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .insert_header(("X-Accel-Buffering", "no"))
            .streaming(sse_stream(rx, meta)))
    } else {
        let generated = collect(&mut rx, &meta).await?;
        Ok(HttpResponse::Ok().json(full_response(&meta, &generated)))
    }
}

/// Merges the choices' event streams into one, each event tagged with its choice's index, and
/// records per-variant metrics from what the client sees: the request once (its start, time
/// to first token of any choice, end-to-end latency when the last choice ends, the prompt's
/// tokens), generated tokens for every choice. When the client goes away the forwarder drops
/// the engine's receivers, which cancels every choice.
fn instrument(
    rxs: Vec<UnboundedReceiver<GenEvent>>,
    model: String,
    started: std::time::Instant,
) -> UnboundedReceiver<Tagged> {
    use futures::StreamExt;
    let (tx, out) = unbounded_channel();
    let n = rxs.len();
    let mut merged = futures::stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| {
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |ev| (i, ev))
    }));
    actix_web::rt::spawn(async move {
        let m = crate::metrics::global();
        m.request_started(&model);
        let mut first = true;
        let mut finished = 0;
        loop {
            let ev = tokio::select! {
                ev = merged.next() => ev,
                () = tx.closed() => None,
            };
            let Some(ev) = ev else { break };
            match &ev.1 {
                GenEvent::Text(t) if first && !t.is_empty() => {
                    first = false;
                    m.observe_ttft(&model, started.elapsed().as_secs_f64());
                }
                GenEvent::Finished { usage, .. } => {
                    let secs = started.elapsed().as_secs_f64();
                    if first {
                        // Stopped at its first token (e.g. EOS): that token still came first.
                        first = false;
                        m.observe_ttft(&model, secs);
                    }
                    if finished == 0 {
                        m.add_prompt_tokens(&model, usage.prompt_tokens as u64);
                    }
                    finished += 1;
                    if finished == n {
                        m.observe_e2e(&model, secs);
                    }
                    m.add_generation_tokens(&model, usage.completion_tokens as u64);
                }
                _ => {}
            }
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    out
}

/// The engine names `max_tokens`; chat requests may have said `max_completion_tokens`.
fn name_max_tokens(mut e: ApiError, common: &Common) -> ApiError {
    if e.param.as_deref() == Some("max_tokens") {
        e.param = Some(common.max_tokens_param.to_string());
    }
    e
}

/// Any unknown route.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::not_found(format!("Invalid URL ({} {})", req.method(), req.path())).error_response()
}

/// A known route asked with the wrong method.
pub async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    ApiError::method_not_allowed(format!(
        "Method {} is not allowed on {}",
        req.method(),
        req.path()
    ))
    .error_response()
}
