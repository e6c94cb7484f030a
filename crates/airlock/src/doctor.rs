//! `airlock doctor`: what would run, and what is missing with the command that fixes it.

use airlock_backend::qemu::Qemu;
use airlock_sandbox::{accel_from_env, assets};

/// Prints the report; returns 0 when a sandbox can start, 1 otherwise.
pub fn run() -> i32 {
    let mut missing = 0;
    let mut line = |name: &str, ok: bool, what: String, fix: Option<&str>| {
        let mark = if ok { "ok     " } else { "MISSING" };
        println!("{mark} {name:<12} {what}");
        if !ok {
            missing += 1;
            if let Some(f) = fix {
                println!("        {:<12} fix: {f}", "");
            }
        }
    };

    let forced = match accel_from_env() {
        Ok(f) => f,
        Err(e) => {
            println!("MISSING accelerator  {e}");
            return 1;
        }
    };
    let accel = airlock_backend::detect_accel(forced);
    line(
        "accelerator",
        true,
        format!("{} — {}", accel.accel, accel.reason),
        None,
    );

    let qemu = Qemu::default();
    match qemu.version() {
        Ok(v) => line(
            "qemu",
            true,
            format!("{v} ({})", qemu.binary.display()),
            None,
        ),
        Err(e) => line("qemu", false, e, Some("apt-get install qemu-system-x86")),
    }
    match assets::kernel() {
        Ok(k) => line("kernel", true, k.display().to_string(), None),
        Err(e) => line("kernel", false, e.to_string(), Some("kernel/build.sh")),
    }
    match assets::agent() {
        Ok(a) => line("agent", true, a.display().to_string(), None),
        Err(e) => line("agent", false, e.to_string(), Some("scripts/build-agent")),
    }
    let mkfs = std::process::Command::new("mkfs.ext4").arg("-V").output();
    match mkfs {
        Ok(_) => line(
            "mkfs.ext4",
            true,
            "found (packs --rootfs directories)".into(),
            None,
        ),
        Err(e) => line(
            "mkfs.ext4",
            false,
            e.to_string(),
            Some("apt-get install e2fsprogs"),
        ),
    }
    match airlock_confine::probe() {
        Ok(ll) => line(
            "confinement",
            true,
            format!(
                "seccomp on device threads; landlock {}",
                match ll {
                    airlock_confine::Landlock::Full => "enforced",
                    airlock_confine::Landlock::Partial => "partly enforced (older kernel ABI)",
                    airlock_confine::Landlock::Unavailable => "not available on this kernel",
                }
            ),
            None,
        ),
        Err(e) => line("confinement", false, e.to_string(), None),
    }
    for (name, path) in airlock_sandbox::paths() {
        if name != "kernel" {
            line(name, true, path.display().to_string(), None);
        }
    }
    if missing == 0 {
        println!("\nready: sandboxes will run under {}", accel.accel);
        0
    } else {
        println!("\n{missing} thing(s) missing; scripts/setup installs everything");
        1
    }
}
