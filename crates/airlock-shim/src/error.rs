//! Shim errors, and how they reach containerd (a ttrpc status whose code containerd maps to
//! its errdefs: `ctr` prints the message).

use containerd_shim_protos::ttrpc;

/// Why a task request failed.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The request or the bundle asks for something invalid (bad annotation, host devices).
    #[error("airlock: {0}")]
    Invalid(String),
    /// No such container or process.
    #[error("airlock: {0}")]
    NotFound(String),
    /// The container or process is in the wrong state for the request.
    #[error("airlock: {0}")]
    State(String),
    /// Starting or talking to the VM failed.
    #[error("airlock: {0}")]
    Sandbox(#[from] airlock_sandbox::Error),
    /// A host operation (mount, FIFO) failed.
    #[error("airlock: {0}")]
    Host(String),
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> ttrpc::Error {
        let code = match e {
            ShimError::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
            ShimError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            ShimError::State(_) => ttrpc::Code::FAILED_PRECONDITION,
            ShimError::Sandbox(_) | ShimError::Host(_) => ttrpc::Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}
