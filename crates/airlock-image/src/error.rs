//! Error type of the crate.

use std::path::PathBuf;

/// Result alias using [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while parsing, pulling, importing or storing an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image reference string is malformed.
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference {
        /// The string that was parsed.
        input: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A digest string is malformed or uses an unsupported algorithm.
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest(String),
    /// Content did not hash to the digest it was announced with.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was being verified (blob, manifest, layer file, …).
        what: String,
        /// The announced digest.
        expected: String,
        /// The digest of the bytes actually received.
        actual: String,
    },
    /// Content did not have the size it was announced with.
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// Digest of the blob.
        digest: String,
        /// The announced size.
        expected: u64,
        /// The size actually received (or a lower bound when the data was too long).
        actual: u64,
    },
    /// The image index has no manifest for the requested platform.
    #[error("no image for platform {requested} in {reference}; available: {}", if available.is_empty() { "none".to_string() } else { available.join(", ") })]
    PlatformNotFound {
        /// The reference being pulled.
        reference: String,
        /// The requested platform (`os/arch[/variant]`).
        requested: String,
        /// Platforms the index offers.
        available: Vec<String>,
    },
    /// The image is not in the local store.
    #[error("image {0} not found in the local store")]
    NotFound(String),
    /// A manifest, index or config document could not be understood.
    #[error("invalid {what}: {reason}")]
    InvalidDocument {
        /// Which document.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tarball given to [`crate::import`] is malformed or hostile.
    #[error("invalid image archive: {0}")]
    InvalidArchive(String),
    /// The registry or the transport failed.
    #[error("registry error for {reference}: {source}")]
    Registry {
        /// The reference being pulled.
        reference: String,
        /// The underlying client error.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// Reading the Docker credentials file failed.
    #[error("cannot use docker credentials in {path}: {reason}")]
    Credentials {
        /// Path of the config file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A local I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, usually with the path involved.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn doc(what: impl Into<String>, reason: impl ToString) -> Self {
        Error::InvalidDocument {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// Attach a context string to I/O results.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
