//! itamae: one resident base model, tuned into specialists and served.
//!
//! Layers, each knowing only the one below:
//! `api` (HTTP) → `engine` (scheduling, sampling, generation) → `model` (the transformer, its
//! tokenizer and chat template) → `ops` (numeric kernels with fast and differentiable paths).
pub mod adapters;
pub mod api;
pub mod bench;
pub mod commands;
pub mod config;
pub mod durable;
pub mod engine;
pub mod eval;
pub mod jobs;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod train;
