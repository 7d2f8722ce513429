//! The key service's metrics recorder and the handles the request path records into.
//! What is exposed, and how, is [`metrics`](super::metrics)'s; the series are listed in
//! the [module docs](super#metrics).
//!
//! Each key service has a Prometheus recorder of its own, never the `metrics` crate's
//! global one: several key services in one process (tests, an application embedding
//! two) each count only their own traffic, and an application's global recorder (which
//! the middleware's `keygate_usage_*` series go to) is left alone. Handles are
//! registered on the recorder directly; `metrics::with_local_recorder` is no
//! alternative, as it only covers synchronous code on the calling thread.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::task::JoinHandle;

/// Series names (see the table in the server module docs).
pub(crate) mod name {
    pub(crate) const BUILD_INFO: &str = "keygate_server_build_info";
    pub(crate) const VERIFY_REQUESTS: &str = "keygate_server_verify_requests_total";
    pub(crate) const VERIFY_DURATION: &str = "keygate_server_verify_duration_seconds";
    pub(crate) const HTTP_REQUESTS: &str = "keygate_server_http_requests_total";
    pub(crate) const HTTP_DURATION: &str = "keygate_server_http_request_duration_seconds";
    pub(crate) const USAGE_BATCHES: &str = "keygate_server_usage_batches_total";
    pub(crate) const USAGE_ROWS_RECEIVED: &str = "keygate_server_usage_rows_received_total";
    pub(crate) const USAGE_EVENTS_RECEIVED: &str = "keygate_server_usage_events_received_total";
    pub(crate) const USAGE_ROWS_REFUSED: &str = "keygate_server_usage_rows_refused_total";
    pub(crate) const USAGE_REQUESTS: &str = "keygate_server_usage_requests_total";
    pub(crate) const USAGE_REPORTED: &str = "keygate_server_usage_reported_total";
    pub(crate) const EVENT_SUBSCRIBERS: &str = "keygate_server_event_subscribers";
    pub(crate) const EVENTS_PUBLISHED: &str = "keygate_server_events_published_total";
    pub(crate) const ALERTS_RAISED: &str = "keygate_server_alerts_raised_total";
    pub(crate) const RETENTION_PASSES: &str = "keygate_server_retention_passes_total";
    pub(crate) const RETENTION_ROWS: &str = "keygate_server_retention_rows_total";
    pub(crate) const EVENT_SUBSCRIBERS_REFUSED: &str = "keygate_server_event_subscribers_refused_total";
    pub(crate) const VERIFY_SHED: &str = "keygate_server_verify_shed_total";
    pub(crate) const VERIFY_BATCHES: &str = "keygate_server_verify_batches_total";
    pub(crate) const VERIFY_BATCH_DIGESTS: &str = "keygate_server_verify_batch_digests_total";
    pub(crate) const WEBHOOK_DELIVERIES: &str = "keygate_server_webhook_deliveries_total";
    pub(crate) const WEBHOOK_ATTEMPTS_FAILED: &str = "keygate_server_webhook_attempts_failed_total";
    pub(crate) const KEYS_EXPIRED_BY_POLICY: &str = "keygate_server_keys_expired_by_policy_total";
    pub(crate) const STORE_DURATION: &str = "keygate_server_store_operation_duration_seconds";
    pub(crate) const STORE_ERRORS: &str = "keygate_server_store_errors_total";
    pub(crate) const FEED_CONNECTED: &str = "keygate_server_change_feed_connected";
    pub(crate) const FEED_RECONNECTS: &str = "keygate_server_change_feed_reconnects_total";
    pub(crate) const EVENTS_FORWARDED: &str = "keygate_server_events_forwarded_total";
    pub(crate) const FANOUT_LAG: &str = "keygate_server_fanout_lag_seconds";
    pub(crate) const CREDITS_RECONCILED: &str = "keygate_server_credits_reconciled_total";
    pub(crate) const CREDITS_RECONCILE_ERRORS: &str = "keygate_server_credits_reconcile_errors_total";
    pub(crate) const CREDITS_RECONCILE_PASSES: &str = "keygate_server_credits_reconcile_passes_total";
}

