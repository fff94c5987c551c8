//! Hot-path framing: walks a byte stream of tagged messages (docs 55.7: one type byte, an
//! Int32 length that counts itself, then the body) without copying or decoding bodies.
//!
//! The scanner hands back either a whole message (for the few types the proxy must read, up to
//! a size cap) or a run of bytes to pass through untouched. Pass-through messages are never
//! buffered whole, so a 1 GiB DataRow or CopyData costs only the read buffer; "need more bytes"
//! is `Ok(None)`, never an error.

use thiserror::Error;

use super::MAX_MESSAGE_LEN;

/// A framing failure: the stream cannot be trusted any more.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {len} for message type {tag:?}")]
    InvalidLength { tag: char, len: u32 },
    #[error("message type {tag:?} of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { tag: char, len: usize, limit: usize },
}

/// One step of the scan, describing a prefix of the buffer that was passed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// A whole message to read: `buf[..len]`, type byte and length included.
    Whole { tag: u8, len: usize },
    /// `len` bytes to pass through. `tag` is `Some` when they start a message; `end` is true
    /// when they finish one.
    Pass {
        tag: Option<u8>,
        len: usize,
        end: bool,
    },
}

/// The set of message types the caller wants whole.
#[derive(Clone, Copy)]
pub struct TagSet([bool; 256]);

impl TagSet {
    /// A set of the given message types.
    pub const fn of(tags: &[u8]) -> TagSet {
        let mut set = [false; 256];
        let mut i = 0;
        while i < tags.len() {
            set[tags[i] as usize] = true;
            i += 1;
        }
        TagSet(set)
    }

    /// Whether `tag` is in the set.
    #[inline]
    pub fn contains(&self, tag: u8) -> bool {
        self.0[tag as usize]
    }
}

/// Walks one direction of a connection, message by message.
#[derive(Clone)]
pub struct FrameScanner {
    whole: TagSet,
    max_whole: usize,
    /// Bytes of the current pass-through message not yet handed out.
    remaining: usize,
}

impl FrameScanner {
    /// `whole`: message types returned whole, each at most `max_whole` bytes.
    pub fn new(whole: TagSet, max_whole: usize) -> Self {
        FrameScanner {
            whole,
            max_whole,
            remaining: 0,
        }
    }

    /// True when the scanner sits between two messages.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Describes the next piece at the front of `buf`, or `Ok(None)` when more bytes are
    /// needed. The caller consumes exactly the returned length before calling again.
    #[inline]
    pub fn next(&mut self, buf: &[u8]) -> Result<Option<Piece>, FrameError> {
        if self.remaining > 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            let len = self.remaining.min(buf.len());
            self.remaining -= len;
            return Ok(Some(Piece::Pass {
                tag: None,
                len,
                end: self.remaining == 0,
            }));
        }
        let Some(header) = buf.get(..5) else {
            return Ok(None);
        };
        let tag = header[0];
        let declared = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if declared < 4 {
            return Err(FrameError::InvalidLength {
                tag: tag as char,
                len: declared,
            });
        }
        let total = declared as usize + 1;
        if self.whole.contains(tag) {
            if total > self.max_whole {
                return Err(FrameError::TooLarge {
                    tag: tag as char,
                    len: total,
                    limit: self.max_whole,
                });
            }
            if buf.len() < total {
                return Ok(None);
            }
            return Ok(Some(Piece::Whole { tag, len: total }));
        }
        if declared as usize > MAX_MESSAGE_LEN {
            return Err(FrameError::TooLarge {
                tag: tag as char,
                len: total,
                limit: MAX_MESSAGE_LEN,
            });
        }
        let len = total.min(buf.len());
        self.remaining = total - len;
        Ok(Some(Piece::Pass {
            tag: Some(tag),
            len,
            end: self.remaining == 0,
        }))
    }
}

