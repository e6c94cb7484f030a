//! `airlock pull` and `airlock image ls|rm|gc|import`: parse, call `airlock-image`, print.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use airlock_image::{
    ImageRecord, Platform, ProgressEvent, ProgressState, PullOptions, Reference, Store,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

fn open_store() -> Result<Store, String> {
    Store::open_default().map_err(|e| e.to_string())
}

fn short(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    &hex[..hex.len().min(12)]
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// One bar per blob when stderr is a terminal; one line per finished blob otherwise.
fn progress() -> airlock_image::ProgressFn {
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    let style = ProgressStyle::with_template("{prefix} {bar:30} {bytes}/{total_bytes} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    Arc::new(move |ev: &ProgressEvent| {
        let what = if ev.is_layer { "layer" } else { "config" };
        if !tty {
            match ev.state {
                ProgressState::Cached => eprintln!("{} {what}: already present", short(&ev.digest)),
                ProgressState::Complete => {
                    eprintln!("{} {what}: pulled {}", short(&ev.digest), human(ev.total))
                }
                ProgressState::Downloading => {}
            }
            return;
        }
        let mut bars = bars.lock().unwrap();
        let bar = bars.entry(ev.digest.clone()).or_insert_with(|| {
            let b = multi.add(ProgressBar::new(ev.total));
            b.set_style(style.clone());
            b.set_prefix(format!("{} {what:<6}", short(&ev.digest)));
            b
        });
        bar.set_position(ev.done);
        match ev.state {
            ProgressState::Cached => bar.finish_with_message("already present"),
            ProgressState::Complete => bar.finish_with_message("done"),
            ProgressState::Downloading => {}
        }
    })
}

/// `airlock pull`.
pub async fn pull(
    image: &str,
    platform: Option<&str>,
    insecure: &[String],
) -> Result<ImageRecord, String> {
    let reference = Reference::parse(image).map_err(|e| e.to_string())?;
    let mut opts = PullOptions {
        insecure_registries: insecure.to_vec(),
        progress: Some(progress()),
        ..Default::default()
    };
    if let Some(p) = platform {
        opts.platform = Platform::parse(p).map_err(|e| e.to_string())?;
    }
    let store = open_store()?;
    airlock_image::pull(&store, &reference, &opts)
        .await
        .map_err(|e| e.to_string())
}

/// The stored image `name` refers to, pulled first (for `platform`) if it is not in the store.
pub async fn resolve_or_pull(
    name: &str,
    platform: &str,
    insecure_registries: &[String],
) -> Result<(Store, ImageRecord), String> {
    if let Some(found) = resolve(name)? {
        return Ok(found);
    }
    pull(name, Some(platform), insecure_registries).await?;
    resolve(name)?.ok_or_else(|| format!("{name}: not in the store after pulling"))
}

/// The stored image `name` refers to, if it is in the store.
pub fn resolve(name: &str) -> Result<Option<(Store, ImageRecord)>, String> {
    let reference = Reference::parse(name).map_err(|e| e.to_string())?;
    let store = open_store()?;
    match store.resolve(&reference) {
        Ok(rec) => Ok(Some((store, rec))),
        Err(airlock_image::Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// `airlock image ls`.
pub fn ls(json: bool) -> Result<(), String> {
    let images = open_store()?.list().map_err(|e| e.to_string())?;
    if json {
        let rows: Vec<_> = images
            .iter()
            .map(|i| {
                serde_json::json!({
                    "reference": i.reference,
                    "digest": i.manifest_digest,
                    "platform": i.platform.to_string(),
                    "size": i.size,
                    "created": i.created,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return Ok(());
    }
    println!(
        "{:<50} {:<14} {:<14} {:>10}",
        "IMAGE", "DIGEST", "PLATFORM", "SIZE"
    );
    for i in images {
        println!(
            "{:<50} {:<14} {:<14} {:>10}",
            i.reference,
            short(&i.manifest_digest),
            i.platform.to_string(),
            human(i.size)
        );
    }
    Ok(())
}

/// `airlock image rm`.
pub fn rm(images: &[String]) -> Result<(), String> {
    let store = open_store()?;
    let in_use = airlock_sandbox::images_in_use();
    let mut failed = Vec::new();
    for name in images {
        let removed = Reference::parse(name)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                let rec = store.resolve(&r).map_err(|e| e.to_string())?;
                if let Some(ids) = in_use.get(&rec.manifest_digest) {
                    return Err(format!(
                        "in use by running sandbox(es) {}: stop them first",
                        ids.join(", ")
                    ));
                }
                store.remove(&r).map_err(|e| e.to_string())
            });
        match removed {
            Ok(rec) => println!("removed {}", rec.reference),
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("\n"))
    }
}

/// `airlock image gc`: blobs no image references, and root filesystems built for images
/// that are gone.
pub fn gc() -> Result<(), String> {
    let store = open_store()?;
    let mut freed = store.gc().map_err(|e| e.to_string())?;
    let keep: std::collections::HashSet<_> = store
        .list()
        .map_err(|e| e.to_string())?
        .iter()
        .map(|i| airlock_sandbox::imagefs::cached_path(store.root(), i))
        .collect();
    let dir = store.root().join("rootfs");
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let p = e.path();
        let built = e.file_name().to_string_lossy().starts_with("oci-");
        if built && !keep.contains(&p) {
            freed += e
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            let _ = std::fs::remove_file(&p);
        }
    }
    println!("freed {}", human(freed));
    Ok(())
}

/// `airlock image import TAG [FILE|-]`.
pub fn import(tag: &str, file: Option<&std::path::Path>) -> Result<ImageRecord, String> {
    let store = open_store()?;
    let res = match file {
        None => airlock_image::import(&store, tag, std::io::stdin().lock()),
        Some(p) if p.as_os_str() == "-" => {
            airlock_image::import(&store, tag, std::io::stdin().lock())
        }
        Some(p) => {
            let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
            airlock_image::import(&store, tag, std::io::BufReader::new(f))
        }
    };
    res.map_err(|e| e.to_string())
}
