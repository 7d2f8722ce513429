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

thread_local! {
    /// The start of the current wall-clock second on this thread: the instant it began
    /// and its wall time (nanosecond 0). Times inside that second cost a field write.
    static ANCHOR: Cell<Option<(Instant, OffsetDateTime)>> = const { Cell::new(None) };
}

const SECOND: Duration = Duration::from_secs(1);

/// Calibrates the time-stamp counter now rather than on the first request.
pub(crate) fn warm_up() {
    let _ = Instant::now();
}

/// The wall-clock time at `at`, given `now` (a later reading the caller already has).
///
/// The system clock is read again whenever `now` leaves the anchored second, so a
/// stepped clock shows within a second.
pub(crate) fn wall_time(at: Instant, now: Instant) -> OffsetDateTime {
    let (second, wall) = ANCHOR.with(|cell| match cell.get() {
        Some((second, wall)) if second <= now && now.saturating_duration_since(second) < SECOND => (second, wall),
        _ => {
            let wall = OffsetDateTime::now_utc();
            let into = Duration::from_nanos(u64::from(wall.nanosecond()));
            let anchor = match now.checked_sub(into) {
                Some(second) => (second, wall.replace_nanosecond(0).unwrap_or(wall)),
                None => (now, wall),
            };
            cell.set(Some(anchor));
            anchor
        }
    });
    match at.checked_duration_since(second) {
        // The common case: `at` is in the anchored second. (`OffsetDateTime + Duration`
        // normalises a whole date; setting the nanosecond does not.)
        Some(after) if after < SECOND && wall.nanosecond() == 0 => {
            wall.replace_nanosecond(after.subsec_nanos()).unwrap_or_else(|_| wall + after)
        }
        Some(after) => wall + after,
        None => wall - second.saturating_duration_since(at),
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
        // The anchor is the start of a wall-clock second, and is replaced once `now`
        // leaves that second.
        let (second, wall) = ANCHOR.with(Cell::get).unwrap();
        assert_eq!(wall.nanosecond(), 0);
        assert!(second <= now && now - second < SECOND);
        let later = second + SECOND + Duration::from_millis(1);
        let at_later = wall_time(later, later);
        let (next, _) = ANCHOR.with(Cell::get).unwrap();
        assert!(next > second && next <= later);
        // Inside the second and across it, the mapping is the same linear one.
        let inside = wall_time(second + Duration::from_millis(250), later);
        assert!((at_later - inside - time::Duration::milliseconds(751)).abs() < time::Duration::milliseconds(5));
    }
}
