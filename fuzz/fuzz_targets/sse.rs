//! The revocation listener's event stream: the per-event byte bound (ours), then the
//! SSE parser (`eventsource-stream`), fed chunk by chunk exactly as the listener does,
//! then what the listener reads from each event.
//!
//! Invariants, for any bytes cut into any chunks:
//! - the bound refuses the stream at the chunk where an event (all its lines, without
//!   their ends) first exceeds the maximum, or where the bytes stop being UTF-8, as a
//!   model of the SSE line rules written here says, whatever the chunking;
//! - what the bound lets through parses to exactly the events the model's SSE parser
//!   (the HTML standard's algorithm) finds, and none is larger than the bound;
//! - a key event's data is either a key id or treated as unreadable (never ignored).
#![no_main]

use eventsource_stream::{Event, Eventsource};
use futures::StreamExt;
use keygate::fuzzing::{EventBound, PARSER_START};
use keygate::wire::{EventName, KeyChanged};
use libfuzzer_sys::fuzz_target;

/// Where the model refuses the stream: the bytes within which the refusal must fall
/// (an event growing past `max` is one byte; bad UTF-8 is seen at its first byte or
/// at the byte after it that cannot continue it).
fn model_refuses_at(stream: &[u8], max: usize) -> Option<(usize, usize)> {
    let utf8_bad = match std::str::from_utf8(stream) {
        Ok(_) => None,
        // An incomplete character at the very end may still be completed.
        Err(e) => e.error_len().map(|n| (e.valid_up_to(), e.valid_up_to() + n)),
    };
    let mut event = 0;
    let mut line = 0;
    let mut i = 0;
    let too_long = loop {
        let Some(&b) = stream.get(i) else { break None };
        if b == b'\r' || b == b'\n' {
            if line == 0 {
                event = 0;
            }
            line = 0;
            if b == b'\r' && stream.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
        } else {
            line += 1;
            event += 1;
            if event > max {
                break Some(i);
            }
        }
        i += 1;
    };
    match (utf8_bad, too_long) {
        (Some((lo, hi)), Some(at)) => Some((lo.min(at), hi.min(at))),
        (Some(range), None) => Some(range),
        (None, at) => at.map(|at| (at, at)),
    }
}

/// The HTML standard's event stream interpretation, on complete lines only (the parser
/// waits for a line's end, and a CR at the very end might be the start of a CRLF).
fn model_events(text: &str) -> Vec<(String, String, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (mut out, mut data, mut kind, mut id) = (Vec::new(), String::new(), String::new(), String::new());
    let mut rest = text;
    while let Some(end) = rest.find(['\r', '\n']) {
        let line = &rest[..end];
        let eol = if rest[end..].starts_with("\r\n") { 2 } else { 1 };
        if rest[end..] == *"\r" {
            break;
        }
        rest = &rest[end + eol..];
        if line.is_empty() {
            if !data.is_empty() {
                data.pop();
                let kind = if kind.is_empty() { "message".to_owned() } else { std::mem::take(&mut kind) };
                out.push((kind, std::mem::take(&mut data), id.clone()));
            }
            data.clear();
            kind.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => kind = value.to_owned(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "id" if !value.contains('\0') => id = value.to_owned(),
            _ => {}
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [m, c1, c2, stream @ ..] = data else { return };
    let max = 64 + usize::from(*m);
    let sizes = [1 + usize::from(*c1) % 16, 1 + usize::from(*c2) % 512];
    let mut chunks = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let n = sizes[chunks.len() % 2].min(stream.len() - at);
        chunks.push(&stream[at..at + n]);
        at += n;
    }

    // The bound, chunk by chunk, then on the whole stream at once.
    let refused_at = model_refuses_at(stream, max);
    let mut bound = EventBound::new(max);
    let mut passed = Vec::new();
    let mut start = 0;
    let mut refused = None;
    let mut through = Vec::new();
    for chunk in &chunks {
        let Some(out) = bound.accepts(chunk) else {
            refused = Some(start..start + chunk.len());
            break;
        };
        through.extend_from_slice(chunk);
        passed.push(out);
        start += chunk.len();
    }
    match (&refused, refused_at) {
        (None, None) => {}
        (Some(range), Some((lo, hi))) => {
            assert!(range.start <= hi && lo < range.end, "refused in {range:?}, the model in {lo}..={hi}")
        }
        (got, want) => panic!("the bound refused in {got:?}, the model at {want:?}"),
    }
    assert_eq!(EventBound::new(max).accepts(stream).is_some(), refused_at.is_none());
    // A mark, or the part of one the bound has seen so far, is all it removes.
    let mark = through.iter().zip(b"\xef\xbb\xbf").take_while(|(a, b)| a == b).count();
    let unmarked = if mark == 3 || mark == through.len() { &through[mark..] } else { &through[..] };
    assert_eq!(passed.concat(), unmarked, "the bound changed more than a leading byte order mark");

    // The parser, behind the bound as in the listener: a refused chunk ends the stream.
    let fed = futures::stream::iter(
        std::iter::once(Ok::<_, &str>(PARSER_START.to_vec()))
            .chain(passed.iter().map(|c| Ok(c.clone())))
            .chain(refused.iter().map(|_| Err("refused"))),
    );
    let mut events: Vec<Event> = Vec::new();
    futures::executor::block_on(async {
        let mut parsed = std::pin::pin!(fed.eventsource());
        while let Some(Ok(event)) = parsed.next().await {
            events.push(event);
        }
    });
    let valid = match std::str::from_utf8(&through) {
        Ok(s) => s,
        Err(e) => {
            assert!(e.error_len().is_none(), "the bound let invalid UTF-8 through");
            std::str::from_utf8(&through[..e.valid_up_to()]).unwrap()
        }
    };
    let got: Vec<(String, String, String)> =
        events.iter().map(|e| (e.event.clone(), e.data.clone(), e.id.clone())).collect();
    assert_eq!(got, model_events(valid));

    for event in &events {
        assert!(event.data.len() <= max && event.event.len() <= max && event.id.len() <= max);
        // What the listener reads: a key event names a key id, or drops the cache.
        if let Some(EventName::Key(kind)) = EventName::parse(&event.event) {
            assert!(EventName::parse(kind.name()) == Some(EventName::Key(kind)));
            if let Ok(changed) = serde_json::from_str::<KeyChanged>(&event.data) {
                let again: KeyChanged = serde_json::from_str(&serde_json::to_string(&changed).unwrap()).unwrap();
                assert_eq!(again, changed);
            }
        }
    }
});
