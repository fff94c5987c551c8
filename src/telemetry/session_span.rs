//! The session's tracing span, entered only when something is logged.
//!
//! Every line a session logs carries its span `session{id, peer, tenant}`. The usual way,
//! `Instrument`, enters the span on every poll of the session's future and leaves it after:
//! about 340 instructions per pooled transaction (a thread-local span stack pushed and popped
//! at each of its wake-ups), for lines that a healthy session almost never writes. Here a poll
//! only notes the span's id in a thread-local cell ([`in_session`]), and [`SessionScoped`],
//! the process's subscriber, enters that span for the moment it decides on, records or
//! writes a line (or creates a span, or is asked for the current one). What a line shows is
//! the same: the span is on the stack whenever a layer looks at it, so `--log-format json`'s
//! `spans`, the text format's prefix, `Span::current()` and span directives such as
//! `[session{tenant=acme}]=debug` (which are decided while the span is entered) all see it.
//!
//! Without [`SessionScoped`] installed (a library user's own subscriber), sessions log
//! without their span.

use std::cell::Cell;
use std::future::Future;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::task::{Context, Poll};

use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Span, Subscriber};
use tracing_core::span::Current;

thread_local! {
    /// The span of the session being polled on this thread, if any.
    static SESSION: Cell<Option<NonZeroU64>> = const { Cell::new(None) };
}

pin_project_lite::pin_project! {
    /// A session's future, polled with its span noted (see [`in_session`]).
    pub struct InSession<F> {
        span: Span,
        #[pin]
        inner: F,
    }
}

/// `inner`, whose lines carry `span` once [`SessionScoped`] is the subscriber.
pub fn in_session<F: Future>(span: Span, inner: F) -> InSession<F> {
    InSession { span, inner }
}

impl<F: Future> Future for InSession<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let id = this.span.id().map(|id| id.into_non_zero_u64());
        // Restored however the poll ends, a panic included: the next task polled on this
        // thread must not log as this session.
        let _restore = Restore(SESSION.replace(id));
        this.inner.poll(cx)
    }
}

struct Restore(Option<NonZeroU64>);

impl Drop for Restore {
    fn drop(&mut self) {
        SESSION.set(self.0);
    }
}

/// The process's subscriber: `inner` (the registry and its layers), with the span of the
/// session being polled entered around each call that looks at the current span.
pub struct SessionScoped<S> {
    inner: S,
}

impl<S: Subscriber> SessionScoped<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    /// `f` with the polled session's span entered, when there is one and no other span is
    /// entered. A span entered during the session's poll was, if the session made it, the
    /// session span's child, so its lines already reach the session span through its parent;
    /// and `Instrument` gives a line the same spans: the current one and its parents.
    fn scoped<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        let Some(id) = SESSION.get() else {
            return f(&self.inner);
        };
        if self.inner.current_span().id().is_some() {
            return f(&self.inner);
        }
        let id = Id::from_non_zero_u64(id);
        self.inner.enter(&id);
        let _exit = Exit(&self.inner, &id);
        f(&self.inner)
    }
}

/// Leaves the span entered by [`SessionScoped::scoped`], even if a layer panicked.
struct Exit<'a, S: Subscriber>(&'a S, &'a Id);

impl<S: Subscriber> Drop for Exit<'_, S> {
    fn drop(&mut self) {
        self.0.exit(self.1);
    }
}

