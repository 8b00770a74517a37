//! Request targets: both ambiguity modes; never panics; normalize never yields dot or empty
//! middle segments.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshauthz::path::{Mode, parse_with};

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else { return };
    let _ = parse_with(target, Mode::Reject);
    if let Ok(p) = parse_with(target, Mode::Normalize) {
        let last = p.segments.len().saturating_sub(1);
        for (i, s) in p.segments.iter().enumerate() {
            assert!(s != "." && s != "..", "{target:?} -> {:?}", p.segments);
            assert!(!s.is_empty() || i == last, "{target:?} -> {:?}", p.segments);
        }
    }
});
