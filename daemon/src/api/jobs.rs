//! `/v1/fine_tuning/jobs`: create (validated here, files validated in the background), list,
//! retrieve, cancel, pause, resume, events (paged newest first, or live as Server-Sent Events
//! with `?stream=true`) and checkpoints. Shapes follow OpenAI's; the adapter travels in the
//! `method.supervised.adapter` extension (see `crate::jobs::spec`).
use std::collections::HashMap;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use serde_json::{json, Value};

use super::error::ApiError;
use super::fields::{self, check_query, Fields};
use super::handlers::method_not_allowed;
use crate::jobs::spec::{parse_create, FieldError};
use crate::jobs::storage::{valid_id, JOB_PREFIX};
use crate::jobs::store::{CheckpointRow, EventRow, JobRow};
use crate::jobs::Jobs;

pub fn configure(cfg: &mut web::ServiceConfig) {
    fn resource(path: &str) -> actix_web::Resource {
        web::resource(path).default_service(web::to(method_not_allowed))
    }
    cfg.service(
        resource("/v1/fine_tuning/jobs")
            .route(web::post().to(create))
            .route(web::get().to(list)),
    )
    .service(resource("/v1/fine_tuning/jobs/{id}").route(web::get().to(retrieve)))
    .service(resource("/v1/fine_tuning/jobs/{id}/cancel").route(web::post().to(cancel)))
    .service(resource("/v1/fine_tuning/jobs/{id}/pause").route(web::post().to(pause)))
    .service(resource("/v1/fine_tuning/jobs/{id}/resume").route(web::post().to(resume)))
    .service(resource("/v1/fine_tuning/jobs/{id}/events").route(web::get().to(events)))
    .service(resource("/v1/fine_tuning/jobs/{id}/checkpoints").route(web::get().to(checkpoints)));
}

/// The jobs service registered as app data; absent when the server runs without one.
pub(crate) fn jobs_of(req: &HttpRequest) -> Result<Jobs, ApiError> {
    req.app_data::<web::Data<Jobs>>()
        .map(|d| d.get_ref().clone())
        .ok_or_else(|| ApiError::unavailable("Fine-tuning is not enabled on this server"))
}

/// The query string, every parameter checked against what the route takes.
pub(crate) fn query_map(
    req: &HttpRequest,
    fields: &Fields,
) -> Result<HashMap<String, String>, ApiError> {
    let q = web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .map_err(|e| ApiError::bad_request(format!("Invalid query string: {e}")))?;
    check_query(fields, &q)?;
    Ok(q)
}

/// `limit` from the query: `default` when absent, 1..=`max`.
pub(crate) fn limit_param(
    q: &HashMap<String, String>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(default),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::invalid(
                "limit",
                format!("limit must be an integer from 1 to {max}, got `{s}`"),
            )),
        },
    }
}

fn spec_error(e: FieldError) -> ApiError {
    if e.param.is_empty() {
        ApiError::bad_request(e.message)
    } else {
        ApiError::invalid(e.param, e.message)
    }
}

fn job_id(id: &str) -> Result<&str, ApiError> {
    if valid_id(JOB_PREFIX, id) {
        Ok(id)
    } else {
        Err(ApiError::invalid(
            "fine_tuning_job_id",
            format!("Invalid fine-tuning job id `{id}`"),
        ))
    }
}

pub(crate) fn job_object(j: &JobRow, organization_id: &str) -> Value {
    json!({
        "object": "fine_tuning.job",
        "id": j.id,
        "created_at": j.created_at,
        "error": j.error,
        "fine_tuned_model": j.fine_tuned_model,
        "finished_at": j.finished_at,
        "hyperparameters": j.hyperparameters,
        "model": j.model,
        "organization_id": organization_id,
        "result_files": j.result_files,
        "status": j.status,
        "trained_tokens": j.trained_tokens,
        "training_file": j.training_file,
        "validation_file": j.validation_file,
        "seed": j.seed,
        "estimated_finish": j.estimated_finish,
        "method": j.method,
        "metadata": j.metadata,
        "user_provided_suffix": j.suffix,
        "integrations": [],
    })
}

