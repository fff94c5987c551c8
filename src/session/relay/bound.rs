//! `set_config` calls whose arguments are query parameters (`SELECT set_config($1, $2,
//! false)`, as psycopg and others send): the guard checks the text at Parse
//! ([`crate::tenant::guard::SetConfigCall`]), the relay keeps the calls per statement and
//! checks them again with the values each Bind gives. A Bind that fails the check never
//! reaches the server; one that passes records the setting for transaction pooling.

use std::collections::HashMap;

use bytes::BytesMut;

use super::{Relay, replace_statement_name};
use crate::error::{ClientError, sqlstate};
use crate::protocol::take_cstr;
use crate::tenant::guard::{Bound, SetConfigCall, Verdict};

/// Statements with such calls a session may hold at once.
const MAX_STATEMENTS: usize = 10_000;

/// The client's statements (by client name, the unnamed one as empty) that call
/// `set_config` with parameters. An entry leaves only when the client closes the statement
/// or replaces the unnamed one: a Parse that fails because the name exists must not take
/// the checks off the statement that still runs.
#[derive(Debug, Default)]
pub(super) struct BoundChecks(HashMap<Vec<u8>, Vec<SetConfigCall>>);

impl BoundChecks {
    /// The unnamed statement is gone (an unnamed Parse or a simple Query).
    pub(super) fn unnamed_gone(&mut self) {
        if !self.0.is_empty() {
            self.0.remove(&b""[..]);
        }
    }

    /// The client closed statement `name`.
    pub(super) fn closed(&mut self, name: &[u8]) {
        if !self.0.is_empty() {
            self.0.remove(name);
        }
    }
}

/// The declared parameter types of a Parse (after its text): one OID per parameter.
fn declared_types(params: &[u8]) -> Option<Vec<u32>> {
    let (count, mut rest) = params.split_first_chunk::<2>()?;
    let count = u16::from_be_bytes(*count);
    let mut types = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let (oid, tail) = rest.split_first_chunk::<4>()?;
        types.push(u32::from_be_bytes(*oid));
        rest = tail;
    }
    Some(types)
}

/// The parameter formats and values of a Bind (after the statement name).
struct BindParams<'a> {
    formats: Vec<u16>,
    values: Vec<Option<&'a [u8]>>,
}

impl<'a> BindParams<'a> {
    fn read(mut rest: &'a [u8]) -> Option<Self> {
        let u16_at = |rest: &mut &'a [u8]| -> Option<u16> {
            let (v, tail) = rest.split_first_chunk::<2>()?;
            *rest = tail;
            Some(u16::from_be_bytes(*v))
        };
        let nformats = u16_at(&mut rest)?;
        let formats = (0..nformats)
            .map(|_| u16_at(&mut rest))
            .collect::<Option<Vec<_>>>()?;
        let nvalues = u16_at(&mut rest)?;
        let mut values = Vec::with_capacity(usize::from(nvalues));
        for _ in 0..nvalues {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let len = i32::from_be_bytes(*len);
            rest = tail;
            if len < 0 {
                values.push(None);
            } else {
                let len = usize::try_from(len).ok()?;
                values.push(Some(rest.get(..len)?));
                rest = &rest[len..];
            }
        }
        Some(BindParams { formats, values })
    }

    /// Parameter `n` (1-based).
    fn get(&self, n: usize) -> Option<Bound<'a>> {
        let value = *self.values.get(n.checked_sub(1)?)?;
        let format = match self.formats.as_slice() {
            [] => 0,
            [one] => *one,
            all => *all.get(n - 1)?,
        };
        Some(Bound {
            value,
            binary: format == 1,
        })
    }
}

impl Relay {
    /// A Parse the guard allowed whose text calls `set_config` with parameters: the
    /// declared types must fit (see the guard), and the calls are kept for its Binds.
    pub(super) fn keep_bound_settings(
        &mut self,
        name: &[u8],
        params: &[u8],
        calls: Vec<SetConfigCall>,
    ) -> Result<(), Verdict> {
        let types = declared_types(params).unwrap_or_default();
        for call in &calls {
            call.check_types(&types)?;
        }
        let checks = &mut self.bound_checks.0;
        if checks.len() >= MAX_STATEMENTS && !checks.contains_key(name) {
            return Err(Verdict::refuse_as(
                sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
                format!(
                    "too many prepared statements calling set_config() with parameters \
                     (limit {MAX_STATEMENTS}); close some first"
                ),
            ));
        }
        checks.insert(name.to_vec(), calls);
        Ok(())
    }

    /// SQL `EXECUTE` of one of these statements would run its `set_config` with values no
    /// Bind gave (session mode: Parse and SQL names are one namespace on the server; with
    /// transaction pooling such an EXECUTE already fails): refused.
    pub(super) fn execute_of_bound(&self, text: &[u8]) -> Option<Verdict> {
        if self.bound_checks.0.is_empty() {
            return None;
        }
        let names = crate::tenant::guard::executed_names(text, self.standard_conforming);
        let name = names
            .iter()
            .find(|n| self.bound_checks.0.contains_key(n.as_bytes()))?;
        Some(Verdict::refuse(format!(
            "prepared statement \"{name}\" calls set_config() with parameters: run it with \
             Bind, not EXECUTE"
        )))
    }

    /// Checks a Bind of a statement that calls `set_config` with parameters. Returns the
    /// Bind to send instead when it is refused (one naming no statement: the server's error
    /// is replaced by pgtenant's); with transaction pooling, queues what the calls change.
    pub(super) fn check_bind(&mut self, body: &[u8]) -> Option<BytesMut> {
        if self.bound_checks.0.is_empty() {
            return None;
        }
        let (portal, rest) = take_cstr(body)?;
        let (name, params) = take_cstr(rest)?;
        let calls = self.bound_checks.0.get(name)?;
        let replay = self.pooled();
        let verdict = match BindParams::read(params) {
            None => Err(Verdict::refuse("malformed Bind message")),
            Some(bound) => calls
                .iter()
                .map(|call| {
                    self.rules
                        .policy
                        .check_bound_set_config(call, replay, |n| bound.get(n))
                })
                .collect::<Result<Vec<_>, _>>(),
        };
        // Queued with this batch's earlier effects, within the session's bounds.
        let verdict = verdict.and_then(|effects| {
            self.queue_effects(effects.into_iter().flatten().collect())
                .map_err(|why| Verdict::refuse_as(sqlstate::CONFIGURATION_LIMIT_EXCEEDED, why))
        });
        match verdict {
            Ok(()) => None,
            Err(v) => {
                let r = v.refusal.unwrap_or_else(|| {
                    Box::new(crate::tenant::guard::Refusal {
                        sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
                        message: "set_config() refused".into(),
                        position: None,
                    })
                });
                Some(self.refuse_bind(
                    ClientError::error(r.sqlstate, r.message).with_position(r.position),
                    &body[..portal.len() + 1],
                    params,
                ))
            }
        }
    }

    /// Refuses a Bind with `error`: the Bind to send instead names no statement, so the
    /// server fails it and the client gets `error` in place of the server's.
    /// `prefix`: the Bind's portal name with its NUL.
    pub(super) fn refuse_bind(
        &mut self,
        error: ClientError,
        prefix: &[u8],
        params: &[u8],
    ) -> BytesMut {
        self.counters.refused += 1;
        self.refuse(self.next_epoch, error);
        replace_statement_name(crate::protocol::tag::BIND, prefix, params)
    }
}
