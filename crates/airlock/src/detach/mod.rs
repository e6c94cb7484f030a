//! Long-lived sandboxes without a daemon: `run -d` starts one supervisor process per sandbox
//! (`airlock __supervise`, in its own session) that owns the VM and serves the JSON-RPC API on
//! `<runtime dir>/sandboxes/<id>/sock` (0600). Every other command (`exec`, `ls`, `kill`, …)
//! is a client of that socket or reads the record directory.
//!
//! Record directory `<runtime dir>/sandboxes/<id>/`: `meta.json` (settings; secret names and
//! hosts, never values), `lock` (flock'd by the live supervisor: that is how `ls` tells
//! running from dead), `sock`, `log` (the detached command's output), `exit.json` (written on a
//! clean stop; missing on a dead sandbox). The supervisor gets its settings, secret values
//! included, as JSON on its stdin pipe, never in argv or the environment.
//!
//! One concern per file: [`records`] (the record store), [`supervisor`] (launching and the
//! supervisor process), [`exec`] and [`commands`] (the client verbs).

mod commands;
mod exec;
mod records;
mod supervisor;

pub use commands::*;
pub use exec::*;
pub use records::*;
pub use supervisor::*;
