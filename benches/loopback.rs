//! What keygate costs end to end, as a user feels it: the same axum route served over
//! loopback HTTP/1.1, bare and behind each auth layer, measured by the CPU time the
//! app's one worker thread spends per request.
//!
//! ```sh
//! cargo bench --bench loopback                  # 5 rounds of 3 s per variant
//! KEYGATE_BENCH_REDIS_URL=redis://127.0.0.1:6379 cargo bench --bench loopback   # and fleet limits
//! LOOPBACK_ROUNDS=9 LOOPBACK_SECS=5 cargo bench --bench loopback
//! cargo bench --bench loopback -- --rounds 9 --secs 5 --slice 0.5 --warmup 1
//! ```
//!
//! Variants, all answering `GET /reports` with the same handler and receiving the same
//! request (`Authorization: Bearer <a real key>`; the key differs only for fleet limits):
//! - `bare`: the route alone;
//! - `tower-http bearer`: tower-http's `ValidateRequestHeaderLayer::bearer`, the floor
//!   of any auth layer;
//! - `keygate + StaticVerifier`: `ApiKeyLayer` + `RequireScopes::all(["reports:read"])`;
//! - `keygate production`: the same layers over a warm `CachedVerifier<HttpVerifier>`
//!   against the reference key service (SQLite in memory, in its own runtime and
//!   thread, unpinned), the revocation event stream followed, usage exported to the
//!   key service through `UsageAggregator` + `HttpUsageExporter`;
//! - `keygate production, usage off`: the same without usage events;
//! - `keygate production, fleet limits`: `keygate production` plus
//!   `ApiKeyLayer::fleet_limits` on a `RedisLimits` (defaults, a key prefix of its own per
//!   run), called with a key of its own carrying a `requests` limit and credits of
//!   10^15 (the most the key service takes, never exhausted by a run): each request
//!   spends 1 from the limit and 1 credit from leases taken from Redis. Run only when
//!   `KEYGATE_BENCH_REDIS_URL` names a Redis; otherwise a line says it was skipped. The
//!   other variants' key has neither, so they do no limit work;
//! - `keygate production, per-process limits` (with the fleet variant only): the fleet
//!   key on `keygate production` without `fleet_limits`, its limit and credits counted
//!   in this process: the fleet variant's difference from it is what Redis adds.
//!
//! The app runs on one thread named `app`, a current-thread Tokio runtime pinned to
//! CPU 0, so everything the middleware causes (the event stream, the usage exporter's
//! batches) is paid there, as in a one-core deployment. The load generator, 64
//! keep-alive HTTP/1.1 connections from a hyper client, runs on its own current-thread
//! runtime pinned to CPU 1; each variant keeps its connections from the warm-up to the
//! end. Round `r` runs every variant for `secs` (default 3 s), in slices of about
//! `slice` (default 0.25 s) taken in turn, the order rotated by `r` and by the slice:
//! on a machine shared with other work, every variant of a round sees the same
//! neighbours. A round's figure for a variant is the app thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`, read on that thread before and after each slice) divided
//! by the requests it answered, so neither the load generator's, the key service's nor
//! Redis's work is counted (the engine's Redis client, on the app thread, is). Each ratio is taken against the same round's bare figure; the table
//! shows medians over rounds (default 5). `--slice` equal to `--secs` runs each variant
//! once per round, in one piece. Every response must be a 200: a variant with any other
//! answer is flagged.
//!
//! Linux only (thread pinning and the per-thread CPU clock).

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("the loopback benchmark pins threads and reads per-thread CPU clocks: Linux only");
}

#[cfg(target_os = "linux")]
fn main() {
    bench::main();
}

#[cfg(target_os = "linux")]
mod bench {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use axum::Router;
    use axum::routing::get;
    use bytes::Bytes;
    use http::{HeaderValue, Request, header};
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    use keygate::client::{AdminClient, NewKey};
    use keygate::server::{KeyServer, RunningKeyServer};
    use keygate::{
        AggregatorHandle, ApiKey, ApiKeyLayer, CachedVerifier, HttpUsageExporter, HttpVerifier, Principal, RedisLimits,
        RequireScopes, RevocationListener, ScopeSet, StaticVerifier, UsageAggregator, Verifier,
    };
    use tokio::sync::oneshot;

