//! Airlock's JSON-RPC 2.0 API, newline-delimited, matchlock-compatible: the wire format
//! ([`wire`]) and the server ([`server`]) that `airlock rpc` runs over stdio and every
//! sandbox supervisor runs on its unix socket. Matchlock's methods keep their shapes and error
//! codes; Airlock's additions are optional fields and extra methods (see `docs/rpc.md`).

pub mod server;
pub mod wire;
