//! Path normalization on arbitrary input: no panic, and the result never
//! keeps a dot segment that could smuggle a path past a prefix rule.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshward_config::PathNormalization;
use meshward_policy::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for mode in [PathNormalization::Base, PathNormalization::MergeSlashes, PathNormalization::DecodeAndMergeSlashes] {
        if let Ok(p) = normalize_path(text, mode) {
            if p.starts_with('/') {
                assert!(!p.contains("/../") && !p.ends_with("/.."), "{text:?} -> {p:?}");
            }
        }
    }
});