    const CONNECTIONS: usize = 64;
    const SERVICE_TOKEN: &str = "bench-service-token-0123456789abcdef";
    const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdefgh";
    /// A request that takes this long counts as an error (the app is one thread: a
    /// healthy one answers 64 queued requests in well under a millisecond).
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
    const APP_CPU: usize = 0;
    const LOAD_CPU: usize = 1;
    const REDIS_ENV: &str = "KEYGATE_BENCH_REDIS_URL";
    /// The fleet key's `requests` limit (per second) and credits: the key service's
    /// largest amount, beyond what any run spends.
    const FLEET_AMOUNT: u64 = keygate::quota::MAX_QUOTA_AMOUNT;

    #[derive(Clone, Copy)]
    struct Config {
        rounds: usize,
        secs: f64,
        slice: f64,
        warmup: f64,
    }

    impl Config {
        /// Environment first (`LOOPBACK_ROUNDS`, `LOOPBACK_SECS`, `LOOPBACK_SLICE`,
        /// `LOOPBACK_WARMUP`), then `--rounds`, `--secs`, `--slice`, `--warmup`; anything
        /// else (cargo adds `--bench`) is ignored.
        fn read() -> Self {
            let env = |name: &str| std::env::var(name).ok();
            let mut rounds = env("LOOPBACK_ROUNDS");
            let mut secs = env("LOOPBACK_SECS");
            let mut warmup = env("LOOPBACK_WARMUP");
            let mut slice = env("LOOPBACK_SLICE");
            let mut args = std::env::args().skip(1);
            while let Some(arg) = args.next() {
                match arg.as_str() {
                    "--rounds" => rounds = args.next(),
                    "--secs" => secs = args.next(),
                    "--warmup" => warmup = args.next(),
                    "--slice" => slice = args.next(),
                    _ => {}
                }
            }
            let cfg = Self {
                rounds: rounds.map_or(5, |s| s.parse().expect("rounds: a whole number")),
                secs: secs.map_or(3.0, |s| s.parse().expect("secs: a number of seconds")),
                slice: slice.map_or(0.25, |s| s.parse().expect("slice: a number of seconds")),
                warmup: warmup.map_or(0.5, |s| s.parse().expect("warmup: a number of seconds")),
            };
            // Bounded: a typo must not hold a shared machine for an hour.
            assert!((1..=50).contains(&cfg.rounds), "rounds: 1 to 50");
            assert!(cfg.secs > 0.0 && cfg.secs <= 60.0, "secs: more than 0, at most 60");
            assert!(cfg.slice >= 0.05, "slice: at least 0.05 s");
            assert!((0.0..=10.0).contains(&cfg.warmup), "warmup: 0 to 10 s");
            cfg
        }
    }

