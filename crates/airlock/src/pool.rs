//! Warm pools as the user sees them: a process holding pools (`airlock mcp --pool N`)
//! publishes their status every two seconds to a private file in the runtime dir, named for
//! its pid; `airlock pool ls` reads those of live processes (and removes those of dead ones).

use std::path::PathBuf;
use std::time::Duration;

use airlock_sandbox::PoolStatus;
use serde::{Deserialize, Serialize};

/// One holder's published status.
#[derive(Serialize, Deserialize)]
struct Published {
    pid: u32,
    /// What holds the pools (`mcp`).
    holder: String,
    pools: Vec<PoolStatus>,
}

fn dir() -> PathBuf {
    crate::detach::runtime_dir().join("pools")
}

/// Writes `status()` every two seconds until the process ends; the file is removed on a
/// clean exit by the next `pool ls` otherwise (its pid is gone).
pub async fn publish<F>(holder: &'static str, status: F)
where
    F: Fn() -> Vec<PoolStatus> + Send + 'static,
{
    let dir = dir();
    if let Err(e) = airlock_sandbox::private_dir(&dir) {
        tracing::warn!("pool status is not published: {e}");
        return;
    }
    let path = dir.join(format!("{}.json", std::process::id()));
    let tmp = path.with_extension("tmp");
    loop {
        let p = Published {
            pid: std::process::id(),
            holder: holder.into(),
            pools: status(),
        };
        let wrote = serde_json::to_vec(&p)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                use std::io::Write;
                airlock_sandbox::private_file(&tmp)?.write_all(&b)?;
                std::fs::rename(&tmp, &path)
            });
        if let Err(e) = wrote {
            tracing::debug!("cannot publish the pool status: {e}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// `airlock pool ls [--json]`.
pub fn ls(json: bool) -> Result<(), String> {
    let mut all = Vec::new();
    let entries = match std::fs::read_dir(dir()) {
        Ok(e) => e.flatten().collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("{}: {e}", dir().display())),
    };
    for e in entries {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Some(p) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Published>(&b).ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{}", p.pid)).exists() {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        all.push(p);
    }
    all.sort_by_key(|p| p.pid);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "{:<8} {:<6} {:<18} {:>4} {:>5} {:>7} {:>7} {:>6} {:>9}",
        "HOLDER", "PID", "TEMPLATE", "SIZE", "READY", "FILLING", "CLAIMED", "MISSED", "IDLE PSS"
    );
    for p in &all {
        for s in &p.pools {
            let key = s.template.as_deref().unwrap_or("-");
            println!(
                "{:<8} {:<6} {:<18} {:>4} {:>5} {:>7} {:>7} {:>6} {:>6} MiB{}",
                p.holder,
                p.pid,
                &key[..key.len().min(16)],
                s.size,
                s.ready,
                s.filling,
                s.claimed,
                s.missed,
                s.idle_pss_bytes >> 20,
                s.last_error
                    .as_deref()
                    .map(|e| format!("  (cannot fill: {e})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
