//! `/v1/adapters`: PEFT adapters imported over the API, and load/unload/download of every
//! servable variant (imported ones and fine-tuning jobs' results and checkpoints). The handlers
//! parse the request (names, the multipart upload), call the [`AdapterStore`] and render the
//! `adapter` objects it returns; the store owns the files, the index and the generations.
use actix_multipart::Multipart;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::TryStreamExt;
use serde_json::{json, Value};

use super::error::ApiError;
use super::handlers::method_not_allowed;
use crate::adapters::peft;
use crate::jobs::adapter_store::{valid_name, AdapterInfo, Import, JOB_PREFIX, MAX_CONFIG_BYTES};
use crate::jobs::AdapterStore;
use crate::jobs::Jobs;

pub fn configure(cfg: &mut web::ServiceConfig) {
    fn resource(path: &str) -> actix_web::Resource {
        web::resource(path).default_service(web::to(method_not_allowed))
    }
    cfg.service(
        resource("/v1/adapters")
            .route(web::get().to(list))
            .route(web::post().to(import)),
    )
    .service(
        resource("/v1/adapters/{id}")
            .route(web::get().to(retrieve))
            .route(web::delete().to(delete)),
    )
    .service(resource("/v1/adapters/{id}/load").route(web::post().to(load)))
    .service(resource("/v1/adapters/{id}/unload").route(web::post().to(unload)))
    .service(resource("/v1/adapters/{id}/files/{name}").route(web::get().to(download)));
}

fn check_name(name: &str) -> Result<&str, ApiError> {
    if valid_name(name) {
        Ok(name)
    } else {
        Err(ApiError::invalid(
            "id",
            format!(
                "Invalid adapter name `{}`: use 1 to 128 of A-Z a-z 0-9 . _ : -, not starting with `.` and without `..`",
                name.chars().take(200).collect::<String>()
            ),
        ))
    }
}

fn store_of(req: &HttpRequest) -> Result<AdapterStore, ApiError> {
    req.app_data::<web::Data<AdapterStore>>()
        .map(|d| d.get_ref().clone())
        .ok_or_else(|| ApiError::unavailable("Adapters are not available on this server"))
}

/// The jobs service, if the server has one: it knows the fine-tuning jobs' variants.
fn jobs_of(req: &HttpRequest) -> Option<&Jobs> {
    req.app_data::<web::Data<Jobs>>().map(|d| d.get_ref())
}

/// The API's `adapter` object.
fn adapter_object(a: &AdapterInfo) -> Value {
    json!({
        "id": a.id,
        "object": "adapter",
        "type": a.kind,
        "generation": a.generation,
        "size_bytes": a.size_bytes,
        "created_at": a.created_at,
        "resident": a.resident,
        "parent": a.parent,
        "source": a.source,
        "fine_tuning_job_id": a.fine_tuning_job_id,
    })
}

/// `GET /v1/adapters`: imported adapters (resident or not) and every served variant.
pub async fn list(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let store = store_of(&req)?;
    let data: Vec<Value> = store
        .list(jobs_of(&req))
        .await?
        .iter()
        .map(adapter_object)
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data, "has_more": false})))
}

/// `GET /v1/adapters/{id}`.
pub async fn retrieve(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = check_name(&id)?;
    let store = store_of(&req)?;
    let a = store.describe(jobs_of(&req), id).await?;
    Ok(HttpResponse::Ok().json(adapter_object(&a)))
}

fn multipart_error(e: actix_multipart::MultipartError) -> ApiError {
    ApiError::bad_request(format!(
        "Could not read the multipart body (fields: name, adapter_config.json, adapter_model.safetensors, optional if_generation): {e}"
    ))
}

