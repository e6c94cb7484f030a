//! Resource use of a running sandbox, as `airlock stats` shows it: what the VM process costs
//! the host (CPU time, memory) and what the guest NIC moved.

use serde::{Deserialize, Serialize};

/// A sample of a sandbox's resource use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// CPU time the VM process has used (user + system, every thread), nanoseconds.
    pub cpu_ns: u64,
    /// Resident memory of the VM process, bytes (guest RAM it has touched plus QEMU's own).
    pub rss_bytes: u64,
    /// Proportional share of that memory, bytes: pages shared with other sandboxes (a warm
    /// template's RAM) count once across them.
    pub pss_bytes: u64,
    /// The guest NIC's traffic; `None` without a network.
    pub net: Option<airlock_net::NetCounters>,
}

/// CPU time and memory of process `pid` from `/proc`. Fields it cannot read are 0.
pub(crate) fn of_process(pid: u32) -> Stats {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let (rss, pss) = memory_from_rollup(&rollup);
    Stats {
        cpu_ns: cpu_ticks_from_stat(&stat).saturating_mul(1_000_000_000 / hz),
        rss_bytes: rss,
        pss_bytes: pss,
        net: None,
    }
}

/// utime + stime (clock ticks) of a `/proc/PID/stat` line.
fn cpu_ticks_from_stat(stat: &str) -> u64 {
    // The command name may hold spaces and parentheses: the fields follow its last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    // After the name: state is field 3, utime 14, stime 15 (1-based, man proc).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11).saturating_add(n(12))
}

/// (Rss, Pss) in bytes from `/proc/PID/smaps_rollup`.
fn memory_from_rollup(text: &str) -> (u64, u64) {
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            .saturating_mul(1024)
    };
    (kib("Rss:"), kib("Pss:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_and_smaps_rollup() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(cpu_ticks_from_stat(stat), 300);
        assert_eq!(cpu_ticks_from_stat("garbage"), 0);
        let rollup = "00400000-7ffd [rollup]\nRss:              102400 kB\nPss:               \
                      51200 kB\nPss_Anon:  1 kB\n";
        assert_eq!(memory_from_rollup(rollup), (102400 * 1024, 51200 * 1024));
        assert_eq!(memory_from_rollup(""), (0, 0));
    }

    #[test]
    fn reads_this_process() {
        let s = of_process(std::process::id());
        assert!(
            s.rss_bytes > 0 && s.pss_bytes > 0 && s.pss_bytes <= s.rss_bytes,
            "{s:?}"
        );
    }
}
