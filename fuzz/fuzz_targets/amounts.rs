//! Amounts: decimal text in every unit the protocols use, and JSON numbers.
#![no_main]
use adapters::Micros;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for exponent in 0..=6 {
            if let Ok(micros) = Micros::from_decimal_str(text, exponent) {
                assert!(micros <= Micros::MAX);
            }
        }
    }
    if let Ok(number) = serde_json::from_slice::<serde_json::Number>(data) {
        if let Ok(micros) = Micros::from_json_number(&number) {
            assert!(micros <= Micros::MAX);
        }
    }
});
