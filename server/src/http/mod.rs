//! HTTP endpoints.

pub mod batch;
pub mod blobs;
pub mod cors;
pub mod health;
