//! The floor under every warm start: bare QEMU restoring Airlock's own template (the same
//! command line, RAM file, device state and disks), with nothing of Airlock around it — no
//! netstack, no `Init`, no command. What a warm start costs beyond this is Airlock's (and the
//! guest's); what this costs, no change to Airlock can remove for this VMM and accelerator.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use airlock_backend::{Backend, DiskConfig, NicConfig, Vm, VmConfig};
use airlock_sandbox::{template, RootfsSource, Sandbox, SandboxSpec};
use anyhow::{bail, Context, Result};

/// One bare restore, running; dropping it kills QEMU.
struct Restored {
    vm: Box<dyn Vm>,
    // Held open: the guest sees a connected control port and a NIC with its link up.
    _ends: Vec<UnixStream>,
}

impl Drop for Restored {
    fn drop(&mut self) {
        self.vm.kill();
    }
}

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

/// Sends one QMP command on `mon`, returns its `return` value.
fn qmp(
    mon: &mut BufReader<UnixStream>,
    cmd: &str,
    args: serde_json::Value,
) -> Result<serde_json::Value> {
    let msg = serde_json::json!({"execute": cmd, "arguments": args});
    mon.get_mut().write_all(format!("{msg}\n").as_bytes())?;
    let mut line = String::new();
    loop {
        line.clear();
        if mon.read_line(&mut line)? == 0 {
            bail!("QEMU closed its monitor during {cmd}");
        }
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = v.get("error") {
            bail!("QMP {cmd}: {e}");
        }
    }
}

/// Launches QEMU restoring the template in `dir`; returns once the guest runs again, with the
/// time from just before the spawn.
fn restore(dir: &Path, m: &template::Manifest, scratch: &Path) -> Result<(Duration, Restored)> {
    let st = std::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(dir.join("scratch.ext4"))
        .arg(scratch)
        .status()?;
    if !st.success() {
        bail!("copying the template's writable disk failed: {st}");
    }
    let i = &m.inputs;
    let (ctl_host, ctl_vm) = UnixStream::pair()?;
    let (mon_host, mon_vm) = UnixStream::pair()?;
    let mut ends = vec![ctl_host];
    let nic = match i.nic {
        true => {
            let (host, vm) = UnixStream::pair()?;
            ends.push(host);
            Some(NicConfig {
                fd: vm.into(),
                mac: airlock_net::stack::GUEST_MAC,
            })
        }
        false => None,
    };
    let accel = i.accel.parse().map_err(anyhow::Error::msg)?;
    let cfg = VmConfig {
        cmdline_extra: m.boot_cmdline.clone(),
        cpus: i.cpus,
        memory_mib: i.memory_mib,
        disks: vec![
            DiskConfig {
                path: i.root.path.clone(),
                read_only: true,
                serial: "airlock-root".into(),
            },
            DiskConfig {
                path: scratch.to_path_buf(),
                read_only: false,
                serial: "airlock-scratch".into(),
            },
        ],
        nic,
        shared_memory_file: Some(dir.join("ram")),
        memory_private: true,
        monitor: Some(mon_vm.into()),
        incoming: Some(std::fs::File::open(dir.join("state"))?.into()),
        ..VmConfig::new(
            i.kernel.path.clone(),
            i.initrd.path.clone(),
            ctl_vm.into(),
            scratch.with_extension("console"),
            accel,
        )
    };
    let t = Instant::now();
    let vm = airlock_backend::qemu::Qemu::default().launch(cfg)?;
    let fd = vm.incoming_fd().context("QEMU got no incoming fd")?;
    let restored = Restored { vm, _ends: ends };
    mon_host.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut mon = BufReader::new(mon_host);
    let mut greeting = String::new();
    mon.read_line(&mut greeting)?;
    qmp(&mut mon, "qmp_capabilities", serde_json::json!({}))?;
    qmp(
        &mut mon,
        "migrate-set-capabilities",
        serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
    )?;
    qmp(
        &mut mon,
        "migrate-incoming",
        serde_json::json!({"uri": format!("fd:{fd}")}),
    )?;
    loop {
        let s = qmp(&mut mon, "query-status", serde_json::json!({}))?;
        match s["status"].as_str().unwrap_or_default() {
            "inmigrate" => std::thread::sleep(Duration::from_micros(500)),
            "paused" | "postmigrate" | "prelaunch" => break,
            other => bail!("the restore ended in state {other:?}"),
        }
    }
    qmp(&mut mon, "cont", serde_json::json!({}))?;
    Ok((t.elapsed(), restored))
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
    let m = template::verify(&dir).map_err(anyhow::Error::msg)?;
    let (dir2, tmp2) = (dir.clone(), tmp.path().to_path_buf());
    tokio::task::spawn_blocking(move || {
        // One uncounted restore, as every other measurement has its warm-up.
        restore(&dir2, &m, &tmp2.join("warmup.ext4"))?;
        let mut restores = Vec::new();
        for n in 0..iterations {
            let (d, vm) = restore(&dir2, &m, &tmp2.join(format!("s{n}.ext4")))?;
            restores.push(d);
            drop(vm);
        }
        let held = (0..idle)
            .map(|n| restore(&dir2, &m, &tmp2.join(format!("i{n}.ext4"))).map(|r| r.1))
            .collect::<Result<Vec<_>>>()?;
        std::thread::sleep(Duration::from_secs(2));
        let mut pss = 0;
        for r in &held {
            pss += crate::snap::rss_pss(r.vm.pid())?.1;
        }
        Ok(Floor {
            restores,
            idle_pss_kib: pss / idle.max(1) as u64,
        })
    })
    .await?
}
