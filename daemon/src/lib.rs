//! itamae: one resident base model, tuned into specialists and served.
//!
//! Layers, each knowing only the one below:
//! `api` (HTTP: parses requests, calls a service, renders its answer or error) → `jobs` (the
//! fine-tuning jobs, files and adapter store services, over the storage interfaces
//! `jobs::backend`), `engine` (scheduling, sampling, generation) and `train` → `adapters` →
//! `model` (the transformer, its tokenizer and chat template) → `ops` (numeric kernels with fast
//! and differentiable paths). `durable` (crash-safe file writes) and `alloc` (the process's
//! memory allocator) know no layer and serve all.
pub mod adapters;
pub mod alloc;
pub mod api;
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
