//! [`Sandbox::processes`]: what runs in the guest (`airlock top`), from the agent's `ps`
//! builtin.

use crate::{Error, Sandbox};

/// One process in the guest.
pub use airlock_proto::GuestProcess;

/// Most bytes of `ps` output the host accepts (some 20 000 processes).
const MAX_PS_BYTES: usize = 8 << 20;

impl Sandbox {
    /// The guest's processes, by pid: all but the agent (pid 1) and kernel threads. The list
    /// comes from the guest, so it says what the guest claims: fine to show, not to trust.
    pub async fn processes(&self) -> Result<Vec<GuestProcess>, Error> {
        self.builtin_json_lines("ps", MAX_PS_BYTES, "process list")
            .await
    }
}
