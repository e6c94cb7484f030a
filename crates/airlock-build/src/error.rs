//! Errors of a build. Each says what went wrong and, where it can, what to do.

use crate::dockerfile::ParseError;

/// Everything that can make a build fail.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile does not parse.
    #[error("{0}")]
    Parse(#[from] ParseError),
    /// A problem with the build context (missing file, path outside it, bad .dockerignore).
    #[error("{0}")]
    Context(String),
    /// A `--build-arg` is malformed.
    #[error("--build-arg {arg}: {reason}")]
    BuildArg {
        /// The argument as given (its value left out).
        arg: String,
        /// What is wrong.
        reason: String,
    },
    /// A step cannot be carried out as written.
    #[error("step {step} (Dockerfile line {line}): {message}")]
    Step {
        /// Step number (1-based, as printed).
        step: usize,
        /// Dockerfile line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A RUN command exited non-zero.
    #[error("step {step}: the command '{command}' returned a non-zero code: {code}")]
    RunFailed {
        /// Step number.
        step: usize,
        /// The command as written.
        command: String,
        /// Its exit code (128+N for signal N).
        code: i32,
    },
    /// The image store or a registry failed.
    #[error("{0}")]
    Image(#[from] airlock_image::Error),
    /// A sandbox could not be started or failed.
    #[error("sandbox: {0}")]
    Sandbox(#[from] airlock_sandbox::Error),
    /// A layer the guest sent is malformed or too large.
    #[error("layer: {0}")]
    Layer(String),
    /// A local I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl BuildError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BuildError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias using [`BuildError`].
pub type Result<T, E = BuildError> = std::result::Result<T, E>;
