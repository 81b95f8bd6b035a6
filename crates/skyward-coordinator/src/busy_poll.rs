//! Busy polling of this machine's idle CPUs while calls to nodes on it are in flight.
//!
//! A round trip to a Local node crosses three processes (coordinator, worker, executor) and
//! back; every hop wakes a sleeping thread. On a virtual machine a wake-up costs tens of
//! microseconds when the woken thread's virtual CPU is halted (the hypervisor has to run it
//! again): on the development VM, a blocking Unix-socket ping-pong between two processes takes
//! 55 µs when the other CPU sleeps, and 5 µs while idle CPUs run a busy loop instead of halting.
//! On the whole chain it is less (p50 231 → 183 µs, docs/benchmarks.md): a wake-up that crosses
//! to the other virtual CPU still costs 20-40 µs there, halted or not.
//!
//! [`BusyPoll`] keeps up to `Options::busy_poll_cpus` threads spinning for
//! `Options::busy_poll_window` after each send to, or reply from, a node (`touch`). The threads
//! run under `SCHED_IDLE`: the kernel runs them only on a CPU that has nothing else to run, and a
//! woken thread takes the CPU from them as soon as they enter the kernel (every 10 µs at most), so
//! they fill idle time without taking CPU from the coordinator, the workers or anything else on
//! the machine. It starts only once a node proved to be on this machine, and the threads park
//! when the pool has been quiet for the window: a pool whose tasks run for minutes spins for a
//! millisecond after each dispatch, not for minutes.
//!
//! Synchronisation: `touch` stores the time and then reads `sleepers`; a spinner that goes to
//! sleep increments `sleepers` and then reads the time again. Both are `SeqCst`, so at least one
//! of the two sees the other: either the spinner sees the new time and keeps spinning, or `touch`
//! sees a sleeper and unparks every spinner (`Thread::unpark` takes no lock, so a spinner preempted
//! anywhere can never block the caller).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// What the spinners and the pool share.
#[derive(Debug)]
struct State {
    epoch: Instant,
    /// Nanoseconds since `epoch` of the last send or reply.
    last: AtomicU64,
    /// Spinners parked (or about to park).
    sleepers: AtomicUsize,
    stop: AtomicBool,
    window: u64,
    /// Nanoseconds the spinners spent spinning, all together.
    spun: AtomicU64,
}

impl State {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn recent(&self, now: u64) -> bool {
        now.saturating_sub(self.last.load(Ordering::SeqCst)) < self.window
    }
}

/// The pool's busy poller: off until [`BusyPoll::start`], a no-op when configured with no CPUs.
#[derive(Debug)]
pub(crate) struct BusyPoll {
    state: Arc<State>,
    cpus: usize,
    /// Set by `start`: the spinner threads (empty where they could not be made).
    threads: OnceLock<Vec<Thread>>,
}

impl BusyPoll {
    /// A poller that will use up to `cpus` threads (capped by the CPUs this process may use) and
    /// spin for `window` after each touch.
    pub(crate) fn new(cpus: usize, window: Duration) -> Self {
        let available = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self {
            state: Arc::new(State {
                epoch: Instant::now(),
                last: AtomicU64::new(0),
                sleepers: AtomicUsize::new(0),
                stop: AtomicBool::new(false),
                window: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
                spun: AtomicU64::new(0),
            }),
            cpus: if window.is_zero() { 0 } else { cpus.min(available) },
            threads: OnceLock::new(),
        }
    }

    /// Start the spinners (a node proved to be on this machine). Idempotent.
    pub(crate) fn start(&self) {
        if self.cpus == 0 || self.state.stop.load(Ordering::SeqCst) {
            return;
        }
        self.threads.get_or_init(|| {
            (0..self.cpus)
                .filter_map(|i| {
                    let state = Arc::clone(&self.state);
                    std::thread::Builder::new()
                        .name(format!("skyward-poll-{i}"))
                        .spawn(move || spin(&state))
                        .map_err(|e| tracing::debug!(error = %e, "cannot start a busy-poll thread"))
                        .ok()
                        .map(|handle| handle.thread().clone())
                })
                .collect()
        });
        tracing::debug!(threads = self.threads.get().map_or(0, Vec::len), "busy polling started");
    }

