//! `keygate-server`: the reference key service and its admin command line.
//!
//! ```text
//! keygate-server serve --db sqlite://keys.db --listen 127.0.0.1:7700
//! keygate-server keys create --owner acme --name ci --scope reports:read [--expires-in 30d]
//! keygate-server keys list [--owner acme] [--search TEXT] [--state active] [--limit 100] [--after CURSOR | --all]
//! keygate-server keys show key_...
//! keygate-server keys update key_... [--scope S]... [--role R]... [--meta JSON] [--expires-in 12h] [--rate-limit 100/60s]
//! keygate-server keys disable key_... | keys enable key_...
//! keygate-server keys rotate key_... --grace 3600
//! keygate-server keys revoke key_...
//! keygate-server roles put analyst --scope reports:read --scope dashboards:read
//! keygate-server roles delete analyst [--detach]
//! keygate-server usage --key-id key_... | --owner acme [--group-by minute|hour|day|route] [--since T] [--until T]
//! keygate-server audit
//! keygate-server alerts list [--all] | alerts ack ALERT_ID
//! keygate-server tokens create --kind service --name fleet-eu      # printed once
//! keygate-server tokens create --kind admin --name ops --database sqlite://keys.db   # offline
//! keygate-server tokens list | tokens revoke tok_...
//! keygate-server backup --database sqlite://keys.db --to keys-backup.db [--force]
//! keygate-server healthcheck [--url http://127.0.0.1:7700/healthz]
//! ```
//!
//! Exit codes: 0 ok, 1 other failure, 2 usage (bad arguments), 3 not found, 4 conflict
//! or refused input (HTTP 400, 409, 413), 5 unauthorized (401, 403), 6 unreachable
//! (connection failed or timed out, or a 5xx answer).
//!
//! **Tokens.** Callers present service tokens (verify, usage, events) and admin tokens
//! (everything else); both are records of the store, several active at once, created
//! with `tokens create` and revoked with `tokens revoke` without a restart; a token's
//! name is the audit actor. Bootstrap tokens come from `KEYGATE_SERVICE_TOKEN` /
//! `KEYGATE_ADMIN_TOKEN`, `--service-token-file` / `--admin-token-file` (or the
//! `--service-token` / `--admin-token` flags), at least 32 characters, and act as the
//! tokens named `bootstrap-service` / `bootstrap-admin`. A persistent database with no
//! active admin token and none configured refuses to start: create one offline with
//! `tokens create --kind admin --name ops --database URL`. Only `sqlite::memory:`
//! generates (and prints once) the tokens not configured.
//!
//! `serve` logs on stderr as text or, with `--log-format json`, JSON lines, filtered by
//! `RUST_LOG` (`EnvFilter` directives such as `keygate=debug,sqlx=warn`; default `info`).
//! Admin commands talk to `--url` (`KEYGATE_URL`, default `http://127.0.0.1:7700`) and
//! print for people, or JSON with `--json`.
//!
//! Usage retention (`serve`): minute rows are rolled up into hour rows after
//! `--usage-minutes-hours` (default 168, 7 days), hour rows deleted after
//! `--usage-hours-days` (default 90), a pass every `--usage-retention-interval-s`
//! (default 300); `--no-usage-retention` turns the passes off. The same passes prune
//! the change log that resuming event streams replay (`Last-Event-ID`): rows older than
//! `--change-log-hours` (default 24) or beyond the newest `--change-log-rows` (default
//! 100 000).
//!
//! Metrics (`serve`): `--metrics-listen ADDR` (`KEYGATE_METRICS_LISTEN`; off by default)
//! serves Prometheus metrics at `GET /metrics` on that address of its own, without a token.
//!
//! Console (`serve`): the admin console in the browser is on by default under `/console`
//! on the listen address; `--console-listen ADDR` (`KEYGATE_CONSOLE_LISTEN`) serves it on
//! an address of its own instead, `--no-console` (`KEYGATE_NO_CONSOLE`) turns it off,
//! `--console-secure-cookies` marks its session cookie `Secure` (behind TLS).
//!
//! `backup` copies a SQLite store consistently while servers use it (`VACUUM INTO`); it
//! refuses to overwrite `--to` unless `--force`. PostgreSQL is backed up with `pg_dump`.
//! `healthcheck` exits 0 when `--url` answers 200 (for container health checks: the
//! image needs no curl).
//!
//! Edges (`serve`): at most `--max-event-subscribers` event streams (default 1 000), a
//! connection has `--header-read-timeout-s` (default 10) to send its headers and a body
//! may pause `--request-body-timeout-s` (default 30). `--env-prefix ENV=PREFIX`
//! (repeatable) gives an environment's keys their own prefix (default `test=kgtest`).
//!
//! Webhooks: `keygate-server webhooks add https://hooks.example.com/keygate [--event
//! key.revoked --event 'alert.*'] [--description ...]` prints the endpoint's signing
//! secret once; `webhooks list`, `webhooks remove wh_...`, `webhooks deliveries wh_...`.
//! `serve` retries a delivery `--webhook-max-attempts` times (default 20) for at most
//! `--webhook-max-age` (default 24h) and queues at most `--webhook-max-pending` (default
//! 10 000) per endpoint; webhook URLs on internal addresses (loopback, private,
//! link-local) are refused unless `--webhook-allow-internal`; `--expiring-within` (default 7d, `0` off) raises `key_expiring`
//! before a key expires; `--max-key-age live=90d` (repeatable; `--max-key-age-owner
//! acme=30d` per owner) raises `key_max_age` past it and, with
//! `--expire-after-max-age-grace 7d`, expires the key that much later (audit actor
//! `policy`). `--github-secret-scanning` takes GitHub's leaked-key reports at
//! `POST /v1/leaks/github` (keys from `--github-keys-url`, default GitHub's; reported keys
//! are revoked, or disabled with `--leak-action disable`). Durations: a number with `s`,
//! `m`, `h` or `d` (`90d`, `12h`; bare: seconds).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use keygate::RateLimit;
use keygate::client::{
    AdminClient, ClientError, CreatedKey, KeyInfo, KeyPatch, NewKey, NewToken, OwnerInfo, OwnerQuota, TokenInfo,
    TokenKind, UsageGroupBy, UsageQuery, UsageReport,
};
use keygate::server::{BackupError, KeyServer, RetentionConfig};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What `--help` says about exit codes; the README has the same table.
const EXIT_CODES: &str = "\
Exit codes:
  0  ok
  1  any other failure (starting the server, an answer that cannot be read)
  2  usage: bad arguments or values
  3  not found (HTTP 404)
  4  conflict or refused input (HTTP 400, 409, 413)
  5  unauthorized (HTTP 401, 403): check --admin-token / KEYGATE_ADMIN_TOKEN
  6  unreachable: connection refused or timed out, or the key service answered 5xx";