impl<S: Subscriber> Subscriber for SessionScoped<S> {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.inner.on_register_dispatch(subscriber);
    }

    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.inner.register_callsite(metadata)
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.scoped(|s| s.enabled(metadata))
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.inner.max_level_hint()
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        // A span created inside a session is the session span's child.
        self.scoped(|s| s.new_span(span))
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        self.inner.record(span, values);
    }

    fn record_follows_from(&self, span: &Id, follows: &Id) {
        self.inner.record_follows_from(span, follows);
    }

    fn event_enabled(&self, event: &Event<'_>) -> bool {
        self.scoped(|s| s.event_enabled(event))
    }

    fn event(&self, event: &Event<'_>) {
        self.scoped(|s| s.event(event));
    }

    fn enter(&self, span: &Id) {
        self.inner.enter(span);
    }

    fn exit(&self, span: &Id) {
        self.inner.exit(span);
    }

    fn clone_span(&self, id: &Id) -> Id {
        self.inner.clone_span(id)
    }

    fn try_close(&self, id: Id) -> bool {
        self.inner.try_close(id)
    }

    fn current_span(&self) -> Current {
        self.scoped(|s| s.current_span())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::task::Waker;

    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;

    use super::*;

    /// A line's message and the names of its spans, innermost first.
    type Line = (String, Vec<String>);

    /// Each event's message and spans.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<Line>>>);

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Lines {
        fn on_event(&self, event: &Event<'_>, ctx: LayerContext<'_, S>) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    if f.name() == "message" {
                        self.0 = format!("{v:?}");
                    }
                }
            }
            let mut message = Message(String::new());
            event.record(&mut message);
            let spans = ctx
                .event_scope(event)
                .map(|scope| scope.map(|s| s.name().to_owned()).collect())
                .unwrap_or_default();
            if let Ok(mut lines) = self.0.lock() {
                lines.push((message.0, spans));
            }
        }
    }

    fn poll_once<F: Future>(f: F) -> Poll<F::Output> {
        let mut f = std::pin::pin!(f);
        f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    fn spans_of(lines: &Lines, message: &str) -> Vec<String> {
        let lines = lines.0.lock().unwrap();
        let line = lines.iter().find(|(m, _)| m == message);
        line.unwrap_or_else(|| panic!("no line {message:?} in {:?}", *lines))
            .1
            .clone()
    }

    #[test]
    fn a_sessions_lines_carry_its_span_and_others_do_not() {
        let lines = Lines::default();
        let subscriber = SessionScoped::new(tracing_subscriber::registry().with(lines.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("session", id = 7u64);
            let inner = tracing::info_span!("inner");
            let polled = poll_once(in_session(span.clone(), async {
                tracing::info!("inside");
                // The span is current for code that asks, and a span made here is its child.
                assert_eq!(tracing::Span::current().id(), span.id());
                let child = tracing::info_span!("child");
                child.in_scope(|| tracing::info!("in a child"));
                // A span made elsewhere and entered here has its own parents, as with
                // `Instrument`.
                inner.in_scope(|| tracing::info!("in another"));
                5
            }));
            assert_eq!(polled, Poll::Ready(5));
            tracing::info!("outside");
            // A panic in a session's poll does not leave its span noted for the next poll.
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                poll_once(in_session(span.clone(), async { panic!("boom") }))
            }));
            assert!(panicked.is_err());
            tracing::info!("after the panic");
            assert!(tracing::Span::current().is_none());
        });
        assert_eq!(spans_of(&lines, "inside"), ["session"]);
        assert_eq!(spans_of(&lines, "in a child"), ["child", "session"]);
        assert_eq!(spans_of(&lines, "in another"), ["inner"]);
        assert!(spans_of(&lines, "outside").is_empty());
        assert!(spans_of(&lines, "after the panic").is_empty());
    }

    #[test]
    fn span_directives_see_the_session_span() {
        let lines = Lines::default();
        let filter = tracing_subscriber::EnvFilter::new("[session{tenant=acme}]=debug,info");
        let subscriber = SessionScoped::new(
            tracing_subscriber::registry()
                .with(filter)
                .with(lines.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            for tenant in ["acme", "globex"] {
                let span = tracing::info_span!("session", tenant);
                let _ = poll_once(in_session(span, async move {
                    tracing::debug!("debug for {tenant}");
                }));
            }
            tracing::debug!("debug outside");
        });
        assert_eq!(spans_of(&lines, "debug for acme"), ["session"]);
        let lines = lines.0.lock().unwrap();
        assert!(
            !lines
                .iter()
                .any(|(m, _)| m == "debug for globex" || m == "debug outside"),
            "{:?}",
            *lines
        );
    }
}
