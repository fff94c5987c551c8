//! Upper-case keywords folded to lower case without an allocation.

/// Defines [`COMMON_KEYWORDS`] and the lookup of the packed ones by code.
macro_rules! common_keywords {
    ($($k:literal,)*) => {
        /// Keywords applications write in upper case often enough that folding them without
        /// an allocation pays (the folded name of any other identifier is allocated).
        pub(super) const COMMON_KEYWORDS: &[&str] = &[$($k,)*];

        /// The keyword of at most [`PACKED`] bytes whose code (see [`fold_code`]) is `code`:
        /// comparisons with constants, which the compiler makes one switch.
        fn packed_keyword(code: u64) -> Option<&'static str> {
            $(
                if $k.len() <= PACKED && code == const { fold_code($k.as_bytes()) } {
                    return Some($k);
                }
            )*
            None
        }
    };
}

common_keywords! {
    "all",
    "and",
    "as",
    "asc",
    "begin",
    "between",
    "by",
    "case",
    "commit",
    "count",
    "default",
    "delete",
    "desc",
    "distinct",
    "else",
    "end",
    "exists",
    "false",
    "for",
    "from",
    "group",
    "having",
    "in",
    "inner",
    "insert",
    "into",
    "is",
    "isolation",
    "join",
    "left",
    "level",
    "like",
    "limit",
    "not",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "read",
    "release",
    "returning",
    "rollback",
    "savepoint",
    "select",
    "set",
    "show",
    "start",
    "then",
    "transaction",
    "true",
    "union",
    "update",
    "values",
    "when",
    "where",
    "with",
    "write",
}

/// The longest of [`COMMON_KEYWORDS`].
pub(super) const LONGEST_KEYWORD: usize = 11;

/// Keywords up to this long are looked up by their code (see [`fold_code`]); the few longer
/// ones are compared directly.
const PACKED: usize = 8;

/// `raw` (at most [`PACKED`] bytes) folded to lower case and packed into one integer
/// (big-endian). Identifier bytes are never zero, so names of different lengths pack
/// differently.
const fn fold_code(raw: &[u8]) -> u64 {
    let mut code = 0u64;
    let mut i = 0;
    while i < raw.len() {
        code = (code << 8) | raw[i].to_ascii_lowercase() as u64;
        i += 1;
    }
    code
}

/// `raw` folded to lower case, if it is one of [`COMMON_KEYWORDS`]: its code compared with
/// constants (no copy, no byte-string compares) for all but the longest few.
pub(super) fn common_keyword(raw: &[u8]) -> Option<&'static str> {
    if raw.len() > PACKED {
        if raw.len() > LONGEST_KEYWORD {
            return None;
        }
        return COMMON_KEYWORDS
            .iter()
            .copied()
            .find(|k| k.len() == raw.len() && k.as_bytes().eq_ignore_ascii_case(raw));
    }
    packed_keyword(fold_code(raw))
}