#[derive(Parser)]
#[command(name = "keygate-server", version, about = "The keygate reference key service", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the key service.
    Serve(Box<Serve>),
    /// Manage keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Manage roles.
    #[command(subcommand)]
    Roles(RolesCmd),
    /// Limits and credits shared by all of an owner's keys.
    #[command(subcommand)]
    Owners(OwnersCmd),
    /// Show the audit log (newest 1 000 records, or from --since).
    Audit {
        #[command(flatten)]
        conn: Conn,
        /// RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
    /// Show a key's usage, or the sum over an owner's keys (default: the last 24 hours,
    /// per minute).
    Usage {
        #[command(flatten)]
        conn: Conn,
        /// The key id (same as --key-id).
        #[arg(value_name = "KEY_ID", conflicts_with_all = ["key_id", "owner"])]
        key: Option<String>,
        /// The key id.
        #[arg(long, conflicts_with = "owner")]
        key_id: Option<String>,
        /// Sum every key of this owner instead.
        #[arg(long)]
        owner: Option<String>,
        /// Buckets: a minute, an hour, a day, or one per route, method and outcome.
        #[arg(long, value_enum, default_value_t = GroupBy::Minute)]
        group_by: GroupBy,
        /// From (RFC 3339; default 24 hours before --until).
        #[arg(long)]
        since: Option<String>,
        /// Until, exclusive (RFC 3339; default now).
        #[arg(long)]
        until: Option<String>,
    },
    /// Show or acknowledge usage alerts.
    #[command(subcommand)]
    Alerts(AlertsCmd),
    /// Manage the service and admin tokens callers present (issue 14).
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Copy a SQLite store consistently, while servers keep using it (PostgreSQL: use
    /// pg_dump).
    Backup(Backup),
    /// Exit 0 when the key service's health check answers 200, non-zero otherwise.
    Healthcheck(Healthcheck),
    /// Manage webhook endpoints and read their delivery log.
    #[command(subcommand)]
    Webhooks(WebhooksCmd),
}

#[derive(Subcommand)]
enum AlertsCmd {
    /// List alerts not acknowledged yet (the newest 1 000).
    List {
        #[command(flatten)]
        conn: Conn,
        /// Acknowledged alerts too.
        #[arg(long)]
        all: bool,
    },
    /// Acknowledge an alert: `alerts list` no longer shows it.
    Ack {
        #[command(flatten)]
        conn: Conn,
        /// The alert's id (the `id` column of `alerts list`).
        alert_id: u64,
    },
}

#[derive(Args)]
struct Backup {
    /// The store to copy: sqlite://PATH or sqlite:PATH.
    #[arg(long, env = "KEYGATE_DB", hide_env_values = true)]
    database: String,
    /// The file to write (refused if it exists, unless --force).
    #[arg(long)]
    to: std::path::PathBuf,
    /// Replace --to if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct Healthcheck {
    /// The health check URL.
    #[arg(long, env = "KEYGATE_HEALTHCHECK_URL", default_value = "http://127.0.0.1:7700/healthz")]
    url: String,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    timeout_s: u64,
}

#[derive(Args)]
struct Serve {
    /// Database URL: sqlite://path (created if missing), sqlite::memory:, postgres://...
    #[arg(long, env = "KEYGATE_DB", hide_env_values = true, default_value = "sqlite://keygate.db")]
    db: String,
    /// Address to listen on.
    #[arg(long, env = "KEYGATE_LISTEN", default_value = keygate::server::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Bootstrap service token (verify, usage, events), at least 32 characters; acts as
    /// the token named `bootstrap-service`. Prefer KEYGATE_SERVICE_TOKEN or
    /// --service-token-file: flags show in `ps`.
    #[arg(long, env = "KEYGATE_SERVICE_TOKEN", hide_env_values = true)]
    service_token: Option<String>,
    /// File holding the bootstrap service token (trailing newline trimmed, at most 4 KiB);
    /// takes precedence over --service-token / KEYGATE_SERVICE_TOKEN.
    #[arg(long, env = "KEYGATE_SERVICE_TOKEN_FILE")]
    service_token_file: Option<std::path::PathBuf>,
    /// Bootstrap admin token, at least 32 characters; acts as the token named
    /// `bootstrap-admin` (the audit actor). Without one, a persistent database must hold
    /// an admin token (`keygate-server tokens create --kind admin --name ops --database
    /// URL`); only `sqlite::memory:` generates and prints tokens.
    #[arg(long, env = "KEYGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// File holding the bootstrap admin token (trailing newline trimmed, at most 4 KiB);
    /// takes precedence over --admin-token / KEYGATE_ADMIN_TOKEN.
    #[arg(long, env = "KEYGATE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<std::path::PathBuf>,
    /// Prefix of issued keys.
    #[arg(long, default_value = keygate::server::DEFAULT_KEY_PREFIX)]
    key_prefix: String,
    /// Log format on stderr: `text`, or `json` (one object a line).
    #[arg(long, env = "KEYGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Roll minute usage rows up into hour rows after this many hours.
    #[arg(long, env = "KEYGATE_USAGE_MINUTES_HOURS", default_value_t = 7 * 24)]
    usage_minutes_hours: u64,
    /// Delete hour usage rows after this many days.
    #[arg(long, env = "KEYGATE_USAGE_HOURS_DAYS", default_value_t = 90)]
    usage_hours_days: u64,
    /// Seconds between usage retention passes.
    #[arg(long, env = "KEYGATE_USAGE_RETENTION_INTERVAL_S", default_value_t = 300)]
    usage_retention_interval_s: u64,
    /// Do not prune usage (another replica, or an external job, does).
    #[arg(long, env = "KEYGATE_USAGE_RETENTION_OFF")]
    no_usage_retention: bool,
    /// Keep the change log (what resuming event streams replay) this many hours.
    #[arg(long, env = "KEYGATE_CHANGE_LOG_HOURS", default_value_t = 24)]
    change_log_hours: u64,
    /// Keep at most this many change log rows.
    #[arg(long, env = "KEYGATE_CHANGE_LOG_ROWS", default_value_t = 100_000)]
    change_log_rows: u64,
    /// Serve Prometheus metrics at GET /metrics on this address of its own (no token:
    /// bind it where only the scraper reaches). Off when absent.
    #[arg(long, env = "KEYGATE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Serve the admin console (still under /console) on this address of its own
    /// instead of the listen address.
    #[arg(long, env = "KEYGATE_CONSOLE_LISTEN", conflicts_with = "no_console")]
    console_listen: Option<SocketAddr>,
    /// No admin console at all.
    #[arg(long, env = "KEYGATE_NO_CONSOLE")]
    no_console: bool,
    /// Mark the console's session cookie `Secure` (set it when TLS fronts the console).
    #[arg(long, env = "KEYGATE_CONSOLE_SECURE_COOKIES")]
    console_secure_cookies: bool,
    /// The key prefix of an environment, `ENV=PREFIX` (repeatable; default `test=kgtest`;
    /// other environments use --key-prefix).
    #[arg(long = "env-prefix", value_name = "ENV=PREFIX", value_parser = parse_env_prefix)]
    env_prefixes: Vec<(String, String)>,
    /// Most event streams (`GET /v1/events`) served at once; past it, 503 with Retry-After.
    #[arg(long, env = "KEYGATE_MAX_EVENT_SUBSCRIBERS", default_value_t = keygate::server::DEFAULT_MAX_EVENT_SUBSCRIBERS)]
    max_event_subscribers: u64,
    /// Most verifications answered at once; past it, 503 `overloaded` with Retry-After 1.
    #[arg(long, env = "KEYGATE_MAX_CONCURRENT_VERIFIES", default_value_t = keygate::server::DEFAULT_MAX_CONCURRENT_VERIFIES)]
    max_concurrent_verifies: usize,
    /// Seconds a connection has to send a request's headers (and the longest an idle
    /// keep-alive connection stays open).
    #[arg(long, env = "KEYGATE_HEADER_READ_TIMEOUT_S", default_value_t = 10)]
    header_read_timeout_s: u64,
    /// Seconds a request body may pause before the request fails.
    #[arg(long, env = "KEYGATE_REQUEST_BODY_TIMEOUT_S", default_value_t = 30)]
    request_body_timeout_s: u64,
    // Webhooks, expiring-soon alerts and the rotation policy (issue 14).
    #[command(flatten)]
    webhooks: WebhookFlags,
    /// Reconcile credits from the fleet-wide engine's counts in this Redis
    /// (`redis://[user:password@]host:port[/db]`; `rediss://` for TLS) into the store. Off
    /// when absent. One replica is enough; several are harmless.
    #[cfg(feature = "redis")]
    #[arg(long, env = "KEYGATE_REDIS_URL", hide_env_values = true)]
    redis: Option<String>,
    /// The prefix of the engine's Redis keys (the middlewares' RedisLimits prefix).
    #[cfg(feature = "redis")]
    #[arg(long, env = "KEYGATE_REDIS_PREFIX", default_value = "keygate:", requires = "redis")]
    redis_prefix: String,
    /// Time between credit reconciliation passes (30s, 5m, ...).
    #[cfg(feature = "redis")]
    #[arg(long, env = "KEYGATE_CREDITS_RECONCILE_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    credits_reconcile_interval: time::Duration,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GroupBy {
    Minute,
    Hour,
    Day,
    Route,
}

impl From<GroupBy> for UsageGroupBy {
    fn from(g: GroupBy) -> Self {
        match g {
            GroupBy::Minute => Self::Minute,
            GroupBy::Hour => Self::Hour,
            GroupBy::Day => Self::Day,
            GroupBy::Route => Self::Route,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// `time level target: message fields`.
    Text,
    /// One JSON object a line (`timestamp`, `level`, `target`, `fields`).
    Json,
}

#[derive(Args, Clone)]
struct Conn {
    /// The key service.
    #[arg(long, env = "KEYGATE_URL", default_value = "http://127.0.0.1:7700")]
    url: String,
    /// Admin token.
    #[arg(long, env = "KEYGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a key and print it (the only time it is shown).
    Create(Box<CreateArgs>),
    /// Change a key: only the fields given change.
    Update(Box<UpdateArgs>),
    /// Disable a key (verify answers DISABLED) until `keys enable`.
    Disable {
        #[command(flatten)]
        conn: Conn,
        /// The key id.
        key_id: String,
    },
    /// Enable a disabled key.
    Enable {
        #[command(flatten)]
        conn: Conn,
        /// The key id.
        key_id: String,
    },
    /// List keys, oldest first or in --sort's order, one page (the next page's cursor goes
    /// to stderr) or all.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Only this owner's.
        #[arg(long)]
        owner: Option<String>,
        /// Only keys whose owner, name, key id or prefix holds this text.
        #[arg(long)]
        search: Option<String>,
        /// Only keys of this environment.
        #[arg(long)]
        environment: Option<String>,
        /// Only keys in this state: active, expiring (soon), disabled, revoked or expired.
        #[arg(long)]
        state: Option<String>,
        /// Keys per page (1 to 1 000; default 1 000).
        #[arg(long)]
        limit: Option<u32>,
        /// The page after this cursor (printed by the page before, with the same --sort).
        #[arg(long, conflicts_with = "all")]
        after: Option<String>,
        /// The order: created (the default), name, owner or last_used; add :desc for
        /// largest first (name:desc).
        #[arg(long)]
        sort: Option<String>,
        /// Every page, following the cursors.
        #[arg(long)]
        all: bool,
    },
    /// Show one key.
    Show {
        #[command(flatten)]
        conn: Conn,
        /// The key id.
        key_id: String,
    },
    /// Issue a new secret; the old one keeps working for --grace seconds.
    Rotate {
        #[command(flatten)]
        conn: Conn,
        /// The key id.
        key_id: String,
        /// Seconds the old secret keeps working.
        #[arg(long, default_value_t = 0)]
        grace: u64,
    },
    /// Revoke a key for good (revoking a revoked key succeeds: "already revoked").
    Revoke {
        #[command(flatten)]
        conn: Conn,
        /// The key id.
        key_id: String,
    },
}

#[derive(Args)]
struct CreateArgs {
    #[command(flatten)]
    conn: Conn,
    /// Owner.
    #[arg(long)]
    owner: String,
    /// Human name.
    #[arg(long)]
    name: String,
    /// A scope (repeatable).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// A role (repeatable).
    #[arg(long = "role")]
    roles: Vec<String>,
    /// Environment (`live`, `test`).
    #[arg(long = "env")]
    environment: Option<String>,
    /// Expiry, RFC 3339.
    #[arg(long, conflicts_with = "expires_in")]
    expires_at: Option<String>,
    /// Expiry from now: `30d`, `12h`, `45m`, `90s`.
    #[arg(long, value_parser = parse_duration)]
    expires_in: Option<time::Duration>,
    /// Metadata, a JSON object.
    #[arg(long)]
    meta: Option<String>,
    /// Rate limit for the middleware: `LIMIT/PERIOD`, e.g. `100/60s`, `5000/1h` (the
    /// limit named `requests`).
    #[arg(long, value_parser = parse_ratelimit)]
    rate_limit: Option<RateLimit>,
    #[command(flatten)]
    quota: QuotaArgs,
    /// A network the key may be used from (CIDR or address; repeatable). Default: any.
    #[arg(long = "allow-network", value_name = "CIDR")]
    allow_networks: Vec<String>,
    /// Allow a key with neither scopes nor roles (it only authenticates).
    #[arg(long)]
    allow_empty: bool,
}

#[derive(Args)]
struct UpdateArgs {
    #[command(flatten)]
    conn: Conn,
    /// The key id.
    key_id: String,
    /// New name.
    #[arg(long)]
    name: Option<String>,
    /// Replace the scopes with these (repeatable).
    #[arg(long = "scope", conflicts_with = "clear_scopes")]
    scopes: Vec<String>,
    /// Remove every scope.
    #[arg(long)]
    clear_scopes: bool,
    /// Replace the roles with these (repeatable).
    #[arg(long = "role", conflicts_with = "clear_roles")]
    roles: Vec<String>,
    /// Remove every role.
    #[arg(long)]
    clear_roles: bool,
    /// Replace the metadata (a JSON object).
    #[arg(long)]
    meta: Option<String>,
    /// New expiry, RFC 3339.
    #[arg(long, conflicts_with_all = ["expires_in", "no_expiry"])]
    expires_at: Option<String>,
    /// New expiry from now: `30d`, `12h`, `45m`, `90s`.
    #[arg(long, value_parser = parse_duration, conflicts_with = "no_expiry")]
    expires_in: Option<time::Duration>,
    /// Remove the expiry.
    #[arg(long)]
    no_expiry: bool,
    /// New rate limit: `LIMIT/PERIOD`, e.g. `100/60s`.
    #[arg(long, value_parser = parse_ratelimit, conflicts_with = "no_rate_limit")]
    rate_limit: Option<RateLimit>,
    /// Remove the rate limit.
    #[arg(long)]
    no_rate_limit: bool,
    /// Replace the named limits with these (with --limit).
    #[command(flatten)]
    quota: QuotaArgs,
    /// Remove every named limit.
    #[arg(long, conflicts_with = "limits")]
    clear_limits: bool,
    /// Remove the credits.
    #[arg(long, conflicts_with_all = ["credits", "refill"])]
    no_credits: bool,
    /// Replace the key's network allowlist with these (CIDR or address; repeatable).
    #[arg(long = "allow-network", value_name = "CIDR", conflicts_with = "clear_networks")]
    allow_networks: Vec<String>,
    /// Remove the network allowlist: any network again.
    #[arg(long)]
    clear_networks: bool,
    /// Allow the change to leave the key with neither scopes nor roles.
    #[arg(long)]
    allow_empty: bool,
}

#[derive(Subcommand)]
enum RolesCmd {
    /// Create or replace a role.
    Put {
        #[command(flatten)]
        conn: Conn,
        /// Role name.
        name: String,
        /// A scope (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
    /// List roles.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a role; refused while keys hold it, unless --detach.
    Delete {
        #[command(flatten)]
        conn: Conn,
        /// Role name.
        name: String,
        /// Remove the role from the keys holding it, then delete it.
        #[arg(long)]
        detach: bool,
    },
}

// ---- limits and credits (issue 16)

/// `--limit`, `--credits` and `--refill`, for keys and owners.
#[derive(Args)]
struct QuotaArgs {
    /// A named limit, `NAME=LIMIT/PERIOD[,burst=N]`: `requests=100/1s,burst=20`,
    /// `reports=1000/1h` (repeatable; replaces the list).
    #[arg(long = "limit", value_parser = parse_limit)]
    limits: Vec<keygate::quota::Limit>,
    /// Credits remaining.
    #[arg(long)]
    credits: Option<u64>,
    /// How credits come back: `every:3600s:500`, `daily:1000`, `monthly:10000@1`
    /// (remaining set to the amount; needs --credits).
    #[arg(long, requires = "credits", value_parser = parse_refill)]
    refill: Option<keygate::quota::Refill>,
}

impl QuotaArgs {
    fn credits(&self) -> Option<keygate::quota::Credits> {
        self.credits.map(|remaining| keygate::quota::Credits { remaining, refill: self.refill })
    }
}

fn parse_limit(s: &str) -> Result<keygate::quota::Limit, String> {
    s.parse()
}

fn parse_refill(s: &str) -> Result<keygate::quota::Refill, String> {
    s.parse()
}

#[derive(Subcommand)]
enum OwnersCmd {
    /// Show an owner's limits and credits.
    Show {
        #[command(flatten)]
        conn: Conn,
        /// The owner, as its keys name it.
        owner: String,
    },
    /// Set an owner's limits and credits, replacing what was set (none given: clears).
    Set {
        #[command(flatten)]
        conn: Conn,
        /// The owner, as its keys name it.
        owner: String,
        #[command(flatten)]
        quota: QuotaArgs,
        /// A network every key of the owner may be used from (CIDR or address; repeatable).
        #[arg(long = "allow-network", value_name = "CIDR")]
        allow_networks: Vec<String>,
    },
}

async fn owners(cmd: OwnersCmd) -> Result<(), CliError> {
    let (conn, info) = match cmd {
        OwnersCmd::Show { conn, owner } => {
            let info = client(&conn)?.get_owner(&owner).await?;
            (conn, info)
        }
        OwnersCmd::Set { conn, owner, quota, allow_networks } => {
            let body = OwnerQuota { credits: quota.credits(), limits: quota.limits, allowed_networks: allow_networks };
            let info = client(&conn)?.put_owner(&owner, &body).await?;
            (conn, info)
        }
    };
    print(&conn, &info, || describe_owner(&info));
    Ok(())
}

fn describe_owner(o: &OwnerInfo) -> String {
    format!(
        "owner:        {}
limits:       {}
credits:      {}
networks:     {}
updated_at:   {}",
        o.owner,
        join_limits(&o.limits),
        o.credits.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string),
        join_networks(&o.allowed_networks),
        fmt_time(o.updated_at)
    )
}

fn join_limits(limits: &[keygate::quota::Limit]) -> String {
    if limits.is_empty() {
        return "-".to_owned();
    }
    limits.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

// ---- tokens (issue 14)

#[derive(Subcommand)]
enum TokensCmd {
    /// Create a token and print it (the only time it is shown). With --database, writes
    /// straight into the store, no key service needed: how the first admin token of a
    /// persistent database is made.
    Create {
        /// The key service (ignored with --database).
        #[arg(long, env = "KEYGATE_URL", default_value = "http://127.0.0.1:7700")]
        url: String,
        /// Admin token (not needed with --database).
        #[arg(long, env = "KEYGATE_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Write into this database directly (sqlite://path, postgres://...) instead of
        /// asking a running key service; audited as `offline-cli`.
        #[arg(long, visible_alias = "db")]
        database: Option<String>,
        /// `service` (middlewares) or `admin` (the admin API).
        #[arg(long, value_enum)]
        kind: Kind,
        /// Unique name (letters, digits, `.`, `_`, `-`); the audit actor of what the
        /// token does.
        #[arg(long)]
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never the tokens themselves).
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke a token, at once on every replica (its event streams are closed).
    /// Idempotent; the last active admin token is refused.
    Revoke {
        #[command(flatten)]
        conn: Conn,
        /// The token id (`tok_...`).
        id: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Kind {
    Service,
    Admin,
}

impl From<Kind> for TokenKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Service => Self::Service,
            Kind::Admin => Self::Admin,
        }
    }
}

async fn tokens(cmd: TokensCmd) -> Result<(), CliError> {
    match cmd {
        TokensCmd::Create { url, admin_token, database, kind, name, json } => {
            let created = match database {
                Some(db) => keygate::server::create_token_offline(&db, &NewToken { kind: kind.into(), name }).await?,
                None => {
                    let token = admin_token.ok_or_else(|| {
                        CliError::Usage(
                            "give --admin-token (or KEYGATE_ADMIN_TOKEN), or --database to write offline".into(),
                        )
                    })?;
                    AdminClient::new(&url, token)?.create_token(kind.into(), &name).await?
                }
            };
            // The one place a raw token is printed: the operator asked for it.
            if json {
                println!("{}", serde_json::to_string_pretty(&created).unwrap_or_default());
            } else {
                println!("{}", describe_token(&created.info));
                println!("token (shown once, store it now):\n{}", created.token);
            }
        }
        TokensCmd::List { conn } => {
            let tokens = client(&conn)?.list_tokens().await?;
            print(&conn, &tokens, || {
                let mut out = String::from("id\tname\tkind\tprefix\tstate\tcreated_at\tlast_used_at\n");
                for t in &tokens {
                    out.push_str(&format!(
                        "{}\t{}\t{}\t{}…\t{}\t{}\t{}\n",
                        t.id,
                        t.name,
                        t.kind,
                        t.prefix,
                        token_state(t),
                        fmt_time(Some(t.created_at)),
                        fmt_time(t.last_used_at)
                    ));
                }
                out
            });
        }
        TokensCmd::Revoke { conn, id } => {
            let t = client(&conn)?.revoke_token(&id).await?;
            print(&conn, &t, || format!("revoked {} ({}) at {}", t.id, t.name, fmt_time(t.revoked_at)));
        }
    }
    Ok(())
}

fn describe_token(t: &TokenInfo) -> String {
    format!(
        "id:           {}\nname:         {}\nkind:         {}\nprefix:       {}…\nstate:        {}\ncreated_at:   {}",
        t.id,
        t.name,
        t.kind,
        t.prefix,
        token_state(t),
        fmt_time(Some(t.created_at))
    )
}

fn token_state(t: &TokenInfo) -> &'static str {
    match (t.revoked_at, t.bootstrap) {
        (Some(_), _) => "revoked",
        (None, true) => "bootstrap",
        (None, false) => "active",
    }
}

/// Largest token file read.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// A token from a file: at most 4 KiB, surrounding whitespace (the trailing newline)
/// trimmed. The contents are never printed.
fn read_token_file(flag: &str, path: &std::path::Path) -> Result<String, CliError> {
    let fail = |why: String| CliError::Usage(format!("{flag} {}: {why}", path.display()));
    let len = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?.len();
    if len > MAX_TOKEN_FILE_BYTES {
        return Err(fail(format!("larger than {MAX_TOKEN_FILE_BYTES} bytes; expected one token")));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| fail("not text".into()))?;
    Ok(text.trim().to_owned())
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Server(#[from] keygate::server::ServerError),
    #[error("{0}")]
    Usage(String),
    // backup and healthcheck (issue 14)
    #[error("{0}")]
    Backup(#[from] BackupError),
    #[error("unhealthy: {0}")]
    Unhealthy(String),
}

impl CliError {
    /// The exit code: see [`EXIT_CODES`].
    fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Client(ClientError::Api { status, .. }) => match status {
                404 => 3,
                400 | 409 | 413 | 422 => 4,
                401 | 403 => 5,
                500..=599 => 6,
                _ => 1,
            },
            Self::Client(ClientError::Http(_)) => 6,
            // The offline `tokens create` writes to the store directly.
            Self::Server(keygate::server::ServerError::Store(keygate::server::StoreError::Conflict(_))) => 4,
            Self::Server(keygate::server::ServerError::Store(keygate::server::StoreError::NotFound(_))) => 3,
            // Connection refused, timed out, or anything but a 200.
            Self::Unhealthy(_) => 6,
            _ => 1,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Serve(s) = &cli.command {
        init_logging(s.log_format);
    }
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            // Shared: every subcommand's failures map to the documented exit codes here.
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs on stderr, filtered by `RUST_LOG` in `EnvFilter`'s directive syntax
/// (`keygate=debug,sqlx=warn`; default `info`; invalid directives are skipped).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::LevelFilter;

    let filter = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into()).from_env_lossy();
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => fmt.json().init(),
    }
}

async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Serve(s) => serve(*s).await,
        Command::Keys(cmd) => keys(cmd).await,
        Command::Tokens(cmd) => tokens(cmd).await,
        Command::Owners(cmd) => owners(cmd).await,
        Command::Roles(RolesCmd::Put { conn, name, scopes }) => {
            let role = client(&conn)?.put_role(&name, scopes).await?;
            print(&conn, &role, || format!("role {} = [{}]", role.name, role.scopes.join(", ")));
            Ok(())
        }
        Command::Roles(RolesCmd::List { conn }) => {
            let roles = client(&conn)?.list_roles().await?;
            print(&conn, &roles, || {
                let rows = roles.iter().map(|r| vec![r.name.clone(), r.scopes.join(","), fmt_time(Some(r.updated_at))]);
                table(["name", "scopes", "updated_at"], rows)
            });
            Ok(())
        }
        Command::Roles(RolesCmd::Delete { conn, name, detach }) => {
            let deleted = client(&conn)?.delete_role(&name, detach).await?;
            print(&conn, &deleted, || match deleted.detached.len() {
                0 => format!("deleted role {}", deleted.name),
                n => {
                    format!("deleted role {} (removed from {n} key(s): {})", deleted.name, deleted.detached.join(", "))
                }
            });
            Ok(())
        }
        Command::Audit { conn, since } => {
            let since = since.as_deref().map(parse_time).transpose()?;
            let records = client(&conn)?.audit(since).await?;
            print(&conn, &records, || {
                let rows = records.iter().map(|r| {
                    vec![
                        fmt_time(Some(r.at)),
                        r.actor.clone(),
                        r.action.clone(),
                        r.key_id.clone().unwrap_or_else(|| "-".into()),
                        r.changes.to_string(),
                    ]
                });
                table(["at", "actor", "action", "key_id", "changes"], rows)
            });
            Ok(())
        }
        Command::Usage { conn, key, key_id, owner, group_by, since, until } => {
            let mut query = match (key.or(key_id), owner) {
                (Some(k), None) => UsageQuery::key(k),
                (None, Some(o)) => UsageQuery::owner(o),
                _ => return Err(CliError::Usage("give a key id (--key-id) or --owner".into())),
            };
            query.since = since.as_deref().map(parse_time).transpose()?;
            query.until = until.as_deref().map(parse_time).transpose()?;
            let report = client(&conn)?.usage_report(&query.group_by(group_by.into())).await?;
            print(&conn, &report, || usage_table(&report));
            Ok(())
        }
        Command::Webhooks(cmd) => webhooks(cmd).await,
        Command::Alerts(AlertsCmd::List { conn, all }) => {
            let alerts = client(&conn)?.list_alerts(if all { None } else { Some(false) }).await?;
            print(&conn, &alerts, || {
                let rows = alerts.iter().map(|a| {
                    vec![
                        a.id.map_or_else(|| "-".into(), |id| id.to_string()),
                        fmt_time(Some(a.at)),
                        a.key_id.clone(),
                        a.kind.as_str().to_owned(),
                        a.observed.to_string(),
                        format!("{:.1}", a.threshold),
                        fmt_time(a.acknowledged_at),
                        a.detail.clone(),
                    ]
                });
                table(["id", "at", "key_id", "kind", "observed", "threshold", "acknowledged_at", "detail"], rows)
            });
            Ok(())
        }
        Command::Alerts(AlertsCmd::Ack { conn, alert_id }) => {
            let alert = client(&conn)?.ack_alert(alert_id).await?;
            print(&conn, &alert, || {
                format!("acknowledged alert {alert_id} ({} on {})", alert.kind.as_str(), alert.key_id)
            });
            Ok(())
        }
        Command::Backup(b) => backup(b).await,
        Command::Healthcheck(h) => healthcheck(h).await,
    }
}

