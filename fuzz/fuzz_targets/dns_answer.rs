//! Guest DNS queries: any bytes must give a well-formed reply or none, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let policy = airlock_net::Policy::new(
        &["api.example.com".into(), "*.github.com".into()],
        &[],
        &[],
    )
    .unwrap();
    let mut table = airlock_net::dns::Synthetic::default();
    let (reply, _) = airlock_net::dns::answer(data, &policy, &mut table);
    if let Some(r) = reply {
        assert!(r.len() >= 12);
    }
});
