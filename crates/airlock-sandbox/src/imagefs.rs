//! OCI image → root filesystem, rootless and exact.
//!
//! The layers are applied inside a throwaway *builder VM*: it boots the usual kernel and agent
//! with an empty sparse ext4 as its only disk, the host streams each layer (decompressed here)
//! into the agent's `apply-layer` builtin, which unpacks it as root *in the guest* with OCI
//! whiteouts. Ownership, modes, setuid bits, xattrs, device nodes and hardlinks therefore come
//! out exactly as the layers say, with no privilege on the host, and a hostile layer (`..`,
//! links pointing out, bombs) can only damage that VM and the image being built, never the
//! host. The result is cached per layer chain and shared read-only by every sandbox.
//!
//! Chosen over writing ext4 from the tar stream in Rust on the host: no ext4 writer to keep
//! exact, and the guest kernel does the filesystem work it already knows.

use std::io::Read;
use std::path::{Path, PathBuf};

use airlock_image::{ImageConfig, ImageRecord, Store};

use crate::{Error, ExecEvent, ExecSpec, Sandbox, SandboxSpec};

/// Where the built root filesystem of `image` is kept: beside the store's blobs, so the
/// store's garbage collection can see it. Keyed by the layer chain, not the manifest: images
/// that differ only in their config (a build's last CMD, a retag) share one filesystem.
pub fn cached_path(store: &Path, image: &ImageRecord) -> PathBuf {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for l in &image.layers {
        h.update(l.digest.as_bytes());
        h.update(b"\n");
    }
    let hex = hex::encode(h.finalize());
    store
        .join("rootfs")
        .join(format!("oci-{}.ext4", &hex[..32]))
}

/// Decompresses a layer blob by its magic bytes (gzip, zstd or plain tar).
fn layer_reader(path: &Path) -> Result<Box<dyn Read + Send>, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| e.to_string())?;
    let f = std::io::Read::chain(std::io::Cursor::new(magic[..n].to_vec()), f);
    Ok(match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(f)),
        [0x28, 0xb5, 0x2f, 0xfd] => {
            Box::new(zstd::stream::read::Decoder::new(f).map_err(|e| e.to_string())?)
        }
        _ => Box::new(f),
    })
}

/// Builds (or reuses) the root filesystem image of `image` from the store at `store`.
pub async fn build(store: &Path, image: &ImageRecord) -> Result<PathBuf, Error> {
    let out = cached_path(store, image);
    if out.is_file() {
        return Ok(out);
    }
    let store = Store::open(store).map_err(|e| Error::Rootfs(e.to_string()))?;
    std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))?;
    // Sparse: the virtual size only bounds what the layers may expand to.
    let compressed: u64 = image.layers.iter().map(|l| l.size).sum();
    let mib = (compressed * 6 / (1 << 20) + 1024).max(2048);
    let tmp = crate::rootfs::unique_tmp(&out, "build");
    {
        let tmp = tmp.clone();
        let args = ["-E", "root_owner=0:0,lazy_itable_init=1,nodiscard"].map(Into::into);
        tokio::task::spawn_blocking(move || {
            crate::rootfs::mkfs_ext4(&args, &tmp, &format!("{mib}M"))
        })
        .await
        .map_err(|e| Error::Setup(e.to_string()))?
        .map_err(Error::Rootfs)?;
    }
    let res = apply_layers(&store, image, &tmp).await;
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Whoever finished first wins; a copy already there stays (see publish_new).
    crate::rootfs::publish_new(&tmp, &out)?;
    Ok(out)
}

async fn apply_layers(store: &Store, image: &ImageRecord, target: &Path) -> Result<(), Error> {
    let mut spec = SandboxSpec::new(crate::RootfsSource::Image(target.to_path_buf()));
    spec.builder_target = Some(target.to_path_buf());
    spec.hostname = Some("airlock-builder".into());
    let sb = Sandbox::start(spec).await?;
    for (i, layer) in image.layers.iter().enumerate() {
        let blob = store
            .blob_path(&layer.digest)
            .map_err(|e| Error::Rootfs(e.to_string()))?;
        let reader = layer_reader(&blob)
            .map_err(|e| Error::Rootfs(format!("layer {}: {e}", layer.digest)))?;
        let mut exec = sb
            .exec(ExecSpec {
                argv: vec!["apply-layer".into()],
                stdin: true,
                builtin: Some("apply-layer".into()),
                ..Default::default()
            })
            .await?;
        let input = exec.input();
        // Decompress on a blocking thread; a small queue keeps memory bounded.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(4);
        let reader_task = tokio::task::spawn_blocking(move || {
            let mut r = reader;
            loop {
                let mut buf = vec![0u8; 256 * 1024];
                match r.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.blocking_send(Ok(buf)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        let feed = async {
            while let Some(chunk) = rx.recv().await {
                let chunk =
                    chunk.map_err(|e| Error::Rootfs(format!("layer {}: {e}", layer.digest)))?;
                input.write(&chunk).await?;
            }
            input.close().await
        };
        let drain = async {
            let mut stderr = Vec::new();
            loop {
                match exec.next().await? {
                    Some(ExecEvent::Stderr(b)) => stderr.extend_from_slice(&b),
                    Some(ExecEvent::Exit(s)) => return Ok::<_, Error>((s, stderr)),
                    Some(ExecEvent::Failed(e)) => return Err(Error::Exec(e)),
                    Some(_) => {}
                    None => {
                        return Err(Error::Protocol("builder exec ended without status".into()))
                    }
                }
            }
        };
        let (fed, drained) = tokio::join!(feed, drain);
        let _ = reader_task.await;
        let (status, stderr) = drained?;
        fed?;
        if status.code != Some(0) {
            return Err(Error::Rootfs(format!(
                "layer {} of {} ({}) could not be applied: {}",
                i + 1,
                image.layers.len(),
                layer.digest,
                String::from_utf8_lossy(&stderr).trim()
            )));
        }
    }
    // A clean shutdown flushes the target disk.
    sb.stop().await
}

/// The command an image runs: `Entrypoint` + (`cmd` if given, else `Cmd`), Docker's rule;
/// `entrypoint` (`--entrypoint`) replaces the image's and drops its `Cmd`.
pub fn command(config: &ImageConfig, entrypoint: Option<&str>, cmd: &[String]) -> Vec<String> {
    let ep: Vec<String> = match entrypoint {
        Some("") => Vec::new(),
        Some(e) => vec![e.to_string()],
        None => config.entrypoint().to_vec(),
    };
    let args: Vec<String> = if !cmd.is_empty() {
        cmd.to_vec()
    } else if entrypoint.is_some() {
        Vec::new()
    } else {
        config.cmd().to_vec()
    };
    ep.into_iter().chain(args).collect()
}
