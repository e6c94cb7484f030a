//! Library side of the guest agent: the parts that parse untrusted input and can be tested
//! and fuzzed on the host.

pub mod procs;
pub mod rootdiff;
pub mod unpack;
