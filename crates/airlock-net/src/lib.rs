//! Airlock's sealed network. The guest's NIC ends here, in a userspace TCP/IP stack: DNS is
//! answered locally, every connection is checked against the allow rules before anything is
//! dialled, TLS to hosts that carry secrets is terminated with a per-sandbox CA so placeholders
//! can be swapped for the real values in flight, and every decision is an audit event.

pub mod audit;
pub mod ca;
pub mod policy;
pub mod proxy;
pub mod rewrite;
pub mod secrets;

pub use audit::{Audit, Event};
pub use policy::{AllowRule, HostPattern, Policy, PolicyError, Verdict};
pub use proxy::{ProxyContext, ProxyError, Secret, Target};