/// Splits a buffer that holds only whole messages into `(tag, body)` pairs; used on the
/// proxy's own small exchanges (server startup, resets), never on the forwarding path.
pub fn split_whole(mut buf: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8]), FrameError>> {
    std::iter::from_fn(move || {
        let header = buf.get(..5)?;
        let tag = header[0];
        let declared = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if declared < 4 || declared as usize + 1 > buf.len() {
            buf = &[];
            return Some(Err(FrameError::InvalidLength {
                tag: tag as char,
                len: declared,
            }));
        }
        let total = declared as usize + 1;
        let body = &buf[5..total];
        buf = &buf[total..];
        Some(Ok((tag, body)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    const WHOLE: TagSet = TagSet::of(b"ZQ");

    /// Feeds `stream` to a scanner in chunks split at `cuts`, returning the reconstructed
    /// messages as (tag, bytes) in order.
    fn scan_in_chunks(stream: &[u8], cuts: &[usize]) -> Vec<(u8, Vec<u8>, bool)> {
        let mut scanner = FrameScanner::new(WHOLE, 1 << 20);
        let mut pending: Vec<u8> = Vec::new();
        let mut out: Vec<(u8, Vec<u8>, bool)> = Vec::new();
        let mut fed = 0;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        points.sort_unstable();
        points.push(stream.len());
        for p in points {
            if p < fed {
                continue;
            }
            pending.extend_from_slice(&stream[fed..p]);
            fed = p;
            while let Some(piece) = scanner.next(&pending).expect("valid stream") {
                match piece {
                    Piece::Whole { tag, len } => {
                        out.push((tag, pending[..len].to_vec(), true));
                        pending.drain(..len);
                    }
                    Piece::Pass { tag, len, .. } => {
                        match tag {
                            Some(t) => out.push((t, pending[..len].to_vec(), false)),
                            None => out
                                .last_mut()
                                .expect("continuation follows a start")
                                .1
                                .extend_from_slice(&pending[..len]),
                        }
                        pending.drain(..len);
                    }
                }
            }
        }
        assert!(pending.is_empty() || !scanner.at_boundary() || pending.len() < 5);
        out
    }

    #[test]
    fn whole_messages_wait_for_all_their_bytes() {
        let mut s = FrameScanner::new(WHOLE, 1024);
        let z = msg(b'Z', b"I");
        assert_eq!(s.next(&z[..5]).unwrap(), None);
        assert_eq!(
            s.next(&z).unwrap(),
            Some(Piece::Whole { tag: b'Z', len: 6 })
        );
    }

    #[test]
    fn pass_through_messages_stream_in_pieces() {
        let mut s = FrameScanner::new(WHOLE, 1024);
        let d = msg(b'D', &[7u8; 100]);
        assert_eq!(
            s.next(&d[..10]).unwrap(),
            Some(Piece::Pass {
                tag: Some(b'D'),
                len: 10,
                end: false
            })
        );
        assert!(!s.at_boundary());
        assert_eq!(
            s.next(&d[10..]).unwrap(),
            Some(Piece::Pass {
                tag: None,
                len: 95,
                end: true
            })
        );
        assert!(s.at_boundary());
    }

    #[test]
    fn lengths_below_four_are_refused() {
        let mut s = FrameScanner::new(WHOLE, 1024);
        let bad = [b'D', 0, 0, 0, 3];
        assert!(matches!(
            s.next(&bad),
            Err(FrameError::InvalidLength { len: 3, .. })
        ));
    }

    #[test]
    fn oversize_whole_messages_are_refused_before_buffering() {
        let mut s = FrameScanner::new(WHOLE, 64);
        let header = [b'Q', 0, 0, 1, 0];
        assert!(matches!(s.next(&header), Err(FrameError::TooLarge { .. })));
        let huge = [b'd', 0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(s.next(&huge), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn split_whole_reports_truncation() {
        let mut buf = msg(b'S', b"a\0b\0");
        buf.extend_from_slice(&msg(b'Z', b"I"));
        let parts: Vec<_> = split_whole(&buf).collect();
        assert_eq!(parts.len(), 2);
        assert!(split_whole(&buf[..buf.len() - 1]).any(|p| p.is_err()));
    }

    proptest! {
        /// Splitting the byte stream anywhere yields the same messages.
        #[test]
        fn split_anywhere_gives_the_same_frames(
            bodies in proptest::collection::vec((prop::sample::select(b"ZQDdCTS".to_vec()), proptest::collection::vec(any::<u8>(), 0..300)), 1..20),
            cuts in proptest::collection::vec(any::<usize>(), 0..30),
        ) {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for (tag, body) in &bodies {
                let m = msg(*tag, body);
                expected.push((*tag, m.clone(), WHOLE.contains(*tag)));
                stream.extend_from_slice(&m);
            }
            let got = scan_in_chunks(&stream, &cuts);
            prop_assert_eq!(got, expected);
        }
    }
}