/// What each series is, for `# HELP` (and the unit of the histograms).
const HELP: &[(&str, &str)] = &[
    (name::BUILD_INFO, "Always 1; the version label names the keygate build."),
    (name::VERIFY_REQUESTS, "POST /v1/keys/verify calls past the token check, by outcome."),
    (name::VERIFY_DURATION, "Time to answer a verify call, from its body read to its answer."),
    (name::HTTP_REQUESTS, "HTTP requests by route template, method and status class."),
    (name::HTTP_DURATION, "Time from a request's arrival to its response head, by route template and method."),
    (name::USAGE_BATCHES, "Usage batches: applied, or duplicate (applied before, nothing added)."),
    (name::USAGE_ROWS_RECEIVED, "Aggregate usage rows received in applied batches."),
    (name::USAGE_EVENTS_RECEIVED, "Raw usage events received in applied batches."),
    (name::USAGE_ROWS_REFUSED, "Usage rows not stored: their minute is outside the accepted window."),
    (name::USAGE_REQUESTS, "Requests in applied usage batches, by what became of them."),
    (name::USAGE_REPORTED, "What middlewares report they could not deliver in full, by kind."),
    (name::EVENT_SUBSCRIBERS, "GET /v1/events streams open now."),
    (name::EVENTS_PUBLISHED, "Events published to the event streams."),
    (
        name::ALERTS_RAISED,
        "Alerts raised: usage alerts (denial_spike, rate_spike, new_network) and the sweep's key_expiring and \
         key_max_age.",
    ),
    (name::RETENTION_PASSES, "Usage retention passes, by result."),
    (name::RETENTION_ROWS, "Rows usage retention passes rolled up or deleted, by action."),
    (name::EVENT_SUBSCRIBERS_REFUSED, "GET /v1/events streams refused because the subscriber cap was reached."),
    (name::VERIFY_SHED, "Verifications refused at once because max_concurrent_verifies were in progress."),
    (name::VERIFY_BATCHES, "POST /v1/keys/verify-batch calls past the token check and shedding."),
    (name::VERIFY_BATCH_DIGESTS, "Digests in the batch verify calls counted by keygate_server_verify_batches_total."),
    (
        name::WEBHOOK_DELIVERIES,
        "Webhook deliveries this replica finished, by result (delivered: a 2xx; failed: given up on).",
    ),
    (name::WEBHOOK_ATTEMPTS_FAILED, "Webhook delivery attempts that failed (each retried later, or given up on)."),
    (name::KEYS_EXPIRED_BY_POLICY, "Keys the rotation policy expired past their maximum age and grace period."),
    (name::STORE_DURATION, "Time a store operation took, by operation, failures included."),
    (name::STORE_ERRORS, "Store operations that failed, by operation and error kind."),
    (name::FEED_CONNECTED, "1 while the feed of other replicas' changes is connected (PostgreSQL)."),
    (name::FEED_RECONNECTS, "Times the feed of other replicas' changes reconnected (PostgreSQL)."),
    (name::EVENTS_FORWARDED, "Changes made through other replicas forwarded to this one's streams (PostgreSQL)."),
    (
        name::FANOUT_LAG,
        "From another replica's NOTIFY of a change, just before its commit, to this replica hearing it.",
    ),
    (name::CREDITS_RECONCILE_PASSES, "Credit reconciliation passes run, failed ones included."),
    (name::CREDITS_RECONCILED, "Keys and owners whose remaining credits were written from Redis, by holder."),
    (name::CREDITS_RECONCILE_ERRORS, "Credit reconciliation passes stopped, by what failed (redis, store)."),
];

/// Histogram buckets, in seconds: 0.5 ms to 10 s.
pub(crate) const BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The verdict of one verify call, the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VerifyOutcome {
    Valid,
    NotFound,
    Revoked,
    Expired,
    Disabled,
    /// No verdict: a malformed request, or the store failed.
    Error,
}

impl VerifyOutcome {
    const ALL: [Self; 6] = [Self::Valid, Self::NotFound, Self::Revoked, Self::Expired, Self::Disabled, Self::Error];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::NotFound => "not_found",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::Disabled => "disabled",
            Self::Error => "error",
        }
    }
}

/// The recorder of one key service, or nothing (metrics off: every record is a no-op).
/// Shared by the state and the store.
#[derive(Debug)]
pub(crate) struct Meters {
    on: Option<On>,
}

#[derive(Debug)]
struct On {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    verify: [Counter; 6],
    verify_duration: Histogram,
    upkeep: JoinHandle<()>,
}

impl Drop for On {
    fn drop(&mut self) {
        self.upkeep.abort();
    }
}

impl Meters {
    /// Metrics off.
    pub(crate) fn off() -> Self {
        Self { on: None }
    }

