//! `set_config(name, value, is_local)` calls: what the text shows of their arguments, the
//! checks the guard runs on them (the rules of `SET`, see `settings.rs`), and the checks of
//! calls whose arguments are parameters, run when a Bind supplies the values.
//!
//! A parameter is accepted only where its value alone decides what the server sees: the
//! statement is a plain query (its `$n` are the Bind's, not a PREPARE's or a function's),
//! the parameter appears nowhere else in it (another use could give it a type whose cast to
//! text changes the value, as `char(n)` trims), and its declared type, if any, is text or
//! varchar (boolean for `is_local`).

use super::lexer::{Kind, Token};
use super::settings::Value;
use super::types::{Arg, Effect, Policy, Scope, SetConfigCall, Verdict};

/// The value a Bind gives one parameter: `None` is NULL.
pub struct Bound<'a> {
    pub value: Option<&'a [u8]>,
    pub binary: bool,
}

/// Declared parameter types a bound name or value may have: unspecified, text, varchar.
const TEXT_TYPES: &[u32] = &[0, 25, 1043];
/// Declared types a bound `is_local` may have: unspecified, boolean.
const BOOL_TYPES: &[u32] = &[0, 16];
/// Statements whose `$n` are the Bind's parameters.
const BOUND_STATEMENTS: &[&str] = &[
    "select", "with", "values", "insert", "update", "delete", "merge",
];

