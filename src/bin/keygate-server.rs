//! `keygate-server`: the reference key service and its admin command line.
//!
//! ```text
//! keygate-server serve --db sqlite://keys.db --listen 127.0.0.1:7700
//! keygate-server keys create --owner acme --name ci --scope reports:read
//! keygate-server keys list [--owner acme]
//! keygate-server keys show key_...
//! keygate-server keys rotate key_... --grace 3600
//! keygate-server keys revoke key_...
//! keygate-server roles put analyst --scope reports:read --scope dashboards:read
//! keygate-server usage --key-id key_... | --owner acme [--group-by minute|hour|day|route] [--since T] [--until T]
//! keygate-server audit | alerts
//! ```
//!
//! Tokens come from `--service-token` / `--admin-token` or `KEYGATE_SERVICE_TOKEN` /
//! `KEYGATE_ADMIN_TOKEN`; `serve` generates and prints once any token not given.
//! `serve` logs on stderr as text or, with `--log-format json`, JSON lines, filtered by
//! `RUST_LOG` (`EnvFilter` directives such as `keygate=debug,sqlx=warn`; default `info`).
//! Admin commands talk to `--url` (`KEYGATE_URL`, default `http://127.0.0.1:7700`) and
//! print for people, or JSON with `--json`.
//!
//! Usage retention (`serve`): minute rows are rolled up into hour rows after
//! `--usage-minutes-hours` (default 168, 7 days), hour rows deleted after
//! `--usage-hours-days` (default 90), a pass every `--usage-retention-interval-s`
//! (default 300); `--no-usage-retention` turns the passes off.
//!
//! Webhooks: `keygate-server webhooks add https://hooks.example.com/keygate [--event
//! key.revoked --event 'alert.*'] [--description ...]` prints the endpoint's signing
//! secret once; `webhooks list`, `webhooks remove wh_...`, `webhooks deliveries wh_...`.
//! `serve` retries a delivery `--webhook-max-attempts` times (default 20) for at most
//! `--webhook-max-age` (default 24h) and queues at most `--webhook-max-pending` (default
//! 10 000) per endpoint; `--expiring-within` (default 7d, `0` off) raises `key_expiring`
//! before a key expires; `--max-key-age live=90d` (repeatable; `--max-key-age-owner
//! acme=30d` per owner) raises `key_max_age` past it and, with
//! `--expire-after-max-age-grace 7d`, expires the key that much later (audit actor
//! `policy`). Durations: a number with `s`, `m`, `h` or `d` (`90d`, `12h`; bare: seconds).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use keygate::server::{
    AdminClient, ClientError, CreatedKey, KeyInfo, KeyServer, NewKey, RetentionConfig, UsageGroupBy, UsageQuery,
    UsageReport,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Parser)]
#[command(name = "keygate-server", version, about = "The keygate reference key service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the key service.
    Serve(Serve),
    /// Manage keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Manage roles.
    #[command(subcommand)]
    Roles(RolesCmd),
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
    /// Show usage alerts.
    Alerts {
        #[command(flatten)]
        conn: Conn,
    },
    // Webhooks (issue 14).
    /// Manage webhook endpoints and read their delivery log.
    #[command(subcommand)]
    Webhooks(WebhooksCmd),
}

