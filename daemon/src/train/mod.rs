//! Training against the resident model: data (JSONL formats, validation, tokenization with loss
//! masks, batching and packing), the optimizer and schedule, and the loop with evaluation,
//! checkpoints and exact resume.
pub mod data;
pub mod optim;
pub mod trainer;

pub use trainer::{
    EvalMetrics, Finish, Method, StepMetrics, TrainConfig, TrainControl, TrainError, TrainEvent,
    TrainOutcome, Trainer,
};
