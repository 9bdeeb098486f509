//! The jobs layer's failures, as the API needs to tell them apart (the mapping to HTTP statuses
//! and OpenAI error bodies is `api::error`'s). Messages are the ones clients see.
use super::backend::StoreError;
use crate::engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No such job, file or checkpoint.
    #[error("{0}")]
    NotFound(String),
    /// No such adapter (imported, or a servable variant).
    #[error("No such adapter: {0}")]
    AdapterNotFound(String),
    /// A request the service refuses; `param` names the request field at fault (None: the
    /// request as a whole).
    #[error("{message}")]
    Invalid {
        param: Option<String>,
        message: String,
    },
    /// The request names a model this server cannot act on.
    #[error("{message}")]
    ModelNotFound { model: String, message: String },
    /// The request is understood but this server will not do it (deleting a variant that
    /// only lives in memory, ...).
    #[error("{0}")]
    Forbidden(String),
    /// A compare-and-set on an adapter's generation failed.
    #[error("{0}")]
    GenerationMismatch(String),
    /// The base model is not loaded yet.
    #[error("{0}")]
    NotReady(String),
    /// The row store failed.
    #[error("Database error: {0}")]
    Storage(#[from] StoreError),
    /// Anything else on the server's side (bytes that cannot be written, ...).
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl ServiceError {
    /// A refusal naming the request field at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            param: Some(param.into()),
            message: message.into(),
        }
    }

    /// A refusal of the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::Invalid {
            param: None,
            message: message.into(),
        }
    }
}

pub type ServiceResult<T> = std::result::Result<T, ServiceError>;
