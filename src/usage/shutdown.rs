//! How the usage pipeline and the aggregator stop their background worker: the handle
//! asks with a deadline, and every export from then on must end by it.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Past the shutdown deadline, how long [`Stopper::stop`] waits for the worker to notice
/// before aborting it. The workers bound their own exports by the deadline, so this only
/// matters for an exporter that blocks its thread.
const ABORT_GRACE: Duration = Duration::from_millis(100);

/// The handle's side: asks the worker to stop, and waits for it within the deadline.
pub(super) struct Stopper {
    ask: watch::Sender<Option<Instant>>,
    worker: JoinHandle<()>,
    deadline: Duration,
}

/// The worker's side: learns that shutdown was asked for, and by when it must be done.
pub(super) struct StopRequest(watch::Receiver<Option<Instant>>);

/// Spawns the worker `run` builds on `runtime`; it may take `deadline` to stop.
pub(super) fn spawn<F>(
    runtime: &tokio::runtime::Handle,
    deadline: Duration,
    run: impl FnOnce(StopRequest) -> F,
) -> Stopper
where
    F: Future<Output = ()> + Send + 'static,
{
    let (ask, asked) = watch::channel(None);
    let worker = runtime.spawn(run(StopRequest(asked)));
    Stopper { ask, worker, deadline }
}

impl Stopper {
    /// How long the worker may take to stop.
    pub(super) fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Asks the worker to be done within the deadline and waits for it; past the deadline
    /// (plus a short grace) aborts it. Returns whether it finished by itself.
    pub(super) async fn stop(self) -> bool {
        let Self { ask, mut worker, deadline } = self;
        let deadline = Instant::now() + deadline;
        ask.send_replace(Some(deadline));
        let finished = tokio::time::timeout_at(deadline + ABORT_GRACE, &mut worker).await;
        if matches!(finished, Ok(Ok(()))) {
            return true;
        }
        // Aborted, or the exporter panicked.
        worker.abort();
        false
    }
}

impl StopRequest {
    /// Resolves with the deadline once shutdown is asked for; never, if the handle was
    /// dropped without asking (the worker then stops when the last sink goes).
    pub(super) async fn asked(&mut self) -> Instant {
        let deadline = self.0.wait_for(Option::is_some).await.ok().and_then(|deadline| *deadline);
        match deadline {
            Some(deadline) => deadline,
            None => std::future::pending().await,
        }
    }

    /// `known` when the worker already has a deadline, else the one shutdown brings.
    pub(super) async fn deadline(&mut self, known: Option<Instant>) -> Instant {
        match known {
            Some(deadline) => deadline,
            None => self.asked().await,
        }
    }
}
