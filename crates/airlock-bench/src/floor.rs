//! The floor under every warm start: bare QEMU restoring Airlock's own template
//! ([`airlock_sandbox::bare`]), timed and weighed.

use std::path::Path;
use std::time::Duration;

use airlock_sandbox::{bare, template, RootfsSource, Sandbox, SandboxSpec};
use anyhow::{Context, Result};

/// The template the default sandbox of `rootfs` restores (started once to find out).
async fn template_dir(rootfs: &Path) -> Result<std::path::PathBuf> {
    let sb = Sandbox::start(SandboxSpec::new(RootfsSource::from_path(rootfs)?)).await?;
    let key = sb
        .template()
        .map(str::to_string)
        .context("the sandbox did not start warm: no template to restore")?;
    sb.stop().await?;
    Ok(template::templates_dir().join(key))
}

/// What [`measure`] found.
pub struct Floor {
    /// Spawn until the restored guest runs, one per iteration.
    pub restores: Vec<Duration>,
    /// Mean PSS (KiB) of `idle` bare restores held at once, 2 s after they run.
    pub idle_pss_kib: u64,
}

/// Restores the default template of `rootfs` `iterations` times one after the other, then
/// `idle` at once for their memory.
pub async fn measure(rootfs: &Path, iterations: usize, idle: usize) -> Result<Floor> {
    let dir = template_dir(rootfs).await?;
    let tmp = tempfile::tempdir()?;
    let at = tmp.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        // One uncounted restore, as every other measurement has its warm-up.
        bare::restore(&dir, &at.join("warmup.ext4"))?;
        let mut restores = Vec::new();
        for n in 0..iterations {
            restores.push(bare::restore(&dir, &at.join(format!("s{n}.ext4")))?.took());
        }
        let held = (0..idle)
            .map(|n| bare::restore(&dir, &at.join(format!("i{n}.ext4"))))
            .collect::<Result<Vec<_>, _>>()?;
        std::thread::sleep(Duration::from_secs(2));
        let mut pss = 0;
        for r in &held {
            pss += crate::snap::rss_pss(r.pid())?.1;
        }
        Ok(Floor {
            restores,
            idle_pss_kib: pss / idle.max(1) as u64,
        })
    })
    .await?
}