async fn backup(b: Backup) -> Result<(), CliError> {
    let report = keygate::server::backup_sqlite(&b.database, &b.to, b.force).await?;
    println!("backed up {} keys ({} bytes) to {}", report.keys, report.bytes, b.to.display());
    Ok(())
}

async fn healthcheck(h: Healthcheck) -> Result<(), CliError> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(h.timeout_s.max(1)))
        .build()
        .map_err(|e| CliError::Unhealthy(e.to_string()))?;
    let response = client.get(&h.url).send().await.map_err(|e| CliError::Unhealthy(e.without_url().to_string()))?;
    if response.status() != reqwest::StatusCode::OK {
        return Err(CliError::Unhealthy(format!("{} answered {}", h.url, response.status())));
    }
    println!("ok");
    Ok(())
}

async fn serve(s: Serve) -> Result<(), CliError> {
    let retention = RetentionConfig {
        enabled: !s.no_usage_retention,
        interval: Duration::from_secs(s.usage_retention_interval_s),
        minutes: Duration::from_secs(s.usage_minutes_hours.saturating_mul(3600)),
        hours: Duration::from_secs(s.usage_hours_days.saturating_mul(86_400)),
        change_log: Duration::from_secs(s.change_log_hours.saturating_mul(3600)),
        change_log_rows: s.change_log_rows,
        ..RetentionConfig::default()
    };
    let mut builder = KeyServer::builder()
        .database(&s.db)
        .listen(s.listen)
        .key_prefix(&s.key_prefix)
        .retention(retention)
        .max_event_subscribers(s.max_event_subscribers)
        .max_concurrent_verifies(s.max_concurrent_verifies)
        .header_read_timeout(Duration::from_secs(s.header_read_timeout_s))
        .request_body_timeout(Duration::from_secs(s.request_body_timeout_s));
    for (env, prefix) in &s.env_prefixes {
        builder = builder.env_prefix(env, prefix);
    }
    if let Some(addr) = s.metrics_listen {
        builder = builder.metrics_listen(addr);
    }
    builder = builder.console(if s.no_console {
        keygate::server::ConsoleConfig::off()
    } else {
        let config = keygate::server::ConsoleConfig::default().secure_cookies(s.console_secure_cookies);
        match s.console_listen {
            Some(addr) => config.listen(addr),
            None => config,
        }
    });
    let service_token = match &s.service_token_file {
        Some(path) => Some(read_token_file("--service-token-file", path)?),
        None => s.service_token.clone(),
    };
    let admin_token = match &s.admin_token_file {
        Some(path) => Some(read_token_file("--admin-token-file", path)?),
        None => s.admin_token.clone(),
    };
    if let Some(t) = &service_token {
        builder = builder.service_token(t.as_str());
    }
    if let Some(t) = &admin_token {
        builder = builder.admin_token(t.as_str());
    }
    #[cfg(feature = "redis")]
    if let Some(url) = &s.redis {
        let every = Duration::from_secs(s.credits_reconcile_interval.whole_seconds().max(1) as u64);
        builder = builder.reconcile_credits(url.as_str(), every).redis_prefix(&s.redis_prefix);
    }
    let builder = webhook_options(builder, &s.webhooks)?;
    let server = builder.start().await?;
    // Generated only on `sqlite::memory:`. Printed once, on stderr, and never logged.
    if let (None, Some(t)) = (&service_token, server.service_token()) {
        eprintln!("generated service token (shown once; this database and the token end with the process): {t}");
    }
    if let (None, Some(t)) = (&admin_token, server.admin_token()) {
        eprintln!("generated admin token (shown once; this database and the token end with the process): {t}");
    }
    eprintln!("keygate-server listening on {}", server.url());
    if let Some(addr) = server.metrics_addr() {
        eprintln!("keygate-server metrics on http://{addr}/metrics");
    }
    server.run_until(shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

async fn keys(cmd: KeysCmd) -> Result<(), CliError> {
    match cmd {
        KeysCmd::Create(args) => {
            let CreateArgs {
                conn,
                owner,
                name,
                scopes,
                roles,
                environment,
                expires_at,
                expires_in,
                meta,
                rate_limit,
                quota,
                allow_networks,
                allow_empty,
            } = *args;
            let meta = meta.as_deref().map(parse_meta).transpose()?;
            let expires_at = match (expires_at, expires_in) {
                (Some(at), _) => Some(parse_time(&at)?),
                (None, Some(d)) => Some(OffsetDateTime::now_utc() + d),
                (None, None) => None,
            };
            let new = NewKey {
                owner,
                name,
                scopes,
                roles,
                environment,
                expires_at,
                meta,
                ratelimit: rate_limit,
                credits: quota.credits(),
                limits: quota.limits,
                allowed_networks: allow_networks,
                allow_empty,
            };
            let created = client(&conn)?.create_key(new).await?;
            print_created(&conn, &created);
        }
        KeysCmd::Update(args) => {
            let UpdateArgs {
                conn,
                key_id,
                name,
                scopes,
                clear_scopes,
                roles,
                clear_roles,
                meta,
                expires_at,
                expires_in,
                no_expiry,
                rate_limit,
                no_rate_limit,
                quota,
                clear_limits,
                no_credits,
                allow_networks,
                clear_networks,
                allow_empty,
            } = *args;
            let credits = if no_credits { Some(None) } else { quota.credits().map(Some) };
            let patch = KeyPatch {
                name,
                scopes: (clear_scopes || !scopes.is_empty()).then_some(scopes),
                roles: (clear_roles || !roles.is_empty()).then_some(roles),
                disabled: None,
                meta: meta.as_deref().map(parse_meta).transpose()?,
                expires_at: match (expires_at, expires_in, no_expiry) {
                    (Some(at), _, _) => Some(Some(parse_time(&at)?)),
                    (None, Some(d), _) => Some(Some(OffsetDateTime::now_utc() + d)),
                    (None, None, true) => Some(None),
                    (None, None, false) => None,
                },
                ratelimit: if no_rate_limit { Some(None) } else { rate_limit.map(Some) },
                limits: (clear_limits || !quota.limits.is_empty()).then_some(quota.limits),
                credits,
                allowed_networks: (clear_networks || !allow_networks.is_empty()).then_some(allow_networks),
                allow_empty,
            };
            if patch.is_empty() {
                return Err(CliError::Usage(
                    "nothing to change: give --name, --scope/--clear-scopes, --role/--clear-roles, --meta, \
                     --expires-at/--expires-in/--no-expiry, --rate-limit/--no-rate-limit, --limit/--clear-limits \
                     --credits/--no-credits or --allow-network/--clear-networks"
                        .into(),
                ));
            }
            let k = client(&conn)?.update_key(&key_id, &patch).await?;
            print(&conn, &k, || describe(&k));
        }
        KeysCmd::Disable { conn, key_id } => {
            let k = client(&conn)?.disable(&key_id).await?;
            print(&conn, &k, || format!("disabled {}", k.key_id));
        }
        KeysCmd::Enable { conn, key_id } => {
            let k = client(&conn)?.enable(&key_id).await?;
            print(&conn, &k, || format!("enabled {}", k.key_id));
        }
        KeysCmd::List { conn, owner, search, environment, state: wanted, limit, after, sort, all } => {
            let query = keygate::client::KeyListQuery { owner, search, environment, state: wanted, limit, after, sort };
            let admin = client(&conn)?;
            let keys = if all {
                // A bound against a server that never ends its cursors: 10 000 pages.
                admin.list_all_keys(&query, 10_000).await?
            } else {
                let page = admin.list_keys_page(&query).await?;
                if let Some(next) = &page.next {
                    eprintln!("more keys: --after {next}");
                }
                page.keys
            };
            print(&conn, &keys, || {
                let rows = keys.iter().map(|k| {
                    vec![
                        k.key_id.clone(),
                        k.key_prefix.clone(),
                        k.owner.clone(),
                        k.name.clone(),
                        k.environment.clone(),
                        state(k).to_owned(),
                        fmt_time(k.expires_at),
                        fmt_time(k.last_used_at),
                    ]
                });
                table(["key_id", "prefix", "owner", "name", "env", "state", "expires_at", "last_used_at"], rows)
            });
        }
        KeysCmd::Show { conn, key_id } => {
            let k = client(&conn)?.get_key(&key_id).await?;
            print(&conn, &k, || describe(&k));
        }
        KeysCmd::Rotate { conn, key_id, grace } => {
            let created = client(&conn)?.rotate(&key_id, grace).await?;
            print_created(&conn, &created);
        }
        KeysCmd::Revoke { conn, key_id } => {
            let r = client(&conn)?.revoke_key(&key_id).await?;
            print(&conn, &r, || {
                if r.already_revoked {
                    format!("{} already revoked (at {})", r.info.key_id, fmt_time(r.info.revoked_at))
                } else {
                    format!("revoked {}", r.info.key_id)
                }
            });
        }
    }
    Ok(())
}

/// An aligned table: a header line, then one line per row, columns padded with spaces.
fn table<const N: usize>(header: [&str; N], rows: impl Iterator<Item = Vec<String>>) -> String {
    table_of(&header, rows)
}

fn table_of(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.to_vec());
    let mut empty = true;
    for row in rows {
        empty = false;
        t.add_row(row);
    }
    if empty {
        return "(none)".into();
    }
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    // The last column's padding.
    t.lines().map(|l| l.trim_end().to_owned()).collect::<Vec<_>>().join("\n")
}

/// A usage report as a table: a title line, one line per bucket, then the total.
fn usage_table(report: &UsageReport) -> String {
    let whose = match (&report.key_id, &report.owner) {
        (Some(k), _) => format!("key {k}"),
        (None, Some(o)) => format!("owner {o} (all keys)"),
        (None, None) => "usage".into(),
    };
    let title =
        format!("{whose}, per {}, {} to {}", report.group_by.as_str(), fmt_time(report.since), fmt_time(report.until));
    let by_route = report.group_by == UsageGroupBy::Route;
    let mut header: Vec<&str> = if by_route { vec!["route", "method", "outcome"] } else { vec!["start"] };
    header.extend([
        "requests", "allowed", "denied", "1xx", "2xx", "3xx", "4xx", "5xx", "p50_ms", "p90_ms", "p99_ms", "max_ms",
    ]);
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    let mut total = [0u64; 8];
    let mut rows = Vec::new();
    for b in &report.buckets {
        let mut row = match (&b.route, &b.method, &b.outcome) {
            (Some(r), Some(m), Some(o)) => vec![r.clone(), m.clone(), o.clone()],
            _ if by_route => vec!["-".into(), "-".into(), "-".into()],
            _ => vec![fmt_time(Some(b.start))],
        };
        let counts =
            [b.requests, b.allowed, b.denied, b.status_1xx, b.status_2xx, b.status_3xx, b.status_4xx, b.status_5xx];
        for (t, c) in total.iter_mut().zip(counts) {
            *t = t.saturating_add(c);
        }
        row.extend(counts.iter().map(u64::to_string));
        row.extend([
            ms(b.latency_ms_p50),
            ms(b.latency_ms_p90),
            ms(b.latency_ms_p99),
            format!("{:.2}", b.latency_ms_max),
        ]);
        rows.push(row);
    }
    let mut last = vec!["total".to_owned()];
    if by_route {
        last.extend(["".to_owned(), "".to_owned()]);
    }
    last.extend(total.iter().map(u64::to_string));
    last.extend(std::iter::repeat_n(String::new(), 4));
    rows.push(last);
    format!("{title}\n{}", table_of(&header, rows.into_iter()))
}

fn client(conn: &Conn) -> Result<AdminClient, CliError> {
    Ok(AdminClient::new(&conn.url, &conn.admin_token)?)
}

fn print<T: serde::Serialize>(conn: &Conn, value: &T, text: impl FnOnce() -> String) {
    if conn.json {
        match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: {e}"),
        }
    } else {
        print!("{}", text());
        println!();
    }
}

