//! x-forwarded-client-cert: never panics, bounded by the header cap.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshauthz::identity::xfcc;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(elements) = xfcc::parse(s) {
        assert!(elements.iter().map(|e| e.pairs.len()).sum::<usize>() <= s.len());
    }
    let _ = xfcc::client_uri(s);
});
