//! The proxy's runtime and its timers.
//!
//! A tokio runtime with a time driver checks its timer wheel every time its thread parks and
//! wakes: two clock readings and a pass over the wheel's shards, each behind its lock. A proxy
//! parks about twice per transaction, and that check cost about 1,000 instructions of the
//! 10,000 pgtenant spent per transaction (`scripts/instructions.sh`), for timers that almost
//! never fire. So the proxy's runtime ([`proxy_runtime`]) has no time driver: its threads park
//! on the sockets alone. Its timers live on a second, single-threaded runtime of their own
//! (the control runtime, on its own thread), whose driver wakes the proxy's task when one
//! fires: a cross-thread wake-up, paid only by the timers that fire.
//!
//! Every timer pgtenant creates goes through this module ([`sleep`], [`timeout`], ...), which
//! creates it on the control runtime when there is one and on the current runtime otherwise
//! (the tests' runtimes, `pgtenant check`, ...). Code of other crates that makes timers itself
//! (the catalog's PostgreSQL client and pool) runs inside [`in_control`]. A test reads the
//! source for any other use of tokio's timers (`tokio::time::sleep` and the like), which
//! would panic on the proxy's runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::time::{Instant, Interval, Sleep, Timeout};

/// The control runtime, once [`proxy_runtime`] started it (once per process).
static CONTROL: OnceLock<Handle> = OnceLock::new();

/// Builds the runtime the proxy runs on: `threads` worker threads (1: a current-thread
/// runtime) with sockets and no time driver, and starts the control runtime that keeps their
/// timers, on a thread of its own that lives as long as the process.
pub fn proxy_runtime(threads: usize) -> std::io::Result<Runtime> {
    control()?;
    let mut builder = if threads <= 1 {
        Builder::new_current_thread()
    } else {
        let mut b = Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_io().build()
}

/// The control runtime's handle, started on first use.
fn control() -> std::io::Result<&'static Handle> {
    if let Some(handle) = CONTROL.get() {
        return Ok(handle);
    }
    let runtime = Builder::new_current_thread().enable_all().build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("pgtenant-timers".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    // Two callers at once: the first handle stays, the other runtime's thread idles.
    Ok(CONTROL.get_or_init(|| handle))
}

/// Runs `make` in the control runtime's context, when there is one.
fn on_control<T>(make: impl FnOnce() -> T) -> T {
    match CONTROL.get() {
        Some(handle) => {
            let _entered = handle.enter();
            make()
        }
        None => make(),
    }
}

/// [`tokio::time::sleep`], kept by the control runtime.
pub fn sleep(duration: Duration) -> Sleep {
    on_control(|| tokio::time::sleep(duration))
}

/// [`tokio::time::sleep_until`], kept by the control runtime.
pub fn sleep_until(deadline: Instant) -> Sleep {
    on_control(|| tokio::time::sleep_until(deadline))
}

/// [`tokio::time::timeout`], its timer kept by the control runtime.
pub fn timeout<F: Future>(duration: Duration, future: F) -> Timeout<F> {
    on_control(|| tokio::time::timeout(duration, future))
}

/// [`tokio::time::timeout_at`], its timer kept by the control runtime.
pub fn timeout_at<F: Future>(deadline: Instant, future: F) -> Timeout<F> {
    on_control(|| tokio::time::timeout_at(deadline, future))
}

/// [`tokio::time::interval`], its timer kept by the control runtime.
pub fn interval(period: Duration) -> Interval {
    on_control(|| tokio::time::interval(period))
}

/// Runs a future of another crate that makes its own timers (or sockets, or tasks) as if it
/// ran on the control runtime: each poll enters the control runtime's context, so what the
/// future creates is registered there, and the control runtime's drivers wake this task.
/// Tasks it spawns run on the control runtime. For the control plane's work (the catalog),
/// never the data path.
pub fn in_control<F: Future>(future: F) -> InControl<F> {
    InControl(Box::pin(future))
}

/// The future of [`in_control`] (boxed: the control plane's, one allocation per call).
pub struct InControl<F>(Pin<Box<F>>);

impl<F: Future> Future for InControl<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let future = self.0.as_mut();
        on_control(|| future.poll(cx))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every timer in the crate is made through this module: one made with tokio's own
    /// functions on the proxy's runtime, which has no time driver, would panic.
    #[test]
    fn no_timer_is_made_outside_this_module() {
        const BANNED: [&str; 7] = [
            "tokio::time::sleep(",
            "tokio::time::sleep_until(",
            "tokio::time::timeout(",
            "tokio::time::timeout_at(",
            "tokio::time::interval(",
            "tokio::time::interval_at(",
            "use tokio::time::{",
        ];
        let mut found = Vec::new();
        let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.ends_with("src/timers.rs")
                {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for (n, line) in text.lines().enumerate() {
                        if BANNED.iter().any(|b| line.contains(b)) {
                            found.push(format!("{}:{}: {line}", path.display(), n + 1));
                        }
                    }
                }
            }
        }
        assert!(found.is_empty(), "use crate::timers:\n{}", found.join("\n"));
    }

    /// The proxy's runtime has no time driver, and the module's timers work on it: they fire,
    /// bound a future, tick, and another crate's own timer runs inside `in_control`.
    #[test]
    fn timers_work_on_the_proxy_runtime() {
        use std::time::Duration;
        for threads in [1, 2] {
            let rt = super::proxy_runtime(threads).unwrap();
            rt.block_on(async {
                let started = std::time::Instant::now();
                super::sleep(Duration::from_millis(20)).await;
                assert!(started.elapsed() >= Duration::from_millis(20));
                super::sleep_until(tokio::time::Instant::now()).await;
                let slow = std::future::pending::<()>();
                assert!(
                    super::timeout(Duration::from_millis(10), slow)
                        .await
                        .is_err()
                );
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                assert_eq!(super::timeout_at(deadline, async { 7 }).await, Ok(7));
                let mut tick = super::interval(Duration::from_millis(5));
                tick.tick().await;
                tick.tick().await;
                // As another crate would: tokio's own timer, made during a poll.
                let foreign = async { tokio::time::sleep(Duration::from_millis(5)).await };
                super::in_control(foreign).await;
                // A task spawned by the proxy runtime's own code has its timers too.
                tokio::spawn(super::sleep(Duration::from_millis(5)))
                    .await
                    .unwrap();
            });
            // Without the module, tokio's own timer has no driver here.
            let bare = rt.block_on(rt.spawn(async {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }));
            assert!(bare.is_err_and(|e| e.is_panic()));
        }
    }
}
