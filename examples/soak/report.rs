//! The summary at the end: answers by verdict and status, wrong answers with the
//! history of their secret, what the schedules did, and the resources of each process
//! with the flatness check (see the crate docs for its definition).

use std::fmt::Write as _;
use std::time::Duration;

use crate::chaos::{Changes, Incident};
use crate::load::Tally;
use crate::truth::Expect;

/// The processes sampled, in the CSV's words.
pub const NAMES: [&str; 3] = ["protected", "replica-a", "replica-b"];

/// One reading of a process's resident memory and open descriptors.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Duration,
    pub process: usize,
    pub rss_kib: u64,
    pub fds: u64,
}

/// Everything the summary says.
pub struct Report<'a> {
    pub run: Duration,
    pub planned: Duration,
    pub tally: &'a Tally,
    pub changes: &'a Changes,
    pub incidents: &'a [Incident],
    /// The stream's outages and streams opened, read when the load stopped.
    pub outages: (Vec<Duration>, u64),
    pub samples: &'a [Sample],
    pub protected_exit: String,
    pub cache_line: Option<String>,
}

/// One process's resources: at minute 1, at the end, and the flatness check.
struct Flat {
    minute_one: Option<Sample>,
    end: Option<Sample>,
    base: (u64, u64),
    last: (u64, u64),
    flat: bool,
}

fn flatness(samples: &[Sample], process: usize, run: Duration) -> Flat {
    let mine: Vec<&Sample> = samples.iter().filter(|s| s.process == process).collect();
    let (base_w, last_w) = if run >= Duration::from_secs(240) {
        (
            (Duration::from_secs(60), Duration::from_secs(120)),
            (run - Duration::from_secs(120), run + Duration::from_secs(60)),
        )
    } else {
        ((run / 4, run / 2), (run * 3 / 4, run + Duration::from_secs(60)))
    };
    let max = |(from, to): (Duration, Duration)| {
        let w = mine.iter().filter(|s| s.at >= from && s.at < to);
        (w.clone().map(|s| s.rss_kib).max().unwrap_or(0), w.map(|s| s.fds).max().unwrap_or(0))
    };
    let (base, last) = (max(base_w), max(last_w));
    let flat = base.0 > 0 && last.0 > 0 && last.0 <= base.0 * 6 / 5 + 8 * 1024 && last.1 <= base.1 + 10;
    let minute_one = mine.iter().min_by_key(|s| s.at.abs_diff(Duration::from_secs(60))).map(|s| **s);
    Flat { minute_one, end: mine.last().map(|s| **s), base, last, flat }
}

