//! The feed of other replicas' changes: for a store several key-service replicas share,
//! a task that hears what the others committed and hands it to this replica's
//! [`ChangeSink`], with the counters [`ServerStats`](crate::server::ServerStats) shows.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::Histogram;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ChangeSink;
use crate::server::events::{ChangeNote, unix_ms_now};

/// What a [`ChangeFeed`] has done, read with [`ChangeFeed::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) struct FeedStats {
    /// Whether the feed is connected now.
    pub(crate) connected: bool,
    /// Notes from other replicas published to this replica's subscribers.
    pub(crate) forwarded: u64,
    /// This replica's own logged changes, published when they came back (in id order).
    pub(crate) own_published: u64,
    /// This replica's own unlogged notes, skipped (its subscribers had them already).
    pub(crate) own_skipped: u64,
    /// Changes published from the change log after a (re)connection.
    pub(crate) caught_up: u64,
    /// Notes that could not be read (each one published `reset` instead).
    pub(crate) unreadable: u64,
    /// Connections established after the first (each one followed by a catch-up from
    /// the change log, or `reset` when the log no longer holds what was missed).
    pub(crate) reconnects: u64,
}

/// The counters a feed task updates; handed to it by [`ChangeFeed::spawn`].
#[derive(Debug)]
pub(crate) struct FeedCounters {
    forwarded: AtomicU64,
    own_published: AtomicU64,
    own_skipped: AtomicU64,
    caught_up: AtomicU64,
    unreadable: AtomicU64,
    connects: AtomicU64,
    connected: watch::Sender<bool>,
    /// From a note's `sent_at_ms` to its arrival here, in seconds (another replica's
    /// clock against this one's: skew shows, and a note "from the future" counts as 0).
    lag: Histogram,
}

impl FeedCounters {
    /// Reads one payload from the feed: hands logged changes (this replica's too) and
    /// the other replicas' unlogged notes to `sink`, skips this replica's own unlogged
    /// notes, and publishes `reset` for one it cannot read (a lost invalidation is
    /// never ignored).
    pub(crate) fn forward(&self, sink: &dyn ChangeSink, own_origin: &str, payload: &str) {
        match ChangeNote::decode_full(payload) {
            Ok(d) if d.origin == own_origin && d.id.is_none() => {
                self.own_skipped.fetch_add(1, Ordering::Relaxed);
            }
            Ok(d) => {
                if d.origin == own_origin {
                    self.own_published.fetch_add(1, Ordering::Relaxed);
                } else {
                    if let Some(sent) = d.sent_at_ms {
                        self.lag.record(unix_ms_now().saturating_sub(sent).max(0) as f64 / 1000.0);
                    }
                    self.forwarded.fetch_add(1, Ordering::Relaxed);
                }
                sink.publish(&d.note, d.id);
            }
            Err(why) => {
                tracing::warn!(error = %why, "unreadable change note from another replica; telling subscribers to reset");
                self.unreadable.fetch_add(1, Ordering::Relaxed);
                sink.publish(&ChangeNote::Reset("unreadable".into()), None);
            }
        }
    }

    /// Counts changes published from the change log.
    pub(crate) fn caught_up(&self, n: u64) {
        self.caught_up.fetch_add(n, Ordering::Relaxed);
    }

    /// Marks the feed connected (counting the connection) or disconnected; returns the
    /// number of connections so far.
    pub(crate) fn set_connected(&self, up: bool) -> u64 {
        let connects =
            if up { self.connects.fetch_add(1, Ordering::Relaxed) + 1 } else { self.connects.load(Ordering::Relaxed) };
        self.connected.send_replace(up);
        connects
    }
}

/// A task forwarding other replicas' changes into this replica's [`ChangeSink`];
/// started by [`Store::follow_changes`](super::Store::follow_changes), stopped when
/// dropped.
#[derive(Debug)]
pub(crate) struct ChangeFeed {
    task: JoinHandle<()>,
    counters: Arc<FeedCounters>,
}

impl ChangeFeed {
    /// Spawns `run` on the current Tokio runtime with fresh counters; the fan-out lag
    /// of the notes it forwards goes to `lag`.
    pub(crate) fn spawn<F, Fut>(lag: Histogram, run: F) -> Self
    where
        F: FnOnce(Arc<FeedCounters>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let counters = Arc::new(FeedCounters {
            forwarded: AtomicU64::new(0),
            own_published: AtomicU64::new(0),
            own_skipped: AtomicU64::new(0),
            caught_up: AtomicU64::new(0),
            unreadable: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            connected: watch::Sender::new(false),
            lag,
        });
        let task = tokio::spawn(run(Arc::clone(&counters)));
        Self { task, counters }
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> FeedStats {
        let c = &self.counters;
        FeedStats {
            connected: *c.connected.borrow(),
            forwarded: c.forwarded.load(Ordering::Relaxed),
            own_published: c.own_published.load(Ordering::Relaxed),
            own_skipped: c.own_skipped.load(Ordering::Relaxed),
            caught_up: c.caught_up.load(Ordering::Relaxed),
            unreadable: c.unreadable.load(Ordering::Relaxed),
            reconnects: c.connects.load(Ordering::Relaxed).saturating_sub(1),
        }
    }

    /// Waits until the feed is connected, for at most `limit`; whether it is.
    pub(crate) async fn wait_connected(&self, limit: Duration) -> bool {
        let mut rx = self.counters.connected.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|up| *up)).await.is_ok_and(|r| r.is_ok())
    }
}

impl Drop for ChangeFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::server::events::KeyEvent;

    #[derive(Debug, Default)]
    struct Recorded(Mutex<Vec<(ChangeNote, Option<u64>)>>);

    impl ChangeSink for Recorded {
        fn publish(&self, note: &ChangeNote, id: Option<u64>) {
            self.0.lock().unwrap().push((note.clone(), id));
        }
    }

    #[tokio::test]
    async fn forward_skips_own_notes_and_resets_on_unreadable_ones() {
        let sink = Recorded::default();
        let feed = ChangeFeed::spawn(Histogram::noop(), |_| async {});
        let c = &feed.counters;
        let note = ChangeNote::Key(KeyEvent::Updated, "key_a".into());
        c.forward(&sink, "me", &note.encode("me", None));
        c.forward(&sink, "me", &note.encode("other", None));
        c.forward(&sink, "me", &note.encode("me", Some(5)));
        c.forward(&sink, "me", &note.encode("other", Some(6)));
        c.forward(&sink, "me", "garbage");
        let s = feed.stats();
        assert_eq!((s.own_skipped, s.own_published, s.forwarded, s.unreadable), (1, 1, 2, 1));
        // The other replica's note, both logged ones with their ids (this replica's own
        // included: the feed publishes every logged change, in id order), and the reset
        // for the unreadable one.
        assert_eq!(
            *sink.0.lock().unwrap(),
            [
                (note.clone(), None),
                (note.clone(), Some(5)),
                (note, Some(6)),
                (ChangeNote::Reset("unreadable".into()), None)
            ]
        );
        assert!(!feed.wait_connected(Duration::from_millis(10)).await);
        c.set_connected(true);
        assert!(feed.wait_connected(Duration::from_millis(10)).await);
    }
}
