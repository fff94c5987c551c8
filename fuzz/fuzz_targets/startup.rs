//! Opening packets and the decoders applied to untrusted message bodies: no panic, and a
//! decoded packet never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtenant::protocol::{client_msgs, server_msgs, startup};
use pgtenant::tenant::params::{ClientSettings, split_options};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((packet, used))) = startup::parse_initial(data) {
        assert!(used <= data.len());
        if let startup::InitialPacket::Startup(m) = packet {
            let _ = ClientSettings::from_startup(&m.params);
            let _ = m.protocol_options();
        }
    }
    let _ = client_msgs::sasl_initial_response(data);
    let _ = client_msgs::query_text(data);
    let _ = client_msgs::parse_text(data);
    let _ = server_msgs::auth_request(data);
    let _ = server_msgs::ready_for_query(data);
    let _ = server_msgs::parameter_status(data);
    let _ = server_msgs::backend_key_data(data);
    let _ = server_msgs::error_fields(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = split_options(text);
    }
});
