//! The one place where failures become HTTP statuses and OpenAI-style error bodies:
//! `{"error":{"message","type","param","code"}}`.
use std::fmt;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde_json::{json, Value};

use crate::engine::EngineError;
use crate::jobs::ServiceError;

/// `type` of client mistakes (4xx).
pub const INVALID_REQUEST: &str = "invalid_request_error";
/// `type` of server-side failures (5xx).
pub const SERVER_ERROR: &str = "server_error";

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The OpenAI `type` field.
    pub kind: &'static str,
    /// The request field at fault (`messages[1].role`, `temperature`, ...).
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400 naming the request field at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, message)
        }
    }

    /// 400 about the request as a whole (unparsable body, not an object, ...).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, INVALID_REQUEST, message)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::not_found(format!("The model `{model}` does not exist"))
        }
    }

    /// 403: understood but refused (not a question of the key's scope: see `auth`).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            code: Some("permission_denied"),
            ..Self::new(StatusCode::FORBIDDEN, "permission_denied", message)
        }
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, INVALID_REQUEST, message)
    }

    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, INVALID_REQUEST, message)
    }

    pub fn not_ready(message: impl Into<String>) -> Self {
        Self {
            code: Some("model_not_ready"),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, SERVER_ERROR, message)
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: Some("engine_unavailable"),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, SERVER_ERROR, message)
        }
    }

    /// 429: the engine's waiting queue is full; `Retry-After` tells when to come back.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            code: Some("server_busy"),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, SERVER_ERROR, message)
    }

    /// The JSON body: `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status);
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            res.insert_header((header::RETRY_AFTER, "1"));
        }
        res.json(self.body())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NotReady => Self::not_ready(e.to_string()),
            EngineError::ModelNotFound(ref model) => Self::model_not_found(model),
            EngineError::Invalid { param, message } => Self::invalid(param, message),
            EngineError::Unavailable(_) => Self::unavailable(e.to_string()),
            EngineError::Overloaded { .. } => Self::overloaded(e.to_string()),
            EngineError::Internal(_) => Self::internal(e.to_string()),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::NotFound(message) => Self::not_found(message),
            ServiceError::AdapterNotFound(_) => Self {
                code: Some("adapter_not_found"),
                ..Self::not_found(e.to_string())
            },
            ServiceError::Invalid {
                param: Some(param),
                message,
            } => Self::invalid(param, message),
            ServiceError::Invalid {
                param: None,
                message,
            } => Self::bad_request(message),
            ServiceError::ModelNotFound { model, message } => Self {
                message,
                ..Self::model_not_found(&model)
            },
            ServiceError::GenerationMismatch(message) => Self {
                status: StatusCode::CONFLICT,
                message,
                kind: INVALID_REQUEST,
                param: Some("if_generation".into()),
                code: Some("generation_mismatch"),
            },
            ServiceError::NotReady(message) => Self::not_ready(message),
            ServiceError::Forbidden(message) => Self::forbidden(message),
            ServiceError::Storage(_) => {
                tracing::error!("jobs database: {e}");
                Self::internal(e.to_string())
            }
            ServiceError::Internal(message) => Self::internal(message),
            ServiceError::Engine(e) => e.into(),
        }
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        Self::internal(format!("a worker thread failed: {e}"))
    }
}

