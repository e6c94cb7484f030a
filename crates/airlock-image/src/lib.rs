//! OCI image handling for Airlock.
//!
//! This crate turns an image reference such as `alpine`, `ghcr.io/org/app:1.2` or
//! `127.0.0.1:5000/test/bb@sha256:…` into verified, content-addressed blobs on local disk:
//!
//! * [`Reference`] parses references with Docker's rules (default registry `docker.io`,
//!   implicit `library/` namespace, default tag `latest`).
//! * [`Store`] is a content-addressed blob store plus a small JSON index of pulled/imported
//!   images, safe for several processes at once (every update happens under an `flock`).
//! * [`pull`] downloads an image from a registry (anonymous, bearer-token or basic auth,
//!   credentials from `~/.docker/config.json`), verifying every blob against its digest.
//! * [`import`] reads `docker save` tarballs and OCI image-layout tarballs as streams.
//! * [`push`] uploads a stored image to a registry; [`Store::write_image`] records a new
//!   image built from layers written with [`Store::blob_writer`] (`airlock build`).
//! * [`ImageConfig`] exposes the runtime settings (entrypoint, cmd, env, …) of a stored image.
//!
//! The crate never extracts layers; it only stores them. Unpacking a root file system is the
//! caller's job.

#![warn(missing_docs)]

mod config;
mod credentials;
mod error;
mod import;
mod lock;
mod pull;
mod push;
mod reference;
mod store;
mod write;

pub use config::ImageConfig;
pub use error::{Error, Result};
pub use import::{clean_relative, import};
pub use pull::{pull, Platform, ProgressEvent, ProgressFn, ProgressState, PullOptions};
pub use push::{push, PushOptions, PushProgressFn};
pub use reference::Reference;
pub use store::{default_data_dir, ImageRecord, LayerRecord, Store};
pub use write::{
    compose_manifest, BlobWriter, WriteGuard, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_LAYER_GZIP,
};

/// Media type of an OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of a Docker schema 2 image manifest.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of a Docker schema 2 manifest list.
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
