//! A signal future that is polled again only after it woke its task.
//!
//! A session's select polls its end signals (shutdown, drain, the tenant leaving) at every
//! wake-up, twice or more per transaction, and polling a `CancellationToken`'s future takes
//! the token's lock and the notifier's. Wrapped in [`Woken`], the inner future is polled once
//! to register, and then only when it called its waker; every other poll is an atomic load
//! and a waker comparison.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// What the inner future wakes: it records the wake and wakes the session's task.
struct Flag {
    woke: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// `inner`, polled only when it has woken since its last poll (and on the first poll).
pub(super) struct Woken<'a, F> {
    inner: Pin<&'a mut F>,
    flag: Arc<Flag>,
    waker: Waker,
    /// The task waker held by `flag.task`, until a wake takes it.
    registered: Option<Waker>,
}

impl<'a, F: Future> Woken<'a, F> {
    pub(super) fn new(inner: Pin<&'a mut F>) -> Self {
        let flag = Arc::new(Flag {
            // Polled on the first poll, to register.
            woke: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Woken {
            inner,
            waker: Waker::from(Arc::clone(&flag)),
            flag,
            registered: None,
        }
    }
}

impl<F: Future> Future for Woken<'_, F> {
    type Output = F::Output;

    // Inlined: polled at every wake-up of a session (several times per transaction), and
    // its usual answer is a load and a compare.
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let same = this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        // Not woken, and the same task waker still registered (only a wake, which sets the
        // flag first, takes it away): nothing to do, not even an atomic write.
        if same && !this.flag.woke.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        // Registered before the flag is read: a wake after the read wakes this task.
        this.flag.task.register(cx.waker());
        if !same {
            this.registered = Some(cx.waker().clone());
        }
        if !this.flag.woke.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut inner_cx = Context::from_waker(&this.waker);
        this.inner.as_mut().poll(&mut inner_cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn fires_when_cancelled_before_or_after_the_first_poll() {
        let before = CancellationToken::new();
        before.cancel();
        let fut = std::pin::pin!(before.cancelled());
        Woken::new(fut).await;

        let after = CancellationToken::new();
        let fut = std::pin::pin!(after.cancelled());
        let mut w = Woken::new(fut);
        for _ in 0..3 {
            assert!(poll_once(&mut w).is_pending());
        }
        let remote = after.clone();
        tokio::spawn(async move { remote.cancel() });
        crate::timers::timeout(std::time::Duration::from_secs(30), w)
            .await
            .expect("the cancel woke the task");
    }

    #[test]
    fn a_child_token_cancelled_through_its_parent_fires() {
        let parent = CancellationToken::new();
        let child = parent.child_token();
        let fut = std::pin::pin!(child.cancelled());
        let mut w = Woken::new(fut);
        assert!(poll_once(&mut w).is_pending());
        assert!(poll_once(&mut w).is_pending());
        parent.cancel();
        assert!(poll_once(&mut w).is_ready());
    }

    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_task_waker_polled_last_is_the_one_woken() {
        let token = CancellationToken::new();
        let fut = std::pin::pin!(token.cancelled());
        let mut w = Woken::new(fut);
        let (a, b) = (
            Arc::new(Count(Default::default())),
            Arc::new(Count(Default::default())),
        );
        let (wa, wb) = (Waker::from(Arc::clone(&a)), Waker::from(Arc::clone(&b)));
        assert!(
            Pin::new(&mut w)
                .poll(&mut Context::from_waker(&wa))
                .is_pending()
        );
        assert!(
            Pin::new(&mut w)
                .poll(&mut Context::from_waker(&wb))
                .is_pending()
        );
        assert!(
            Pin::new(&mut w)
                .poll(&mut Context::from_waker(&wb))
                .is_pending()
        );
        token.cancel();
        assert_eq!(
            b.0.load(Ordering::SeqCst),
            1,
            "the last task waker was woken"
        );
        assert_eq!(a.0.load(Ordering::SeqCst), 0);
        assert!(
            Pin::new(&mut w)
                .poll(&mut Context::from_waker(&wb))
                .is_ready()
        );
    }
}
