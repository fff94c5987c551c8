//! Upper-case keywords folded to lower case without an allocation.

/// Keywords applications write in upper case often enough that folding them without an
/// allocation pays (the folded name of any other identifier is allocated).
pub(super) const COMMON_KEYWORDS: &[&str] = &[
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
];

/// The longest of [`COMMON_KEYWORDS`].
pub(super) const LONGEST_KEYWORD: usize = 11;

/// `raw` folded to lower case and packed into one integer (big-endian; at most 16 bytes).
/// Identifier bytes are never zero, so names of different lengths pack differently.
const fn fold_code(raw: &[u8]) -> u128 {
    let mut code = 0u128;
    let mut i = 0;
    while i < raw.len() {
        code = (code << 8) | raw[i].to_ascii_lowercase() as u128;
        i += 1;
    }
    code
}

/// [`COMMON_KEYWORDS`]' codes (see [`fold_code`]) with their index, sorted by code.
pub(super) const KEYWORD_CODES: [(u128, usize); COMMON_KEYWORDS.len()] = {
    let mut codes = [(0u128, 0usize); COMMON_KEYWORDS.len()];
    let mut i = 0;
    while i < codes.len() {
        codes[i] = (fold_code(COMMON_KEYWORDS[i].as_bytes()), i);
        // Insertion sort, at compile time.
        let mut j = i;
        while j > 0 && codes[j - 1].0 > codes[j].0 {
            let t = codes[j];
            codes[j] = codes[j - 1];
            codes[j - 1] = t;
            j -= 1;
        }
        i += 1;
    }
    codes
};

/// `raw` folded to lower case, if it is one of [`COMMON_KEYWORDS`]: a binary search over
/// integers (no copy, no byte-string compares).
pub(super) fn common_keyword(raw: &[u8]) -> Option<&'static str> {
    if raw.len() > LONGEST_KEYWORD {
        return None;
    }
    let code = fold_code(raw);
    KEYWORD_CODES
        .binary_search_by_key(&code, |&(c, _)| c)
        .ok()
        .map(|i| COMMON_KEYWORDS[KEYWORD_CODES[i].1])
}
