//! The engine owns the resident model on a dedicated thread: requests are rendered, tokenized and
//! validated on the caller's side ([`EngineHandle::prepare`]), then queued to the engine thread,
//! which runs prefill and decode with sampling and streams text back ([`GenEvent`]).
pub mod types;

pub use types::*;

/// A validated, tokenized request ready to run.
pub struct Prepared {
    pub prompt_tokens: usize,
    pub max_tokens: usize,
}

/// Cheap to clone; shared by every HTTP worker.
#[derive(Clone)]
pub struct EngineHandle {}

impl EngineHandle {
    /// True once the model is loaded and the engine thread runs.
    pub fn is_ready(&self) -> bool {
        todo!()
    }

    /// The base model and (later) every variant.
    pub fn models(&self) -> Vec<ModelCard> {
        todo!()
    }

    /// Renders the chat template, tokenizes and checks lengths against the context:
    /// errors name the request field (`messages`, `prompt`, `max_tokens`, `model`, ...).
    pub fn prepare(&self, _req: GenerationRequest) -> Result<Prepared, EngineError> {
        todo!()
    }

    /// Queues a prepared request; events arrive on the returned receiver until `Finished` or `Failed`.
    /// Dropping the receiver cancels the generation.
    pub fn submit(
        &self,
        _p: Prepared,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<GenEvent>, EngineError> {
        todo!()
    }
}
