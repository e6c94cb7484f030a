//! Arbitrary bytes as an image layer, applied onto a fresh temporary directory. Must never
//! panic and never touch anything outside that directory (a sibling canary must survive).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(base) = tempfile::tempdir() else { return };
    let root = base.path().join("root");
    let canary = base.path().join("canary");
    if std::fs::create_dir(&root).is_err() || std::fs::write(&canary, b"c").is_err() {
        return;
    }
    let _ = airlock_guest::unpack::apply_layer(data, &root);
    assert_eq!(std::fs::read(&canary).ok().as_deref(), Some(&b"c"[..]), "layer escaped its root");
});
