//! `/v1/files`: upload (multipart `file` + `purpose=fine-tune`), list, retrieve, delete and
//! download the datasets that fine-tuning jobs train on. Bytes are streamed to a temporary file
//! under the size limit and renamed into place only when complete.
use std::io::Read;

use actix_multipart::Multipart;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::TryStreamExt;
use serde_json::{json, Value};

use super::error::ApiError;
use super::fields;
use super::handlers::method_not_allowed;
use super::jobs::{jobs_of, limit_param, query_map};
use crate::jobs::backend::{BlobWriter, FileQuery};
use crate::jobs::storage::{valid_id, FILE_PREFIX};
use crate::jobs::store::FileRow;
use crate::jobs::FINE_TUNE;
/// Bytes gathered before each write to disk.
const WRITE_CHUNK: usize = 1 << 20;
/// Longest accepted `purpose` field.
const MAX_PURPOSE: usize = 64;
/// Longest stored file name (the name is only shown back, never used as a path).
const MAX_FILENAME: usize = 255;

pub fn configure(cfg: &mut web::ServiceConfig) {
    fn resource(path: &str) -> actix_web::Resource {
        web::resource(path).default_service(web::to(method_not_allowed))
    }
    cfg.service(
        resource("/v1/files")
            .route(web::post().to(upload))
            .route(web::get().to(list)),
    )
    .service(
        resource("/v1/files/{id}")
            .route(web::get().to(retrieve))
            .route(web::delete().to(delete)),
    )
    .service(resource("/v1/files/{id}/content").route(web::get().to(content)));
}

pub(crate) fn file_object(f: &FileRow) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
        "expires_at": null,
    })
}

/// A file id from the URL: checked before anything touches the disk or the database.
fn file_id(id: &str) -> Result<&str, ApiError> {
    if valid_id(FILE_PREFIX, id) {
        Ok(id)
    } else {
        Err(ApiError::invalid(
            "file_id",
            format!("Invalid file id `{id}`"),
        ))
    }
}

fn multipart_error(e: actix_multipart::MultipartError) -> ApiError {
    use actix_multipart::MultipartError as M;
    match e {
        M::ContentTypeMissing
        | M::ContentTypeParse
        | M::ContentTypeIncompatible
        | M::BoundaryMissing => ApiError::bad_request(
            "The request must be multipart/form-data with the fields `file` and `purpose`",
        ),
        e => ApiError::bad_request(format!("Could not read the multipart body: {e}")),
    }
}

async fn write_chunk(
    f: Box<dyn BlobWriter>,
    buf: Vec<u8>,
) -> Result<(Box<dyn BlobWriter>, Vec<u8>), ApiError> {
    web::block(move || {
        let mut f = f;
        f.write_all(&buf).map(|()| (f, buf))
    })
    .await?
    .map_err(|e| ApiError::internal(format!("Cannot store the upload: {e}")))
}