/// Reads one multipart field into memory, refusing more than `limit` bytes.
async fn read_field(
    field: &mut actix_multipart::Field,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, ApiError> {
    let mut v = Vec::new();
    while let Some(chunk) = field.try_next().await.map_err(multipart_error)? {
        if (v.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::payload_too_large(format!(
                "`{what}` is larger than the limit of {limit} bytes"
            )));
        }
        v.extend_from_slice(&chunk);
    }
    Ok(v)
}

/// The uploaded parts of an import.
#[derive(Default)]
struct Upload {
    name: Option<String>,
    config: Option<Vec<u8>>,
    weights: Option<Vec<u8>>,
    if_generation: Option<u64>,
}

async fn read_upload(mut payload: Multipart, max_weights: u64) -> Result<Upload, ApiError> {
    let mut u = Upload::default();
    while let Some(mut field) = payload.try_next().await.map_err(multipart_error)? {
        // A part is recognised by its field name, or by its file name (`-F file=@adapter_config.json`).
        let key = match field.name() {
            Some(n @ ("name" | "if_generation")) => n.to_string(),
            n => {
                let filename = field
                    .content_disposition()
                    .and_then(|d| d.get_filename())
                    .unwrap_or_default();
                match (n, filename) {
                    (Some(peft::CONFIG_FILE), _) | (_, peft::CONFIG_FILE) => {
                        peft::CONFIG_FILE.into()
                    }
                    (Some(peft::WEIGHTS_FILE), _) | (_, peft::WEIGHTS_FILE) => {
                        peft::WEIGHTS_FILE.into()
                    }
                    _ => String::new(),
                }
            }
        };
        match key.as_str() {
            "name" => {
                let v = read_field(&mut field, 256, "name").await?;
                u.name = Some(String::from_utf8_lossy(&v).trim().to_string());
            }
            "if_generation" => {
                let v = read_field(&mut field, 32, "if_generation").await?;
                let s = String::from_utf8_lossy(&v).trim().to_string();
                u.if_generation = Some(s.parse::<u64>().map_err(|_| {
                    ApiError::invalid(
                        "if_generation",
                        format!("`if_generation` must be a non-negative integer, got `{s}`"),
                    )
                })?);
            }
            peft::CONFIG_FILE => {
                if u.config.is_some() {
                    return Err(ApiError::invalid(peft::CONFIG_FILE, "Give the config once"));
                }
                u.config =
                    Some(read_field(&mut field, MAX_CONFIG_BYTES as u64, peft::CONFIG_FILE).await?);
            }
            peft::WEIGHTS_FILE => {
                if u.weights.is_some() {
                    return Err(ApiError::invalid(
                        peft::WEIGHTS_FILE,
                        "Give the weights once",
                    ));
                }
                u.weights = Some(read_field(&mut field, max_weights, peft::WEIGHTS_FILE).await?);
            }
            // Unknown parts are drained and ignored.
            _ => while field.try_next().await.map_err(multipart_error)?.is_some() {},
        }
    }
    Ok(u)
}

/// `POST /v1/adapters` (multipart: `name`, `adapter_config.json`, `adapter_model.safetensors`,
/// optional `if_generation`).
pub async fn import(req: HttpRequest, payload: Multipart) -> Result<HttpResponse, ApiError> {
    let store = store_of(&req)?;
    let u = read_upload(payload, store.max_weights_bytes()).await?;
    let name = u
        .name
        .ok_or_else(|| ApiError::invalid("name", "Missing required field: `name`"))?;
    check_name(&name).map_err(|mut e| {
        e.param = Some("name".into());
        e
    })?;
    if name.starts_with(JOB_PREFIX) {
        return Err(ApiError::invalid(
            "name",
            format!("Names starting with `{JOB_PREFIX}` are reserved for fine-tuning jobs"),
        ));
    }
    let config = u.config.ok_or_else(|| {
        ApiError::invalid(
            peft::CONFIG_FILE,
            "Missing required file: adapter_config.json",
        )
    })?;
    let weights = u.weights.ok_or_else(|| {
        ApiError::invalid(
            peft::WEIGHTS_FILE,
            "Missing required file: adapter_model.safetensors",
        )
    })?;
    let (a, created) = store
        .import(Import {
            name,
            config,
            weights,
            if_generation: u.if_generation,
        })
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(status).json(adapter_object(&a)))
}