impl SetConfigCall {
    /// The parameter numbers the call takes, with the declared types each may have.
    fn params(&self) -> impl Iterator<Item = (usize, &'static [u32])> + '_ {
        [
            (&self.name, TEXT_TYPES),
            (&self.value, TEXT_TYPES),
            (&self.local, BOOL_TYPES),
        ]
        .into_iter()
        .filter_map(|(arg, types)| match arg {
            Arg::Param(n) => Some((*n, types)),
            _ => None,
        })
    }

    /// True when a Bind must supply some of the arguments.
    pub fn takes_params(&self) -> bool {
        self.params().next().is_some()
    }

    /// Checks the declared parameter types of the Parse (`types`, one OID per parameter,
    /// 0 where unspecified) against what the call needs.
    pub fn check_types(&self, types: &[u32]) -> Result<(), Verdict> {
        for (n, allowed) in self.params() {
            let declared = types.get(n - 1).copied().unwrap_or(0);
            if !allowed.contains(&declared) {
                return Err(Verdict::refuse(format!(
                    "set_config() parameter ${n} must be declared as text{} or left unspecified",
                    if allowed == BOOL_TYPES {
                        " boolean"
                    } else {
                        ""
                    }
                )));
            }
        }
        Ok(())
    }
}

/// The `set_config` call at `tokens[at]`, when it is a call with three arguments.
pub(super) fn parse(sql: &[u8], tokens: &[Token<'_>], at: usize) -> Option<SetConfigCall> {
    if !tokens.get(at + 1)?.is_punct(b'(') {
        return None;
    }
    let mut args = Vec::new();
    let mut depth = 0usize;
    let mut start = at + 2;
    for (i, t) in tokens.iter().enumerate().skip(at + 1) {
        if t.is_punct(b'(') || t.is_punct(b'[') {
            depth += 1;
        } else if t.is_punct(b')') || t.is_punct(b']') {
            depth -= 1;
            if depth == 0 {
                args.push(arg(sql, &tokens[start..i]));
                break;
            }
        } else if depth == 1 && t.is_punct(b',') {
            args.push(arg(sql, &tokens[start..i]));
            start = i + 1;
        }
    }
    match <[Arg; 3]>::try_from(args) {
        Ok([name, value, local]) => Some(SetConfigCall { name, value, local }),
        Err(_) => None,
    }
}

fn arg(sql: &[u8], tokens: &[Token<'_>]) -> Arg {
    let param = |t: &Token<'_>| {
        let digits = sql.get(t.start + 1..t.end)?;
        std::str::from_utf8(digits).ok()?.parse::<usize>().ok()
    };
    match tokens {
        [t] => match &t.kind {
            Kind::Str { value: Some(v) } => Arg::Text(v.to_string()),
            Kind::Param => param(t).filter(|n| *n > 0).map_or(Arg::Other, Arg::Param),
            _ if t.is_keyword("null") => Arg::Null,
            _ if t.is_keyword("true") => Arg::Bool(true),
            _ if t.is_keyword("false") => Arg::Bool(false),
            _ => Arg::Other,
        },
        // `$n::text`, `$n::varchar`: the same value.
        [p, cast, ty]
            if p.kind == Kind::Param
                && cast.kind == Kind::Op(b"::")
                && (ty.is_keyword("text") || ty.is_keyword("varchar")) =>
        {
            param(p).filter(|n| *n > 0).map_or(Arg::Other, Arg::Param)
        }
        _ => Arg::Other,
    }
}

/// PostgreSQL's boolean input (`parse_bool`): `t`, `true`, `yes`, `on`, `1` and their
/// opposites, any case, unique prefixes, surrounding spaces.
pub fn parse_bool(text: &str) -> Option<bool> {
    let v = text.trim().to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    if prefix_of("true", 1) || prefix_of("yes", 1) || v == "1" || prefix_of("on", 2) {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || v == "0" || prefix_of("off", 2) {
        Some(false)
    } else {
        None
    }
}

impl Policy {
    /// Checks the `set_config` call at `tokens[at]` as far as the text shows it; a call
    /// taking parameters is added to `bound` for the Bind.
    pub(super) fn check_set_config(
        &self,
        sql: &[u8],
        tokens: &[Token<'_>],
        at: usize,
        tenant_rules: bool,
        bound: &mut Vec<SetConfigCall>,
    ) -> Result<(), Verdict> {
        let refuse = || {
            Verdict::refuse(
                "set_config() is allowed only as a call with three arguments, the first a string \
                 literal or a query parameter",
            )
        };
        let call = parse(sql, tokens, at).ok_or_else(refuse)?;
        let name = match &call.name {
            Arg::Text(name) => Some(name.to_ascii_lowercase()),
            Arg::Param(_) => None,
            _ => return Err(refuse()),
        };
        if let Some(name) = &name {
            self.check_setting_name(name, tenant_rules)?;
        }
        if !call.takes_params() {
            if let Some(name) = &name {
                self.check_setting_value(name, &Value::of_arg(&call.value))?;
            }
            return Ok(());
        }
        let statement = tokens.first().and_then(Token::ident).unwrap_or("");
        if !BOUND_STATEMENTS.contains(&statement) || tokens.iter().any(|t| t.is_punct(b';')) {
            return Err(Verdict::refuse(
                "set_config() takes query parameters only in a single SELECT, INSERT, UPDATE, \
                 DELETE or MERGE",
            ));
        }
        for (n, _) in call.params() {
            if param_uses(sql, tokens, n) != uses_in_calls(sql, tokens, n) {
                return Err(Verdict::refuse(format!(
                    "a parameter of set_config() (${n}) may not be used elsewhere in the statement"
                )));
            }
        }
        bound.push(call);
        Ok(())
    }

    /// Checks a call of [`Policy::check_set_config`] with the values a Bind gives
    /// (`param(n)`; literals need none). With `replay` (transaction pooling) returns what the
    /// call changes in the session, and refuses a session-level call whose value cannot be
    /// known; nothing when `is_local` is true or the name is NULL (the server refuses that).
    pub fn check_bound_set_config<'a>(
        &self,
        call: &SetConfigCall,
        replay: bool,
        param: impl Fn(usize) -> Option<Bound<'a>>,
    ) -> Result<Option<Effect>, Verdict> {
        let unknown = || {
            Verdict::refuse(if replay {
                "this form of set_config() cannot follow the client across pooled \
                 transactions; give the name and value as string literals or query parameters, \
                 and is_local as true or false"
            } else {
                "set_config() needs its name as a string literal or a query parameter"
            })
        };
        // Some(None) is NULL; None is a value the guard cannot know.
        let text = |arg: &Arg| -> Result<Option<Option<String>>, Verdict> {
            Ok(match arg {
                Arg::Text(v) => Some(Some(v.clone())),
                Arg::Null => Some(None),
                Arg::Param(n) => match param(*n) {
                    None => None,
                    Some(Bound { value: None, .. }) => Some(None),
                    Some(Bound { value: Some(v), .. }) => {
                        let text = std::str::from_utf8(v)
                            .ok()
                            .filter(|s| !s.contains('\0'))
                            .ok_or_else(|| {
                                Verdict::refuse(format!(
                                    "set_config() parameter ${n} must be UTF-8 text through pgtenant"
                                ))
                            })?;
                        Some(Some(text.to_owned()))
                    }
                },
                Arg::Bool(_) | Arg::Other => None,
            })
        };
        let name = match text(&call.name)? {
            Some(Some(name)) => name,
            Some(None) => return Ok(None),
            None => return Err(unknown()),
        };
        if !name.is_ascii() {
            return Err(Verdict::refuse(
                "set_config() setting names must be ASCII through pgtenant",
            ));
        }
        let name = name.to_ascii_lowercase();
        self.check_setting_name(&name, self.scope == Scope::Tenant)?;
        let value = text(&call.value)?;
        let checked = match &value {
            Some(Some(v)) => Value::Text(v.trim().to_ascii_lowercase()),
            Some(None) => Value::Default,
            None => Value::Unknown,
        };
        self.check_setting_value(&name, &checked)?;
        if !replay {
            return Ok(None);
        }
        let local = match &call.local {
            Arg::Bool(b) => Some(*b),
            Arg::Null => Some(false),
            Arg::Text(v) => parse_bool(v),
            Arg::Param(n) => match param(*n) {
                Some(Bound { value: None, .. }) => Some(false),
                Some(Bound {
                    value: Some([b]),
                    binary: true,
                }) => Some(*b != 0),
                Some(Bound {
                    value: Some(v),
                    binary: false,
                }) => std::str::from_utf8(v).ok().and_then(parse_bool),
                Some(Bound { binary: true, .. }) | None => None,
            },
            Arg::Other => None,
        };
        match (local, value) {
            (Some(true), _) => Ok(None),
            (Some(false), Some(Some(value))) => Ok(Some(Effect::Set {
                key: name.clone(),
                pairs: vec![(name, value)],
            })),
            (Some(false), Some(None)) => Ok(Some(Effect::Reset(name))),
            _ => Err(unknown()),
        }
    }
}

/// How many times `$n` appears in `tokens`.
fn param_uses(sql: &[u8], tokens: &[Token<'_>], n: usize) -> usize {
    let digits = n.to_string();
    tokens
        .iter()
        .filter(|t| t.kind == Kind::Param && sql.get(t.start + 1..t.end) == Some(digits.as_bytes()))
        .count()
}

/// How many times `$n` is an argument of a `set_config` call in `tokens`.
fn uses_in_calls(sql: &[u8], tokens: &[Token<'_>], n: usize) -> usize {
    tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| t.ident() == Some("set_config"))
        .filter_map(|(i, _)| parse(sql, tokens, i))
        .map(|c| c.params().filter(|(m, _)| *m == n).count())
        .sum()
}
