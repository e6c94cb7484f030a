//! Reused threads for the per-exec pumps. Every exec needs two or three threads (stdout,
//! stderr, stdin); creating each afresh (a stack mapping, its guard page, the clone, the first
//! touches of the stack, and unmapping it all at exit) was a measurable part of an exec's round
//! trip under TCG. Finished workers wait for the next job instead; a few stay idle for good.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send>;

struct State {
    queue: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    queue: VecDeque::new(),
    idle: 0,
});
static WAKE: Condvar = Condvar::new();

/// Idle workers kept beyond this many exit.
const MAX_IDLE: usize = 8;

/// Runs `f` on a worker thread: an idle one when there is one, else a new one. Jobs may block
/// for as long as they like; nothing waits for a busy worker.
pub fn run(f: impl FnOnce() + Send + 'static) {
    let mut s = STATE.lock().unwrap();
    // Each idle worker takes one queued job: hand this one over only if one is left for it.
    if s.idle > s.queue.len() {
        s.queue.push_back(Box::new(f));
        drop(s);
        WAKE.notify_one();
        return;
    }
    drop(s);
    std::thread::spawn(move || {
        f();
        work();
    });
}

fn work() {
    let mut s = STATE.lock().unwrap();
    loop {
        if let Some(job) = s.queue.pop_front() {
            drop(s);
            job();
            s = STATE.lock().unwrap();
            continue;
        }
        if s.idle >= MAX_IDLE {
            return;
        }
        s.idle += 1;
        s = WAKE.wait(s).unwrap();
        s.idle -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn jobs_run_and_workers_are_reused() {
        let (tx, rx) = channel();
        for round in 0..3 {
            for i in 0..20 {
                let tx = tx.clone();
                run(move || {
                    // Block a little so several run at once.
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    tx.send((round, i, std::thread::current().id())).unwrap();
                });
            }
            let got: Vec<_> = (0..20).map(|_| rx.recv().unwrap()).collect();
            assert_eq!(got.len(), 20);
            // Let the workers go idle before the next round.
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(STATE.lock().unwrap().idle <= MAX_IDLE);
    }
}
