//! The sandbox API's error type.

use airlock_proto::ExecErrorKind;

use crate::{ConnectError, ConnectErrorKind, ExecError};

/// Errors of the sandbox API. Each says what happened and, where it can, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something Airlock needs on the host is missing.
    #[error("{0}")]
    Setup(String),
    /// The root filesystem could not be prepared.
    #[error("rootfs: {0}")]
    Rootfs(String),
    /// The VMM could not be started.
    #[error(transparent)]
    Backend(#[from] airlock_backend::BackendError),
    /// The guest kernel panicked.
    #[error("guest kernel panicked: {message}\n--- last console lines ---\n{console}")]
    GuestPanic {
        /// The panic line.
        message: String,
        /// Tail of the guest console.
        console: String,
    },
    /// The VM ended when it should not have.
    #[error("sandbox VM stopped unexpectedly ({why})\n--- last console lines ---\n{console}")]
    VmStopped {
        /// What was observed.
        why: String,
        /// Tail of the guest console.
        console: String,
    },
    /// The guest did not become ready in time.
    #[error("guest agent not ready after {secs} s\n--- last console lines ---\n{console}")]
    NotReady {
        /// How long Airlock waited.
        secs: u64,
        /// Tail of the guest console.
        console: String,
    },
    /// The guest broke the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The command could not be started in the guest.
    #[error("{}", .0.message)]
    Exec(ExecError),
    /// A connection to a port inside the sandbox could not be made.
    #[error("{}{}", .error.message, if .error.kind == ConnectErrorKind::Refused { format!(": is a server listening on port {} inside the sandbox?", .port) } else { String::new() })]
    Connect {
        /// The guest port.
        port: u16,
        /// What the guest agent reported.
        error: ConnectError,
    },
    /// A file operation failed in the guest (the message names the path).
    #[error("{}", .0.message)]
    File(ExecError),
    /// A snapshot could not be taken, found or started.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// The sandbox network could not be set up, or a rule given to it is malformed.
    #[error(transparent)]
    Network(#[from] airlock_net::NetError),
    /// The operation needs the sandbox's network, and it has none (`--no-network`).
    #[error("this sandbox has no network")]
    NoNetwork,
    /// Host I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// For a failed exec, the exit code a shell would give (127 not found, 126 not
    /// executable); `None` for other errors.
    pub fn exec_exit_code(&self) -> Option<i32> {
        match self {
            Error::Exec(e) => Some(match e.kind {
                ExecErrorKind::NotFound => 127,
                ExecErrorKind::PermissionDenied => 126,
                _ => 125,
            }),
            _ => None,
        }
    }
}
