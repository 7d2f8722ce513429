//! The wire protocol's JSON types: what the middleware decodes from the key service
//! (verify answers, event data, usage answers, errors) and the verify request that
//! carries a key or its digest.
//!
//! Invariants, for any bytes:
//! - a message that decodes encodes to JSON that decodes to an equal message, and that
//!   JSON is a fixed point;
//! - a verify request never shows its key in `Debug`, nor in the error of a request
//!   that does not decode.
#![no_main]

use keygate::wire::{Alert, ErrorBody, Heartbeat, KeyChanged, ResetData, UsageAccepted, VerifyAnswer, VerifyRequest};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(json: &[u8]) {
    let Ok(message) = serde_json::from_slice::<T>(json) else { return };
    let written = serde_json::to_string(&message).expect("a decoded message encodes");
    let again: T = serde_json::from_str(&written).unwrap_or_else(|e| panic!("{written} does not decode: {e}"));
    assert_eq!(again, message, "{written}");
    assert_eq!(serde_json::to_string(&again).unwrap(), written);
}

fn verify_request(json: &[u8]) {
    // The key the input carries, if it is a JSON object with a string `key`, and the
    // object's field names (an error may name those).
    let value = serde_json::from_slice::<serde_json::Value>(json).ok();
    let key = value.as_ref().and_then(|v| v.get("key")?.as_str().map(str::to_owned));
    let names: Vec<String> =
        value.as_ref().and_then(|v| v.as_object()).map_or(Vec::new(), |o| o.keys().cloned().collect());
    match serde_json::from_slice::<VerifyRequest>(json) {
        Ok(request) => {
            let written = serde_json::to_string(&request).unwrap();
            let again: VerifyRequest = serde_json::from_str(&written).unwrap();
            assert!(again.digest() == request.digest());
            assert_eq!(serde_json::to_string(&again).unwrap(), written);
            if let VerifyRequest::Key(k) = &request {
                assert!(request.digest() == k.digest());
                let shown = format!("{request:?}");
                let secret = k.expose_secret();
                match k.prefix() {
                    Some(p) => assert_eq!(shown, format!("Key(ApiKey(\"{p}_…\"))")),
                    None => assert_eq!(shown, "Key(ApiKey(\"…\"))", "{secret:?}"),
                }
            }
        }
        Err(e) => {
            // A key shaped like keygate's (an `_`, which no serde or keygate message
            // holds) that is not also a field name must not appear in the error.
            let message = e.to_string();
            if let Some(key) = key.filter(|k| k.len() >= 8 && k.contains('_') && !k.contains('`')) {
                if !names.iter().any(|n| n.contains(key.as_str())) {
                    assert!(!message.contains(&key), "the error shows the key: {message}");
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, json)) = data.split_first() else { return };
    match which % 8 {
        0 => verify_request(json),
        1 => round_trip::<VerifyAnswer>(json),
        2 => round_trip::<KeyChanged>(json),
        3 => round_trip::<ResetData>(json),
        4 => round_trip::<Heartbeat>(json),
        5 => round_trip::<Alert>(json),
        6 => round_trip::<UsageAccepted>(json),
        _ => round_trip::<ErrorBody>(json),
    }
});