/// `POST /v1/files`.
pub async fn upload(req: HttpRequest, mut payload: Multipart) -> Result<HttpResponse, ApiError> {
    let jobs = jobs_of(&req)?;
    let limit = jobs.config().max_upload_bytes;
    let mut purpose: Option<String> = None;
    // (the upload being written, bytes, file name); dropped uncommitted, it leaves nothing.
    let mut upload: Option<(Box<dyn BlobWriter>, u64, String)> = None;
    while let Some(mut field) = payload.try_next().await.map_err(multipart_error)? {
        match field.name() {
            Some("purpose") => {
                let mut v = Vec::new();
                while let Some(chunk) = field.try_next().await.map_err(multipart_error)? {
                    if v.len() + chunk.len() > MAX_PURPOSE {
                        return Err(ApiError::invalid("purpose", "`purpose` is too long"));
                    }
                    v.extend_from_slice(&chunk);
                }
                purpose = Some(String::from_utf8_lossy(&v).trim().to_string());
            }
            Some("file") => {
                if upload.is_some() {
                    return Err(ApiError::invalid("file", "Give exactly one `file`"));
                }
                let filename: String = field
                    .content_disposition()
                    .and_then(|d| d.get_filename())
                    .unwrap_or("upload.jsonl")
                    .chars()
                    .take(MAX_FILENAME)
                    .collect();
                let j = jobs.clone();
                let mut f = web::block(move || j.begin_upload()).await??;
                let mut bytes = 0u64;
                let mut buf = Vec::with_capacity(WRITE_CHUNK);
                while let Some(chunk) = field.try_next().await.map_err(multipart_error)? {
                    bytes += chunk.len() as u64;
                    if bytes > limit {
                        return Err(ApiError::payload_too_large(format!(
                            "The file is larger than the limit of {limit} bytes"
                        )));
                    }
                    buf.extend_from_slice(&chunk);
                    if buf.len() >= WRITE_CHUNK {
                        let (nf, mut nb) = write_chunk(f, buf).await?;
                        nb.clear();
                        (f, buf) = (nf, nb);
                    }
                }
                if !buf.is_empty() {
                    f = write_chunk(f, buf).await?.0;
                }
                upload = Some((f, bytes, filename));
            }
            // Anything else is named in a 400 unless it is empty (SDKs send unset extras so).
            other => {
                let name = other.unwrap_or("").to_string();
                let mut v = Vec::new();
                while let Some(chunk) = field.try_next().await.map_err(multipart_error)? {
                    if v.len() < MAX_PURPOSE {
                        v.extend_from_slice(&chunk);
                    }
                }
                if !v.is_empty() {
                    let value = Value::String(String::from_utf8_lossy(&v).into_owned());
                    fields::FILE_UPLOAD.check(&name, &value)?;
                }
            }
        }
    }
    let purpose = purpose
        .ok_or_else(|| ApiError::invalid("purpose", "Missing required parameter: `purpose`"))?;
    if purpose != FINE_TUNE {
        return Err(ApiError::invalid(
            "purpose",
            format!("Invalid purpose `{purpose}`: this server accepts `{FINE_TUNE}` files only"),
        ));
    }
    let Some((f, bytes, filename)) = upload else {
        return Err(ApiError::invalid(
            "file",
            "Missing required parameter: `file`",
        ));
    };
    let row = jobs.add_file(f, bytes, filename, purpose).await?;
    Ok(HttpResponse::Ok().json(file_object(&row)))
}

/// `GET /v1/files` (`purpose`, `after`, `limit` up to 10000, `order` asc|desc).
pub async fn list(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let q = query_map(&req, &fields::FILE_LIST)?;
    let jobs = jobs_of(&req)?;
    let limit = limit_param(&q, 10_000, 10_000)?;
    let after = match q.get("after") {
        Some(a) => Some(file_id(a).map_err(|_| ApiError::invalid("after", "Invalid file id"))?),
        None => None,
    };
    let ascending = match q.get("order").map(String::as_str) {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(_) => return Err(ApiError::invalid("order", "order must be `asc` or `desc`")),
    };
    let page = jobs
        .list_files(FileQuery {
            purpose: q.get("purpose").map(String::as_str),
            after,
            limit,
            ascending,
        })
        .await?;
    let data: Vec<Value> = page.data.iter().map(file_object).collect();
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": data,
        "has_more": page.has_more,
        "first_id": page.data.first().map(|f| &f.id),
        "last_id": page.data.last().map(|f| &f.id),
    })))
}

async fn find(req: &HttpRequest, id: &str) -> Result<FileRow, ApiError> {
    let id = file_id(id)?;
    Ok(jobs_of(req)?.file(id).await?)
}

/// `GET /v1/files/{id}`.
pub async fn retrieve(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let f = find(&req, &id).await?;
    Ok(HttpResponse::Ok().json(file_object(&f)))
}

/// `DELETE /v1/files/{id}`.
pub async fn delete(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = file_id(&id)?;
    let f = jobs_of(&req)?.delete_file(id).await?;
    Ok(HttpResponse::Ok().json(json!({"id": f.id, "object": "file", "deleted": true})))
}

/// `GET /v1/files/{id}/content`: the bytes as uploaded, streamed.
pub async fn content(req: HttpRequest, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = file_id(&id)?;
    let (f, file) = jobs_of(&req)?.file_content(id).await?;
    let stream = futures::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let read = web::block(move || {
            let mut buf = vec![0u8; 64 << 10];
            let n = file.read(&mut buf)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((file, buf))
        })
        .await;
        match read {
            Ok(Ok((_, buf))) if buf.is_empty() => None,
            Ok(Ok((file, buf))) => Some((Ok(web::Bytes::from(buf)), Some(file))),
            Ok(Err(e)) => Some((Err(e), None)),
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .body(actix_web::body::SizedStream::new(
            f.bytes.max(0) as u64,
            stream,
        )))
}
