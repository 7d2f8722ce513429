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
//! keygate-server audit | usage key_... | alerts
//! ```
//!
//! Tokens come from `--service-token` / `--admin-token` or `KEYGATE_SERVICE_TOKEN` /
//! `KEYGATE_ADMIN_TOKEN`; `serve` generates and prints once any token not given.
//! `serve` logs on stderr as text or, with `--log-format json`, JSON lines, filtered by
//! `RUST_LOG` (`EnvFilter` directives such as `keygate=debug,sqlx=warn`; default `info`).
//! Admin commands talk to `--url` (`KEYGATE_URL`, default `http://127.0.0.1:7700`) and
//! print for people, or JSON with `--json`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use keygate::server::{AdminClient, ClientError, CreatedKey, KeyInfo, KeyServer, NewKey};
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
    /// Show a key's per-minute usage (default: the last 24 hours).
    Usage {
        #[command(flatten)]
        conn: Conn,
        /// The key id.
        key_id: String,
        /// RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
    /// Show usage alerts.
    Alerts {
        #[command(flatten)]
        conn: Conn,
    },
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
        Command::Usage { conn, key_id, since } => {
            let since = since.as_deref().map(parse_time).transpose()?;
            let report = client(&conn)?.usage(&key_id, since).await?;
            print(&conn, &report, || {
                let mut out = String::from("minute\trequests\tallowed\tdenied\t2xx\t4xx\t5xx\tavg_ms\tmax_ms\n");
                for b in &report.buckets {
                    let avg = if b.requests > 0 { b.latency_ms_sum / b.requests as f64 } else { 0.0 };
                    out.push_str(&format!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{avg:.2}\t{:.2}\n",
                        fmt_time(Some(b.start)),
                        b.requests,
                        b.allowed,
                        b.denied,
                        b.status_2xx,
                        b.status_4xx,
                        b.status_5xx,
                        b.latency_ms_max
                    ));
                }
                out
            });
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
    }
}

async fn serve(s: Serve) -> Result<(), CliError> {
    let mut builder = KeyServer::builder().database(&s.db).listen(s.listen).key_prefix(&s.key_prefix);
    if let Some(t) = &s.service_token {
        builder = builder.service_token(t);
    }
    if let Some(t) = &s.admin_token {
        builder = builder.admin_token(t);
    }
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