fn print_created(conn: &Conn, c: &CreatedKey) {
    // The one place a raw key is printed: the operator asked for it.
    if conn.json {
        let mut v = serde_json::to_value(&c.info).unwrap_or_default();
        v["key"] = c.key.expose_secret().into();
        if let Some(t) = c.previous_expires_at {
            v["previous_expires_at"] = fmt_time(Some(t)).into();
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("{}", describe(&c.info));
        if let Some(t) = c.previous_expires_at {
            println!("previous key works until {}", fmt_time(Some(t)));
        }
        println!("key (shown once, store it now):\n{}", c.key.expose_secret());
    }
}

fn describe(k: &KeyInfo) -> String {
    format!(
        "key_id:       {}\nprefix:       {}…\nowner:        {}\nname:         {}\nscopes:       {}\nroles:        {}\n\
         environment:  {}\nstate:        {}\nexpires_at:   {}\ncreated_at:   {}\nlast_used_at: {}\nmeta:         {}\n\
         limits:       {}\ncredits:      {}\nnetworks:     {}",
        k.key_id,
        k.key_prefix,
        k.owner,
        k.name,
        k.scopes.join(", "),
        k.roles.join(", "),
        k.environment,
        state(k),
        fmt_time(k.expires_at),
        fmt_time(Some(k.created_at)),
        fmt_time(k.last_used_at),
        k.meta,
        join_limits(&k.limits),
        k.credits.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string),
        join_networks(&k.allowed_networks)
    )
}