    /// Something was sent to or received from a node: keep polling for the window from now.
    /// Costs a clock read and two atomic operations while the spinners run.
    pub(crate) fn touch(&self) {
        let Some(threads) = self.threads.get() else { return };
        self.state.last.store(self.state.now(), Ordering::SeqCst);
        if self.state.sleepers.load(Ordering::SeqCst) > 0 {
            for thread in threads {
                thread.unpark();
            }
        }
    }

    /// Stop and end the spinners for good.
    pub(crate) fn stop(&self) {
        self.state.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.get().into_iter().flatten() {
            thread.unpark();
        }
    }

    /// How long the spinners have spun, all together.
    pub(crate) fn spun(&self) -> Duration {
        Duration::from_nanos(self.state.spun.load(Ordering::Relaxed))
    }

    /// Spinner threads started (0 before `start`, or where none could be made).
    pub(crate) fn threads(&self) -> usize {
        self.threads.get().map_or(0, Vec::len)
    }
}

impl Drop for BusyPoll {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Lower the calling thread to `SCHED_IDLE`; `false` where that is not possible (then it must not
/// spin: at normal priority it would take CPU from the work it is meant to speed up).
fn lower_to_idle_priority() -> bool {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for SCHED_IDLE.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// How often a spinner enters the kernel (`sched_yield`). A thread woken onto a spinner's CPU
/// may only be marked for a lazy reschedule, which takes effect when the spinner next enters the
/// kernel: spinning in user space alone kept 1 % of round trips waiting a whole window (p99 1.1 ms
/// instead of 0.4). A yield on every turn fixed that but gave back most of the gain; one every
/// 10 µs keeps both (docs/benchmarks.md).
const YIELD_EVERY: u64 = 10_000;

fn spin(state: &State) {
    if !lower_to_idle_priority() {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower a busy-poll thread to SCHED_IDLE; not polling");
        return;
    }
    while !state.stop.load(Ordering::Relaxed) {
        let began = state.now();
        let mut now = began;
        let mut next_yield = began + YIELD_EVERY;
        while state.recent(now) && !state.stop.load(Ordering::Relaxed) {
            if now >= next_yield {
                std::thread::yield_now();
                next_yield = now + YIELD_EVERY;
            } else {
                std::hint::spin_loop();
            }
            now = state.now();
        }
        state.spun.fetch_add(now - began, Ordering::Relaxed);
        state.sleepers.fetch_add(1, Ordering::SeqCst);
        // A touch between the loop's last check and the increment above is seen here.
        if !state.recent(state.now()) && !state.stop.load(Ordering::SeqCst) {
            std::thread::park();
        }
        state.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (bounded) until `f` holds, checking every millisecond.
    fn eventually(limit: Duration, f: impl Fn() -> bool) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        f()
    }

    #[test]
    fn spins_only_for_the_window_after_a_touch_and_stops() {
        let poll = BusyPoll::new(1, Duration::from_millis(20));
        poll.touch();
        assert_eq!(poll.threads(), 0, "nothing starts before start()");
        poll.start();
        assert_eq!(poll.threads(), 1);
        // Parked once the (never touched) window has passed.
        assert!(eventually(Duration::from_secs(5), || poll.state.sleepers.load(Ordering::SeqCst) == 1));
        let before = poll.spun();
        poll.touch();
        // Woken by the touch: it spins about one window, then parks again.
        assert!(eventually(Duration::from_secs(5), || poll.spun() - before >= Duration::from_millis(15)));
        assert!(eventually(Duration::from_secs(5), || poll.state.sleepers.load(Ordering::SeqCst) == 1));
        let after_one = poll.spun() - before;
        assert!(after_one < Duration::from_secs(2), "spun {after_one:?} for a 20 ms window: it did not stop");
        // Quiet: no more spinning.
        let quiet = poll.spun();
        std::thread::sleep(Duration::from_millis(60));
        assert!(poll.spun() - quiet < Duration::from_millis(1), "spun while nothing was touched");
        poll.stop();
        assert!(eventually(Duration::from_secs(5), || poll.state.sleepers.load(Ordering::SeqCst) == 0));
    }

    #[test]
    fn no_cpus_or_no_window_means_no_threads() {
        let off = BusyPoll::new(0, Duration::from_millis(1));
        off.start();
        off.touch();
        assert_eq!(off.threads(), 0);
        let no_window = BusyPoll::new(2, Duration::ZERO);
        no_window.start();
        assert_eq!(no_window.threads(), 0);
    }
}
