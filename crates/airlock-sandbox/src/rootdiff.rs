//! [`Sandbox::root_diff`]: what commands changed in the sandbox's root, as an OCI layer tar
//! (`airlock build` turns a RUN step into a layer with it).

use crate::{Error, ExecEvent, ExecSpec, Sandbox};

impl Sandbox {
    /// Streams everything changed in the root since boot (the writable layer) as an
    /// uncompressed OCI layer tar into `sink`, chunk by chunk: whiteouts for deletions, opaque
    /// markers for replaced directories; the agent's own files (mount points, resolv.conf,
    /// an injected CA) left out. The tar comes from the guest: treat it as untrusted (the
    /// caller bounds its size through `sink` and checks paths). Returns the bytes received.
    pub async fn root_diff(
        &self,
        mut sink: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<u64, Error> {
        let mut spec = ExecSpec::new(Vec::<String>::new());
        spec.builtin = Some("root-diff".into());
        let mut e = self.exec(spec).await?;
        let mut err = Vec::new();
        let mut total = 0u64;
        loop {
            match e.next().await? {
                Some(ExecEvent::Stdout(b)) => {
                    total += b.len() as u64;
                    sink(&b)?
                }
                Some(ExecEvent::Stderr(b)) if err.len() < 64 << 10 => err.extend_from_slice(&b),
                Some(ExecEvent::Exit(s)) if s.code == Some(0) => return Ok(total),
                Some(ExecEvent::Exit(_)) => {
                    return Err(Error::Setup(format!(
                        "root diff: {}",
                        String::from_utf8_lossy(&err).trim()
                    )))
                }
                Some(ExecEvent::Failed(f)) => return Err(Error::Exec(f)),
                Some(_) => {}
                None => return Err(Error::Protocol("root diff ended without a status".into())),
            }
        }
    }
}