#[derive(Args)]
struct Serve {
    /// Database URL: sqlite://path (created if missing), sqlite::memory:, postgres://...
    #[arg(long, env = "KEYGATE_DB", default_value = "sqlite://keygate.db")]
    db: String,
    /// Address to listen on.
    #[arg(long, env = "KEYGATE_LISTEN", default_value = keygate::server::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Token for verify, usage and events (generated and printed once if absent).
    #[arg(long, env = "KEYGATE_SERVICE_TOKEN", hide_env_values = true)]
    service_token: Option<String>,
    /// Token for the admin API (generated and printed once if absent).
    #[arg(long, env = "KEYGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
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
    // Webhooks, expiring-soon alerts and the rotation policy (issue 14).
    #[command(flatten)]
    webhooks: WebhookFlags,
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
    Create {
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
        #[arg(long)]
        expires_at: Option<String>,
        /// Metadata, a JSON object.
        #[arg(long)]
        meta: Option<String>,
    },
    /// List keys.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Only this owner's.
        #[arg(long)]
        owner: Option<String>,
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
    /// Revoke a key for good.
    Revoke {
        #[command(flatten)]
        conn: Conn,
        /// The key id.
        key_id: String,
    },
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
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Server(#[from] keygate::server::ServerError),
    #[error("{0}")]
    Usage(String),
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
            ExitCode::FAILURE
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
        Command::Serve(s) => serve(s).await,
        Command::Keys(cmd) => keys(cmd).await,
        Command::Roles(RolesCmd::Put { conn, name, scopes }) => {
            let role = client(&conn)?.put_role(&name, scopes).await?;
            print(&conn, &role, || format!("role {} = [{}]", role.name, role.scopes.join(", ")));
            Ok(())
        }
        Command::Roles(RolesCmd::List { conn }) => {
            let roles = client(&conn)?.list_roles().await?;
            print(&conn, &roles, || {
                roles.iter().map(|r| format!("{}\t{}\n", r.name, r.scopes.join(","))).collect::<String>()
            });
            Ok(())
        }
        Command::Audit { conn, since } => {
            let since = since.as_deref().map(parse_time).transpose()?;
            let records = client(&conn)?.audit(since).await?;
            print(&conn, &records, || {
                records
                    .iter()
                    .map(|r| {
                        format!(
                            "{}\t{}\t{}\t{}\t{}\n",
                            fmt_time(Some(r.at)),
                            r.actor,
                            r.action,
                            r.key_id.as_deref().unwrap_or("-"),
                            r.changes
                        )
                    })
                    .collect::<String>()
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
        Command::Alerts { conn } => {
            let alerts = client(&conn)?.alerts().await?;
            print(&conn, &alerts, || {
                alerts
                    .iter()
                    .map(|a| format!("{}\t{}\t{}\t{}\n", fmt_time(Some(a.at)), a.key_id, a.kind.as_str(), a.detail))
                    .collect::<String>()
            });
            Ok(())
        }
    }
}

async fn serve(s: Serve) -> Result<(), CliError> {
    let retention = RetentionConfig {
        enabled: !s.no_usage_retention,
        interval: Duration::from_secs(s.usage_retention_interval_s),
        minutes: Duration::from_secs(s.usage_minutes_hours.saturating_mul(3600)),
        hours: Duration::from_secs(s.usage_hours_days.saturating_mul(86_400)),
        ..RetentionConfig::default()
    };
    let mut builder =
        KeyServer::builder().database(&s.db).listen(s.listen).key_prefix(&s.key_prefix).retention(retention);
    if let Some(t) = &s.service_token {
        builder = builder.service_token(t);
    }
    if let Some(t) = &s.admin_token {
        builder = builder.admin_token(t);
    }
    let builder = webhook_options(builder, &s.webhooks)?;
    let server = builder.start().await?;
    // Printed once, on stderr, and never logged.
    if s.service_token.is_none() {
        eprintln!(
            "generated service token (shown once; set KEYGATE_SERVICE_TOKEN to keep one): {}",
            server.service_token()
        );
    }
    if s.admin_token.is_none() {
        eprintln!("generated admin token (shown once; set KEYGATE_ADMIN_TOKEN to keep one): {}", server.admin_token());
    }
    eprintln!("keygate-server listening on {}", server.url());
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
        KeysCmd::Create { conn, owner, name, scopes, roles, environment, expires_at, meta } => {
            let meta = meta
                .map(|m| serde_json::from_str(&m).map_err(|e| CliError::Usage(format!("--meta is not JSON: {e}"))))
                .transpose()?;
            let expires_at = expires_at.as_deref().map(parse_time).transpose()?;
            let new = NewKey { owner, name, scopes, roles, environment, expires_at, meta, ratelimit: None };
            let created = client(&conn)?.create_key(new).await?;
            print_created(&conn, &created);
        }
        KeysCmd::List { conn, owner } => {
            let keys = client(&conn)?.list_keys(owner.as_deref()).await?;
            print(&conn, &keys, || {
                let mut out = String::from("key_id\tprefix\towner\tname\tstate\tlast_used_at\n");
                for k in &keys {
                    out.push_str(&format!(
                        "{}\t{}…\t{}\t{}\t{}\t{}\n",
                        k.key_id,
                        k.key_prefix,
                        k.owner,
                        k.name,
                        state(k),
                        fmt_time(k.last_used_at)
                    ));
                }
                out
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
            let k = client(&conn)?.revoke(&key_id).await?;
            print(&conn, &k, || format!("revoked {}", k.key_id));
        }
    }
    Ok(())
}

/// A usage report as a table: one line per bucket, then the total.
fn usage_table(report: &UsageReport) -> String {
    let whose = match (&report.key_id, &report.owner) {
        (Some(k), _) => format!("key {k}"),
        (None, Some(o)) => format!("owner {o} (all keys)"),
        (None, None) => "usage".into(),
    };
    let mut out = format!(
        "{whose}, per {}, {} to {}\n",
        report.group_by.as_str(),
        fmt_time(report.since),
        fmt_time(report.until)
    );
    let first = if report.group_by == UsageGroupBy::Route { "route\tmethod\toutcome" } else { "start" };
    out.push_str(&format!(
        "{first}\trequests\tallowed\tdenied\t1xx\t2xx\t3xx\t4xx\t5xx\tp50_ms\tp90_ms\tp99_ms\tmax_ms\n"
    ));
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    let mut total = [0u64; 8];
    for b in &report.buckets {
        let first = match (&b.route, &b.method, &b.outcome) {
            (Some(r), Some(m), Some(o)) => format!("{r}\t{m}\t{o}"),
            _ => fmt_time(Some(b.start)),
        };
        let counts =
            [b.requests, b.allowed, b.denied, b.status_1xx, b.status_2xx, b.status_3xx, b.status_4xx, b.status_5xx];
        for (t, c) in total.iter_mut().zip(counts) {
            *t = t.saturating_add(c);
        }
        let counts: Vec<String> = counts.iter().map(u64::to_string).collect();
        out.push_str(&format!(
            "{first}\t{}\t{}\t{}\t{}\t{:.2}\n",
            counts.join("\t"),
            ms(b.latency_ms_p50),
            ms(b.latency_ms_p90),
            ms(b.latency_ms_p99),
            b.latency_ms_max
        ));
    }
    let pad = if report.group_by == UsageGroupBy::Route { "total\t\t" } else { "total" };
    let total: Vec<String> = total.iter().map(u64::to_string).collect();
    out.push_str(&format!("{pad}\t{}\n", total.join("\t")));
    out
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
         environment:  {}\nstate:        {}\nexpires_at:   {}\ncreated_at:   {}\nlast_used_at: {}\nmeta:         {}",
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
        k.meta
    )
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
    Ok(builder.webhooks(webhooks).alerts(alerts).rotation_policy(policy))
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