fn join_networks(networks: &[String]) -> String {
    if networks.is_empty() { "any".to_owned() } else { networks.join(", ") }
}

fn state(k: &KeyInfo) -> &'static str {
    if k.revoked {
        "revoked"
    } else if k.disabled {
        "disabled"
    } else if k.expires_at.is_some_and(|e| e <= OffsetDateTime::now_utc()) {
        "expired"
    } else {
        "active"
    }
}

fn fmt_time(t: Option<OffsetDateTime>) -> String {
    t.and_then(|t| t.format(&Rfc3339).ok()).unwrap_or_else(|| "-".into())
}

fn parse_time(s: &str) -> Result<OffsetDateTime, CliError> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|_| CliError::Usage(format!("`{s}` is not an RFC 3339 time")))
}

fn parse_meta(s: &str) -> Result<serde_json::Value, CliError> {
    serde_json::from_str(s).map_err(|e| CliError::Usage(format!("--meta is not JSON: {e}")))
}

/// `30d`, `12h`, `45m`, `90s` (a number and one unit), above zero and at most 100 years.
fn parse_duration(s: &str) -> Result<time::Duration, String> {
    let bad = || format!("`{s}` is not a duration: a number and a unit, such as 30d, 12h, 45m or 90s");
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(unit_at);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let total = n.checked_mul(seconds).filter(|t| *t > 0 && *t <= 100 * 366 * 86_400).ok_or_else(bad)?;
    Ok(time::Duration::seconds(total))
}

