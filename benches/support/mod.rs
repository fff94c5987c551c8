//! What the benchmarks share.

use bytes::BytesMut;
use pgtenant::protocol::encode;

/// What PostgreSQL sends back for pgbench's `-S` query: RowDescription, DataRow,
/// CommandComplete, ReadyForQuery (idle).
pub fn pgbench_select_reply(out: &mut BytesMut) {
    encode::raw(
        b'T',
        b"\0\x01abalance\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        out,
    );
    encode::raw(b'D', b"\0\x01\0\0\0\x041234", out);
    encode::raw(b'C', b"SELECT 1\0", out);
    encode::raw(b'Z', b"I", out);
}
