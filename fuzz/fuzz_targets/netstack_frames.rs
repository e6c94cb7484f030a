//! Guest ethernet frames into the policy filter and the userspace stack. The input is split
//! into frames at 0xFF bytes, so one run can hold a handshake.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frames: Vec<&[u8]> = data
        .split(|b| *b == 0xff)
        .filter(|f| !f.is_empty())
        .take(32)
        .collect();
    airlock_net::stack::fuzz_frames(&frames);
});