/// `LIMIT/PERIOD`: `100/60s`, `5000/1h` (a bare period is seconds: `100/60`).
fn parse_ratelimit(s: &str) -> Result<RateLimit, String> {
    let bad = || format!("`{s}` is not a rate limit: LIMIT/PERIOD, such as 100/60s or 5000/1h");
    let (limit, period) = s.split_once('/').ok_or_else(bad)?;
    let limit: u64 = limit.trim().parse().map_err(|_| bad())?;
    let period = period.trim();
    let period_s = if period.bytes().all(|b| b.is_ascii_digit()) {
        period.parse::<u64>().map_err(|_| bad())?
    } else {
        parse_duration(period)?.whole_seconds() as u64
    };
    if limit == 0 || period_s == 0 {
        return Err(bad());
    }
    Ok(RateLimit { limit, period_s })
}

/// `ENV=PREFIX`.
fn parse_env_prefix(s: &str) -> Result<(String, String), String> {
    let (env, prefix) = s.split_once('=').ok_or_else(|| format!("`{s}` is not ENV=PREFIX (e.g. test=kgtest)"))?;
    Ok((env.to_owned(), prefix.to_owned()))
}

// ---- webhooks, expiring-soon alerts, rotation policy (issue 14)

#[derive(Args)]
struct WebhookFlags {
    /// Do not deliver webhooks from this replica (events are still queued).
    #[arg(long, env = "KEYGATE_WEBHOOKS_OFF")]
    no_webhooks: bool,
    /// Most attempts per webhook delivery.
    #[arg(long, env = "KEYGATE_WEBHOOK_MAX_ATTEMPTS", default_value_t = 20)]
    webhook_max_attempts: u32,
    /// Longest time after an event its delivery is retried (`24h`).
    #[arg(long, env = "KEYGATE_WEBHOOK_MAX_AGE", default_value = "24h", value_parser = parse_span)]
    webhook_max_age: Duration,
    /// Accept and deliver to webhook URLs on loopback, private, link-local or unspecified
    /// addresses (refused by default, against request forgery into the server's network).
    #[arg(long, env = "KEYGATE_WEBHOOK_ALLOW_INTERNAL")]
    webhook_allow_internal: bool,
    /// Most pending deliveries per endpoint; past it the oldest are dropped and counted.
    #[arg(long, env = "KEYGATE_WEBHOOK_MAX_PENDING", default_value_t = 10_000)]
    webhook_max_pending: u32,
    /// Raise `key_expiring` this long before a key expires (`0`: never).
    #[arg(long, env = "KEYGATE_EXPIRING_WITHIN", default_value = "7d", value_parser = parse_span)]
    expiring_within: Duration,
    /// How often keys are swept for expiring ones and the rotation policy.
    #[arg(long, env = "KEYGATE_KEY_SWEEP_INTERVAL", default_value = "60s", value_parser = parse_span)]
    key_sweep_interval: Duration,
    /// Maximum key age of an environment, `ENV=DURATION` (`live=90d`; repeatable).
    #[arg(long = "max-key-age", value_name = "ENV=DURATION", value_parser = parse_pair)]
    max_key_age: Vec<(String, Duration)>,
    /// Maximum key age of an owner, `OWNER=DURATION` (wins over the environment's; repeatable).
    #[arg(long = "max-key-age-owner", value_name = "OWNER=DURATION", value_parser = parse_pair)]
    max_key_age_owner: Vec<(String, Duration)>,
    /// Expire keys this long after they passed their maximum age (default: never).
    #[arg(long, value_parser = parse_span)]
    expire_after_max_age_grace: Option<Duration>,
    /// Take GitHub secret scanning reports at POST /v1/leaks/github (off by default).
    #[arg(long, env = "KEYGATE_GITHUB_SECRET_SCANNING")]
    github_secret_scanning: bool,
    /// Where GitHub's secret scanning public keys are fetched from.
    #[arg(long, env = "KEYGATE_GITHUB_KEYS_URL", default_value = keygate::server::GITHUB_KEYS_URL)]
    github_keys_url: String,
    /// What a leak report does to a key: revoke (default) or disable.
    #[arg(long, env = "KEYGATE_LEAK_ACTION", default_value = "revoke", value_parser = ["revoke", "disable"])]
    leak_action: String,
}

