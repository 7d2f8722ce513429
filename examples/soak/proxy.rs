//! A TCP proxy in front of one key-service replica, so that the driver can cut every
//! connection through it (that is how it cuts the event stream) and see when an event
//! stream is open.
//!
//! While its replica is down the proxy is down too (its port closed): a middleware then
//! sees what it would see without a proxy, a refused connection, and fails over. A
//! proxy that accepted and then dropped every connection would test a different
//! failure (a load balancer with no backend), not a replica restart.
//!
//! Written by hand: a few lines of `tokio` copying bytes both ways; what the soak needs
//! beyond a stock proxy is the cut and the view of `GET /v1/events`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

use crate::truth::Stream;

const BUF: usize = 16 * 1024;

#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    upstream: SocketAddr,
    addr: Mutex<SocketAddr>,
    stream: Arc<Stream>,
    conns: Mutex<HashMap<u64, Conn>>,
    accept: Mutex<Option<(watch::Sender<()>, JoinHandle<()>)>>,
    next_id: AtomicU64,
    /// Checks the checker: forward an event stream's answer head, then nothing.
    swallow_events: bool,
}

struct Conn {
    task: AbortHandle,
    /// Counted as a live event stream in [`Stream`]: cleared by whoever uncounts it.
    events: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on an ephemeral port of 127.0.0.1 in front of `upstream`.
    /// `swallow_events`: the driver's `--sabotage-events` (checks the checker).
    pub async fn start(upstream: SocketAddr, stream: Arc<Stream>, swallow_events: bool) -> io::Result<Self> {
        let proxy = Self {
            inner: Arc::new(Inner {
                upstream,
                addr: Mutex::new(SocketAddr::from(([127, 0, 0, 1], 0))),
                stream,
                conns: Mutex::new(HashMap::new()),
                accept: Mutex::new(None),
                next_id: AtomicU64::new(0),
                swallow_events,
            }),
        };
        proxy.up().await?;
        Ok(proxy)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr.lock().unwrap())
    }

    /// Opens the port again (the same one), retrying for a few seconds.
    pub async fn up(&self) -> io::Result<()> {
        let addr = *self.inner.addr.lock().unwrap();
        let mut attempts = 0;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if attempts < 50 => {
                    attempts += 1;
                    eprintln!("soak: proxy cannot bind {addr} yet ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        *self.inner.addr.lock().unwrap() = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(());
        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => inner.relay(client),
                        Err(e) => {
                            eprintln!("soak: proxy accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    },
                    _ = stopped.changed() => return,
                }
            }
        });
        *self.inner.accept.lock().unwrap() = Some((stop, task));
        Ok(())
    }

    /// Closes the port (new connections are refused) and cuts every connection.
    pub async fn down(&self) {
        let accept = self.inner.accept.lock().unwrap().take();
        if let Some((stop, task)) = accept {
            let _ = stop.send(());
            // The listener is dropped when the task returns: only then is the port closed.
            let _ = task.await;
        }
        self.cut();
    }

    /// Drops every connection through the proxy, the event stream's included.
    pub fn cut(&self) {
        let conns: Vec<Conn> = self.inner.conns.lock().unwrap().drain().map(|(_, c)| c).collect();
        for conn in &conns {
            // Uncounted before the sockets close: the outage starts now.
            if conn.events.swap(false, Ordering::SeqCst) {
                self.inner.stream.closed();
            }
        }
        for conn in conns {
            conn.task.abort();
        }
    }
}

impl Inner {
    fn relay(self: &Arc<Self>, client: TcpStream) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let events = Arc::new(AtomicBool::new(false));
        let inner = Arc::clone(self);
        let counted = Arc::clone(&events);
        // Registered under the lock before the task can finish and unregister itself.
        let mut conns = self.conns.lock().unwrap();
        let task = tokio::spawn(async move {
            let _guard = Unregister { inner: Arc::clone(&inner), id, events: Arc::clone(&counted) };
            let upstream = match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(inner.upstream)).await
            {
                Ok(Ok(s)) => s,
                _ => return,
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (mut cr, mut cw) = client.into_split();
            let (mut ur, mut uw) = upstream.into_split();
            let is_events = AtomicBool::new(false);
            let to_upstream = async {
                let mut buf = vec![0u8; BUF];
                let mut first = true;
                loop {
                    let n = cr.read(&mut buf).await?;
                    if n == 0 {
                        return io::Result::Ok(());
                    }
                    if first {
                        first = false;
                        is_events.store(buf[..n].starts_with(b"GET /v1/events"), Ordering::SeqCst);
                    }
                    uw.write_all(&buf[..n]).await?;
                }
            };
            let to_client = async {
                let mut buf = vec![0u8; BUF];
                let mut first = true;
                loop {
                    let n = ur.read(&mut buf).await?;
                    if n == 0 {
                        return io::Result::Ok(());
                    }
                    if !first && inner.swallow_events && is_events.load(Ordering::SeqCst) {
                        continue;
                    }
                    if first {
                        first = false;
                        // The key service took the subscription: from here the stream is up.
                        if is_events.load(Ordering::SeqCst)
                            && buf[..n].starts_with(b"HTTP/1.1 200")
                            && !counted.swap(true, Ordering::SeqCst)
                        {
                            inner.stream.opened();
                        }
                    }
                    cw.write_all(&buf[..n]).await?;
                }
            };
            // Either side ending ends both: HTTP/1 clients here never half-close.
            tokio::select! {
                _ = to_upstream => {}
                _ = to_client => {}
            }
        });
        conns.insert(id, Conn { task: task.abort_handle(), events });
    }
}

/// Runs when a connection's task ends or is aborted.
struct Unregister {
    inner: Arc<Inner>,
    id: u64,
    events: Arc<AtomicBool>,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        if self.events.swap(false, Ordering::SeqCst) {
            self.inner.stream.closed();
        }
        self.inner.conns.lock().unwrap().remove(&self.id);
    }
}
