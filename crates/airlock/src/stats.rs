//! `airlock stats`: CPU, memory and network use of running sandboxes, like `docker stats`.
//! Each figure comes from the sandbox's supervisor (RPC `stats`); CPU % is the VM process's
//! CPU time over wall time between two samples (100 % = one host core).

use std::io::Write;
use std::time::{Duration, Instant};

use airlock_sandbox::Stats;
use serde::Serialize;

use crate::detach::{self, Meta};

/// One sandbox's sample.
struct Sample {
    meta: Meta,
    at: Instant,
    v: Stats,
}

async fn sample(meta: &Meta) -> Option<Sample> {
    let (mut c, _) = detach::connect(&meta.id).await.ok()?;
    let v = c.stats().await.ok()?;
    Some(Sample {
        meta: meta.clone(),
        at: Instant::now(),
        v,
    })
}

/// A row of the table, and one object of `--json`.
#[derive(Debug, Serialize)]
struct Row {
    id: String,
    name: Option<String>,
    cpu_percent: f64,
    memory_bytes: u64,
    rss_bytes: u64,
    memory_limit_bytes: u64,
    memory_percent: f64,
    net_rx_bytes: u64,
    net_tx_bytes: u64,
}

/// A row: the later sample, with the CPU rate since the earlier one.
fn row(before: &Sample, now: &Sample) -> Row {
    let wall = now.at.duration_since(before.at).as_nanos().max(1) as f64;
    let cpu = now.v.cpu_ns.saturating_sub(before.v.cpu_ns) as f64;
    let limit = u64::from(now.meta.memory_mib) << 20;
    let pss = now.v.pss_bytes;
    let net = now.v.net.unwrap_or_default();
    Row {
        id: now.meta.id.clone(),
        name: now.meta.name.clone(),
        cpu_percent: (cpu / wall * 1000.0).round() / 10.0,
        memory_bytes: pss,
        rss_bytes: now.v.rss_bytes,
        memory_limit_bytes: limit,
        memory_percent: if limit == 0 {
            0.0
        } else {
            (pss as f64 / limit as f64 * 1000.0).round() / 10.0
        },
        net_rx_bytes: net.rx_bytes,
        net_tx_bytes: net.tx_bytes,
    }
}

/// Binary units for memory, as docker prints them.
fn mem(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2}GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1}MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0}KiB", b / 1024.0)
    }
}

/// Decimal units for traffic, as docker prints them.
fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2}GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1}MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1}kB", b / 1e3)
    } else {
        format!("{b:.0}B")
    }
}

fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<12}  {:<16}  {:>7}  {:>22}  {:>6}  {:>19}\n",
        "ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<12}  {:<16}  {:>6.1}%  {:>22}  {:>5.1}%  {:>19}\n",
            r.id,
            r.name.as_deref().unwrap_or("-"),
            r.cpu_percent,
            format!("{} / {}", mem(r.memory_bytes), mem(r.memory_limit_bytes)),
            r.memory_percent,
            format!("{} / {}", bytes(r.net_rx_bytes), bytes(r.net_tx_bytes)),
        ));
    }
    out
}

/// `airlock stats [--no-stream] [--json] [ID...]`: without ids, every running sandbox (and,
/// when streaming, those started later). Named sandboxes must be running.
pub async fn stats(ids: &[String], no_stream: bool, json_out: bool) -> Result<(), String> {
    let pick = || -> Result<Vec<Meta>, String> {
        if ids.is_empty() {
            Ok(detach::running())
        } else {
            ids.iter().map(|i| detach::running_one(i)).collect()
        }
    };
    let mut metas = pick()?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut before = Vec::new();
    for m in &metas {
        before.extend(sample(m).await);
    }
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut now = Vec::new();
        for m in &metas {
            now.extend(sample(m).await);
        }
        let rows: Vec<Row> = now
            .iter()
            .filter_map(|n| {
                let b = before.iter().find(|b| b.meta.id == n.meta.id)?;
                Some(row(b, n))
            })
            .collect();
        let text = if json_out {
            format!("{}\n", serde_json::to_string(&rows).unwrap_or_default())
        } else if tty && !no_stream {
            // Redrawn in place, as docker does.
            format!("\x1b[2J\x1b[H{}", table(&rows))
        } else {
            table(&rows)
        };
        let mut out = std::io::stdout();
        if out
            .write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            // The reader went away (`| head`): not an error.
            return Ok(());
        }
        if no_stream {
            return Ok(());
        }
        if !ids.is_empty() && now.is_empty() {
            return Err("the sandboxes have stopped".into());
        }
        before = now;
        if ids.is_empty() {
            // Newly started sandboxes join; stopped ones leave.
            metas = pick()?;
            for m in &metas {
                if !before.iter().any(|b| b.meta.id == m.id) {
                    before.extend(sample(m).await);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_as_docker_prints_them() {
        assert_eq!(mem(34 << 20), "34.0MiB");
        assert_eq!(mem(3 << 30), "3.00GiB");
        assert_eq!(bytes(1_500), "1.5kB");
        assert_eq!(bytes(12), "12B");
    }
}
