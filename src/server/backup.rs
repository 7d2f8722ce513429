//! A consistent online copy of a SQLite store (`keygate-server backup`).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

/// Why [`backup_sqlite`] made no copy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The destination exists and overwriting was not asked for.
    #[error("`{}` exists: refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    /// A PostgreSQL URL: that database is backed up with PostgreSQL's own tools.
    #[error(
        "a PostgreSQL database is backed up with pg_dump, not with this command: \
         pg_dump --format=custom --file=keygate.dump \"$KEYGATE_DB\" (one consistent snapshot, no downtime; \
         see the README, \"Backup\")"
    )]
    Postgres,
    /// Not the URL of a SQLite file (`sqlite::memory:` has nothing to copy).
    #[error("`{0}` is not a SQLite database file (expected sqlite://PATH)")]
    NotAFile(String),
    /// The file opens but holds no keygate store.
    #[error("the database holds no keygate store (no `keys` table)")]
    NotKeygate,
    /// SQLite refused (the file cannot be opened, the copy cannot be written, ...).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The copy was made but fails SQLite's integrity check; it was removed.
    #[error("the copy fails its integrity check: {0}")]
    Integrity(String),
    /// The destination could not be written, synced or moved into place.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What [`backup_sqlite`] copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupReport {
    /// Size of the copy in bytes.
    pub bytes: u64,
    /// Keys in the copy.
    pub keys: u64,
}

/// Copies the SQLite store at `database` (`sqlite://PATH` or `sqlite:PATH`) to the file
/// `to`, consistently, while key services keep using it.
///
/// The copy is SQLite's `VACUUM INTO` from one read transaction: a snapshot of one
/// moment, every committed write before it and none after, that writers do not wait
/// for (WAL). It is written next to `to` under a temporary name, checked with `PRAGMA
/// integrity_check`, synced, and only then moved to `to`, so `to` is never a partial
/// file. An existing `to` is an error unless `overwrite`. Nothing is written to the
/// source and no migration runs on it. The copy is a store like any other: start a key
/// service on it (`sqlite://<to>`) to restore.
///
/// ```no_run
/// # async fn demo() -> Result<(), keygate::server::BackupError> {
/// let report = keygate::server::backup_sqlite("sqlite:///var/lib/keygate/keygate.db", "/backup/keygate.db".as_ref(), false).await?;
/// println!("{} keys, {} bytes", report.keys, report.bytes);
/// # Ok(()) }
/// ```
pub async fn backup_sqlite(database: &str, to: &Path, overwrite: bool) -> Result<BackupReport, BackupError> {
    if database.starts_with("postgres://") || database.starts_with("postgresql://") {
        return Err(BackupError::Postgres);
    }
    if !database.starts_with("sqlite:") || database.contains(":memory:") || database.contains("mode=memory") {
        return Err(BackupError::NotAFile(database.split('?').next().unwrap_or_default().to_owned()));
    }
    if !overwrite && to.exists() {
        return Err(BackupError::Exists(to.to_owned()));
    }
    // Never creates the source: a mistyped path is an error, not an empty backup.
    let source =
        SqliteConnectOptions::from_str(database)?.create_if_missing(false).busy_timeout(Duration::from_secs(5));
    let mut conn = SqliteConnection::connect_with(&source).await?;
    let has_keys: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'keys'")
        .fetch_one(&mut conn)
        .await?;
    if has_keys == 0 {
        return Err(BackupError::NotKeygate);
    }
    let partial = Partial::next_to(to)?;
    let partial_name = partial.0.to_str().ok_or_else(|| BackupError::Io {
        path: to.to_owned(),
        source: std::io::Error::other("the path is not valid UTF-8"),
    })?;
    sqlx::query("VACUUM INTO ?").bind(partial_name).execute(&mut conn).await?;
    conn.close().await?;

    let copy = SqliteConnectOptions::new().filename(&partial.0).create_if_missing(false);
    let mut check = SqliteConnection::connect_with(&copy).await?;
    let verdict: String = sqlx::query_scalar("PRAGMA integrity_check").fetch_one(&mut check).await?;
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM keys").fetch_one(&mut check).await?;
    check.close().await?;
    if verdict != "ok" {
        return Err(BackupError::Integrity(verdict));
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BackupError::Io { path, source }
    };
    let file = std::fs::File::open(&partial.0).map_err(io(&partial.0))?;
    file.sync_all().map_err(io(&partial.0))?;
    let bytes = file.metadata().map_err(io(&partial.0))?.len();
    drop(file);
    partial.publish(to, overwrite)?;
    Ok(BackupReport { bytes, keys: u64::try_from(keys).unwrap_or(0) })
}

/// The copy under its temporary name, removed unless published.
struct Partial(PathBuf);

impl Partial {
    fn next_to(to: &Path) -> Result<Self, BackupError> {
        let name = to.file_name().ok_or_else(|| BackupError::Io {
            path: to.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        })?;
        let tag = getrandom::u64().unwrap_or_else(|_| u64::from(std::process::id()));
        let mut partial = std::ffi::OsString::from(".");
        partial.push(name);
        partial.push(format!(".partial-{tag:016x}"));
        Ok(Self(to.with_file_name(partial)))
    }

    /// Moves the copy to `to`: a rename when overwriting; otherwise a hard link, which
    /// fails if `to` appeared meanwhile (no overwrite even in a race).
    fn publish(self, to: &Path, overwrite: bool) -> Result<(), BackupError> {
        let io = |source| BackupError::Io { path: to.to_owned(), source };
        if overwrite {
            std::fs::rename(&self.0, to).map_err(io)?;
        } else {
            match std::fs::hard_link(&self.0, to) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(BackupError::Exists(to.to_owned()));
                }
                // A file system without hard links: check, then rename.
                Err(_) if !to.exists() => std::fs::rename(&self.0, to).map_err(io)?,
                Err(_) => return Err(BackupError::Exists(to.to_owned())),
            }
        }
        if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The new directory entry survives a crash too (best effort: not every
            // platform syncs directories).
            if let Ok(dir) = std::fs::File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        // Published by link: the temporary name goes; published by rename: it is gone.
        let _ = std::fs::remove_file(&self.0);
    }
}
