//! A usable clock for TCG guests.
//!
//! Under TCG the guest's TSC ticks at the host's TSC rate, but the guest kernel cannot
//! calibrate it (microvm has no HPET or ACPI PM timer, and PIT calibration fails under
//! emulation), so it falls back to the 4 ms `jiffies` clocksource: coarse time for every
//! program and coarse timers. Telling it the frequency (`tsc_early_khz=`) gives it the TSC.
//! The host's TSC rate is measured once per host boot (20 ms) and cached.

use std::path::Path;

/// Kernel argument with the host TSC frequency, if it can be measured on this host.
pub fn tsc_kernel_arg(runtime_dir: &Path) -> Option<String> {
    tsc_khz(runtime_dir).map(|k| format!("tsc_early_khz={k}"))
}

fn tsc_khz(runtime_dir: &Path) -> Option<u64> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let cache = runtime_dir.join("tsc_khz");
    if let Ok(s) = std::fs::read_to_string(&cache) {
        if let Some((id, khz)) = s.split_once(' ') {
            if id == boot_id.trim() {
                if let Ok(k) = khz.trim().parse() {
                    return Some(k);
                }
            }
        }
    }
    let khz = measure()?;
    // Cached only in a directory that is ours alone; the measurement stands either way.
    if crate::state::private_dir(runtime_dir).is_ok() {
        if let Ok(mut f) = crate::state::private_file(&cache) {
            use std::io::Write;
            let _ = writeln!(f, "{} {khz}", boot_id.trim());
        }
    }
    Some(khz)
}

#[cfg(target_arch = "x86_64")]
fn measure() -> Option<u64> {
    use std::time::{Duration, Instant};
    let t0 = Instant::now();
    // SAFETY: rdtsc has no preconditions on x86_64.
    let c0 = unsafe { core::arch::x86_64::_rdtsc() };
    std::thread::sleep(Duration::from_millis(20));
    let c1 = unsafe { core::arch::x86_64::_rdtsc() };
    let dt = t0.elapsed().as_secs_f64();
    let khz = (c1.wrapping_sub(c0) as f64 / dt / 1000.0) as u64;
    // Anything outside 100 MHz - 10 GHz is not a TSC we want to trust.
    (100_000..10_000_000).contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_and_caches() {
        let d = tempfile::tempdir().unwrap();
        let a = super::tsc_kernel_arg(d.path()).expect("x86_64 host has a TSC");
        assert!(a.starts_with("tsc_early_khz="));
        assert!(d.path().join("tsc_khz").exists());
        assert_eq!(
            super::tsc_kernel_arg(d.path()).unwrap(),
            a,
            "second call reads the cache"
        );
    }
}