/// `POST /v1/adapters/{id}/load`: serves a stored adapter (a no-op answer if it is resident).
pub async fn load(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = check_name(&id)?.to_string();
    let store = store_of(&req)?;
    let a = store.load(jobs_of(&req), &id).await?;
    Ok(HttpResponse::Ok().json(adapter_object(&a)))
}

/// `POST /v1/adapters/{id}/unload`: stops serving it; running requests finish on it.
pub async fn unload(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = check_name(&id)?.to_string();
    let store = store_of(&req)?;
    match store.unload(jobs_of(&req), &id).await? {
        Some(a) => Ok(HttpResponse::Ok().json(adapter_object(&a))),
        // A runtime-only variant (e.g. `--adapter`) is gone entirely once unloaded.
        None => {
            Ok(HttpResponse::Ok().json(json!({"id": id, "object": "adapter", "resident": false})))
        }
    }
}

/// `DELETE /v1/adapters/{id}`: unloads and deletes an imported adapter.
pub async fn delete(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = check_name(&id)?.to_string();
    let store = store_of(&req)?;
    store.delete(jobs_of(&req), &id).await?;
    Ok(HttpResponse::Ok().json(json!({"id": id, "object": "adapter", "deleted": true})))
}

/// `DELETE /v1/models/{id}` (OpenAI's model deletion): a fine-tuning job's result or checkpoint,
/// or an imported adapter. New requests for it get 404 at once, running ones finish, then its
/// files go; the job's record stays. The base model is refused with 403.
pub async fn delete_model(
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let engine = req
        .app_data::<web::Data<crate::engine::EngineHandle>>()
        .ok_or_else(|| ApiError::internal("No engine is attached to this server"))?;
    if engine
        .models()
        .iter()
        .any(|c| c.id == id && c.parent.is_none())
    {
        return Err(ApiError::forbidden(format!(
            "`{id}` is the base model this server runs; it cannot be deleted (only fine-tuned \
             models, their checkpoints and imported adapters can)"
        )));
    }
    store_of(&req)?.delete_model(jobs_of(&req), &id).await?;
    Ok(HttpResponse::Ok().json(json!({"id": id, "object": "model", "deleted": true})))
}

/// `GET /v1/adapters/{id}/files/{name}`: `adapter_config.json` or `adapter_model.safetensors`.
pub async fn download(
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, file) = path.into_inner();
    let id = check_name(&id)?.to_string();
    let (file, content_type) = match file.as_str() {
        peft::CONFIG_FILE => (peft::CONFIG_FILE, "application/json"),
        peft::WEIGHTS_FILE => (peft::WEIGHTS_FILE, "application/octet-stream"),
        _ => {
            return Err(ApiError::invalid(
                "name",
                format!(
                    "Unknown adapter file: use `{}` or `{}`",
                    peft::CONFIG_FILE,
                    peft::WEIGHTS_FILE
                ),
            ))
        }
    };
    let store = store_of(&req)?;
    let bytes = store.read_file(jobs_of(&req), &id, file).await?;
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((
            actix_web::http::header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{file}\""),
        ))
        .body(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::ServiceError;

    #[test]
    fn conflict_is_409() {
        let e = ApiError::from(ServiceError::GenerationMismatch("x".into()));
        assert_eq!(e.status, StatusCode::CONFLICT);
        assert_eq!(e.body()["error"]["param"], "if_generation");
    }

    #[test]
    fn bad_names_are_400_naming_the_id() {
        let e = check_name("../etc").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("id"));
        assert!(check_name("org:name:v3").is_ok());
    }
}
