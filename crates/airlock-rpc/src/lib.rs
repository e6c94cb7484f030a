//! Airlock's JSON-RPC 2.0 API, newline-delimited, matchlock-compatible: the wire format
//! ([`wire`]), the server ([`server`]) that `airlock rpc` runs over stdio and every
//! sandbox supervisor runs on its unix socket, and the typed
//! client ([`client`]) the CLI drives supervisors with. Matchlock's methods keep their shapes and error
//! codes; Airlock's additions are optional fields and extra methods (see `docs/rpc.md`).

pub mod client;
pub mod server;
pub mod wire;
