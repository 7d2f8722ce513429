//! The processes under test: `keygate-server` replicas and `examples/protected`, each
//! its own process as in production, their logs in files, their memory and open file
//! descriptors read from `/proc`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// How long a process has to say where it listens.
const START_LIMIT: Duration = Duration::from_secs(30);

/// A `keygate-server serve` replica on the soak's database.
pub struct Replica {
    pub name: &'static str,
    bin: PathBuf,
    db: String,
    tokens: (PathBuf, PathBuf),
    log: PathBuf,
    /// 0 until the first start picks one; every restart reuses it.
    pub port: u16,
    child: Option<Child>,
    pub starts: u32,
}

impl Replica {
    pub fn new(name: &'static str, bin: &Path, db: &str, tokens: (PathBuf, PathBuf), out: &Path) -> Self {
        Self {
            name,
            bin: bin.to_owned(),
            db: db.to_owned(),
            tokens,
            log: out.join(format!("replica-{name}.log")),
            port: 0,
            child: None,
            starts: 0,
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Starts it (on its port once it has one) and waits until it listens; a port
    /// still held a moment after a kill is retried.
    pub async fn start(&mut self) -> io::Result<()> {
        let mut last = None;
        for _ in 0..20 {
            match self.try_start().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    eprintln!("soak: replica {} did not start ({e}); retrying", self.name);
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        Err(last.unwrap())
    }

    async fn try_start(&mut self) -> io::Result<()> {
        let listen = format!("127.0.0.1:{}", self.port);
        let mut child = Command::new(&self.bin)
            .args(["serve", "--db", &self.db, "--listen", &listen])
            .arg("--admin-token-file")
            .arg(&self.tokens.0)
            .arg("--service-token-file")
            .arg(&self.tokens.1)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = tokio::fs::OpenOptions::new().create(true).append(true).open(&self.log).await?;
        let found = tokio::time::timeout(START_LIMIT, async {
            while let Some(line) = lines.next_line().await? {
                log.write_all(format!("{line}\n").as_bytes()).await?;
                if let Some(url) = line.strip_prefix("keygate-server listening on ") {
                    return io::Result::Ok(Some(url.trim().to_owned()));
                }
            }
            Ok(None)
        })
        .await;
        let url = match found {
            Ok(Ok(Some(url))) => url,
            other => {
                let _ = child.kill().await;
                let why = format!("{other:?}");
                return Err(io::Error::other(format!("no `listening on` line: {why}")));
            }
        };
        let port = url.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok());
        self.port = port.ok_or_else(|| io::Error::other(format!("cannot read the port of {url}")))?;
        // Keep copying its log so that it never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if log.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// SIGTERM (a rolling deploy: it drains) or SIGKILL (a crash); waits for the exit.
    pub async fn stop(&mut self, graceful: bool) -> io::Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if graceful {
            signal(&child, "TERM")?;
            if tokio::time::timeout(Duration::from_secs(15), child.wait()).await.is_ok() {
                return Ok(());
            }
            eprintln!("soak: replica {} ignored SIGTERM for 15 s; killing it", self.name);
        }
        child.kill().await
    }
}

/// `kill -SIG pid`: the standard tool, no `unsafe` here.
pub fn signal(child: &Child, sig: &str) -> io::Result<()> {
    let pid = child.id().ok_or_else(|| io::Error::other("already exited"))?;
    let status = std::process::Command::new("kill").args([format!("-{sig}"), pid.to_string()]).status()?;
    if status.success() { Ok(()) } else { Err(io::Error::other(format!("kill -{sig} {pid} failed"))) }
}

/// `examples/protected` in front of the proxies.
pub struct Protected {
    pub child: Child,
    pub url: String,
}

impl Protected {
    pub async fn start(bin: &Path, key_services: &[String], service_token: &str, out: &Path) -> io::Result<Self> {
        let log = std::fs::File::create(out.join("protected.log"))?;
        let mut cmd = Command::new(bin);
        for url in key_services {
            cmd.args(["--key-service", url]);
        }
        let mut child = cmd
            .args(["--listen", "127.0.0.1:0"])
            // In the environment, not a flag: flags show in `ps`.
            .env("KEYGATE_SERVICE_TOKEN", service_token)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        // Its log goes to standard output too: copied to the log file, looking for the
        // line that names the address.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut copy = tokio::fs::OpenOptions::new().append(true).open(out.join("protected.log")).await?;
        let addr = tokio::time::timeout(START_LIMIT, async {
            while let Some(line) = lines.next_line().await? {
                copy.write_all(format!("{line}\n").as_bytes()).await?;
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return io::Result::Ok(addr.trim().to_owned());
                }
            }
            Err(io::Error::other("protected ended before it listened"))
        })
        .await
        .map_err(|_| io::Error::other("protected did not print its address"))??;
        let url = format!("http://{addr}");
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if copy.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        Ok(Self { child, url })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Resident memory (KiB) and open file descriptors of a process.
pub fn sample(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}
