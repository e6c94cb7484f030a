//! Arbitrary bytes into the JSON-RPC server (`airlock rpc` / supervisor sockets), with no
//! sandbox behind it: every line must get well-formed JSON-RPC answers, never a panic. Also
//! runs the request parser and parameter validation directly on each line.
#![no_main]

use airlock_rpc::{server, wire};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
}

fuzz_target!(|data: &[u8]| {
    for line in data.split(|b| *b == b'\n') {
        if let Ok(req) = wire::parse_request(line) {
            let _ = wire::validate(&req);
        }
    }
    RT.with(|rt| {
        rt.block_on(async {
            let (client, srv) = tokio::io::duplex(1 << 16);
            let (sr, sw) = tokio::io::split(srv);
            let task = tokio::spawn(server::serve(
                server::Shared::empty(),
                tokio::io::BufReader::new(sr),
                sw,
            ));
            let (mut cr, mut cw) = tokio::io::split(client);
            let input = data.to_vec();
            let writer = tokio::spawn(async move {
                let _ = cw.write_all(&input).await;
                let _ = cw.shutdown().await;
            });
            let mut out = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut cr, &mut out).await;
            writer.await.unwrap();
            task.await.unwrap();
            for l in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value = serde_json::from_slice(l).expect("answer is JSON");
                assert_eq!(v["jsonrpc"], "2.0");
            }
        })
    });
});
