//! SPIFFE IDs: parse never panics, and what parses displays back to the same string.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshauthz::identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.to_string(), s);
        let _ = id.istio_workload();
    }
});