fn webhook_options(builder: KeyServer, f: &WebhookFlags) -> Result<KeyServer, CliError> {
    use keygate::server::{AlertConfig, RotationPolicy, WebhookConfig};
    let webhooks = WebhookConfig {
        enabled: !f.no_webhooks,
        max_attempts: f.webhook_max_attempts,
        max_age: f.webhook_max_age,
        max_pending: f.webhook_max_pending,
        ..WebhookConfig::default()
    };
    let alerts = AlertConfig {
        expiring_within: f.expiring_within,
        sweep_interval: f.key_sweep_interval,
        ..AlertConfig::default()
    };
    let mut policy = RotationPolicy::default();
    for (env, age) in &f.max_key_age {
        policy = policy.max_age(env, *age);
    }
    for (owner, age) in &f.max_key_age_owner {
        policy = policy.max_age_for_owner(owner, *age);
    }
    if let Some(grace) = f.expire_after_max_age_grace {
        if policy == RotationPolicy::default() {
            return Err(CliError::Usage("--expire-after-max-age-grace needs a --max-key-age".into()));
        }
        policy = policy.expire_after(grace);
    }
    let mut builder = builder
        .webhooks(webhooks)
        .allow_internal_webhooks(f.webhook_allow_internal)
        .alerts(alerts)
        .rotation_policy(policy);
    if f.github_secret_scanning {
        use keygate::server::{LeakAction, SecretScanning};
        let action = if f.leak_action == "disable" { LeakAction::Disable } else { LeakAction::Revoke };
        builder = builder.secret_scanning(SecretScanning::github().keys_url(&f.github_keys_url).action(action));
    }
    Ok(builder)
}

