//! End-to-end tests against a real registry (Debian's `docker-registry`, distribution 2.8)
//! with images built by umoci and pushed by skopeo. No mocks.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_image::{
    pull, Error, Platform, ProgressEvent, ProgressState, PullOptions, Reference, Store,
};
use common::*;

#[derive(Default, Clone)]
struct Events(Arc<Mutex<Vec<ProgressEvent>>>);

impl Events {
    fn options(&self) -> PullOptions {
        let e = self.0.clone();
        PullOptions {
            progress: Some(Arc::new(move |ev: &ProgressEvent| {
                e.lock().unwrap().push(ev.clone())
            })),
            ..Default::default()
        }
    }
    fn take(&self) -> Vec<ProgressEvent> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn downloaded(events: &[ProgressEvent]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.state == ProgressState::Complete)
        .map(|e| e.digest.clone())
        .collect()
}

fn mtimes(root: &Path) -> Vec<(String, std::time::SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(root.join("blobs/sha256"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().modified().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn registry_end_to_end() {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let layout = build_layout(work.path());
    let registry = Registry::start(work.path());
    let host = registry.host();
    let oci = |tag: &str| format!("oci:{}:{tag}", layout.dir.display());
    skopeo_copy(&[
        "--dest-tls-verify=false",
        &oci("bb"),
        &format!("docker://{host}/test/bb:1"),
    ]);
    skopeo_copy(&[
        "--all",
        "--dest-tls-verify=false",
        &oci("multi"),
        &format!("docker://{host}/test/multi:1"),
    ]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let store_dir = work.path().join("store");
    let store = Store::open(&store_dir).unwrap();
    let bb = Reference::parse(&format!("{host}/test/bb:1")).unwrap();

    // --- first pull: everything downloaded and verified.
    let events = Events::default();
    let rec = rt.block_on(pull(&store, &bb, &events.options())).unwrap();
    assert_eq!(rec.reference, format!("{host}/test/bb:1"));
    assert_eq!(rec.manifest_digest, layout.amd64_manifest);
    assert_eq!(rec.index_digest, None);
    assert_eq!(rec.platform, Platform::default());
    assert_eq!(rec.layers.len(), 1);
    assert!(rec.layers[0].media_type.contains("layer"));
    let blobs = check_store_blobs(&store_dir);
    let mut expected: Vec<String> = rec.blob_digests().iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(
        blobs, expected,
        "store holds exactly manifest, config, layer"
    );
    let total_size: u64 = blobs
        .iter()
        .map(|d| {
            std::fs::metadata(store.blob_path(d).unwrap())
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(rec.size, total_size);
    // Stored blobs are byte-identical to what umoci wrote.
    for d in &blobs {
        let ours = std::fs::read(store.blob_path(d).unwrap()).unwrap();
        let theirs = std::fs::read(layout.dir.join("blobs/sha256").join(&d[7..])).unwrap();
        assert_eq!(ours, theirs, "{d}");
    }
    let ev = events.take();
    let mut got = downloaded(&ev);
    got.sort();
    let mut want = vec![rec.config_digest.clone(), rec.layers[0].digest.clone()];
    want.sort();
    assert_eq!(got, want, "config and layer downloaded once each");
    let layer_ev: Vec<_> = ev.iter().filter(|e| e.is_layer).collect();
    let last = layer_ev.last().unwrap();
    assert_eq!(
        (last.done, last.total),
        (rec.layers[0].size, rec.layers[0].size)
    );
    assert!(layer_ev
        .iter()
        .any(|e| e.state == ProgressState::Downloading && e.done > 0 && e.done <= e.total));
    assert_eq!(temp_files(&store_dir), 0);

    // --- second pull: nothing downloaded, blobs untouched.
    let before = mtimes(&store_dir);
    let rec2 = rt.block_on(pull(&store, &bb, &events.options())).unwrap();
    assert_eq!(rec2.manifest_digest, rec.manifest_digest);
    let ev = events.take();
    assert!(
        downloaded(&ev).is_empty(),
        "re-pull downloaded {:?}",
        downloaded(&ev)
    );
    assert!(ev.iter().all(|e| e.state == ProgressState::Cached));
    assert_eq!(ev.len(), 2);
    assert_eq!(mtimes(&store_dir), before);

    // --- resolve by tag and by digest; list.
    assert_eq!(
        store.resolve(&bb).unwrap().manifest_digest,
        rec.manifest_digest
    );
    let by_digest = Reference::parse(&format!("{host}/test/bb@{}", rec.manifest_digest)).unwrap();
    assert_eq!(store.resolve(&by_digest).unwrap().reference, rec.reference);
    assert!(matches!(
        store.resolve(&Reference::parse(&format!("{host}/test/bb:2")).unwrap()),
        Err(Error::NotFound(_))
    ));
    assert_eq!(store.list().unwrap().len(), 1);

    // --- config accessors.
    let cfg = store.image_config(&rec).unwrap();
    assert_eq!(cfg.cmd(), ["/bin/sh", "-c", "echo hi"]);
    assert!(cfg.entrypoint().is_empty());
    assert!(cfg.env().iter().any(|e| e == "FOO=bar"), "{:?}", cfg.env());
    assert_eq!(cfg.working_dir(), Some("/tmp"));
    assert_eq!(cfg.user(), Some("1000:1000"));
    assert_eq!(cfg.architecture(), "amd64");

    // --- pull by digest (records under the digest reference).
    let rec_d = rt
        .block_on(pull(&store, &by_digest, &PullOptions::default()))
        .unwrap();
    assert_eq!(rec_d.manifest_digest, rec.manifest_digest);
    let wrong = Reference::parse(&format!("{host}/test/bb@sha256:{}", "0".repeat(64))).unwrap();
    assert!(rt
        .block_on(pull(&store, &wrong, &PullOptions::default()))
        .is_err());

    // --- multi-platform index.
    let multi = Reference::parse(&format!("{host}/test/multi:1")).unwrap();
    let m = rt
        .block_on(pull(&store, &multi, &PullOptions::default()))
        .unwrap();
    assert_eq!(m.manifest_digest, layout.amd64_manifest);
    assert_eq!(m.index_digest.as_deref(), Some(layout.index.as_str()));
    assert!(store.has_blob(&layout.index));
    let arm_opts = PullOptions {
        platform: Platform::parse("linux/arm64").unwrap(),
        ..Default::default()
    };
    let arm_store = Store::open(work.path().join("arm-store")).unwrap();
    let a = rt.block_on(pull(&arm_store, &multi, &arm_opts)).unwrap();
    assert_eq!(a.manifest_digest, layout.arm64_manifest);
    assert_eq!(a.platform.architecture, "arm64");
    assert_eq!(arm_store.image_config(&a).unwrap().architecture(), "arm64");
    let s390 = PullOptions {
        platform: Platform::parse("linux/s390x").unwrap(),
        ..Default::default()
    };
    let err = rt.block_on(pull(&arm_store, &multi, &s390)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::PlatformNotFound { .. }), "{msg}");
    assert!(
        msg.contains("linux/amd64") && msg.contains("linux/arm64") && msg.contains("linux/s390x"),
        "{msg}"
    );

    // --- https is required for non-loopback hosts unless listed as insecure.
    // (127.0.0.1 is loopback, so plain HTTP was used above without listing it.)

    // --- concurrent pulls of the same image: two threads, two runtimes, two Store handles.
    let conc_dir = work.path().join("concurrent");
    Store::open(&conc_dir).unwrap();
    let all_events = Events::default();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let dir = conc_dir.clone();
            let bb = bb.clone();
            let opts = all_events.options();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let store = Store::open(&dir).unwrap();
                rt.block_on(pull(&store, &bb, &opts)).unwrap()
            })
        })
        .collect();
    let recs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(recs[0].manifest_digest, recs[1].manifest_digest);
    let ev = all_events.take();
    let d = downloaded(&ev);
    let distinct: HashSet<_> = d.iter().collect();
    assert_eq!(
        d.len(),
        2,
        "each blob downloaded exactly once across both pulls: {d:?}"
    );
    assert_eq!(distinct.len(), 2);
    let conc = Store::open(&conc_dir).unwrap();
    assert_eq!(conc.list().unwrap().len(), 1);
    assert_eq!(check_store_blobs(&conc_dir).len(), 3);
    assert_eq!(temp_files(&conc_dir), 0);
    // Many tasks in one runtime, too.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = conc.clone();
            let bb = bb.clone();
            rt.spawn(async move { pull(&store, &bb, &PullOptions::default()).await })
        })
        .collect();
    for t in tasks {
        rt.block_on(t).unwrap().unwrap();
    }
    assert_eq!(conc.list().unwrap().len(), 1);

    // --- remove + gc frees exactly the image's blobs.
    assert_eq!(conc.gc().unwrap(), 0);
    let removed = conc.remove(&bb).unwrap();
    assert!(matches!(conc.resolve(&bb), Err(Error::NotFound(_))));
    assert!(matches!(conc.remove(&bb), Err(Error::NotFound(_))));
    let freed = conc.gc().unwrap();
    assert_eq!(freed, removed.size);
    assert!(check_store_blobs(&conc_dir).is_empty());
    // In the main store, removing the tag keeps blobs the digest record still uses.
    store.remove(&bb).unwrap();
    let freed = store.gc().unwrap();
    assert_eq!(freed, 0, "blobs shared with other records must stay");
    assert!(store.has_blob(&rec.layers[0].digest));

    // --- interrupted pull: a panicking progress callback aborts mid-download; no partial
    // blob becomes visible and the temp file is gone.
    let int_dir = work.path().join("interrupted");
    let int_store = Store::open(&int_dir).unwrap();
    let opts = PullOptions {
        progress: Some(Arc::new(|e: &ProgressEvent| {
            if e.is_layer && e.state == ProgressState::Downloading && e.done > 0 {
                panic!("simulated interruption");
            }
        })),
        ..Default::default()
    };
    let s2 = int_store.clone();
    let bb2 = bb.clone();
    let res = rt.block_on(rt.spawn(async move { pull(&s2, &bb2, &opts).await }));
    assert!(res.is_err(), "pull should have been interrupted");
    assert!(!int_store.has_blob(&rec.layers[0].digest));
    assert!(int_store.list().unwrap().is_empty());
    assert_eq!(temp_files(&int_dir), 0);
    // A crashed writer's temp file (unlocked) is removed on the next open; a live
    // writer's (locked) one is kept.
    std::fs::write(int_dir.join("tmp/999999-0-0.tmp"), b"partial").unwrap();
    let live_path = int_dir.join("tmp/live.tmp");
    let live = std::fs::File::create(&live_path).unwrap();
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&live), libc::LOCK_EX) },
        0
    );
    Store::open(&int_dir).unwrap();
    assert!(!int_dir.join("tmp/999999-0-0.tmp").exists());
    assert!(live_path.exists());
    drop(live);
    Store::open(&int_dir).unwrap();
    assert_eq!(temp_files(&int_dir), 0);

    // --- corrupted blob in the registry: pull fails, nothing bad is stored.
    let layer = rec.layers[0].digest.clone();
    let path = registry.blob_data(&layer);
    let mut data = std::fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&path, &data).unwrap();
    let bad_dir = work.path().join("bad");
    let bad_store = Store::open(&bad_dir).unwrap();
    let err = rt
        .block_on(pull(&bad_store, &bb, &PullOptions::default()))
        .unwrap_err();
    assert!(
        matches!(err, Error::DigestMismatch { .. }),
        "expected a digest mismatch, got {err}"
    );
    assert!(!bad_store.has_blob(&layer));
    assert!(bad_store.list().unwrap().is_empty());
    assert_eq!(temp_files(&bad_dir), 0);
    check_store_blobs(&bad_dir);

    drop(registry);
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "test took {:?}",
        started.elapsed()
    );
}

#[test]
fn unreachable_registry_is_a_clean_error() {
    // Non-loopback and not listed as insecure, so HTTPS is used; no network here, so the
    // pull must fail with a registry error (no panic, nothing stored).
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let r = Reference::parse("registry.invalid:5000/x/y:1").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(pull(&store, &r, &PullOptions::default()))
        .unwrap_err();
    assert!(matches!(err, Error::Registry { .. }), "{err}");
    assert!(store.list().unwrap().is_empty());
}
