//! Airlock's guest agent: PID 1 of every sandbox VM.
//!
//! It mounts the sandbox root (read-only image + per-sandbox writable layer), switches into
//! it, then serves the host over one virtio-serial port: exec with streamed stdio, signals,
//! terminals, forwarded TCP connections to guest-local ports, and power-off. It is a static binary with no dependency on the image's userland.
//!
//! Threads, not async: one reader of the port, one writer, a reaper, and a few threads per
//! exec. That keeps PID 1's duties (reaping every orphan) simple and explicit.

mod exec;
mod files;
mod net;
mod ports;
mod roots;
mod setup;
mod shares;
mod spawn;
mod user;
mod workers;

use std::fs::File;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use airlock_proto::{
    Decoder, Frame, Hello, Init, Kind, Ready, Resume, Resumed, CONTROL_STREAM, VERSION,
};

/// Sends frames to the host. Cloneable; frames go out in the order they were sent.
#[derive(Clone)]
pub struct Tx(SyncSender<Frame>, Arc<AtomicU32>);

impl Tx {
    /// Queues a frame; returns false once the host connection is gone. Frames of streams that
    /// belonged to a host before a snapshot restore are dropped (reported as sent).
    pub fn send(&self, f: Frame) -> bool {
        if f.stream != CONTROL_STREAM && f.stream < self.1.load(Ordering::Relaxed) {
            return true;
        }
        self.0.send(f).is_ok()
    }
}

fn log(msg: &str) {
    eprintln!("airlock-guest: {msg}");
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("airlock-guest is the init of an Airlock VM and must run as PID 1");
        std::process::exit(2);
    }
    if let Err(e) = run() {
        log(&format!("fatal: {e}"));
    }
    setup::power_off();
}

fn run() -> Result<(), String> {
    setup::early_mounts()?;
    // The port lives in the initramfs' /dev: open it before any root switch.
    let port = setup::open_control_port()?;
    if !setup::enter_builder_target()? {
        setup::mount_root()?;
        setup::late_mounts()?;
    }
    let writer = port
        .try_clone()
        .map_err(|e| format!("dup control port: {e}"))?;

    // Bounded: a host that stops reading stalls the senders rather than growing guest memory.
    let (tx, rx) = sync_channel::<Frame>(256);
    std::thread::spawn(move || write_loop(writer, rx));
    let tx = Tx(tx, Arc::new(AtomicU32::new(0)));

    let execs = Arc::new(exec::Registry::new(tx.clone()));
    {
        let execs = execs.clone();
        std::thread::spawn(move || execs.reap_loop());
    }

    let ports = Arc::new(ports::Ports::new(tx.clone()));

    tx.send(Frame::json(
        Kind::Hello,
        CONTROL_STREAM,
        &Hello {
            version: VERSION,
            agent: env!("CARGO_PKG_VERSION").to_string(),
        },
    ));
    read_loop(port, &tx, &execs, &ports)
}

fn write_loop(mut port: File, rx: Receiver<Frame>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Ok(f) = rx.recv() {
        buf.clear();
        f.encode_into(&mut buf);
        // Coalesce whatever else is queued into one write.
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(f) => f.encode_into(&mut buf),
                Err(_) => break,
            }
        }
        if let Err(e) = port.write_all(&buf) {
            log(&format!("control port write failed: {e}"));
            setup::power_off();
        }
    }
}

fn read_loop(
    mut port: File,
    tx: &Tx,
    execs: &Arc<exec::Registry>,
    ports: &Arc<ports::Ports>,
) -> Result<(), String> {
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut hostname = String::new();
    loop {
        let n = match port.read(&mut buf) {
            // No host end connected (yet, or for a moment): virtio-serial reads EOF then.
            Ok(0) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("control port read failed: {e}")),
        };
        dec.push(&buf[..n]);
        loop {
            let frame = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                // The host is trusted, but a desynchronised stream cannot recover.
                Err(e) => return Err(format!("bad frame from host: {e}")),
            };
            match (frame.kind, frame.stream) {
                (Kind::Init, CONTROL_STREAM) => {
                    let init: Init = frame.parse().map_err(|e| e.to_string())?;
                    exec::set_privileged(init.privileged);
                    setup::apply_init(&init);
                    setup::mount_shares(&init)?;
                    hostname = init.hostname.clone();
                    tx.send(Frame::json(
                        Kind::Ready,
                        CONTROL_STREAM,
                        &Ready {
                            kernel: setup::kernel_release(),
                        },
                    ));
                }
                (Kind::Resume, CONTROL_STREAM) => {
                    let r: Resume = frame.parse().map_err(|e| e.to_string())?;
                    // Old streams' processes keep running; their output has no reader now.
                    tx.1.fetch_max(r.first_stream, Ordering::Relaxed);
                    exec::set_privileged(r.init.privileged);
                    setup::apply_init(&r.init);
                    hostname = r.init.hostname.clone();
                    tx.send(Frame::json(
                        Kind::Resumed,
                        CONTROL_STREAM,
                        &Resumed { nonce: r.nonce },
                    ));
                }
                (Kind::Shutdown, CONTROL_STREAM) => {
                    // An empty payload (an older host) or a bad one: no grace.
                    let req: airlock_proto::ShutdownRequest = frame.parse().unwrap_or_default();
                    if req.grace_ms == 0 {
                        setup::power_off();
                    }
                    // On its own thread, so this loop keeps serving the credit and output
                    // frames the exiting processes need.
                    let grace = std::time::Duration::from_millis(req.grace_ms.min(600_000));
                    std::thread::spawn(move || setup::terminate_all_then_power_off(grace));
                }
                (_, CONTROL_STREAM) => {
                    log(&format!("ignoring {:?} on the control stream", frame.kind));
                }
                (Kind::Exec, s) => execs.start(s, &frame, &hostname),
                (Kind::FileOp, s) => files::start(execs, s, &frame),
                (Kind::Connect, s) => ports.start(s, &frame, execs.owns(s)),
                (_, s) if ports.owns(s) => ports.handle(s, frame),
                (_, s) => execs.handle(s, frame),
            }
        }
    }
}