/// `90d`, `12h`, `30m`, `45s`, or bare seconds.
fn parse_span(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| format!("`{s}` is not a duration such as 90d, 12h, 30m or 45s"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: the unit must be s, m, h or d")),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(|| format!("`{s}` is too long"))
}

/// `NAME=DURATION`.
fn parse_pair(s: &str) -> Result<(String, Duration), String> {
    let (name, span) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected NAME=DURATION (live=90d)"))?;
    if name.is_empty() {
        return Err(format!("`{s}`: the name before `=` is empty"));
    }
    Ok((name.to_owned(), parse_span(span)?))
}

#[derive(Subcommand)]
enum WebhooksCmd {
    /// Add an endpoint and print its signing secret (the only time it is shown).
    Add {
        #[command(flatten)]
        conn: Conn,
        /// Where deliveries are posted (http:// or https://).
        endpoint: String,
        /// An event type, or a prefix such as `alert.*` (repeatable; default: all).
        #[arg(long = "event")]
        events: Vec<String>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
    },
    /// List endpoints.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove an endpoint and its pending deliveries.
    Remove {
        #[command(flatten)]
        conn: Conn,
        /// The endpoint id (`wh_...`).
        id: String,
    },
    /// Show an endpoint's delivery log, newest first.
    Deliveries {
        #[command(flatten)]
        conn: Conn,
        /// The endpoint id (`wh_...`).
        id: String,
        /// Most deliveries shown (at most 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only deliveries with ids below this (the page before).
        #[arg(long)]
        before: Option<i64>,
    },
}

async fn webhooks(cmd: WebhooksCmd) -> Result<(), CliError> {
    match cmd {
        WebhooksCmd::Add { conn, endpoint, events, description } => {
            let created = client(&conn)?.create_webhook(&endpoint, events, description.as_deref()).await?;
            // The one place a signing secret is printed: the operator asked for it.
            print(&conn, &created, || {
                format!(
                    "webhook {} -> {}\nsigning secret (shown once): {}\n",
                    created.endpoint.id, created.endpoint.url, created.secret
                )
            });
        }
        WebhooksCmd::List { conn } => {
            let hooks = client(&conn)?.list_webhooks().await?;
            print(&conn, &hooks, || {
                hooks
                    .iter()
                    .map(|h| {
                        let events = if h.events.is_empty() { "*".to_owned() } else { h.events.join(",") };
                        format!(
                            "{}\t{}\t{}\tpending {}\tdropped {}\t{}\n",
                            h.id, h.url, events, h.pending, h.dropped, h.description
                        )
                    })
                    .collect::<String>()
            });
        }
        WebhooksCmd::Remove { conn, id } => {
            let removed = client(&conn)?.delete_webhook(&id).await?;
            print(&conn, &removed, || format!("removed webhook {} ({})", removed.id, removed.url));
        }
        WebhooksCmd::Deliveries { conn, id, limit, before } => {
            let page = client(&conn)?.webhook_deliveries(&id, before, Some(limit)).await?;
            print(&conn, &page, || {
                let mut out =
                    format!("webhook {}: {} pending, {} dropped\n", page.webhook_id, page.pending, page.dropped);
                for d in &page.deliveries {
                    out.push_str(&format!(
                        "{}\t{}\t{}\t{}\tattempts {}\t{}\t{}\t{}\n",
                        d.id,
                        fmt_time(Some(d.created_at)),
                        d.event_id,
                        d.event_type,
                        d.attempts,
                        d.state.as_str(),
                        d.last_status.map_or_else(|| "-".to_owned(), |s| s.to_string()),
                        d.last_error.as_deref().unwrap_or("-"),
                    ));
                }
                if let Some(b) = page.next_before {
                    out.push_str(&format!("(older: --before {b})\n"));
                }
                out
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rate_limits_parse() {
        assert_eq!(parse_duration("30d").unwrap(), time::Duration::days(30));
        assert_eq!(parse_duration("12h").unwrap(), time::Duration::hours(12));
        assert_eq!(parse_duration("45m").unwrap(), time::Duration::minutes(45));
        assert_eq!(parse_duration("90s").unwrap(), time::Duration::seconds(90));
        for bad in ["", "d", "0d", "30", "30w", "-1h", "1.5h", "99999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_ratelimit("100/60s").unwrap(), RateLimit { limit: 100, period_s: 60 });
        assert_eq!(parse_ratelimit("5000/1h").unwrap(), RateLimit { limit: 5000, period_s: 3600 });
        assert_eq!(parse_ratelimit("7/30").unwrap(), RateLimit { limit: 7, period_s: 30 });
        for bad in ["100", "0/60s", "100/0", "x/60s", "100/soon"] {
            assert!(parse_ratelimit(bad).is_err(), "{bad}");
        }
    }
}
