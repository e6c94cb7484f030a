//! Guest bytes into the host's frame decoder, split at fuzzer-chosen points, with every
//! payload parser and the window accounting run on what comes out. Must never panic, and
//! never buffer more than one maximal frame.
#![no_main]

use airlock_proto::{
    ConnectError, Decoder, ExecError, ExitStatus, Hello, Kind, Ready, Started, StreamReset, Window,
    HEADER_LEN, MAX_PAYLOAD,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let step = 1 + split as usize;
    let mut d = Decoder::new();
    let mut w = Window::default();
    for chunk in rest.chunks(step) {
        d.push(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    match f.kind {
                        Kind::Stdout | Kind::Stderr | Kind::Data => {
                            let _ = w.receive(f.payload.len());
                        }
                        Kind::Credit => {
                            if let Ok(n) = f.parse_credit() {
                                let _ = w.grant(n);
                            }
                        }
                        Kind::Hello => drop(f.parse::<Hello>()),
                        Kind::Ready => drop(f.parse::<Ready>()),
                        Kind::Started => drop(f.parse::<Started>()),
                        Kind::Exit => drop(f.parse::<ExitStatus>()),
                        Kind::ExecFailed => drop(f.parse::<ExecError>()),
                        Kind::ConnectFailed => drop(f.parse::<ConnectError>()),
                        Kind::Reset => drop(f.parse::<StreamReset>()),
                        _ => {}
                    }
                    assert!(f.payload.len() <= MAX_PAYLOAD);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(d.buffered() <= HEADER_LEN + MAX_PAYLOAD + step);
    }
});
