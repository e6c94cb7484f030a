//! The agent's `ps` builtin: the guest's processes, read from `/proc`, one JSON
//! [`GuestProcess`] a line (`airlock top`). The agent itself (pid 1) and kernel threads are
//! left out, as `docker top` shows only the container's processes.

use std::io::Write;
use std::path::Path;

use airlock_proto::GuestProcess;

/// Longest command line reported; a longer one is cut (at a character boundary).
const MAX_COMMAND: usize = 4096;

/// The fields of `/proc/PID/stat` this needs, parsed: `(state, ppid, cpu ticks, start ticks,
/// rss pages)`. `comm` (field 2) may hold spaces and parentheses, so the fields are counted
/// from its last `)`.
pub fn parse_stat(stat: &str) -> Option<(String, i32, u64, u64, u64)> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After comm: state is field 3, so f[i] is field i + 3.
    let field = |n: usize| f.get(n - 3).copied();
    let num = |n: usize| field(n)?.parse::<u64>().ok();
    Some((
        field(3)?.to_string(),
        field(4)?.parse().ok()?,
        num(14)?.checked_add(num(15)?)?,
        num(22)?,
        num(24)?,
    ))
}

/// `cmdline` (NUL-separated arguments) as one line; `None` when empty (a kernel thread, or
/// a zombie).
pub fn command_line(cmdline: &[u8]) -> Option<String> {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.is_empty() {
        return None;
    }
    let mut s = args.join(" ");
    if s.len() > MAX_COMMAND {
        let mut cut = MAX_COMMAND;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    Some(s)
}

/// One process under `proc` (`/proc` in the guest), `None` if it is gone, is the agent, or
/// is a kernel thread.
fn read_one(proc: &Path, pid: i32, ticks_per_s: u64, page_kib: u64) -> Option<GuestProcess> {
    use std::os::unix::fs::MetadataExt;
    if pid <= 1 {
        return None;
    }
    let dir = proc.join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let (state, ppid, cpu, start, rss) = parse_stat(&stat)?;
    // Kernel threads are kthreadd (pid 2) and its children.
    if pid == 2 || ppid == 2 {
        return None;
    }
    let command = match command_line(&std::fs::read(dir.join("cmdline")).ok()?) {
        Some(c) => c,
        // A zombie has no command line left: show its name, as ps does.
        None => {
            let comm = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?;
            format!("[{comm}]")
        }
    };
    let ms = |ticks: u64| ticks.saturating_mul(1000) / ticks_per_s.max(1);
    Some(GuestProcess {
        pid,
        ppid,
        uid: std::fs::metadata(&dir).ok()?.uid(),
        state,
        rss_kib: rss.saturating_mul(page_kib),
        cpu_ms: ms(cpu),
        started_ms: ms(start),
        command,
    })
}

/// Writes every process under `proc` but the agent and kernel threads to `out`, ordered by
/// pid.
pub fn write_processes(proc: &Path, out: &mut dyn Write) -> Result<(), String> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    // SAFETY: as above.
    let page_kib = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64) / 1024;
    let mut pids: Vec<i32> = std::fs::read_dir(proc)
        .map_err(|e| format!("{}: {e}", proc.display()))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        if let Some(p) = read_one(proc, pid, ticks, page_kib) {
            let line = serde_json::to_string(&p).map_err(|e| e.to_string())?;
            writeln!(out, "{line}").map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = "42 (we (ird) name) S 7 42 42 0 -1 4194560 100 0 0 0 25 5 0 0 20 0 1 0 \
                    1234 1000000 300 18446744073709551615";
        assert_eq!(parse_stat(stat), Some(("S".to_string(), 7, 30, 1234, 300)));
        assert_eq!(parse_stat("42 (x) S 7"), None, "too few fields");
        assert_eq!(parse_stat("no parenthesis"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn command_lines_join_arguments_and_stay_bounded() {
        assert_eq!(
            command_line(b"sleep\x001000\x00").as_deref(),
            Some("sleep 1000")
        );
        assert_eq!(command_line(b""), None);
        assert_eq!(command_line(b"\x00\x00"), None);
        let long = "é".repeat(MAX_COMMAND);
        let c = command_line(long.as_bytes()).unwrap();
        assert!(c.len() <= MAX_COMMAND && c.chars().all(|ch| ch == 'é'));
    }

    #[test]
    fn this_hosts_processes_are_listed() {
        let mut out = Vec::new();
        write_processes(Path::new("/proc"), &mut out).unwrap();
        let me = std::process::id() as i32;
        let found = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice::<GuestProcess>(l).unwrap())
            .find(|p| p.pid == me)
            .expect("this test's own process is listed");
        assert!(found.rss_kib > 0 && !found.command.is_empty(), "{found:?}");
    }
}