/// `JsonConfig` error handler: unreadable or oversized bodies become OpenAI-style errors.
pub fn json_error(err: actix_web::error::JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as J;
    let api = match err {
        J::OverflowKnownLength { length, limit } => ApiError::payload_too_large(format!(
            "The request body ({length} bytes) is larger than the limit of {limit} bytes"
        )),
        J::Overflow { limit } => ApiError::payload_too_large(format!(
            "The request body is larger than the limit of {limit} bytes"
        )),
        J::Deserialize(e) => ApiError::bad_request(format!(
            "We could not parse the JSON body of your request: {e}"
        )),
        J::ContentType => ApiError::bad_request("The request body must be JSON"),
        other => ApiError::bad_request(format!("Could not read the request body: {other}")),
    };
    api.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let e = ApiError::invalid("messages[1].role", "bad role");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "bad role", "type": "invalid_request_error",
                             "param": "messages[1].role", "code": null}})
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn engine_errors_map_to_statuses() {
        let cases = [
            (EngineError::NotReady, 503, None, Some("model_not_ready")),
            (
                EngineError::ModelNotFound("x".into()),
                404,
                Some("model"),
                Some("model_not_found"),
            ),
            (
                EngineError::Invalid {
                    param: "max_tokens".into(),
                    message: "too many".into(),
                },
                400,
                Some("max_tokens"),
                None,
            ),
            (
                EngineError::Unavailable("gone".into()),
                503,
                None,
                Some("engine_unavailable"),
            ),
            (EngineError::Internal("boom".into()), 500, None, None),
            (
                EngineError::Overloaded {
                    retry_after_secs: 1,
                },
                429,
                None,
                Some("server_busy"),
            ),
        ];
        for (e, status, param, code) in cases {
            let a = ApiError::from(e);
            assert_eq!(a.status.as_u16(), status, "{a:?}");
            assert_eq!(a.param.as_deref(), param, "{a:?}");
            assert_eq!(a.code, code, "{a:?}");
            let b = a.body();
            assert!(b["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
            let kind = match status {
                429 => "rate_limit_error",
                s if s >= 500 => SERVER_ERROR,
                _ => INVALID_REQUEST,
            };
            assert_eq!(b["error"]["type"], kind);
        }
    }

    #[test]
    fn service_errors_map_to_statuses() {
        let storage = crate::jobs::backend::StoreError::new(std::io::Error::other("disk full"));
        let cases = [
            (
                ServiceError::NotFound("no job".into()),
                404,
                None,
                None,
                "no job",
            ),
            (
                ServiceError::AdapterNotFound("a".into()),
                404,
                None,
                Some("adapter_not_found"),
                "No such adapter: a",
            ),
            (
                ServiceError::invalid("training_file", "missing"),
                400,
                Some("training_file"),
                None,
                "missing",
            ),
            (ServiceError::bad_request("no"), 400, None, None, "no"),
            (
                ServiceError::ModelNotFound {
                    model: "m".into(),
                    message: "not here".into(),
                },
                404,
                Some("model"),
                Some("model_not_found"),
                "not here",
            ),
            (
                ServiceError::GenerationMismatch("at 2".into()),
                409,
                Some("if_generation"),
                Some("generation_mismatch"),
                "at 2",
            ),
            (
                ServiceError::Forbidden("not this one".into()),
                403,
                None,
                Some("permission_denied"),
                "not this one",
            ),
            (
                ServiceError::NotReady("loading".into()),
                503,
                None,
                Some("model_not_ready"),
                "loading",
            ),
            (
                ServiceError::Storage(storage),
                500,
                None,
                None,
                "Database error: disk full",
            ),
            (
                ServiceError::Internal("boom".into()),
                500,
                None,
                None,
                "boom",
            ),
            (
                ServiceError::Engine(EngineError::ModelNotFound("x".into())),
                404,
                Some("model"),
                Some("model_not_found"),
                "The model `x` does not exist",
            ),
        ];
        for (e, status, param, code, message) in cases {
            let a = ApiError::from(e);
            assert_eq!(a.status.as_u16(), status, "{a:?}");
            assert_eq!(a.param.as_deref(), param, "{a:?}");
            assert_eq!(a.code, code, "{a:?}");
            assert_eq!(a.message, message, "{a:?}");
        }
    }

    #[test]
    fn model_not_found_names_model() {
        let a = ApiError::from(EngineError::ModelNotFound("nope".into()));
        assert!(a.message.contains("nope"));
        assert_eq!(a.kind, INVALID_REQUEST);
    }

    #[test]
    fn unavailable_sets_retry_after() {
        let res = ApiError::not_ready("loading").error_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(res.headers().contains_key(header::RETRY_AFTER));
    }
}
