//! The warm-up a VM gets before it is saved as a template or paused in a pool: a throw-away
//! `Init`, then a few spawns of the agent's and the image's programs, then `reap`.
//!
//! What it buys is guest state, not TCG's translations (those live in the QEMU process and
//! are lost at a restore): the files the next `Init` writes are already in the writable layer
//! (written in place, not copied up), the NIC is configured as every sandbox's is (so an
//! identical config is left alone), and the image's shell and `true` are in the guest's page
//! cache. Nothing of any sandbox is in the VM then: the `Init` carries a random hostname
//! seed, machine-id and RNG seed, no network policy, secret or share, and a CA whose key is
//! dropped here; the next `Init` replaces every one of them.

use airlock_proto::{ExecRequest, Frame, Init, Kind};

use crate::conn::Conn;
use crate::{network, Error};

/// The throw-away `Init` of a warm-up. `privileged` must be the one the VM will serve: an
/// agent that restricted itself stays restricted.
pub(crate) fn throwaway_init(nic: bool, privileged: bool) -> Result<Init, Error> {
    let ca = match nic {
        true => Some(
            airlock_net::ca::Ca::generate()
                .map_err(|e| Error::Setup(e.to_string()))?
                .pem()
                .to_string(),
        ),
        false => None,
    };
    Ok(Init {
        hostname: "airlock-warmup".into(),
        rng_seed: crate::random_bytes::<32>().to_vec(),
        machine_id: Some(hex::encode(crate::random_bytes::<16>())),
        net: nic.then(network::guest_config),
        ca_pem: ca,
        privileged,
        ..Default::default()
    })
}

/// What a warm-up runs, in this order: the agent's own binary twice (it exits at once when it
/// is not PID 1: the guest's spawn path), then the image's `true` twice and its shell (the
/// dynamic loader, libc and the shell's start-up, which most commands go through), then
/// `reap`. An image without one of those programs only warms up less.
fn execs() -> Vec<ExecRequest> {
    let run = |argv: &[&str]| ExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    vec![
        run(&["/proc/self/exe"]),
        run(&["/proc/self/exe"]),
        run(&["true"]),
        run(&["true"]),
        run(&["sh", "-c", ":"]),
        ExecRequest {
            builtin: Some("reap".into()),
            ..Default::default()
        },
    ]
}

/// Runs [`execs`] on streams `first..`, one after the other; returns the next free stream.
/// `reap` must succeed: it is what guarantees no image process outlives the warm-up.
pub(crate) async fn run_execs(conn: &Conn, first: u32) -> Result<u32, Error> {
    let mut id = first;
    for req in execs() {
        let reap = req.builtin.is_some();
        let (mut events, _window) = conn.open_stream(id);
        conn.send(Frame::json(Kind::Exec, id, &req))
            .await
            .map_err(|e| Error::Setup(format!("warm-up exec: {e}")))?;
        let ended = tokio::time::timeout(crate::RESTORE_TIMEOUT, async {
            while let Some(ev) = events.recv().await {
                match ev {
                    crate::ExecEvent::Exit(s) => return Some(s.code == Some(0)),
                    crate::ExecEvent::Failed(_) => return Some(false),
                    _ => {}
                }
            }
            None
        })
        .await;
        conn.close_stream(id);
        match ended {
            // The image may lack `true` or `sh`: that only warms up less. `reap` must work.
            Ok(Some(ok)) if ok || !reap => {}
            _ => {
                return Err(Error::Setup(format!(
                    "the warm-up ({:?}) did not end well",
                    req.builtin.as_deref().unwrap_or(&req.argv.join(" "))
                )))
            }
        }
        id += 1;
    }
    Ok(id)
}