fn event_object(e: &EventRow) -> Value {
    json!({
        "object": "fine_tuning.job.event",
        "id": e.id,
        "created_at": e.created_at,
        "level": e.level,
        "message": e.message,
        "type": e.kind,
        "data": e.data.clone().unwrap_or_else(|| json!({})),
    })
}

fn checkpoint_object(c: &CheckpointRow) -> Value {
    json!({
        "object": "fine_tuning.job.checkpoint",
        "id": c.id,
        "created_at": c.created_at,
        "fine_tuned_model_checkpoint": c.model,
        "step_number": c.step,
        "metrics": c.metrics,
        "fine_tuning_job_id": c.job_id,
    })
}

async fn find(jobs: &Jobs, id: &str) -> Result<JobRow, ApiError> {
    Ok(jobs.job(job_id(id)?).await?)
}

fn ok_job(jobs: &Jobs, j: &JobRow) -> HttpResponse {
    HttpResponse::Ok().json(job_object(j, &jobs.config().organization_id))
}

/// `POST /v1/fine_tuning/jobs`.
pub async fn create(req: HttpRequest, body: web::Json<Value>) -> Result<HttpResponse, ApiError> {
    let jobs = jobs_of(&req)?;
    if let Some(obj) = body.as_object() {
        fields::JOB_CREATE.check_object(obj)?;
    }
    let default_seed = rand::random_range(0..(1u64 << 31));
    let c = parse_create(&body, default_seed).map_err(spec_error)?;
    let row = jobs.create_job(c).await?;
    Ok(ok_job(&jobs, &row))
}

/// `GET /v1/fine_tuning/jobs` (`after`, `limit` = 20).
pub async fn list(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let q = query_map(&req, &fields::JOB_LIST)?;
    let jobs = jobs_of(&req)?;
    let limit = limit_param(&q, 20, 100)?;
    let after = match q.get("after") {
        Some(a) if valid_id(JOB_PREFIX, a) => Some(a.as_str()),
        Some(_) => return Err(ApiError::invalid("after", "Invalid fine-tuning job id")),
        None => None,
    };
    let page = jobs.list_jobs(after, limit).await?;
    let org = &jobs.config().organization_id;
    let data: Vec<Value> = page.data.iter().map(|j| job_object(j, org)).collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data, "has_more": page.has_more})))
}

