//! HTTP endpoints.

pub mod admin;
pub mod batch;
pub mod blobs;
pub mod cors;
pub mod health;
