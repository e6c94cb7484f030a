//! The Rust API end to end: boot a sandbox, stream a command's output while feeding its stdin,
//! move files in and out, list a directory, stop.
//!
//! `cargo run --release -p airlock-sandbox --example stream -- /path/to/rootfs`

use airlock_sandbox::{ExecEvent, ExecSpec, RootfsSource, Sandbox, SandboxSpec};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::args()
        .nth(1)
        .ok_or("usage: stream ROOTFS (a directory or ext4 image)")?;
    let sb = Sandbox::start(SandboxSpec::new(RootfsSource::from_path(root)?)).await?;

    // Streaming exec with stdin: output arrives as the command produces it.
    let mut spec = ExecSpec::new(["sh", "-c", "while read l; do echo got: $l; done"]);
    spec.stdin = true;
    let mut exec = sb.exec(spec).await?;
    let input = exec.input();
    input.write(b"one\ntwo\n").await?;
    input.close().await?;
    while let Some(ev) = exec.next().await? {
        match ev {
            ExecEvent::Stdout(b) => print!("{}", String::from_utf8_lossy(&b)),
            ExecEvent::Stderr(b) => eprint!("{}", String::from_utf8_lossy(&b)),
            ExecEvent::Exit(s) => println!("exit: {s:?}"),
            ExecEvent::Failed(e) => println!("could not start: {}", e.message),
            ExecEvent::Started(pid) => println!("guest pid {pid}"),
        }
    }

    // Files: written and read in bounded chunks over the control channel.
    sb.write_file("/tmp/hello.txt", b"hello\n", 0o644).await?;
    let back = sb.read_file("/tmp/hello.txt").await?;
    println!("read back {} bytes", back.len());
    for f in sb.list_files("/tmp").await? {
        println!("{:>8} {:o} {}", f.size, f.mode, f.name);
    }
    sb.stop().await?;
    Ok(())
}