/// `GET /v1/fine_tuning/jobs/{id}`.
pub async fn retrieve(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let jobs = jobs_of(&req)?;
    let j = find(&jobs, &id).await?;
    Ok(ok_job(&jobs, &j))
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`: a queued job never starts, a running one stops
/// between two steps (its status says `cancelled` at once).
pub async fn cancel(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let jobs = jobs_of(&req)?;
    let j = jobs.cancel_job(job_id(&id)?).await?;
    Ok(ok_job(&jobs, &j))
}

/// `POST /v1/fine_tuning/jobs/{id}/pause`: a running job stops between two steps and waits.
pub async fn pause(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    pause_or_resume(req, id, true).await
}

/// `POST /v1/fine_tuning/jobs/{id}/resume`: a paused job goes on.
pub async fn resume(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    pause_or_resume(req, id, false).await
}

async fn pause_or_resume(
    req: HttpRequest,
    id: web::Path<String>,
    pause: bool,
) -> Result<HttpResponse, ApiError> {
    let jobs = jobs_of(&req)?;
    let j = jobs.pause_job(job_id(&id)?, pause).await?;
    Ok(ok_job(&jobs, &j))
}

/// `GET /v1/fine_tuning/jobs/{id}/events` (`after`, `limit` = 20, newest first), or with
/// `stream=true` every event oldest first as Server-Sent Events, then live ones until the job
/// ends (`data: [DONE]`).
pub async fn events(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let jobs = jobs_of(&req)?;
    let q = query_map(&req, &fields::JOB_EVENTS)?;
    let j = find(&jobs, &id).await?;
    let stream = match q.get("stream").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::invalid("stream", "stream must be true or false")),
    };
    if stream {
        return Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .insert_header(("X-Accel-Buffering", "no"))
            .streaming(event_stream(&jobs, j.id)));
    }
    let limit = limit_param(&q, 20, 1000)?;
    let after = match q.get("after") {
        Some(a) if valid_id(crate::jobs::storage::EVENT_PREFIX, a) => Some(a.as_str()),
        Some(_) => return Err(ApiError::invalid("after", "Invalid event id")),
        None => None,
    };
    let page = jobs.job_events(&j.id, after, limit).await?;
    let data: Vec<Value> = page.data.iter().map(event_object).collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data, "has_more": page.has_more})))
}

/// Server-Sent Events: each event as `data: {json}`, then `data: [DONE]` once the job ended.
fn event_stream(
    jobs: &Jobs,
    job_id: String,
) -> impl futures::Stream<Item = Result<web::Bytes, std::io::Error>> {
    jobs.watch_events(job_id)
        .map(|e| Ok(web::Bytes::from(format!("data: {}\n\n", event_object(&e)))))
        .chain(futures::stream::once(async {
            Ok(web::Bytes::from_static(b"data: [DONE]\n\n"))
        }))
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints` (`after`, `limit` = 10), newest step first.
pub async fn checkpoints(
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let jobs = jobs_of(&req)?;
    let q = query_map(&req, &fields::JOB_CHECKPOINTS)?;
    let j = find(&jobs, &id).await?;
    let limit = limit_param(&q, 10, 100)?;
    let all = jobs.job_checkpoints(&j.id).await?;
    let start = match q.get("after") {
        Some(a) => match all.iter().position(|c| &c.id == a) {
            Some(i) => i + 1,
            None => return Err(ApiError::invalid("after", "Unknown checkpoint id")),
        },
        None => 0,
    };
    let page: Vec<&CheckpointRow> = all.iter().skip(start).take(limit).collect();
    let has_more = all.len() > start + page.len();
    let data: Vec<Value> = page.iter().map(|c| checkpoint_object(c)).collect();
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": page.first().map(|c| &c.id),
        "last_id": page.last().map(|c| &c.id),
    })))
}

#[cfg(test)]
mod tests {
    use actix_web::{test as atest, App};

    use super::*;

    #[actix_web::test]
    async fn without_the_jobs_service_routes_answer_503() {
        let app = atest::init_service(App::new().configure(crate::api::configure)).await;
        for req in [
            atest::TestRequest::get().uri("/v1/files"),
            atest::TestRequest::get().uri("/v1/fine_tuning/jobs"),
            atest::TestRequest::get().uri("/v1/fine_tuning/jobs/ftjob-abc/events"),
            atest::TestRequest::post().uri("/v1/fine_tuning/jobs/ftjob-abc/cancel"),
        ] {
            let res = atest::call_service(&app, req.to_request()).await;
            assert_eq!(res.status().as_u16(), 503);
        }
        let res = atest::call_service(
            &app,
            atest::TestRequest::put()
                .uri("/v1/fine_tuning/jobs")
                .to_request(),
        )
        .await;
        assert_eq!(res.status().as_u16(), 405);
    }

    #[test]
    fn limits_and_ids_are_checked() {
        let q = |s: &str| -> HashMap<String, String> {
            web::Query::<HashMap<String, String>>::from_query(s)
                .unwrap()
                .into_inner()
        };
        assert_eq!(limit_param(&q(""), 20, 100).unwrap(), 20);
        assert_eq!(limit_param(&q("limit=5"), 20, 100).unwrap(), 5);
        for bad in ["limit=0", "limit=101", "limit=x", "limit=-1"] {
            assert_eq!(
                limit_param(&q(bad), 20, 100).unwrap_err().param.as_deref(),
                Some("limit")
            );
        }
        assert!(job_id("ftjob-abc").is_ok());
        assert!(job_id("../ftjob-abc").is_err());
        assert!(job_id("ftjob-../../x").is_err());
    }
}
