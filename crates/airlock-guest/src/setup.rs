//! Boot-time duties of PID 1: filesystems, the root switch, the control port, power-off.

use std::fs::{self, File, OpenOptions};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use airlock_proto::Init;

/// virtio-serial port name the host gives the control channel.
pub const CONTROL_PORT: &str = "airlock.0";
/// virtio-blk serial of the read-only image disk.
pub const ROOT_SERIAL: &str = "airlock-root";
/// virtio-blk serial of an image-builder VM's target disk.
pub const TARGET_SERIAL: &str = "airlock-target";
/// virtio-blk serial of the per-sandbox writable disk.
pub const SCRATCH_SERIAL: &str = "airlock-scratch";

fn do_mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    let _ = fs::create_dir_all(target);
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|e| format!("mount {fstype} {src} on {target}: {e}"))
}

/// /dev, /proc and /sys of the initramfs, needed to find the disks.
pub fn early_mounts() -> Result<(), String> {
    do_mount("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None)?;
    do_mount(
        "proc",
        "/proc",
        "proc",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    do_mount(
        "sysfs",
        "/sys",
        "sysfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    Ok(())
}

/// Finds the block device whose virtio serial is `serial`.
fn disk_by_serial(serial: &str) -> Option<String> {
    let entries = fs::read_dir("/sys/block").ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(s) = fs::read_to_string(e.path().join("serial")) {
            if s.trim() == serial {
                return Some(format!("/dev/{name}"));
            }
        }
    }
    None
}

static BUILDER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this VM is an image builder (a target disk and no root disk).
pub fn is_builder() -> bool {
    BUILDER.load(std::sync::atomic::Ordering::Relaxed)
}

/// Image-builder VMs: mounts the empty target disk and makes it the root, so layer paths and
/// absolute symlinks resolve inside the image being built. Returns false for a normal sandbox.
pub fn enter_builder_target() -> Result<bool, String> {
    if disk_by_serial(ROOT_SERIAL).is_some() {
        return Ok(false);
    }
    let Some(target) = disk_by_serial(TARGET_SERIAL) else {
        return Ok(false);
    };
    do_mount(&target, "/mnt/target", "ext4", MsFlags::MS_NOATIME, None)?;
    nix::unistd::chroot("/mnt/target").map_err(|e| format!("chroot target: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    // mkfs made it; images do not have it (removal fails harmlessly if not empty).
    let _ = fs::remove_dir("/lost+found");
    BUILDER.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(true)
}

/// Mounts the image read-only, the writable layer over it, and makes the overlay the root.
pub fn mount_root() -> Result<(), String> {
    let base =
        disk_by_serial(ROOT_SERIAL).ok_or("no root disk (virtio-blk serial airlock-root)")?;
    do_mount(
        &base,
        "/mnt/base",
        "ext4",
        MsFlags::MS_RDONLY,
        Some("noload"),
    )
    .or_else(|_| do_mount(&base, "/mnt/base", "erofs", MsFlags::MS_RDONLY, None))?;

    match disk_by_serial(SCRATCH_SERIAL) {
        Some(dev) => do_mount(&dev, "/mnt/scratch", "ext4", MsFlags::MS_NOATIME, None)?,
        None => do_mount(
            "scratch",
            "/mnt/scratch",
            "tmpfs",
            MsFlags::empty(),
            Some("mode=0755"),
        )?,
    }
    // The host's scratch template comes with both made (a stat instead of two mkdirs); a
    // rootless host's mkfs gives them its own uid, and the upper directory's owner is the
    // owner of "/".
    for d in ["/mnt/scratch/upper", "/mnt/scratch/work"] {
        use std::os::unix::fs::MetadataExt;
        match fs::metadata(d) {
            Ok(m) if m.is_dir() => {
                if m.uid() != 0 || m.gid() != 0 {
                    std::os::unix::fs::chown(d, Some(0), Some(0))
                        .map_err(|e| format!("chown {d}: {e}"))?;
                }
            }
            _ => fs::create_dir_all(d).map_err(|e| format!("mkdir {d}: {e}"))?,
        }
    }
    // The writable disk is out of reach once the overlay is "/": keep a handle for
    // renew_scratch_uuid (close-on-exec, so no workload inherits it).
    if let Ok(f) = fs::File::open("/mnt/scratch/work") {
        let _ = SCRATCH.set(f);
    }
    do_mount(
        "overlay",
        "/mnt/root",
        "overlay",
        MsFlags::empty(),
        Some("lowerdir=/mnt/base,upperdir=/mnt/scratch/upper,workdir=/mnt/scratch/work"),
    )?;

    // switch_root: the overlay becomes "/"; the initramfs stays behind, unreachable.
    std::env::set_current_dir("/mnt/root").map_err(|e| format!("chdir new root: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move root: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// The API filesystems of the new root.
pub fn late_mounts() -> Result<(), String> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    do_mount("proc", "/proc", "proc", nosuid_nodev_noexec, None)?;
    do_mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None)?;
    do_mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    do_mount(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    let _ = fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    do_mount(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    do_mount(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    let _ = do_mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid_nodev_noexec,
        None,
    );
    for (target, link) in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    loopback_up();
    Ok(())
}

fn loopback_up() {
    // SAFETY: plain ioctls on a socket we own, with a zeroed ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        libc::close(fd);
    }
}

/// Opens the control port, waiting briefly for its device to appear.
pub fn open_control_port() -> Result<File, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(entries) = fs::read_dir("/sys/class/virtio-ports") {
            for e in entries.flatten() {
                let name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == CONTROL_PORT {
                    let dev = Path::new("/dev").join(e.file_name());
                    return OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&dev)
                        .map_err(|err| format!("open {}: {err}", dev.display()));
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no virtio-serial port named {CONTROL_PORT}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Mixes the host's seed into the kernel RNG, credits it and forces a reseed, so a VM restored
/// from a snapshot stops sharing its RNG state with its siblings at once.
fn reseed_rng(seed: &[u8]) {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203; // _IOW('R', 3, int[2])
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207; // _IO('R', 7)
    let seed = &seed[..seed.len().min(512)];
    let Ok(f) = OpenOptions::new().write(true).open("/dev/urandom") else {
        return;
    };
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    info.resize(8 + seed.len().div_ceil(4) * 4, 0);
    use std::os::fd::AsRawFd;
    // SAFETY: ioctls on an open /dev/urandom with a buffer laid out as rand_pool_info.
    unsafe {
        libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr());
        libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _);
    }
}

/// A directory on the writable layer's filesystem, opened before the switch to the overlay.
static SCRATCH: std::sync::OnceLock<fs::File> = std::sync::OnceLock::new();

/// Gives the writable layer's ext4 a fresh UUID (`EXT4_IOC_SETFSUUID`, Linux 6.0+), so
/// sandboxes made from one scratch template or restored from one warm template do not share
/// it. Needs `metadata_csum_seed` on the filesystem (the host's scratch template has it); on
/// an older one the kernel refuses and the UUID stays as it was.
fn renew_scratch_uuid() -> Result<(), String> {
    // _IOW('f', 44, struct fsuuid { __u32 fsu_len; __u32 fsu_flags; __u8 fsu_uuid[]; })
    const EXT4_IOC_SETFSUUID: libc::c_ulong = 0x4008_662c;
    let mut uuid = [0u8; 16];
    // SAFETY: getrandom into a local buffer of the given length.
    if unsafe { libc::getrandom(uuid.as_mut_ptr().cast(), 16, 0) } != 16 {
        return Err("getrandom failed".into());
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4
    uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
    let mut arg = Vec::with_capacity(24);
    arg.extend_from_slice(&16u32.to_ne_bytes());
    arg.extend_from_slice(&0u32.to_ne_bytes());
    arg.extend_from_slice(&uuid);
    let d = SCRATCH.get().ok_or("no writable disk")?;
    use std::os::fd::AsRawFd;
    // SAFETY: the ioctl reads a struct fsuuid with 16 bytes of UUID from `arg`.
    if unsafe { libc::ioctl(d.as_raw_fd(), EXT4_IOC_SETFSUUID as _, arg.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// Applies the host's per-sandbox settings.
pub fn apply_init(init: &Init) {
    if !init.rng_seed.is_empty() {
        reseed_rng(&init.rng_seed);
    }
    if let Some(id) = &init.machine_id {
        if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            let _ = crate::net::write_in_place("/etc/machine-id", 0, format!("{id}\n").as_bytes());
        }
    }
    // After the reseed, so the UUID comes from this sandbox's randomness.
    if !init.disk_uuid_own {
        if let Err(e) = renew_scratch_uuid() {
            eprintln!("airlock-guest: scratch UUID unchanged: {e}");
        }
    }
    if !init.hostname.is_empty() {
        // Kernel hostname only: writing /etc/hostname would copy /etc up into the writable
        // layer on every boot (measurable under TCG) for a file few programs read.
        let _ = nix::unistd::sethostname(&init.hostname);
    }
    if init.time_unix_ns > 0 {
        let ts = libc::timespec {
            tv_sec: (init.time_unix_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (init.time_unix_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: valid timespec pointer.
        unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    }
    if let Some(net) = &init.net {
        if let Err(e) = crate::net::configure(net) {
            eprintln!("airlock-guest: network: {e}");
        }
    }
    if let Some(pem) = &init.ca_pem {
        if let Err(e) = crate::net::trust_ca(pem) {
            eprintln!("airlock-guest: CA: {e}");
        }
    }
    crate::net::extend_env(init.env.iter().cloned());
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Flushes disks and ends the VM. QEMU runs with `-no-reboot` and the kernel with `reboot=t`,
/// so a reboot request is how a microvm without ACPI powers off.
pub fn power_off() -> ! {
    // SAFETY: plain syscalls; PID 1 is the only caller and never returns from here.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A machine's shutdown: SIGTERM to every process but PID 1, up to `grace` for them to exit,
/// SIGKILL to the rest, then [`power_off`]. Gives exit statuses a moment to reach the host.
pub fn terminate_all_then_power_off(grace: Duration) -> ! {
    // SAFETY: kill(-1) from PID 1 signals every process but itself; no memory is involved.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline && user_processes_left() {
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // The reaper reports each exit to the host; let those frames go out.
    std::thread::sleep(Duration::from_millis(200));
    power_off()
}

/// The `reap` builtin: SIGKILL to every process but the agent, then waits (at most 5 s) until
/// none is left alive. A pooled VM ends its warm-up with it, so nothing the warm-up started
/// from the image is still running when someone claims the VM.
pub fn kill_all_processes() -> Result<(), String> {
    // SAFETY: kill(-1) from PID 1's process signals every process but PID 1; no memory.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while user_processes_left() {
        if Instant::now() > deadline {
            return Err("processes are still alive 5 s after SIGKILL".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Whether any process other than PID 1 and kernel threads (children of kthreadd, PID 2) is
/// alive; zombies do not count (the reaper collects them).
fn user_processes_left() -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    rd.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        if pid <= 2 {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        stat_is_live_user_process(&stat)
    })
}

/// From a `/proc/PID/stat` line: not a zombie and not a kernel thread (parent 2).
fn stat_is_live_user_process(stat: &str) -> bool {
    // The command name may hold spaces and parentheses: the fields follow its last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut f = rest.split_whitespace();
    let state = f.next().unwrap_or("Z");
    let ppid = f.next().and_then(|p| p.parse::<u32>().ok()).unwrap_or(2);
    state != "Z" && state != "X" && ppid != 2
}

/// Where the guest keeps share plumbing (lower mounts, the second view of the writable disk).
const SHARE_RUN: &str = "/run/airlock";

fn valid_target(t: &str) -> Result<(), String> {
    let ok = t.starts_with('/')
        && t.len() < 4096
        && t != "/"
        && !t.split('/').any(|c| c == ".." || c == ".");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "share target {t:?} must be an absolute path other than /"
        ))
    }
}

/// Mounts the writable disk a second time (same superblock) where overlay shares keep their
/// upper layers, so share changes are on the sandbox's writable layer and leave with it.
fn share_scratch() -> Result<String, String> {
    let dir = format!("{SHARE_RUN}/scratch");
    if Path::new(&dir).join("shares").is_dir() {
        return Ok(dir);
    }
    match disk_by_serial(SCRATCH_SERIAL) {
        Some(dev) => do_mount(&dev, &dir, "ext4", MsFlags::MS_NOATIME, None)?,
        None => do_mount(
            "scratch",
            &dir,
            "tmpfs",
            MsFlags::empty(),
            Some("mode=0755"),
        )?,
    }
    fs::create_dir_all(format!("{dir}/shares")).map_err(|e| format!("mkdir shares: {e}"))?;
    Ok(dir)
}

/// The `root-diff` builtin: what commands changed in the root (the overlay's upper
/// directory, reached through a second mount of the writable disk) as a layer tar on `out`.
pub fn root_diff(out: &mut fs::File) -> Result<(), String> {
    if disk_by_serial(SCRATCH_SERIAL).is_none() {
        return Err("this sandbox has no writable disk to diff".into());
    }
    let upper = format!("{}/upper", share_scratch()?);
    let ours = crate::net::agent_written();
    let mut exclude: Vec<&str> = vec!["proc", "sys", "dev", "run", "etc/machine-id"];
    exclude.extend(ours.iter().map(String::as_str));
    airlock_guest::rootdiff::write_diff(Path::new(&upper), &exclude, out).map(drop)
}

/// Upper directory of overlay share `i` (for diffs).
pub fn share_upper(i: usize) -> String {
    format!("{SHARE_RUN}/scratch/shares/{i}/upper")
}

/// Lower (read-only host view) of overlay share `i`.
pub fn share_lower(i: usize) -> String {
    format!("{SHARE_RUN}/fs/{i}")
}

/// Mounts the virtio-fs shares and volumes the host announced.
pub fn mount_shares(init: &Init) -> Result<(), String> {
    use airlock_proto::ShareMode;
    for (i, s) in init.shares.iter().enumerate() {
        valid_target(&s.target)?;
        match s.mode {
            ShareMode::Rw => do_mount(&s.tag, &s.target, "virtiofs", MsFlags::empty(), None)?,
            ShareMode::Ro => do_mount(&s.tag, &s.target, "virtiofs", MsFlags::MS_RDONLY, None)?,
            ShareMode::Overlay => {
                let lower = share_lower(i);
                do_mount(&s.tag, &lower, "virtiofs", MsFlags::MS_RDONLY, None)?;
                let scratch = share_scratch()?;
                let upper = format!("{scratch}/shares/{i}/upper");
                let work = format!("{scratch}/shares/{i}/work");
                for d in [&upper, &work] {
                    fs::create_dir_all(d).map_err(|e| format!("mkdir {d}: {e}"))?;
                }
                let opts = format!("lowerdir={lower},upperdir={upper},workdir={work}");
                do_mount(
                    "overlay",
                    &s.target,
                    "overlay",
                    MsFlags::empty(),
                    Some(&opts),
                )?;
            }
        }
    }
    *SHARES.lock().unwrap() = init.shares.clone();
    for v in &init.volumes {
        valid_target(&v.target)?;
        let dev = disk_by_serial(&v.serial)
            .ok_or_else(|| format!("volume disk {} not found", v.serial))?;
        do_mount(&dev, &v.target, "ext4", MsFlags::MS_NOATIME, None)?;
    }
    Ok(())
}

/// The shares this sandbox mounted (for diffs).
pub static SHARES: std::sync::Mutex<Vec<airlock_proto::ShareMount>> =
    std::sync::Mutex::new(Vec::new());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_tell_user_processes_from_kernel_threads_and_zombies() {
        assert!(stat_is_live_user_process("42 (sh) S 1 42 42 0 -1"));
        assert!(stat_is_live_user_process("43 (a) b) (c) R 42 43 1 0"));
        assert!(!stat_is_live_user_process("7 (kworker/0:1) I 2 0 0 0"));
        assert!(!stat_is_live_user_process("44 (sh) Z 1 44 44 0"));
        assert!(!stat_is_live_user_process("garbage"));
    }

    #[test]
    fn share_targets_must_be_plain_absolute_paths() {
        for ok in ["/workspace", "/a/b/c", "/with space/x"] {
            assert!(valid_target(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/",
            "relative",
            "/a/../etc",
            "/./x",
            "/a/.",
            &format!("/{}", "x".repeat(4096)),
        ] {
            assert!(valid_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn share_paths_are_under_the_agents_run_dir() {
        assert_eq!(share_upper(3), "/run/airlock/scratch/shares/3/upper");
        assert_eq!(share_lower(0), "/run/airlock/fs/0");
    }
}
