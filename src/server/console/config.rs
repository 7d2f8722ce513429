//! [`ConsoleConfig`]: where the console is served and how long its sessions last.

use std::net::SocketAddr;
use std::time::Duration;

/// Default idle expiry of a console session: 30 minutes without a request.
pub const DEFAULT_CONSOLE_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Default absolute expiry of a console session: 12 hours after sign-in, used or not.
pub const DEFAULT_CONSOLE_ABSOLUTE_TIMEOUT: Duration = Duration::from_secs(12 * 3600);
/// Default most sessions held at once (the least recently used goes first beyond it).
pub const DEFAULT_CONSOLE_MAX_SESSIONS: usize = 1000;
/// Default sign-in attempts per client IP address and minute.
pub const DEFAULT_SIGN_IN_ATTEMPTS_PER_MINUTE: u64 = 10;

/// The admin console in the browser (`/console`), set with
/// [`KeyServer::console`](crate::server::KeyServer::console).
///
/// Defaults: on, under `/console` on the key service's own listener; sessions end after
/// 30 min idle or 12 h in any case; at most 1 000 sessions; 10 sign-in attempts per
/// client address and minute; cookies without `Secure` (set
/// [`secure_cookies`](Self::secure_cookies) behind TLS).
///
/// ```
/// # use keygate::server::{ConsoleConfig, KeyServer};
/// let server = KeyServer::builder().console(ConsoleConfig::default().listen("127.0.0.1:7701".parse().unwrap()));
/// let without = KeyServer::builder().console(ConsoleConfig::off());
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct ConsoleConfig {
    pub(crate) enabled: bool,
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) secure_cookies: bool,
    pub(crate) idle_timeout: Duration,
    pub(crate) absolute_timeout: Duration,
    pub(crate) max_sessions: usize,
    pub(crate) sign_in_per_minute: u64,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            secure_cookies: false,
            idle_timeout: DEFAULT_CONSOLE_IDLE_TIMEOUT,
            absolute_timeout: DEFAULT_CONSOLE_ABSOLUTE_TIMEOUT,
            max_sessions: DEFAULT_CONSOLE_MAX_SESSIONS,
            sign_in_per_minute: DEFAULT_SIGN_IN_ATTEMPTS_PER_MINUTE,
        }
    }
}

impl ConsoleConfig {
    /// No console at all: `/console` is not mounted.
    pub fn off() -> Self {
        Self { enabled: false, ..Self::default() }
    }

    /// Serves the console on this address of its own (still under `/console`) instead
    /// of the key service's listener; port 0 picks a free one (read it from
    /// [`RunningKeyServer::console_addr`](crate::server::RunningKeyServer::console_addr)).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Marks the session cookie `Secure` (browsers then send it over HTTPS only): set it
    /// when a TLS proxy fronts the console. Off by default.
    pub fn secure_cookies(mut self, secure: bool) -> Self {
        self.secure_cookies = secure;
        self
    }

    /// A session ends after this long without a request (default 30 min).
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// A session ends this long after sign-in in any case (default 12 h).
    pub fn absolute_timeout(mut self, absolute: Duration) -> Self {
        self.absolute_timeout = absolute;
        self
    }

    /// Most sessions held at once (default 1 000); beyond it the least recently used
    /// session ends.
    pub fn max_sessions(mut self, sessions: usize) -> Self {
        self.max_sessions = sessions;
        self
    }

    /// Sign-in attempts allowed per client IP address and minute (default 10).
    pub fn sign_in_attempts_per_minute(mut self, attempts: u64) -> Self {
        self.sign_in_per_minute = attempts;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.idle_timeout.is_zero() || self.absolute_timeout.is_zero() {
            return Err("the console's session timeouts must be above zero".into());
        }
        if self.max_sessions == 0 {
            return Err("the console must allow at least one session".into());
        }
        Ok(())
    }
}