    /// A recorder of its own, with every series that has fixed labels registered (so a
    /// scrape shows them at 0 before any traffic). Called within a Tokio runtime: it
    /// spawns the upkeep task, which ends when this is dropped.
    pub(crate) fn on() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        for (series, help) in HELP {
            let key = KeyName::from_const_str(series);
            let help = SharedString::const_str(help);
            if series.ends_with("_seconds") {
                recorder.describe_histogram(key, Some(Unit::Seconds), help);
            } else if series.ends_with("_total") {
                recorder.describe_counter(key, None, help);
            } else {
                recorder.describe_gauge(key, None, help);
            }
        }
        let handle = recorder.handle();
        let verify = VerifyOutcome::ALL
            .map(|o| recorder.register_counter(&key(name::VERIFY_REQUESTS, &[("outcome", o.label())]), &META));
        let verify_duration = recorder.register_histogram(&key(name::VERIFY_DURATION, &[]), &META);
        recorder.register_gauge(&key(name::BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]), &META).set(1.0);
        let upkeep = {
            let handle = handle.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(UPKEEP_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    handle.run_upkeep();
                }
            })
        };
        Self { on: Some(On { recorder, handle, verify, verify_duration, upkeep }) }
    }

    /// Whether metrics are on.
    pub(crate) fn is_on(&self) -> bool {
        self.on.is_some()
    }

    /// One verify call.
    pub(crate) fn verified(&self, outcome: VerifyOutcome, took: Duration) {
        if let Some(on) = &self.on {
            on.verify[outcome as usize].increment(1);
            on.verify_duration.record(took);
        }
    }

    /// One store operation; `error` is the kind of its failure.
    pub(crate) fn store_op(&self, op: &'static str, took: Duration, error: Option<&'static str>) {
        if let Some(on) = &self.on {
            on.recorder.register_histogram(&key(name::STORE_DURATION, &[("op", op)]), &META).record(took);
            if let Some(kind) = error {
                on.recorder
                    .register_counter(&key(name::STORE_ERRORS, &[("op", op), ("kind", kind)]), &META)
                    .increment(1);
            }
        }
    }

    /// One HTTP request. `route` is a route template (never a raw path); `method` and
    /// `status` come from fixed sets.
    pub(crate) fn http(&self, route: &str, method: &'static str, status: &'static str, took: Duration) {
        if let Some(on) = &self.on {
            let labels = vec![Label::new("route", route.to_owned()), Label::from_static_parts("method", method)];
            let mut with_status = labels.clone();
            with_status.push(Label::from_static_parts("status", status));
            on.recorder.register_counter(&Key::from_parts(name::HTTP_REQUESTS, with_status), &META).increment(1);
            on.recorder.register_histogram(&Key::from_parts(name::HTTP_DURATION, labels), &META).record(took);
        }
    }

    /// The histogram of the fan-out lag between replicas (a no-op one when off).
    pub(crate) fn fanout_lag(&self) -> Histogram {
        match &self.on {
            Some(on) => on.recorder.register_histogram(&key(name::FANOUT_LAG, &[]), &META),
            None => Histogram::noop(),
        }
    }

    /// A counter with fixed labels, for values sampled at scrape time.
    pub(crate) fn counter(&self, series: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        match &self.on {
            Some(on) => on.recorder.register_counter(&key(series, labels), &META),
            None => Counter::noop(),
        }
    }

    /// A gauge with fixed labels, for values sampled at scrape time.
    pub(crate) fn gauge(&self, series: &'static str, labels: &[(&'static str, &'static str)]) -> Gauge {
        match &self.on {
            Some(on) => on.recorder.register_gauge(&key(series, labels), &META),
            None => Gauge::noop(),
        }
    }

    /// The Prometheus text exposition of every series; `None` when off.
    pub(crate) fn render(&self) -> Option<String> {
        self.on.as_ref().map(|on| on.handle.render())
    }
}

fn key(series: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::from_static_parts(k, v)).collect();
    Key::from_parts(series, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_recorders_count_apart_and_off_records_nothing() {
        let (a, b) = (Meters::on(), Meters::on());
        a.verified(VerifyOutcome::Revoked, Duration::from_millis(1));
        a.verified(VerifyOutcome::Revoked, Duration::from_millis(1));
        b.verified(VerifyOutcome::Valid, Duration::from_millis(1));
        let (ra, rb) = (a.render().unwrap(), b.render().unwrap());
        assert!(ra.contains(r#"keygate_server_verify_requests_total{outcome="revoked"} 2"#), "{ra}");
        assert!(ra.contains(r#"keygate_server_verify_requests_total{outcome="valid"} 0"#), "{ra}");
        assert!(rb.contains(r#"keygate_server_verify_requests_total{outcome="revoked"} 0"#), "{rb}");
        assert!(rb.contains(r#"keygate_server_verify_requests_total{outcome="valid"} 1"#), "{rb}");
        assert!(ra.contains("# HELP keygate_server_verify_requests_total"), "{ra}");
        assert!(ra.contains("keygate_server_verify_duration_seconds_bucket{le=\"0.0025\"} 2"), "{ra}");
        let off = Meters::off();
        off.verified(VerifyOutcome::Valid, Duration::ZERO);
        assert!(off.render().is_none());
    }
}
