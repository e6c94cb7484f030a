//! `airlock build`: OCI images from Dockerfiles, rootless, every RUN step executed inside
//! an Airlock sandbox (sealed network unless the build allows hosts).
//!
//! * [`dockerfile`] parses (continuations, comments, directives, both command forms) and
//!   expands variables as Docker does.
//! * [`context`] reads the build context with `.dockerignore` applied and keeps every COPY
//!   source inside it.
//! * [`layer`] writes layer tars deterministically (gzip, `diff_id` and digest on the way)
//!   and re-writes untrusted ones (a RUN step's diff from the guest) with path checks.
//! * [`cache`] maps a step (parent chain + instruction + inputs) to its result, so an
//!   unchanged rebuild boots no VM.
//! * [`image`] edits the image config step by step; [`stagefs`] looks paths up in a
//!   stage's layers.
//! * [`build`] runs it all and records the image in the store.

#![warn(missing_docs)]

pub mod cache;
pub mod context;
pub mod dockerfile;
mod error;
mod executor;
pub mod image;
pub mod layer;
pub mod stagefs;

pub use error::{BuildError, Result};
pub use executor::{build, parse_build_args, BuildOptions, Progress, ProgressFn};
