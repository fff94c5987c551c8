//! Buffers of sessions between transactions, kept per thread for the next transaction that
//! needs one: an idle session holds no buffer, and a busy one takes a used buffer instead of
//! allocating. Bounded, so a burst does not stay resident.

use super::READ_CHUNK;
use bytes::BytesMut;
use std::cell::RefCell;

/// Buffers kept per thread, at most.
const KEEP: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Gives each buffer without one (no capacity) a spare, in one visit to the spares.
pub(super) fn fill<const N: usize>(bufs: [&mut BytesMut; N]) {
    if bufs.iter().all(|b| b.capacity() > 0) {
        return;
    }
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        for buf in bufs {
            if buf.capacity() == 0 {
                *buf = s
                    .pop()
                    .unwrap_or_else(|| BytesMut::with_capacity(READ_CHUNK));
            }
        }
    });
}

/// Keeps each empty buffer for another session (or frees it), leaving none in its place,
/// in one visit to the spares.
pub(super) fn give_empty<const N: usize>(bufs: [&mut BytesMut; N]) {
    if !bufs.iter().any(|b| b.is_empty() && b.capacity() > 0) {
        return;
    }
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        for buf in bufs {
            if buf.is_empty() && buf.capacity() > 0 {
                let buf = std::mem::take(buf);
                if buf.capacity() >= READ_CHUNK / 4 && s.len() < KEEP {
                    s.push(buf);
                }
            }
        }
    });
}
