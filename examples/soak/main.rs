//! The soak: `examples/protected` under load for `--minutes` (default 10) while keys are
//! revoked, disabled and re-enabled, rotated with and without grace, key-service
//! replicas restarted and the event stream cut; every answer is checked against what
//! the driver knows to be true, and memory and file descriptors are recorded. Not part
//! of CI; run it with `scripts/soak.sh [MINUTES]`.
//!
//! What runs, each its own process but the proxies and the load:
//!
//! - two `keygate-server` replicas on one PostgreSQL database
//!   (`KEYGATE_SOAK_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/keygate_soak`;
//!   the driver creates the database through the server's `postgres` database and
//!   drops it at the end, and refuses `postgres`, `test` and the templates), tokens
//!   from files under `--out`;
//! - a TCP proxy in front of each replica (see `proxy.rs`): cutting every connection
//!   through both is how the event stream is cut; a replica's proxy is down while it is;
//! - `examples/protected` with both proxies as `--key-service`, its defaults otherwise
//!   (30 s TTL, 5 min stale-if-error, the event stream, usage every 10 s);
//! - `--clients` (32) keep-alive clients sending requests back to back with a pool of
//!   `--keys` (200) keys' secrets, the secrets made invalid in the last 20 s, and 20
//!   keys nobody issued, to `GET /reports`, `POST /reports` and `GET /admin`.
//!
//! Meanwhile, every half second (see `chaos.rs`): a key disabled (every 1 s, re-enabled
//! 3 to 12 s later), revoked and replaced (every 2 s), rotated with 0, 5 or 20 s of
//! grace (every 1.5 s), through replica A and B in turn; the stream cut every 40 s from
//! 10 s on; replica A restarted with SIGTERM every 120 s from 20 s on, B with SIGKILL
//! every 120 s from 40 s on, each down for 2 s and back on the same port.
//!
//! Each answer is judged when it arrives (see `truth.rs` for the propagation bound:
//! 1 s after the change, or after the stream is up again): a **wrong answer** is an
//! accepted request (200, 201, 403) on a secret that had to be refused, a 401 on one
//! that had to be accepted, or an accepted answer other than the key's scopes give.
//! 503s and 429s are counted apart, by verdict; any other status or a transport
//! error is an **unexpected answer**.
//!
//! Every 10 s, `VmRSS` and the number of open descriptors of protected and both
//! replicas go to `--out/resources.csv`. **Flat**: the maximum over the last two
//! minutes is at most 20 % + 8 MiB above the maximum of the second minute (memory), at
//! most 10 above it (descriptors); runs shorter than 4 minutes compare the last
//! quarter with the second quarter. Replicas are restarted, so their figures restart
//! too: for them the check says that a fresh replica under the fleet's load does not
//! grow past the first one.
//!
//! The run passes, and the driver exits 0, with no wrong answer, no unexpected answer
//! and every process flat; the summary is printed and written to `--out/summary.txt`.

mod chaos;
mod load;
mod procs;
mod proxy;
mod report;
mod truth;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use keygate::client::AdminClient;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::Mutex as AsyncMutex;

use crate::chaos::{Clock, Gate, Infra, Keys};
use crate::load::{Load, Tally};
use crate::report::{NAMES, Report, Sample};
use crate::truth::Stream;

/// Soak keygate: protected under load while keys change and replicas restart.
#[derive(Parser)]
struct Args {
    /// How long the load runs.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Keys in the pool.
    #[arg(long, default_value_t = 200)]
    keys: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// The database the replicas share; created and dropped by the driver.
    #[arg(
        long,
        env = "KEYGATE_SOAK_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/keygate_soak",
        hide_env_values = true
    )]
    postgres_url: String,
    /// Where logs, the CSV and the summary go.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
    /// Leave the database in place at the end.
    #[arg(long)]
    keep_database: bool,
    /// Check the checker: the proxies pass an event stream's first bytes and then
    /// swallow it, so changes stop reaching the cache while the driver believes the
    /// stream is up. The run must then FAIL with wrong answers.
    #[arg(long)]
    sabotage_events: bool,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::from(2)
        }
    }
}

