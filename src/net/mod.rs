//! Sockets and TLS: the client and server stream types, and the rustls configurations.

pub mod stream;
pub mod tls;