impl Report<'_> {
    pub fn render(&self) -> (String, bool) {
        let t = self.tally;
        let mut s = String::new();
        let secs = self.run.as_secs_f64();
        let _ =
            writeln!(s, "\n==== keygate soak: {:.1} min, {} ====", secs / 60.0, time::OffsetDateTime::now_utc().date());
        let _ = writeln!(s, "requests: {} ({:.0}/s), slowest {:.1?}", t.requests, t.requests as f64 / secs, t.slowest);
        let mut by_status = std::collections::BTreeMap::new();
        for ((_, status), n) in &t.answers {
            *by_status.entry(*status).or_insert(0u64) += n;
        }
        let statuses: Vec<String> = by_status
            .iter()
            .map(|(k, v)| format!("{}: {v}", if *k == 0 { "error".into() } else { k.to_string() }))
            .collect();
        let _ = writeln!(s, "statuses: {}", statuses.join(", "));
        for (expect, what) in
            [(Expect::Accept, "must accept"), (Expect::Reject, "must reject"), (Expect::Transition, "in transition")]
        {
            let row: Vec<String> =
                t.answers.iter().filter(|((e, _), _)| *e == expect).map(|((_, st), n)| format!("{st}: {n}")).collect();
            let _ = writeln!(s, "  {what}: {}", row.join(", "));
        }
        let _ = writeln!(s, "wrong answers: {}", t.wrong);
        for w in &t.first_wrong {
            let _ = writeln!(
                s,
                "  at {:.3}s (took {:.1?}) {} {} -> {} (must {:?}); {}",
                w.at.as_secs_f64(),
                w.took,
                w.label,
                w.route.name(),
                w.status,
                w.expect,
                w.history
            );
        }
        let _ = writeln!(
            s,
            "503: {} on keys that had to be accepted, {} others; 429: {} on keys that had to be accepted, {} others",
            t.count(Some(Expect::Accept), 503),
            t.count(None, 503) - t.count(Some(Expect::Accept), 503),
            t.count(Some(Expect::Accept), 429),
            t.count(None, 429) - t.count(Some(Expect::Accept), 429),
        );
        let unexpected: u64 = t.errors.values().sum();
        let _ = writeln!(s, "unexpected answers: {unexpected} {:?}", t.errors);
        let _ = writeln!(
            s,
            "latest accepted request after its secret was made invalid: {:.0?} after the change",
            t.latest_accept
        );
        let c = self.changes;
        let _ = writeln!(
            s,
            "key changes: {} created, {} revoked, {} disabled, {} re-enabled, rotated {} (no grace) / {} (5 s) / {} (20 s); {} admin calls through A, {} through B, {} failed",
            c.created,
            c.revoked,
            c.disabled,
            c.enabled,
            c.rotated[0],
            c.rotated[1],
            c.rotated[2],
            c.through[0],
            c.through[1],
            c.failed
        );
        let (outages, opened) = &self.outages;
        let longest = outages.iter().max().copied().unwrap_or_default();
        let _ = writeln!(s, "event stream: {} outages (longest {longest:.0?}), {opened} streams opened", outages.len());
        let cuts = self.incidents.iter().filter(|i| i.what.starts_with("event stream")).count();
        let restarts: Vec<String> = self
            .incidents
            .iter()
            .filter(|i| i.what.starts_with("replica"))
            .map(|i| format!("{:.0}s {} ({:.1?})", i.at.as_secs_f64(), i.what, i.took))
            .collect();
        let _ =
            writeln!(s, "incidents: {cuts} stream cuts, {} replica restarts: {}", restarts.len(), restarts.join("; "));
        let _ = writeln!(s, "protected exit: {}", self.protected_exit);
        if let Some(line) = &self.cache_line {
            let _ = writeln!(s, "protected's last words: {line}");
            // Every change invalidates its key id once; the first connection drops the
            // (empty) cache once more. More would be caches dropped on reconnects.
            let invalidations = line
                .split("invalidations: ")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<u64>().ok());
            let changes = c.revoked + c.disabled + c.enabled + c.rotated.iter().sum::<u64>();
            let verdict = match invalidations {
                Some(n) if n == changes + 1 => {
                    "= changes + 1 for the first connection: no cache dropped on a reconnect, no change applied twice"
                }
                Some(_) => "NOT changes + 1: caches dropped, or changes lost or applied twice",
                None => "not found in its log",
            };
            let _ = writeln!(
                s,
                "cache invalidations in protected: {} for {changes} changes ({verdict})",
                invalidations.map_or("?".into(), |n| n.to_string())
            );
        }
        let _ = writeln!(s, "resources (RSS MiB / fds):   minute 1   end   | baseline max  last max  flat");
        let mut all_flat = true;
        let mib = |k: u64| k as f64 / 1024.0;
        for (process, name) in NAMES.iter().enumerate() {
            let f = flatness(self.samples, process, self.planned);
            all_flat &= f.flat;
            let show = |x: Option<Sample>| x.map_or("-".into(), |x| format!("{:.1}/{}", mib(x.rss_kib), x.fds));
            let _ = writeln!(
                s,
                "  {name:<10} {:>10} {:>10} | {:>6.1}/{:<4} {:>6.1}/{:<4} {}",
                show(f.minute_one),
                show(f.end),
                mib(f.base.0),
                f.base.1,
                mib(f.last.0),
                f.last.1,
                if f.flat { "yes" } else { "NO" }
            );
        }
        let pass = t.wrong == 0 && unexpected == 0 && all_flat;
        let _ = writeln!(
            s,
            "result: {} (0 wrong answers: {}, 0 unexpected: {}, memory and fds flat: {})",
            if pass { "PASS" } else { "FAIL" },
            t.wrong == 0,
            unexpected == 0,
            all_flat
        );
        (s, pass)
    }
}