/// The binaries next to this one: `target/release/examples/soak` →
/// `target/release/examples/protected` and `target/release/keygate-server`.
fn binaries() -> Result<(PathBuf, PathBuf), Error> {
    let exe = std::env::current_exe()?;
    let examples = exe.parent().ok_or("no directory")?;
    let server = examples.parent().ok_or("no directory")?.join("keygate-server");
    let protected = examples.join("protected");
    for bin in [&server, &protected] {
        if !bin.exists() {
            return Err(format!("{} is not built (scripts/soak.sh builds it)", bin.display()).into());
        }
    }
    Ok((server, protected))
}

async fn create_database(url: &str) -> Result<(PgConnectOptions, String), Error> {
    let opts: PgConnectOptions = url.parse()?;
    let name = opts.get_database().ok_or("the PostgreSQL URL names no database")?.to_owned();
    if matches!(name.as_str(), "postgres" | "test" | "template0" | "template1")
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!("refusing to create and drop the database {name:?}: name one for the soak alone").into());
    }
    let admin = opts.clone().database("postgres");
    let mut conn = PgConnection::connect_with(&admin).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut conn).await?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await?;
    conn.close().await?;
    Ok((admin, name))
}

async fn drop_database(admin: &PgConnectOptions, name: &str) -> Result<(), Error> {
    let mut conn = PgConnection::connect_with(admin).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

/// A token in a file only this user reads.
fn token_file(path: &Path, token: &str) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    f.write_all(token.as_bytes())?;
    Ok(())
}

