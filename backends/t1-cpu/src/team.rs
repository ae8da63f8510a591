//! A few threads that split each piece of a decoding step between them.
//!
//! A decoding step on the host is ~40 small parallel pieces (a projection's column panels,
//! attention's rows), each a few hundred µs or less. rayon's workers fall asleep between them
//! and waking them cost more than the split saved (measured: 1.3–1.7 s against 1.05 s for
//! 16 × 128 tokens). Here the helpers spin while the team lives (one decoding call, see
//! [`crate::HostEngine::decoder`]), so handing out a piece costs a cache-line round trip.
//! Splitting the projections' columns reads each weight once per step for the whole batch,
//! where a thread per batch shard reads every weight once per shard: 3.8 against 6.2 ms per
//! step for the 18M model's projections on 2 cores (`packed.rs`, `packed_speed`).

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A piece of work: called once with each part index `0..parts`.
type Job<'a> = dyn Fn(usize) + Sync + 'a;

#[derive(Default)]
struct Shared {
    /// Bumped for each job; helpers run the job when it changes.
    epoch: AtomicU64,
    /// Helpers still running the current job.
    pending: AtomicUsize,
    /// `*const &Job` of the current job, valid until `pending` reaches 0.
    job: AtomicPtr<()>,
    stop: AtomicBool,
    /// The first panic of a helper in the current job.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// The calling thread plus `parts - 1` spinning helpers; dropped = helpers stopped and joined.
pub(crate) struct Team {
    parts: usize,
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    /// One job at a time (clones of a cache share the team).
    running: Mutex<()>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Team({} threads)", self.parts)
    }
}

impl Team {
    pub(crate) fn new(parts: usize) -> Self {
        let parts = parts.max(1);
        let shared = Arc::new(Shared::default());
        let helpers = (1..parts)
            .map(|part| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("t1-decode-{part}"))
                    .spawn(move || helper(&shared, part))
                    .expect("cannot start a decoding thread")
            })
            .collect();
        Self { parts, shared, helpers, running: Mutex::new(()) }
    }

    pub(crate) fn parts(&self) -> usize {
        self.parts
    }

    /// Calls `job(part)` for every part, part 0 on this thread, and returns when all are done;
    /// a panic in any part is raised here.
    pub(crate) fn run(&self, job: &Job<'_>) {
        if self.parts == 1 {
            return job(0);
        }
        let _one_at_a_time = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let s = &self.shared;
        s.pending.store(self.parts - 1, Ordering::Relaxed);
        let ptr: *const &Job<'_> = &job;
        s.job.store(ptr as *mut (), Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        // the helpers borrow `job` until `pending` is 0: wait even if part 0 panicked
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            backoff(&mut spins);
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if let Some(p) = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            std::panic::resume_unwind(p);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

fn helper(s: &Shared, part: usize) {
    let mut seen = 0;
    loop {
        let mut spins = 0u32;
        let epoch = loop {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            backoff(&mut spins);
        };
        seen = epoch;
        // SAFETY: `run` stored a pointer to a `&Job` that lives until `pending` reaches 0,
        // which happens only below, after the call.
        let job = unsafe { *(s.job.load(Ordering::Relaxed) as *const &Job<'_>) };
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| job(part))) {
            s.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

/// Spin a while, then yield the core to others (a team idles between decoding steps).
fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins < 1 << 14 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_part_runs_once_per_job_and_panics_reach_the_caller() {
        for parts in [1, 2, 3] {
            let team = Team::new(parts);
            assert_eq!(team.parts(), parts);
            for round in 0..200 {
                let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                team.run(&|p| {
                    hits[p].fetch_add(round + 1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == round + 1), "parts={parts} round={round}");
            }
            let last = parts - 1;
            let err = catch_unwind(AssertUnwindSafe(|| team.run(&|p| assert!(p != last, "part {p} failed"))));
            assert!(err.is_err(), "a panic in part {last} of {parts} must reach the caller");
            // the team still works after a panic
            let n = AtomicUsize::new(0);
            team.run(&|_| {
                n.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(n.load(Ordering::Relaxed), parts);
        }
    }
}
