//! A template restored bare: the QEMU command line, RAM file, device state and disks a warm
//! start uses, with nothing of Airlock around them (no netstack, no `Init`, no command). It is
//! the floor under every warm start: what a warm start costs beyond it is Airlock's and the
//! guest's; what it costs, no change to Airlock removes for that VMM and accelerator.
//! `airlock-bench` measures it.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use airlock_backend::{Backend, NicConfig, Vm, VmConfig};

use crate::{image_disks, qmp, template, Error, RESTORE_TIMEOUT};

/// One bare restore, running. Dropping it kills QEMU.
pub struct BareRestore {
    vm: Box<dyn Vm>,
    took: Duration,
    // Held open: the guest sees a connected control port and a NIC with its link up.
    _ends: Vec<UnixStream>,
    _monitor: qmp::Qmp,
}

impl BareRestore {
    /// From just before QEMU was spawned until the restored guest ran.
    pub fn took(&self) -> Duration {
        self.took
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }
}

impl Drop for BareRestore {
    fn drop(&mut self) {
        self.vm.kill();
    }
}

/// Restores the template in `dir` (checked first, as a warm start checks it) with its
/// writable disk copied to `scratch`, a path that must not exist yet; returns once the guest
/// runs. Blocks: call it off the async runtime.
pub fn restore(dir: &Path, scratch: &Path) -> Result<BareRestore, Error> {
    let m = template::verify(dir).map_err(Error::Setup)?;
    template::copy_disk(&dir.join("scratch.ext4"), scratch)
        .map_err(|e| Error::Rootfs(format!("copy the template's writable disk: {e}")))?;
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
    let accel = i.accel.parse().map_err(Error::Setup)?;
    let cfg = VmConfig {
        cmdline_extra: m.boot_cmdline.clone(),
        cpus: i.cpus,
        memory_mib: i.memory_mib,
        disks: image_disks(i.root.path.clone(), scratch.to_path_buf()),
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
    let fd = match vm.incoming_fd() {
        Some(fd) => fd,
        None => {
            vm.kill();
            return Err(Error::Setup("QEMU got no incoming fd".into()));
        }
    };
    let session = (|| {
        let mut q = qmp::Qmp::connect(mon_host)?;
        q.ignore_shared(true)?;
        q.restore(fd, RESTORE_TIMEOUT)?;
        Ok::<_, qmp::QmpError>(q)
    })();
    match session {
        Ok(q) => Ok(BareRestore {
            took: t.elapsed(),
            vm,
            _ends: ends,
            _monitor: q,
        }),
        Err(e) => {
            vm.kill();
            Err(Error::Setup(format!("restore from template: {e}")))
        }
    }
}
