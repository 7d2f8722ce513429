//! Clocks for the request path.
//!
//! Reading the operating system's clocks costs 30 to 60 ns a time on virtual machines,
//! and a request used to read them four times. [`Instant`] is quanta's: it reads the
//! CPU's time-stamp counter where that is reliable (about 12 ns), and the operating
//! system's monotonic clock where it is not. Wall-clock time comes from a per-thread
//! anchor, re-read once a second.

use std::cell::Cell;
use std::time::Duration;

use time::OffsetDateTime;

pub(crate) use quanta::Instant;

/// How long a thread's wall-clock anchor is trusted before it is read again: short
/// enough that a stepped system clock shows within a second.
const ANCHOR_LIFETIME: Duration = Duration::from_secs(1);

thread_local! {
    static ANCHOR: Cell<Option<(Instant, OffsetDateTime)>> = const { Cell::new(None) };
}

/// Calibrates the time-stamp counter now rather than on the first request.
pub(crate) fn warm_up() {
    let _ = Instant::now();
}

/// The wall-clock time at `at`, given `now` (a later reading the caller already has).
pub(crate) fn wall_time(at: Instant, now: Instant) -> OffsetDateTime {
    let (anchor, wall) = ANCHOR.with(|cell| match cell.get() {
        Some((anchor, wall)) if now.saturating_duration_since(anchor) < ANCHOR_LIFETIME && anchor <= now => {
            (anchor, wall)
        }
        _ => {
            let fresh = (now, OffsetDateTime::now_utc());
            cell.set(Some(fresh));
            fresh
        }
    });
    match at.checked_duration_since(anchor) {
        Some(after) => wall + after,
        None => wall - anchor.saturating_duration_since(at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_time_tracks_the_system_clock() {
        let start = Instant::now();
        let before = OffsetDateTime::now_utc();
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        let at = wall_time(start, now);
        let after = OffsetDateTime::now_utc();
        // The start instant maps back to a wall time around `before`, not `now`.
        assert!((at - before).abs() < time::Duration::milliseconds(5), "{at} vs {before}");
        assert!(wall_time(now, now) <= after);
        // An anchor older than its lifetime is replaced.
        let later = now + ANCHOR_LIFETIME + Duration::from_millis(1);
        let _ = wall_time(later, later);
        let (anchor, _) = ANCHOR.with(Cell::get).unwrap();
        assert_eq!(anchor, later);
    }
}
