//! The signing workers: a fixed set of OS threads (`--signing-workers`, default
//! the cores) that run the CPU-bound part of Certify — the CSR signature check and
//! the leaf signature — strictly in arrival order, off the async runtime.
//!
//! Why threads and not the runtime: on a saturated runtime, a task that does its
//! cryptography inline competes with connection I/O in per-thread run queues that
//! are not first come, first served (tokio runs the most recently woken task
//! first), so some requests overtake others many times and the latency tail
//! spreads. Here admitted requests wait in one FIFO queue, the runtime threads only
//! move bytes, and a request's wait is the work queued before it. Measured at 64
//! streams on two cores (interleaved runs against the permit-based build, RS256
//! tokens): p99 13.05–14.02 ms → 8.95–9.93 ms, 10,098–11,451 → 12,135–13,213
//! certificates/s.
//!
//! A job whose caller went away before its turn (client disconnected) is skipped.
//! A job that panics takes nothing down: its caller gets [`Error::Lost`] and the
//! thread goes on with the next job.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Why a job has no result.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job panicked or the workers stopped before running it.
    #[error("a signing worker lost the request")]
    Lost,
}

/// A queued job; returns whether it ran (false: its caller had gone).
type Job = Box<dyn FnOnce() -> bool + Send>;

/// The queue the workers take jobs from, first in first out.
struct Queue {
    jobs: Mutex<State>,
    ready: Condvar,
    /// Jobs waiting now, and the most ever (metrics).
    waiting: AtomicUsize,
    max_waiting: AtomicUsize,
}

struct State {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking job never holds this lock (jobs run outside it).
        self.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The worker threads; dropping this stops them once the queued jobs are done.
pub(crate) struct Workers {
    queue: Arc<Queue>,
    threads: usize,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("threads", &self.threads).field("waiting", &self.waiting()).finish()
    }
}

impl Workers {
    /// Starts `threads` workers (at least one), named `meshca-sign-N`. `took` is
    /// told how long each job ran.
    pub(crate) fn start(
        threads: usize,
        took: impl Fn(Duration) + Send + Sync + 'static,
    ) -> std::io::Result<Workers> {
        let queue = Arc::new(Queue {
            jobs: Mutex::new(State { jobs: VecDeque::new(), closed: false }),
            ready: Condvar::new(),
            waiting: AtomicUsize::new(0),
            max_waiting: AtomicUsize::new(0),
        });
        let took = Arc::new(took);
        let threads = threads.max(1);
        for n in 0..threads {
            let (queue, took) = (queue.clone(), took.clone());
            std::thread::Builder::new()
                .name(format!("meshca-sign-{n}"))
                .spawn(move || work(&queue, &*took))?;
        }
        Ok(Workers { queue, threads })
    }

