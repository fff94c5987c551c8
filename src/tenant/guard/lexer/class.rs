//! Byte classes of SQL text, as PostgreSQL's scanner (scan.l) defines them: one table load
//! per byte (the operator class was a search of a 17-byte list).

const SPACE: u8 = 1;
const IDENT_START: u8 = 2;
const DIGIT: u8 = 4;
const DOLLAR: u8 = 8;
const OP: u8 = 16;
/// ASCII upper case (also `IDENT_START`).
const UPPER: u8 = 32;

static OF: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut c = 0;
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c | 0x0b) {
            c |= SPACE;
        }
        if b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 {
            c |= IDENT_START;
        }
        if b.is_ascii_uppercase() {
            c |= UPPER;
        }
        if b.is_ascii_digit() {
            c |= DIGIT;
        }
        if b == b'$' {
            c |= DOLLAR;
        }
        if matches!(
            b,
            b'+' | b'-'
                | b'*'
                | b'/'
                | b'<'
                | b'>'
                | b'='
                | b'~'
                | b'!'
                | b'@'
                | b'#'
                | b'%'
                | b'^'
                | b'&'
                | b'|'
                | b'`'
                | b'?'
        ) {
            c |= OP;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn in_class(b: u8, classes: u8) -> bool {
    OF[usize::from(b)] & classes != 0
}

pub(super) fn is_ident_start(b: u8) -> bool {
    in_class(b, IDENT_START)
}

pub(super) fn is_ident_cont(b: u8) -> bool {
    in_class(b, IDENT_START | DIGIT | DOLLAR)
}

/// The length of the identifier `text` starts with (its first byte already known to start
/// one), and whether it holds an ASCII upper-case letter: one table load per byte.
#[inline]
pub(super) fn ident_scan(text: &[u8]) -> (usize, bool) {
    let mut upper = 0;
    for (i, &b) in text.iter().enumerate() {
        let c = OF[usize::from(b)];
        if c & (IDENT_START | DIGIT | DOLLAR) == 0 {
            return (i, upper != 0);
        }
        upper |= c & UPPER;
    }
    (text.len(), upper != 0)
}

pub(super) fn is_dollar_tag_cont(b: u8) -> bool {
    in_class(b, IDENT_START | DIGIT)
}

pub(super) fn is_op_char(b: u8) -> bool {
    in_class(b, OP)
}

pub(super) fn is_space(b: u8) -> bool {
    in_class(b, SPACE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table against the classes as scan.l writes them, for every byte.
    #[test]
    fn every_byte_is_in_the_classes_scan_l_gives_it() {
        for b in 0..=255u8 {
            let start = b.is_ascii_alphabetic() || b == b'_' || b >= 0x80;
            assert_eq!(is_ident_start(b), start, "{b:#x}");
            assert_eq!(
                is_ident_cont(b),
                start || b.is_ascii_digit() || b == b'$',
                "{b:#x}"
            );
            assert_eq!(is_dollar_tag_cont(b), start || b.is_ascii_digit(), "{b:#x}");
            let cont = is_ident_cont(b);
            let (len, upper) = ident_scan(&[b'a', b, b'-']);
            assert_eq!(len, if cont { 2 } else { 1 }, "{b:#x}");
            assert_eq!(upper, cont && b.is_ascii_uppercase(), "{b:#x}");
            assert_eq!(is_op_char(b), b"+-*/<>=~!@#%^&|`?".contains(&b), "{b:#x}");
            assert_eq!(
                is_space(b),
                [b' ', b'\t', b'\n', b'\r', 0x0c, 0x0b].contains(&b),
                "{b:#x}"
            );
        }
    }
}