    /// The one handler every variant serves.
    async fn reports() -> &'static str {
        "no reports today"
    }

    fn route() -> Router {
        Router::new().route("/reports", get(reports))
    }

    fn protected<V: Verifier>(layer: ApiKeyLayer<V>) -> Router {
        Router::new().route("/reports", get(reports).route_layer(RequireScopes::all(["reports:read"]))).layer(layer)
    }

    /// What keeps a production variant's background parts alive, and reports on them.
    struct Production {
        verifier: CachedVerifier<HttpVerifier>,
        events: RevocationListener,
        pipeline: Option<AggregatorHandle>,
        limits: Option<RedisLimits>,
    }

    /// keygate as `examples/protected.rs` and the README set it up: remote verification
    /// behind the cache with its defaults, the event stream, usage exported to the key
    /// service (when `usage`), limits counted in Redis (when `limits`). Must be called on
    /// the app's runtime: the listener, the aggregator and the limits' engine spawn their
    /// tasks there.
    fn production(key_service: &str, usage: bool, limits: Option<RedisLimits>) -> (Router, Production) {
        let urls = vec![key_service.to_owned()];
        let remote = HttpVerifier::builder(urls.clone()).service_token(SERVICE_TOKEN).build().expect("verifier");
        let verifier = CachedVerifier::builder(remote).build();
        let events = RevocationListener::builder(urls).service_token(SERVICE_TOKEN).spawn(&verifier).expect("listener");
        let mut layer = ApiKeyLayer::new(verifier.clone());
        let mut pipeline = None;
        if usage {
            let exporter =
                HttpUsageExporter::builder([key_service]).service_token(SERVICE_TOKEN).build().expect("exporter");
            let (sink, handle) = UsageAggregator::builder().build(exporter).expect("aggregator");
            layer = layer.usage(sink);
            pipeline = Some(handle);
        }
        if let Some(limits) = &limits {
            layer = layer.fleet_limits(limits.clone());
        }
        (protected(layer), Production { verifier, events, pipeline, limits })
    }

    /// The app thread's side: where each variant listens, and how to reach its runtime.
    struct App {
        runtime: tokio::runtime::Handle,
        /// Name, address and the `Authorization` value its requests carry.
        variants: Vec<(&'static str, SocketAddr, HeaderValue)>,
        stop: oneshot::Sender<()>,
    }

    /// The keys the variants call with.
    #[derive(Clone)]
    struct Keys {
        /// No limits nor credits: every variant but the fleet one.
        plain: String,
        /// A `requests` limit and credits, for fleet limits.
        fleet: String,
    }

    /// Where the fleet variant counts: Redis's URL and the run's key prefix.
    #[derive(Clone)]
    struct Fleet {
        url: String,
        prefix: String,
    }

    fn authorization(key: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {key}")).expect("header")
    }

    fn app_thread(
        key_service: String,
        keys: Keys,
        fleet: Option<Fleet>,
        ready: std::sync::mpsc::Sender<App>,
    ) -> Vec<String> {
        let key = keys.plain.clone();
        let pinned = pin(APP_CPU);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("app runtime");
        rt.block_on(async move {
            if !pinned {
                eprintln!("warning: could not pin the app thread to CPU {APP_CPU}");
            }
            #[allow(deprecated)] // the deprecated layer is the point of comparison, not a dependency
            let bearer = tower_http::validate_request::ValidateRequestHeaderLayer::bearer(&key);
            let principal = Principal::builder("bench")
                .owner("bench")
                .scopes(ScopeSet::parse(["reports:read"]).expect("scopes"))
                .build();
            let stat = StaticVerifier::new().with_key(&ApiKey::new(key.clone()), principal);
            let (with_usage, prod) = production(&key_service, true, None);
            let (without_usage, prod_quiet) = production(&key_service, false, None);
            let plain = authorization(&keys.plain);
            let mut routers = vec![
                ("bare", route(), plain.clone()),
                ("tower-http bearer", route().layer(bearer), plain.clone()),
                ("keygate + StaticVerifier", protected(ApiKeyLayer::new(stat)), plain.clone()),
                ("keygate production", with_usage, plain.clone()),
                ("keygate production, usage off", without_usage, plain),
            ];
            let mut prods = vec![("keygate production", prod), ("keygate production, usage off", prod_quiet)];
            if let Some(fleet) = &fleet {
                // The fleet key's limit and credits counted per process: what the limits
                // cost without Redis (the response's rate-limit fields included).
                let (router, prod_local) = production(&key_service, true, None);
                routers.push(("keygate production, per-process limits", router, authorization(&keys.fleet)));
                prods.push(("keygate production, per-process limits", prod_local));
                let limits =
                    RedisLimits::builder(fleet.url.clone()).prefix(fleet.prefix.clone()).build().expect("fleet limits");
                let (router, prod_fleet) = production(&key_service, true, Some(limits));
                routers.push(("keygate production, fleet limits", router, authorization(&keys.fleet)));
                prods.push(("keygate production, fleet limits", prod_fleet));
            }
            let mut variants = Vec::new();
            for (name, router, auth) in routers {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                variants.push((name, listener.local_addr().expect("addr"), auth));
                tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
            }
            // Measure with the event streams up, as in production.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !prods.iter().all(|(_, p)| p.events.is_connected()) {
                assert!(Instant::now() < deadline, "the revocation listeners did not connect within 10 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let (stop, stopped) = oneshot::channel();
            ready.send(App { runtime: tokio::runtime::Handle::current(), variants, stop }).expect("main waits");
            let _ = stopped.await;
            let mut report = Vec::new();
            for (name, p) in prods {
                report.push(format!("{name}: cache {:?}; listener {:?}", p.verifier.stats(), p.events.stats()));
                p.events.shutdown().await;
                if let Some(pipeline) = p.pipeline {
                    report.push(format!("{name}: usage {:?}", pipeline.shutdown().await));
                }
                if let Some(limits) = p.limits {
                    report.push(format!("{name}: limits {:?}", limits.stats()));
                    limits.shutdown().await;
                }
            }
            if let Some(fleet) = &fleet {
                forget_prefix(&fleet.url, &fleet.prefix).await;
            }
            report
        })
    }

    /// Pins the calling thread to one CPU.
    fn pin(cpu: usize) -> bool {
        // SAFETY: `cpu_set_t` is plain data, all zeros is the empty set; CPU_SET writes
        // inside it; sched_setaffinity reads `size_of` bytes from it (pid 0: this thread).
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }

    /// CPU time the calling thread has used.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// The app thread's CPU time, read on the app thread.
    async fn app_cpu(app: &tokio::runtime::Handle) -> Duration {
        app.spawn(async {
            debug_assert_eq!(std::thread::current().name(), Some("app"));
            thread_cpu()
        })
        .await
        .expect("app thread answers")
    }

    #[derive(Default)]
    struct Load {
        ok: u64,
        errors: BTreeMap<String, u64>,
    }

    impl Load {
        fn add(&mut self, other: Load) {
            self.ok += other.ok;
            for (what, n) in other.errors {
                *self.errors.entry(what).or_default() += n;
            }
        }

        fn error(&mut self, what: impl Into<String>) {
            *self.errors.entry(what.into()).or_default() += 1;
        }

        fn answered(&self) -> u64 {
            self.ok + self.errors.values().sum::<u64>()
        }
    }

    type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

    /// One keep-alive HTTP/1.1 connection; its driver runs on the load runtime.
    async fn open(addr: SocketAddr) -> Result<Sender, String> {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(send)
    }

    /// Requests back to back on one connection until `until`; hands the connection back
    /// unless it broke.
    async fn burst(mut send: Sender, host: HeaderValue, auth: HeaderValue, until: Instant) -> (Option<Sender>, Load) {
        let mut load = Load::default();
        while Instant::now() < until {
            let req = Request::get("/reports")
                .header(header::HOST, host.clone())
                .header(header::AUTHORIZATION, auth.clone())
                .body(Empty::new())
                .expect("request");
            let exchange = async {
                let res = send.send_request(req).await?;
                let status = res.status();
                res.into_body().collect().await?;
                Ok::<_, hyper::Error>(status)
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok(status)) if status == http::StatusCode::OK => load.ok += 1,
                Ok(Ok(status)) => load.error(format!("status {status}")),
                Ok(Err(e)) => {
                    load.error(format!("request: {e}"));
                    return (None, load);
                }
                Err(_) => {
                    load.error("timeout");
                    return (None, load);
                }
            }
        }
        (Some(send), load)
    }

    /// A variant's 64 connections, kept open from the warm-up to the end.
    struct Client {
        addr: SocketAddr,
        host: HeaderValue,
        conns: Vec<Sender>,
    }

    impl Client {
        fn new(addr: SocketAddr) -> Self {
            Self { addr, host: HeaderValue::from_str(&addr.to_string()).expect("host"), conns: Vec::new() }
        }

        /// Every connection busy until `until`; the connections that broke are counted
        /// and opened again.
        async fn run(&mut self, auth: &HeaderValue, until: Instant) -> Load {
            let mut load = Load::default();
            while self.conns.len() < CONNECTIONS {
                match open(self.addr).await {
                    Ok(send) => self.conns.push(send),
                    Err(e) => {
                        load.error(e);
                        return load;
                    }
                }
            }
            let tasks: Vec<_> = self
                .conns
                .drain(..)
                .map(|send| tokio::spawn(burst(send, self.host.clone(), auth.clone(), until)))
                .collect();
            for t in tasks {
                let (send, done) = t.await.expect("connection task");
                self.conns.extend(send);
                load.add(done);
            }
            load
        }
    }

    /// One variant's totals over a round.
    #[derive(Default)]
    struct Sample {
        cpu: Duration,
        load_cpu: Duration,
        wall: Duration,
        requests: u64,
    }

    impl Sample {
        fn cpu_per_request(&self) -> f64 {
            micros(self.cpu) / self.requests.max(1) as f64
        }

        fn per_sec(&self) -> f64 {
            self.requests as f64 / self.wall.as_secs_f64()
        }
    }

    /// Every variant's samples, in the order the app lists them, and their errors.
    struct Results {
        samples: Vec<Vec<Sample>>,
        errors: Vec<BTreeMap<String, u64>>,
    }

    async fn drive(app: &App, cfg: &Config) -> Results {
        let n = app.variants.len();
        let mut clients: Vec<Client> = app.variants.iter().map(|(_, addr, _)| Client::new(*addr)).collect();
        for ((name, _, auth), client) in app.variants.iter().zip(&mut clients) {
            let warm = client.run(auth, Instant::now() + Duration::from_secs_f64(cfg.warmup)).await;
            if !warm.errors.is_empty() {
                eprintln!("warm-up of {name}: {:?}", warm.errors);
            }
        }
        let mut results = Results { samples: (0..n).map(|_| Vec::new()).collect(), errors: vec![BTreeMap::new(); n] };
        let slices = (cfg.secs / cfg.slice).ceil().max(1.0) as usize;
        let slice = Duration::from_secs_f64(cfg.secs / slices as f64);
        for r in 0..cfg.rounds {
            let mut round: Vec<Sample> = (0..n).map(|_| Sample::default()).collect();
            for s in 0..slices {
                for i in 0..n {
                    let v = (i + r + s) % n;
                    let cpu0 = app_cpu(&app.runtime).await;
                    let load0 = thread_cpu();
                    let t0 = Instant::now();
                    let done = clients[v].run(&app.variants[v].2, t0 + slice).await;
                    let wall = t0.elapsed();
                    let load_cpu = thread_cpu() - load0;
                    let cpu = app_cpu(&app.runtime).await - cpu0;
                    let sample = &mut round[v];
                    sample.cpu += cpu;
                    sample.load_cpu += load_cpu;
                    sample.wall += wall;
                    sample.requests += done.answered();
                    for (what, k) in done.errors {
                        *results.errors[v].entry(what).or_default() += k;
                    }
                }
            }
            // How busy each side was: far below 100 %, the machine is shared.
            let mut line = format!("round {}:", r + 1);
            for ((name, _, _), sample) in app.variants.iter().zip(&round) {
                line += &format!(
                    " {name} {:.2} µs (app {:.0} %, load {:.0} %);",
                    sample.cpu_per_request(),
                    100.0 * sample.cpu.as_secs_f64() / sample.wall.as_secs_f64(),
                    100.0 * sample.load_cpu.as_secs_f64() / sample.wall.as_secs_f64()
                );
            }
            println!("{line}");
            for (v, sample) in round.into_iter().enumerate() {
                results.samples[v].push(sample);
            }
        }
        results
    }

    fn micros(d: Duration) -> f64 {
        d.as_secs_f64() * 1e6
    }

    fn median(mut xs: Vec<f64>) -> f64 {
        xs.sort_by(f64::total_cmp);
        let m = xs.len() / 2;
        if xs.len() % 2 == 1 { xs[m] } else { (xs[m - 1] + xs[m]) / 2.0 }
    }

    fn machine() -> String {
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".to_owned());
        format!("{cpus} CPUs (nproc), {model}")
    }

    async fn key_service() -> (RunningKeyServer, Keys) {
        let server = KeyServer::builder()
            .database("sqlite::memory:")
            .service_token(SERVICE_TOKEN)
            .admin_token(ADMIN_TOKEN)
            .listen("127.0.0.1:0".parse().expect("addr"))
            .start()
            .await
            .expect("key service starts");
        let admin = AdminClient::new(server.url(), ADMIN_TOKEN).expect("admin client");
        let created = admin
            .create_key(NewKey {
                owner: "bench".into(),
                name: "loopback benchmark".into(),
                scopes: vec!["reports:read".into()],
                ..Default::default()
            })
            .await
            .expect("create a key");
        let fleet = admin
            .create_key(NewKey {
                owner: "bench".into(),
                name: "loopback benchmark, fleet limits".into(),
                scopes: vec!["reports:read".into()],
                limits: vec![keygate::quota::Limit::new("requests", FLEET_AMOUNT, 1)],
                credits: Some(keygate::quota::Credits { remaining: FLEET_AMOUNT, refill: None }),
                ..Default::default()
            })
            .await
            .expect("create the fleet key");
        let keys = Keys { plain: created.key.expose_secret().to_owned(), fleet: fleet.key.expose_secret().to_owned() };
        (server, keys)
    }

    /// The fleet variant's Redis and a prefix of its own, when `KEYGATE_BENCH_REDIS_URL`
    /// is set.
    fn fleet() -> Option<Fleet> {
        let Some(url) = std::env::var(REDIS_ENV).ok().filter(|u| !u.is_empty()) else {
            println!("keygate production, fleet limits: skipped (set {REDIS_ENV} to run it)");
            return None;
        };
        // No earlier run's counts, nor a test's, are met.
        Some(Fleet { url, prefix: format!("kgbench:{:016x}:", fastrand::u64(..)) })
    }

    /// Deletes the Redis keys under `prefix` (credits counts live 40 days otherwise).
    async fn forget_prefix(url: &str, prefix: &str) {
        let client = redis::Client::open(url).expect("redis url");
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            eprintln!("could not reach Redis to delete the keys under {prefix}");
            return;
        };
        let mut cursor = 0u64;
        // Bounded: the run made a handful of keys; 1 000 pages of 100 is far beyond them.
        for _ in 0..1000 {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(100)
                .query_async(&mut conn)
                .await
                .expect("SCAN");
            if !keys.is_empty() {
                let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.expect("DEL");
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }

    pub fn main() {
        let cfg = Config::read();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(cpus > LOAD_CPU, "needs at least 2 CPUs (app on CPU {APP_CPU}, load on CPU {LOAD_CPU})");

        let fleet = fleet();
        // Stops by itself whatever happens: warm-ups, rounds with room for the slices'
        // hand-overs, and a minute for set-up.
        let variants = if fleet.is_some() { 7.0 } else { 5.0 };
        let budget = variants * (cfg.warmup + cfg.rounds as f64 * (1.5 * cfg.secs + 2.0)) + 60.0;
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_secs_f64(budget));
                eprintln!("loopback benchmark still running after {budget:.0} s: aborting");
                std::process::exit(2);
            })
            .expect("watchdog");

        let keys_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keysvc")
            .enable_all()
            .build()
            .expect("key service runtime");
        let (server, keys) = keys_rt.block_on(key_service());

        let (ready, app_ready) = std::sync::mpsc::channel();
        let url = server.url();
        let app_thread = std::thread::Builder::new()
            .name("app".into())
            .spawn(move || app_thread(url, keys, fleet, ready))
            .expect("app thread");
        let app = Arc::new(app_ready.recv().expect("app starts"));

        let driver = app.clone();
        let results = std::thread::Builder::new()
            .name("load".into())
            .spawn(move || {
                if !pin(LOAD_CPU) {
                    eprintln!("warning: could not pin the load generator to CPU {LOAD_CPU}");
                }
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("load runtime");
                rt.block_on(drive(&driver, &cfg))
            })
            .expect("load thread")
            .join()
            .expect("load generator");

        let app = Arc::into_inner(app).expect("load thread is done");
        let _ = app.stop.send(());
        let report = app_thread.join().expect("app thread");
        keys_rt.block_on(server.shutdown());

        let bare: Vec<f64> = results.samples[0].iter().map(Sample::cpu_per_request).collect();
        println!();
        println!("| variant | CPU µs/request | ratio of bare's capacity | req/s |");
        println!("| --- | ---: | ---: | ---: |");
        for (v, (name, _, _)) in app.variants.iter().enumerate() {
            let samples = &results.samples[v];
            let cpu: Vec<f64> = samples.iter().map(Sample::cpu_per_request).collect();
            let ratio: Vec<f64> = cpu.iter().zip(&bare).map(|(c, b)| b / c).collect();
            let rate: Vec<f64> = samples.iter().map(Sample::per_sec).collect();
            let errors: u64 = results.errors[v].values().sum();
            let flag = if errors > 0 { format!(" (**{errors} errors**)") } else { String::new() };
            println!("| {name}{flag} | {:.2} | {:.2} | {:.0} |", median(cpu), median(ratio), median(rate));
        }
        // What fleet limits add to the production form, round by round.
        let index = |name: &str| app.variants.iter().position(|(n, _, _)| *n == name);
        println!();
        for against in ["keygate production", "keygate production, per-process limits"] {
            let (Some(f), Some(p)) = (index("keygate production, fleet limits"), index(against)) else { continue };
            let extra: Vec<f64> = results.samples[f]
                .iter()
                .zip(&results.samples[p])
                .map(|(f, p)| f.cpu_per_request() - p.cpu_per_request())
                .collect();
            println!(
                "fleet limits over {against}: {:+.2} µs CPU/request (median of the rounds' differences)",
                median(extra)
            );
        }
        println!();
        println!(
            "Machine: {}. Medians of {} rounds of {} s per variant in slices of {} s, {CONNECTIONS} connections, release.",
            machine(),
            cfg.rounds,
            cfg.secs,
            cfg.slice.min(cfg.secs)
        );
        for (v, (name, _, _)) in app.variants.iter().enumerate() {
            if !results.errors[v].is_empty() {
                println!("errors, {name}: {:?}", results.errors[v]);
            }
        }
        for line in report {
            println!("{line}");
        }
    }
}