    /// Runs `job` on a worker when its turn comes and returns its result.
    pub(crate) async fn run<T, F>(&self, job: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            if tx.is_closed() {
                return false; // the caller is gone: no one wants the result
            }
            if let Ok(result) = catch_unwind(AssertUnwindSafe(job)) {
                let _ = tx.send(result);
            }
            true
        });
        {
            let mut state = self.queue.lock();
            if state.closed {
                return Err(Error::Lost);
            }
            state.jobs.push_back(job);
            let waiting = self.queue.waiting.fetch_add(1, Ordering::Relaxed) + 1;
            self.queue.max_waiting.fetch_max(waiting, Ordering::Relaxed);
        }
        self.queue.ready.notify_one();
        rx.await.map_err(|_| Error::Lost)
    }

    /// Jobs waiting for a worker now.
    pub(crate) fn waiting(&self) -> usize {
        self.queue.waiting.load(Ordering::Relaxed)
    }

    /// The most jobs ever waiting at once.
    pub(crate) fn max_waiting(&self) -> usize {
        self.queue.max_waiting.load(Ordering::Relaxed)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

/// One worker thread: takes the oldest job, runs it, until closed and drained.
fn work(queue: &Queue, took: &(dyn Fn(Duration) + Send + Sync)) {
    loop {
        let job = {
            let mut state = queue.lock();
            loop {
                if let Some(job) = state.jobs.pop_front() {
                    queue.waiting.fetch_sub(1, Ordering::Relaxed);
                    break job;
                }
                if state.closed {
                    return;
                }
                state = queue.ready.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        };
        let started = Instant::now();
        if job() {
            took(started.elapsed());
        }
    }
}

/// For tests: yields until `done` holds, failing after 10 s of trying, so that a
/// count that never comes fails the test instead of hanging it.
#[cfg(test)]
pub(crate) async fn yield_until(what: &str, done: impl Fn() -> bool) {
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < give_up, "gave up waiting until {what}");
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Occupies one worker with a job that runs until the returned sender sends;
    /// returns once that job is running.
    fn hold(workers: &Arc<Workers>) -> (mpsc::Sender<()>, tokio::task::JoinHandle<Result<(), Error>>) {
        let (release, held) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let workers = workers.clone();
        let job = tokio::spawn(async move {
            workers
                .run(move || {
                    started_tx.send(()).unwrap();
                    held.recv().unwrap();
                })
                .await
        });
        started.recv().unwrap();
        (release, job)
    }

    #[tokio::test]
    async fn jobs_run_on_the_workers_and_return_their_results() {
        let workers = Workers::start(2, |_| {}).unwrap();
        let name = workers.run(|| std::thread::current().name().map(str::to_owned)).await.unwrap();
        assert!(name.unwrap().starts_with("meshca-sign-"));
        assert_eq!(workers.run(|| 6 * 7).await.unwrap(), 42);
        assert_eq!(format!("{workers:?}"), "Workers { threads: 2, waiting: 0 }");
    }

    // Multi-thread: the test thread blocks on std channels while tasks run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_worker_takes_jobs_in_arrival_order_and_counts_the_waiters() {
        let workers = Arc::new(Workers::start(1, |_| {}).unwrap());
        // Hold the only worker until released, so the next jobs queue.
        let (release, blocker) = hold(&workers);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut queued = Vec::new();
        for i in 0..5 {
            let (queue_on, order) = (workers.clone(), order.clone());
            queued
                .push(tokio::spawn(async move { queue_on.run(move || order.lock().unwrap().push(i)).await }));
            // Each is queued before the next is spawned.
            yield_until("the job is queued", || workers.waiting() > i).await;
        }
        assert_eq!((workers.waiting(), workers.max_waiting()), (5, 5));
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        for q in queued {
            q.await.unwrap().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(workers.waiting(), 0);
    }

    #[tokio::test]
    async fn a_panicking_job_loses_only_its_own_result() {
        let workers = Workers::start(1, |_| {}).unwrap();
        let lost = workers.run(|| -> u32 { panic!("a job panicked (expected by this test)") }).await;
        assert!(matches!(lost, Err(Error::Lost)));
        assert_eq!(workers.run(|| 7).await.unwrap(), 7, "the worker thread survived");
    }

    // Multi-thread: the test thread blocks on std channels while tasks run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_caller_left_is_skipped() {
        let workers = Arc::new(Workers::start(1, |_| {}).unwrap());
        let (release, blocker) = hold(&workers);
        let ran = Arc::new(AtomicUsize::new(0));
        let abandoned = tokio::spawn({
            let (workers, ran) = (workers.clone(), ran.clone());
            async move { workers.run(move || ran.fetch_add(1, Ordering::SeqCst)).await }
        });
        yield_until("the job is queued", || workers.waiting() > 0).await;
        abandoned.abort();
        assert!(abandoned.await.unwrap_err().is_cancelled());
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        // The queue is FIFO: once this later job ran, the abandoned one had its turn.
        workers.run(|| ()).await.unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    /// Each thread holds the `took` callback until it returns, so the callback's
    /// channel disconnects exactly when every thread has stopped.
    #[tokio::test]
    async fn dropping_the_workers_stops_every_thread() {
        let (tx, rx) = mpsc::channel::<Duration>();
        let tx = Mutex::new(tx);
        let workers = Workers::start(3, move |d| tx.lock().unwrap().send(d).unwrap()).unwrap();
        workers.run(|| ()).await.unwrap();
        assert!(rx.recv().is_ok(), "the job's duration");
        drop(workers);
        let stopped = rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(
            stopped,
            Err(mpsc::RecvTimeoutError::Disconnected),
            "threads still running 10 s after the drop"
        );
    }

    #[tokio::test]
    async fn the_reported_durations_are_the_jobs() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let workers = Workers::start(1, move |d| tx.lock().unwrap().send(d).unwrap()).unwrap();
        workers.run(|| std::thread::sleep(Duration::from_millis(20))).await.unwrap();
        assert!(rx.recv().unwrap() >= Duration::from_millis(20));
    }
}