async fn run(args: Args) -> Result<bool, Error> {
    let (server_bin, protected_bin) = binaries()?;
    let run = Duration::from_secs_f64(args.minutes * 60.0);
    std::fs::create_dir_all(&args.out)?;
    let out = args.out.canonicalize()?;
    for old in ["replica-a.log", "replica-b.log"] {
        let _ = std::fs::remove_file(out.join(old));
    }
    let admin_token = keygate::ApiKey::generate("kga")?.expose_secret().to_owned();
    let service_token = keygate::ApiKey::generate("kgs")?.expose_secret().to_owned();
    let tokens = (out.join("admin-token"), out.join("service-token"));
    token_file(&tokens.0, &admin_token)?;
    token_file(&tokens.1, &service_token)?;

    let (pg_admin, db_name) = create_database(&args.postgres_url).await?;
    let db_url = args.postgres_url.clone();
    println!("soak: database {db_name} created; output in {}", out.display());

    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let mut r = procs::Replica::new(name, &server_bin, &db_url, tokens.clone(), &out);
        r.start().await?;
        println!("soak: replica {name} on {}", r.url());
        replicas.push(r);
    }
    let stream = Stream::new(Instant::now());
    let mut proxies = Vec::new();
    for r in &replicas {
        proxies.push(proxy::Proxy::start(r.addr(), Arc::clone(&stream), args.sabotage_events).await?);
    }
    let gates: [Gate; 2] = [0, 1].map(|i| {
        let admin = AdminClient::new(replicas[i].url(), admin_token.clone()).expect("a valid URL");
        Arc::new(AsyncMutex::new(Some(admin)))
    });
    let clock = Clock::now();
    let mut keys = Keys::create(gates.clone(), args.keys, clock).await?;
    println!("soak: {} keys created", args.keys);

    let proxy_urls: Vec<String> = proxies.iter().map(proxy::Proxy::url).collect();
    let mut protected = procs::Protected::start(&protected_bin, &proxy_urls, &service_token, &out).await?;
    println!("soak: protected on {} (key services {})", protected.url, proxy_urls.join(", "));
    let waited = Instant::now();
    while !stream.is_up() {
        if waited.elapsed() > Duration::from_secs(15) {
            return Err("protected did not open the event stream within 15 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let pids: Arc<[AtomicU32; 2]> = Arc::new([0, 1].map(|i| AtomicU32::new(replicas[i].pid().unwrap_or(0))));
    let started = Instant::now();
    let until = started + run;
    let sent = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let load = Arc::new(Load {
        url: protected.url.clone(),
        pool: Arc::clone(&keys.pool),
        stream: Arc::clone(&stream),
        started,
        until,
        sent: Arc::clone(&sent),
        wrong: Arc::clone(&wrong),
    });
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(args.clients)
        .build()?;
    let clients: Vec<_> =
        (0..args.clients).map(|_| tokio::spawn(load::client(Arc::clone(&load), http.clone()))).collect();

    let sampler = {
        let csv_path = out.join("resources.csv");
        let protected_pid = protected.pid().unwrap_or(0);
        let pids = Arc::clone(&pids);
        let (sent, wrong) = (Arc::clone(&sent), Arc::clone(&wrong));
        tokio::spawn(async move {
            let mut csv = std::fs::File::create(csv_path).expect("the CSV can be written");
            let _ = writeln!(csv, "seconds,process,pid,rss_kib,fds");
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                let at = started.elapsed();
                let mut line = format!(
                    "soak: {:>5.0} s  {} requests, {} wrong",
                    at.as_secs_f64(),
                    sent.load(Ordering::Relaxed),
                    wrong.load(Ordering::Relaxed)
                );
                let current = [protected_pid, pids[0].load(Ordering::Relaxed), pids[1].load(Ordering::Relaxed)];
                for (process, pid) in current.into_iter().enumerate() {
                    let Some((rss_kib, fds)) = (pid != 0).then(|| procs::sample(pid)).flatten() else { continue };
                    let _ = writeln!(csv, "{:.0},{},{pid},{rss_kib},{fds}", at.as_secs_f64(), NAMES[process]);
                    let _ = write!(line, "; {} {:.1} MiB {fds} fds", NAMES[process], rss_kib as f64 / 1024.0);
                    samples.push(Sample { at, process, rss_kib, fds });
                }
                println!("{line}");
                if Instant::now() >= until {
                    return samples;
                }
            }
        })
    };

    let key_schedule = tokio::spawn(async move {
        keys.run(until).await;
        keys
    });
    let mut infra = Infra {
        replicas,
        proxies,
        gates,
        pids: Arc::clone(&pids),
        admin_token: admin_token.clone(),
        stream: Arc::clone(&stream),
    };
    let incidents = infra.run(started, run).await;
    tokio::time::sleep_until(until.into()).await;

    let mut tally = Tally::default();
    for c in clients {
        tally.add(c.await?);
    }
    let keys = key_schedule.await?;
    let samples = sampler.await?;
    let elapsed = started.elapsed();
    // Before protected stops: its stream closing then is no outage.
    let outages = stream.outages();

    // Stop everything: protected gracefully (it must exit 0), then the replicas.
    procs::signal(&protected.child, "TERM")?;
    let exit = tokio::time::timeout(Duration::from_secs(20), protected.child.wait()).await;
    let protected_exit = match exit {
        Ok(Ok(status)) => status.to_string(),
        other => format!("did not stop: {other:?}"),
    };
    for r in &mut infra.replicas {
        let _ = r.stop(true).await;
    }
    if !args.keep_database {
        drop_database(&pg_admin, &db_name).await?;
    }
    let incidents = incidents?;

    let report = Report {
        run: elapsed,
        tally: &tally,
        changes: &keys.changes,
        incidents: &incidents,
        outages,
        samples: &samples,
        planned: run,
        protected_exit,
        cache_line: last_line_with(&out.join("protected.log"), "stopped"),
    };
    let (text, pass) = report.render();
    println!("{text}");
    std::fs::write(out.join("summary.txt"), &text)?;
    Ok(pass)
}

fn last_line_with(path: &Path, needle: &str) -> Option<String> {
    let log = std::fs::read_to_string(path).ok()?;
    log.lines().rev().find(|l| l.contains(needle)).map(str::to_owned)
}
