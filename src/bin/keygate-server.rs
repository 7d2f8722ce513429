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
//! keygate-server tokens create --kind service --name fleet-eu      # printed once
//! keygate-server tokens create --kind admin --name ops --database sqlite://keys.db   # offline
//! keygate-server tokens list | tokens revoke tok_...
//! keygate-server backup --database sqlite://keys.db --to keys-backup.db [--force]
//! keygate-server healthcheck [--url http://127.0.0.1:7700/healthz]
//! ```
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
//! (default 300); `--no-usage-retention` turns the passes off.
//!
//! Metrics (`serve`): `--metrics-listen ADDR` (`KEYGATE_METRICS_LISTEN`; off by default)
//! serves Prometheus metrics at `GET /metrics` on that address of its own, without a token.
//!
//! `backup` copies a SQLite store consistently while servers use it (`VACUUM INTO`); it
//! refuses to overwrite `--to` unless `--force`. PostgreSQL is backed up with `pg_dump`.
//! `healthcheck` exits 0 when `--url` answers 200 (for container health checks: the
//! image needs no curl).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use keygate::client::{
    AdminClient, ClientError, CreatedKey, KeyInfo, NewKey, NewToken, TokenInfo, TokenKind, UsageGroupBy, UsageQuery,
    UsageReport,
};
use keygate::server::{BackupError, KeyServer, RetentionConfig};
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
    /// Manage the service and admin tokens callers present (issue 14).
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Copy a SQLite store consistently, while servers keep using it (PostgreSQL: use
    /// pg_dump).
    Backup(Backup),
    /// Exit 0 when the key service's health check answers 200, non-zero otherwise.
    Healthcheck(Healthcheck),
}

#[derive(Args)]
struct Backup {
    /// The store to copy: sqlite://PATH or sqlite:PATH.
    #[arg(long, env = "KEYGATE_DB")]
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
    #[arg(long, env = "KEYGATE_DB", default_value = "sqlite://keygate.db")]
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
    /// Serve Prometheus metrics at GET /metrics on this address of its own (no token:
    /// bind it where only the scraper reaches). Off when absent.
    #[arg(long, env = "KEYGATE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
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
        Command::Tokens(cmd) => tokens(cmd).await,
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
        ..RetentionConfig::default()
    };
    let mut builder =
        KeyServer::builder().database(&s.db).listen(s.listen).key_prefix(&s.key_prefix).retention(retention);
    if let Some(addr) = s.metrics_listen {
        builder = builder.metrics_listen(addr);
    }
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
