//! `gate-bench`: the gate hot path against a no-op tonic unary call measured
//! in the same run, then the revoke-to-gate latency with many gates watching.
//!
//! One process runs the all-in-one mesh (estate-mesh, release build) on a
//! loopback port and the load generator. The baseline is `grpc.health.v1.
//! Health/Check` on the same server (same transport, same tower stack; it is
//! an open path, so it skips token verification): a unary call that does
//! nothing. The decision is `GateService/Decide` with a card, as a gate sends
//! it, signed token included, audited in the outbox before the answer.
//!
//! `cargo run --release -p estate-bench --bin gate-bench -- --seconds 10`
//! (`--database-url postgres://…` and `--redis-url redis://…` for the
//! distributed configuration; SQLite and in-process cache by default).

use clap::Parser;
use estate_auth::Principal;
use estate_proto::common::CredentialKind;
use estate_proto::credentials::credential_service_client::CredentialServiceClient;
use estate_proto::credentials::*;
use estate_proto::gate::gate_service_client::GateServiceClient;
use estate_proto::gate::*;
use estate_proto::identity::identity_service_client::IdentityServiceClient;
use estate_proto::identity::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[derive(Debug, Parser)]
struct Args {
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Closed-loop rounds: the no-op, then per round the decisions and the
    /// no-op again; each round's ratio uses the no-op just before and just
    /// after it, and the median of the rounds is the figure (this VM's speed
    /// swings between minutes).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Requests in flight in the closed-loop phases.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the load is spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Cards issued (decisions cycle through them).
    #[arg(long, default_value_t = 1000)]
    cards: usize,
    /// Gates the decisions are spread over, in turn, each with its own
    /// token (an estate has many; each gate's last-seen time is recorded at
    /// most once a second, so more gates mean more of those writes).
    #[arg(long, default_value_t = 1)]
    deciding_gates: usize,
    /// Gates watching the change stream in the revocation phase.
    #[arg(long, default_value_t = 1000)]
    gates: usize,
    /// Revocations timed in the revocation phase.
    #[arg(long, default_value_t = 20)]
    revocations: usize,
    /// PostgreSQL URL of an existing database (default: SQLite in a temporary directory).
    #[arg(long)]
    database_url: Option<String>,
    /// Redis URL (default: in-process cache and bus).
    #[arg(long)]
    redis_url: Option<String>,
    /// Idle WatchChanges streams to open at the end (memory per stream).
    #[arg(long, default_value_t = 0)]
    idle_streams: usize,
    /// Outbox rows the audit relay appends per transaction (default: the
    /// `audit.relay_batch` setting, 100).
    #[arg(long)]
    relay_batch: Option<i64>,
    /// Only run closed-loop decisions for this many seconds (for profiling).
    #[arg(long)]
    profile_decide: Option<u64>,
    /// Only run the closed-loop no-op for this many seconds (for profiling
    /// it the same way, to set the two profiles side by side).
    #[arg(long)]
    profile_noop: Option<u64>,
    /// Only run decisions paced at this rate (calls/s) for `--seconds`, then
    /// the no-op at the same rate (for profiling the open loop's tail).
    #[arg(long)]
    profile_paced: Option<f64>,
    /// With `--profile-paced`: write each paced call's scheduled start,
    /// latency and how late the generator started it (µs, one call a line)
    /// to FILE.Decide and FILE.Noop, to see
    /// when the slow calls came (session 19 found the audit indexer's
    /// bursts that way).
    #[arg(long, value_name = "FILE")]
    latency_trace: Option<std::path::PathBuf>,
    /// The distributed mode as deployed: identity, credentials, audit and
    /// TWO gate replicas as separate processes (the release binaries beside
    /// this one) on `--database-url` (PostgreSQL) and `--redis-url`; the load
    /// is spread over both gate replicas. The revocation and idle-stream
    /// phases are not run in this mode.
    #[arg(long)]
    processes: bool,
}

/// Where the mesh under test runs.
enum Served {
    /// estate-mesh in this process, with its tracing subscriber's guard
    /// (dropping it shuts down the span exporter, when one is configured).
    InProcess {
        stop: tokio::sync::oneshot::Sender<()>,
        server: tokio::task::JoinHandle<()>,
        telemetry: estate_telemetry::TelemetryGuard,
    },
    /// Separate service processes (killed when dropped).
    Processes(Vec<estate_test_support::ServiceProcess>),
}

/// The mesh under test: endpoints of the services the load uses.
struct Mesh {
    identity: String,
    credentials: String,
    gates: Vec<String>,
    admin: String,
    tokens: Option<estate_auth::TokenAuthority>,
    /// The in-process mesh's database (to read the audit backlog).
    db: Option<estate_store::Db>,
    /// The in-process mesh's audit log, to bring its deferred work up to
    /// date after a decision phase ([`settle`]).
    audit: Option<estate_audit::AuditLog>,
    served: Served,
}

impl Mesh {
    async fn in_process(args: &Args, dir: &std::path::Path) -> anyhow::Result<Self> {
        let mut settings = estate_config::Settings::load(None)?;
        settings.data_dir = dir.to_path_buf();
        settings.listen = "127.0.0.1:0".parse()?;
        settings.database.url = args.database_url.clone();
        settings.redis.url = args.redis_url.clone();
        if let Some(b) = args.relay_batch {
            settings.audit.relay_batch = b;
        }
        // The subscriber estate-mesh's main installs (the default filter
        // unless ESTATE__TELEMETRY__LOG_FILTER says otherwise, to stderr), so
        // that the spans' cost is measured as deployed and warnings show.
        let telemetry = estate_telemetry::init(&settings.telemetry, "gate-bench")?;
        let app = estate_mesh::Application::build(settings).await?;
        let endpoint = format!("http://127.0.0.1:{}", app.port());
        let admin = std::fs::read_to_string(app.admin_token_path())?.trim().to_owned();
        let tokens = app.runtime().tokens.clone();
        let db = app.runtime().db.clone();
        // Another handle on the same log: its indexer is safe to run beside
        // the mesh's own (rows already there are skipped, the mark only
        // moves forward); it signs nothing here.
        let audit = estate_audit::AuditLog::new(db.clone(), app.runtime().keys.audit_signing.clone(), u64::MAX, 0);
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = app
                .run_until(async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        Ok(Self {
            identity: endpoint.clone(),
            credentials: endpoint.clone(),
            gates: vec![endpoint],
            admin,
            tokens: Some(tokens),
            db: Some(db),
            audit: Some(audit),
            served: Served::InProcess { stop, server, telemetry },
        })
    }

    async fn processes(args: &Args, dir: &std::path::Path) -> anyhow::Result<Self> {
        let url = args
            .database_url
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--processes needs --database-url (PostgreSQL) to share"))?;
        if args.gates > 0 || args.idle_streams > 0 {
            anyhow::bail!("--processes runs the load phases only: pass --gates 0 (and no --idle-streams)");
        }
        let bins = std::env::current_exe()?.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        let bin = |name: &str| -> anyhow::Result<String> {
            let p = bins.join(name);
            anyhow::ensure!(
                p.exists(),
                "{} is missing: cargo build --release --bins -p estate-identity -p estate-credentials -p estate-audit -p estate-gate",
                p.display()
            );
            Ok(p.display().to_string())
        };
        let mut env: Vec<(&str, String)> = vec![
            ("ESTATE__DATABASE__URL", url),
            ("ESTATE__KEYS__DIR", dir.join("keys").display().to_string()),
            ("ESTATE__LISTEN", "127.0.0.1:0".into()),
            ("ESTATE__TELEMETRY__LOG_FILTER", "error".into()),
            ("ESTATE__DATA_DIR", dir.join("data").display().to_string()),
        ];
        if let Some(r) = &args.redis_url {
            env.push(("ESTATE__REDIS__URL", r.clone()));
        }
        if let Some(b) = args.relay_batch {
            env.push(("ESTATE__AUDIT__RELAY_BATCH", b.to_string()));
        }
        // Identity bootstraps the keys, its tables and the admin token.
        let admin_file = dir.join("admin.token");
        let status = std::process::Command::new(bin("estate-identity")?)
            .arg("--write-admin-token")
            .arg(&admin_file)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "estate-identity --write-admin-token failed");
        env.push(("ESTATE__KEYS__GENERATE_MISSING", "false".into()));
        let identity = estate_test_support::ServiceProcess::start(&bin("estate-identity")?, &env)?;
        let credentials = estate_test_support::ServiceProcess::start(&bin("estate-credentials")?, &env)?;
        let audit = estate_test_support::ServiceProcess::start(&bin("estate-audit")?, &env)?;
        let gate_a = estate_test_support::ServiceProcess::start(&bin("estate-gate")?, &env)?;
        let gate_b = estate_test_support::ServiceProcess::start(&bin("estate-gate")?, &env)?;
        let http = |p: &estate_test_support::ServiceProcess| format!("http://{}", p.addr);
        Ok(Self {
            identity: http(&identity),
            credentials: http(&credentials),
            gates: vec![http(&gate_a), http(&gate_b)],
            admin: std::fs::read_to_string(&admin_file)?.trim().to_owned(),
            tokens: None,
            db: None,
            audit: None,
            served: Served::Processes(vec![identity, credentials, audit, gate_a, gate_b]),
        })
    }

    async fn stop(self) {
        match self.served {
            Served::InProcess { stop, server, telemetry } => {
                let _ = stop.send(());
                let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
                // Spans still buffered are exported now, after the server.
                drop(telemetry);
            }
            Served::Processes(list) => {
                for p in list {
                    let _ = p.stop_gracefully().await;
                }
            }
        }
    }
}

async fn issue_token(
    id: &mut Identity,
    principal: issue_token_request::Principal,
    subject: &str,
) -> anyhow::Result<String> {
    Ok(id
        .issue_token(IssueTokenRequest { principal: Some(principal), subject: subject.into(), ttl_seconds: 3600 })
        .await?
        .into_inner()
        .token)
}

#[derive(Debug, Clone)]
struct Bearer(AsciiMetadataValue);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// The operator's client of the identity service.
type Identity = IdentityServiceClient<InterceptedService<Channel, Bearer>>;

/// A gate of `estate` taking cards and QR codes both ways; its id.
async fn create_gate(op: &mut Identity, estate: &str, name: String) -> anyhow::Result<String> {
    let gate = op
        .create_gate(CreateGateRequest {
            estate_id: estate.to_owned(),
            name,
            direction: GateDirection::Both as i32,
            supported_kinds: vec![CredentialKind::Card as i32, CredentialKind::Qr as i32],
        })
        .await?
        .into_inner();
    Ok(gate.id)
}

fn bearer(token: &str) -> anyhow::Result<Bearer> {
    Ok(Bearer(AsciiMetadataValue::try_from(format!("Bearer {token}"))?))
}

/// The gate's token, sent as the gate SDK sends it
/// ([`estate_proto::TOKEN_HEADER`], indexed by HTTP/2 header compression).
#[derive(Clone)]
struct GateToken(AsciiMetadataValue);

impl tonic::service::Interceptor for GateToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(estate_proto::TOKEN_HEADER, self.0.clone());
        Ok(req)
    }
}

type Gates = GateServiceClient<InterceptedService<Channel, GateToken>>;
type Credentials = CredentialServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Debug, Clone, Copy)]
enum Call {
    Noop,
    Decide,
    /// Nine card decisions, then one operator call issuing a card (a write
    /// with its audit event and change announcement), in turn.
    Mixed,
}

struct Summary {
    /// Calls answered.
    calls: u64,
    /// Wall time of the phase (with [`Summary::charge`], the settling too).
    elapsed: Duration,
    /// CPU time of this whole process (server and load generator) per
    /// call, in µs: less sensitive than `rate` to a VM whose capacity
    /// changes from minute to minute.
    cpu_us: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    errors: u64,
    /// The errors by kind, one line each ([`Load::take_failures`]).
    failures: String,
    /// Paced phases: p99 of how late the load generator started a call
    /// after its scheduled time, in ms. Latency counts from the scheduled
    /// time, so this much of it is the generator's own thread waiting for
    /// a core, not the service.
    late_p99: Option<f64>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// CPU time this process has used (all threads, user and system), in
/// seconds, from /proc/self/stat (clock ticks of 10 ms).
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses.
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            let ticks = rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

fn summarise(mut lat_us: Vec<u64>, elapsed: Duration, errors: u64, cpu_from: f64) -> Summary {
    lat_us.sort_unstable();
    let calls = (lat_us.len() as f64).max(1.0);
    Summary {
        calls: lat_us.len() as u64,
        elapsed,
        cpu_us: (cpu_seconds() - cpu_from) * 1e6 / calls,
        p50: percentile(&lat_us, 0.50),
        p99: percentile(&lat_us, 0.99),
        p999: percentile(&lat_us, 0.999),
        errors,
        failures: String::new(),
        late_p99: None,
    }
}

impl Summary {
    /// Calls answered per second.
    fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    /// The phase charged with `settled` more wall time and `cpu_s` more CPU
    /// seconds: the work it left behind, done after it ([`settle`]).
    fn charge(mut self, settled: Duration, cpu_s: f64) -> Self {
        let calls = (self.calls as f64).max(1.0);
        self.cpu_us += cpu_s * 1e6 / calls;
        self.elapsed += settled;
        self
    }
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// What a load generator needs to open its own connections.
struct Recipe {
    /// One gate-service endpoint per connection.
    gates: Vec<String>,
    credentials: String,
    /// One token per deciding gate.
    gate_tokens: Vec<String>,
    op_token: String,
    holder: (String, String),
    cards: Vec<String>,
}

struct Load {
    recipe: Arc<Recipe>,
    health: Vec<HealthClient<Channel>>,
    /// Per connection, a client per deciding gate.
    gates: Vec<Vec<Gates>>,
    operators: Vec<Credentials>,
    next: Arc<AtomicU64>,
    /// Failed calls by kind (status code, or the refusal's reason), with
    /// the first message of each, printed after the run.
    failures: Arc<std::sync::Mutex<std::collections::BTreeMap<String, (u64, String)>>>,
}

impl Load {
    /// Opens the recipe's connections, on the runtime this runs on.
    async fn connect(recipe: Arc<Recipe>) -> anyhow::Result<Self> {
        let mut channels = Vec::new();
        let mut operator_channels = Vec::new();
        for endpoint in &recipe.gates {
            channels.push(Endpoint::from_shared(endpoint.clone())?.connect().await?);
            operator_channels.push(Endpoint::from_shared(recipe.credentials.clone())?.connect().await?);
        }
        Ok(Self {
            health: channels.iter().map(|c| HealthClient::new(c.clone())).collect(),
            gates: channels
                .iter()
                .map(|c| {
                    recipe
                        .gate_tokens
                        .iter()
                        .map(|t| {
                            let token = AsciiMetadataValue::try_from(t.as_str())?;
                            Ok(GateServiceClient::with_interceptor(c.clone(), GateToken(token)))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
            operators: operator_channels
                .iter()
                .map(|c| Ok(CredentialServiceClient::with_interceptor(c.clone(), bearer(&recipe.op_token)?)))
                .collect::<anyhow::Result<Vec<_>>>()?,
            next: Arc::new(AtomicU64::new(0)),
            failures: Arc::default(),
            recipe,
        })
    }

    /// One call; false (and the failure counted by kind) unless it succeeded
    /// (for a decision: was admitted).
    async fn one(&self, call: Call, lane: usize) -> bool {
        match self.try_one(call, lane).await {
            Ok(()) => true,
            Err((kind, message)) => {
                if let Ok(mut f) = self.failures.lock() {
                    f.entry(kind).or_insert((0, message)).0 += 1;
                }
                false
            }
        }
    }

    /// The failures counted since the last call, one line each ("" when none).
    fn take_failures(&self) -> String {
        let Ok(mut f) = self.failures.lock() else { return String::new() };
        std::mem::take(&mut *f).iter().map(|(kind, (n, first))| format!("  {n} × {kind} (first: {first})\n")).collect()
    }

    async fn try_one(&self, call: Call, lane: usize) -> Result<(), (String, String)> {
        let status = |s: tonic::Status| (format!("{:?}", s.code()), s.message().to_owned());
        match call {
            Call::Noop => {
                let mut h = self.health[lane % self.health.len()].clone();
                h.check(HealthCheckRequest { service: String::new() }).await.map(drop).map_err(status)
            }
            Call::Mixed => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                if n % 10 == 9 {
                    let mut op = self.operators[lane % self.operators.len()].clone();
                    let req = IssueCredentialRequest {
                        person_id: self.recipe.holder.0.clone(),
                        estate_ids: vec![self.recipe.holder.1.clone()],
                        secret: Some(issue_credential_request::Secret::Card(CardSecret {
                            uid: format!("{:012X}", 0xA000_0000_0000u64 + n),
                            facility_code: String::new(),
                        })),
                        ..Default::default()
                    };
                    op.issue_credential(req).await.map(drop).map_err(status)
                } else {
                    Box::pin(self.try_one(Call::Decide, lane)).await
                }
            }
            Call::Decide => {
                let n = self.next.fetch_add(1, Ordering::Relaxed) as usize;
                let clients = &self.gates[lane % self.gates.len()];
                let mut g = clients[n % clients.len()].clone();
                let i = n % self.recipe.cards.len();
                let req = DecideRequest {
                    presented: Some(decide_request::Presented::Card(PresentedCard {
                        uid: self.recipe.cards[i].clone(),
                        facility_code: String::new(),
                    })),
                    gate_id: String::new(),
                };
                let d = g.decide(req).await.map_err(status)?.into_inner();
                if d.verdict == Verdict::Admit as i32 {
                    Ok(())
                } else {
                    Err((format!("refused, reason {}", d.reason), format!("decision {}", d.decision_id)))
                }
            }
        }
    }

    /// As many calls as `concurrency` workers can make in `secs`.
    async fn closed(self: &Arc<Self>, call: Call, concurrency: usize, secs: u64) -> Summary {
        let (start, cpu_from) = (Instant::now(), cpu_seconds());
        let deadline = start + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for lane in 0..concurrency {
            let load = self.clone();
            tasks.push(tokio::spawn(async move {
                let (mut lat, mut errors) = (Vec::with_capacity(1 << 16), 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if load.one(call, lane).await {
                        lat.push(t.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
                (lat, errors)
            }));
        }
        let (mut all, mut errors) = (Vec::new(), 0);
        for t in tasks {
            if let Ok((l, e)) = t.await {
                all.extend(l);
                errors += e;
            }
        }
        Summary { failures: self.take_failures(), ..summarise(all, start.elapsed(), errors, cpu_from) }
    }

    /// Calls at a fixed `rate` for `secs`, latency measured from each call's
    /// scheduled start (no coordinated omission), by a load generator on a
    /// thread of its own: a single-threaded runtime with connections of its
    /// own, as a gate fleet's traffic would come from elsewhere. (Until
    /// session 13 the paced calls ran on the server's runtime, one task
    /// each: every isolated call then woke sleeping workers on both sides,
    /// and a paced no-op cost 3–5× the CPU of a closed-loop one; BENCHMARKS.md.)
    async fn open(
        self: &Arc<Self>,
        call: Call,
        rate: f64,
        secs: u64,
        trace_to: Option<std::path::PathBuf>,
    ) -> anyhow::Result<Summary> {
        let recipe = self.recipe.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let summary = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async move {
                        Ok(Arc::new(Load::connect(recipe).await?).pace(call, rate, secs, trace_to).await)
                    })
                });
            let _ = tx.send(summary);
        });
        rx.await.map_err(|_| anyhow::anyhow!("the paced load generator stopped"))?
    }

    /// The paced calls: one task starts, each millisecond tick, the calls
    /// scheduled up to then and awaits them all, so a call waits up to a
    /// millisecond for its tick, and that wait counts in its latency.
    async fn pace(self: &Arc<Self>, call: Call, rate: f64, secs: u64, trace_to: Option<std::path::PathBuf>) -> Summary {
        use futures_util::StreamExt;
        let total = (rate * secs as f64) as u64;
        let (start, cpu_from) = (Instant::now(), cpu_seconds());
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let (mut lat, mut errors) = (Vec::with_capacity(total as usize), 0u64);
        let mut late = Vec::with_capacity(total as usize);
        let mut sent = 0u64;
        let mut trace: Vec<(u64, u64, u64)> = Vec::new();
        loop {
            // Every call whose scheduled start has come.
            let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
            while sent < due {
                let scheduled = start + Duration::from_secs_f64(sent as f64 / rate);
                let lane = sent as usize;
                in_flight.push(async move {
                    // When the generator got to the call: later than
                    // scheduled when its own thread waited for a core.
                    let started = Instant::now();
                    (self.one(call, lane).await, scheduled, started)
                });
                sent += 1;
            }
            if sent == total && in_flight.is_empty() {
                break;
            }
            tokio::select! {
                Some((ok, scheduled, started)) = in_flight.next() => {
                    if ok {
                        let latency = scheduled.elapsed().as_micros() as u64;
                        lat.push(latency);
                        let lag = started.saturating_duration_since(scheduled).as_micros() as u64;
                        late.push(lag);
                        if trace_to.is_some() {
                            trace.push(((scheduled - start).as_micros() as u64, latency, lag));
                        }
                    } else {
                        errors += 1;
                    }
                }
                _ = tick.tick(), if sent < total => {}
            }
        }
        if let Some(path) = trace_to {
            let text: String = trace.iter().map(|(at, l, lag)| format!("{at} {l} {lag}\n")).collect();
            if let Err(e) = std::fs::write(path.with_added_extension(format!("{call:?}")), text) {
                eprintln!("latency trace not written: {e}");
            }
        }
        late.sort_unstable();
        let late_p99 = Some(percentile(&late, 0.99));
        Summary { failures: self.take_failures(), late_p99, ..summarise(lat, start.elapsed(), errors, cpu_from) }
    }
}

fn line(name: &str, s: &Summary) {
    let late = s.late_p99.map(|ms| format!("   started late p99 {ms:.2} ms")).unwrap_or_default();
    println!(
        "{name:<44} {:>9.0} calls/s   p50 {:>6.2} ms   p99 {:>6.2} ms   p99.9 {:>6.2} ms   cpu {:>5.1} µs/call   errors {}{late}",
        s.rate(),
        s.p50,
        s.p99,
        s.p999,
        s.cpu_us,
        s.errors
    );
    print!("{}", s.failures);
}

/// The allocator the mesh's binaries use (see services/mesh/src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mesh = if args.processes {
        Mesh::processes(&args, dir.path()).await?
    } else {
        Mesh::in_process(&args, dir.path()).await?
    };
    let open =
        |endpoint: String| async move { Endpoint::from_shared(endpoint)?.connect().await.map_err(anyhow::Error::from) };
    let connect = || open(mesh.gates[0].clone());
    let setup = open(mesh.identity.clone()).await?;
    let setup_credentials = open(mesh.credentials.clone()).await?;

    // A tenant, an estate, a gate, persons with cards.
    let mut id = IdentityServiceClient::with_interceptor(setup.clone(), bearer(&mesh.admin)?);
    let tenant = id
        .create_tenant(CreateTenantRequest { name: "Bench Property".into(), jurisdiction_code: "120101".into() })
        .await?
        .into_inner();
    let op_token = issue_token(
        &mut id,
        issue_token_request::Principal::Operator(OperatorGrant { tenant_id: tenant.id.clone(), estate_ids: vec![] }),
        "bench",
    )
    .await?;
    let mut op = IdentityServiceClient::with_interceptor(setup.clone(), bearer(&op_token)?);
    let mut cr = CredentialServiceClient::with_interceptor(setup_credentials.clone(), bearer(&op_token)?);
    let estate = op
        .create_estate(CreateEstateRequest {
            name: "Bench Garden".into(),
            address: "1 Bench Road".into(),
            jurisdiction_code: "120101".into(),
        })
        .await?
        .into_inner();
    let gate_id = create_gate(&mut op, &estate.id, "Main gate".into()).await?;
    let mut holder = String::new();
    let mut cards = Vec::with_capacity(args.cards);
    let mut card_ids = Vec::with_capacity(args.cards);
    let per_person = 10;
    for p in 0..args.cards.div_ceil(per_person) {
        let unit = op
            .create_unit(CreateUnitRequest {
                estate_id: estate.id.clone(),
                building: format!("{}", p / 100 + 1),
                unit: "1".into(),
                room: format!("{}", p % 100 + 101),
            })
            .await?
            .into_inner();
        let person = op
            .create_person(CreatePersonRequest {
                display_name: format!("Resident {p}"),
                phone: format!("1380000{p:04}"),
                birth_date: "1980-01-01".into(),
                guardian_person_id: String::new(),
            })
            .await?
            .into_inner();
        holder = person.id.clone();
        op.create_residency(CreateResidencyRequest {
            person_id: person.id.clone(),
            unit_id: unit.id,
            role: ResidencyRole::Owner as i32,
            valid_from: None,
            valid_until: None,
        })
        .await?;
        for c in 0..per_person {
            let n = p * per_person + c;
            if n >= args.cards {
                break;
            }
            let uid = format!("{:08X}", 0x1000_0000 + n);
            let issued = cr
                .issue_credential(IssueCredentialRequest {
                    person_id: person.id.clone(),
                    estate_ids: vec![estate.id.clone()],
                    secret: Some(issue_credential_request::Secret::Card(CardSecret {
                        uid: uid.clone(),
                        facility_code: String::new(),
                    })),
                    ..Default::default()
                })
                .await?
                .into_inner();
            cards.push(uid);
            card_ids.push(issued.credential.map(|c| c.id).unwrap_or_default());
        }
    }
    let gate_token =
        issue_token(&mut op, issue_token_request::Principal::Gate(GateGrant { gate_id }), "bench-gate").await?;
    let mut gate_tokens = vec![gate_token];
    for g in 1..args.deciding_gates.max(1) {
        let gate_id = create_gate(&mut op, &estate.id, format!("Gate {g}")).await?;
        let principal = issue_token_request::Principal::Gate(GateGrant { gate_id });
        gate_tokens.push(issue_token(&mut op, principal, &format!("bench-gate-{g}")).await?);
    }
    let recipe = Recipe {
        // The connections alternate over the gate replicas (one when in-process).
        gates: (0..args.connections.max(1)).map(|i| mesh.gates[i % mesh.gates.len()].clone()).collect(),
        credentials: mesh.credentials.clone(),
        gate_tokens,
        op_token: op_token.clone(),
        holder: (holder.clone(), estate.id.clone()),
        cards,
    };
    let load = Arc::new(Load::connect(Arc::new(recipe)).await?);

    println!(
        "gate-bench: {} cards, {} connections, {} in flight, {} s per phase; database {}, cache {}; {}",
        load.recipe.cards.len(),
        args.connections,
        args.concurrency,
        args.seconds,
        if args.database_url.is_some() { "PostgreSQL" } else { "SQLite" },
        if args.redis_url.is_some() { "Redis" } else { "in-process" },
        if args.processes {
            "separate processes: identity, credentials, audit, 2 gate replicas"
        } else {
            "all-in-one process"
        }
    );
    // Warm-up: fills the hot-path cache and the connection pools.
    load.closed(Call::Decide, args.concurrency, 2).await;
    load.closed(Call::Noop, args.concurrency, 1).await;

    if let Some(secs) = args.profile_decide {
        eprintln!("profiling window starts");
        line("card decision (GateService/Decide)", &load.closed(Call::Decide, args.concurrency, secs).await);
        mesh.stop().await;
        return Ok(());
    }
    if let Some(secs) = args.profile_noop {
        eprintln!("profiling window starts");
        line("no-op unary (Health/Check)", &load.closed(Call::Noop, args.concurrency, secs).await);
        mesh.stop().await;
        return Ok(());
    }
    if let Some(rate) = args.profile_paced {
        // From a settled log, as the full run's paced phase starts: the
        // indexing and WAL copying the warm-up left are not the paced
        // phase's own (before session 29 they made its first 200 ms slow).
        settle(&mesh, &tenant.id).await?;
        eprintln!("profiling window starts");
        line(
            &format!("card decision at {rate:.0}/s"),
            &load.open(Call::Decide, rate, args.seconds, args.latency_trace.clone()).await?,
        );
        eprintln!("profiling window ends");
        line(
            &format!("no-op unary at {rate:.0}/s"),
            &load.open(Call::Noop, rate, args.seconds, args.latency_trace.clone()).await?,
        );
        mesh.stop().await;
        return Ok(());
    }
    // Rounds: the no-op, then per round the decisions (settled: the audit
    // work they left behind is done and charged to them) and the no-op again.
    let rounds = args.rounds.max(1);
    let mut noops = vec![load.closed(Call::Noop, args.concurrency, args.seconds).await];
    let mut decisions = Vec::with_capacity(rounds);
    let mut backlog = None;
    for round in 0..rounds {
        let decide = load.closed(Call::Decide, args.concurrency, args.seconds).await;
        if round == 0 {
            backlog = audit_backlog(&mesh).await;
        }
        let cpu_from = cpu_seconds();
        let settled = settle(&mesh, &tenant.id).await?;
        let decide = match settled {
            Some((wall, _)) => decide.charge(wall, cpu_seconds() - cpu_from),
            None => decide,
        };
        decisions.push((decide, settled));
        noops.push(load.closed(Call::Noop, args.concurrency, args.seconds).await);
    }
    line("no-op unary (Health/Check)", &noops[0]);
    let (mut ratios, mut cpu_ratios) = (Vec::new(), Vec::new());
    for (i, (decide, settled)) in decisions.iter().enumerate() {
        line(&format!("card decision (GateService/Decide), round {}", i + 1), decide);
        if let Some((wall, entries)) = settled {
            println!(
                "  settled after the phase, charged above: {entries} log entries indexed, WAL checkpointed, in {:.0} ms",
                wall.as_secs_f64() * 1e3
            );
        }
        line("no-op unary (Health/Check)", &noops[i + 1]);
        let noop_rate = (noops[i].rate() + noops[i + 1].rate()) / 2.0;
        let noop_cpu = (noops[i].cpu_us + noops[i + 1].cpu_us) / 2.0;
        ratios.push(decide.rate() / noop_rate);
        cpu_ratios.push(noop_cpu / decide.cpu_us);
    }
    let list = |v: &[f64]| v.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ");
    println!("ratio decide / no-op (closed loop), per round: {}; median {:.2}", list(&ratios), median(ratios.clone()));
    println!(
        "ratio of CPU per call, no-op / decide, per round: {}; median {:.2}",
        list(&cpu_ratios),
        median(cpu_ratios.clone())
    );
    if let Some(n) = backlog {
        // Rows the relay had not yet put into the hash-chained log when the
        // decision phase ended: a large number means the phase's rate was
        // partly paid for later.
        println!("audit backlog at the end of the first decision phase: {n} outbox rows not yet in the log");
    }
    let decide_rate = median(decisions.iter().map(|(d, _)| d.rate()).collect());
    let mixed = load.closed(Call::Mixed, args.concurrency, args.seconds).await;
    line("mixed: 90% decisions, 10% credential issues", &mixed);
    // The paced phase starts from a settled log, as the closed-loop rounds
    // do: the indexing and WAL copying the mixed phase left are not its own.
    settle(&mesh, &tenant.id).await?;

    // "Its max": the median settled closed-loop rate, what the mesh
    // sustains with the decisions' audit work done.
    let target = decide_rate * 0.7;
    let paced = load.open(Call::Decide, target, args.seconds, None).await?;
    line(&format!("card decision at 70% of its max ({target:.0}/s)"), &paced);
    let paced_noop = load.open(Call::Noop, target, args.seconds, None).await?;
    line(&format!("no-op unary at the same rate ({target:.0}/s)"), &paced_noop);
    // Calibration: the same open loop for the no-op at 70% of ITS closed-loop
    // maximum. Paced calls cost this process far more CPU than closed-loop
    // ones (the load generator shares the 2 cores), so this shows what the
    // harness itself allows at "70% of max", whatever the call.
    let noop_target = median(noops.iter().map(|n| n.rate()).collect()) * 0.7;
    let paced_noop_own = load.open(Call::Noop, noop_target, args.seconds, None).await?;
    line(&format!("no-op unary at 70% of its own max ({noop_target:.0}/s)"), &paced_noop_own);

    // Revocation fan-out: `gates` gates of the estate watch; each revocation
    // is timed from just before the operator's call to arrival at each gate.
    if args.gates > 0 && args.revocations > 0 {
        let mut created = Vec::new();
        for i in 0..args.gates {
            created.push(create_gate(&mut op, &estate.id, format!("Watch gate {i}")).await?);
        }
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watchers = Vec::new();
        let stream_channels: Vec<Channel> = {
            let mut v = Vec::new();
            for _ in 0..(args.gates / 100).max(1) {
                v.push(connect().await?);
            }
            v
        };
        let tokens = mesh.tokens.as_ref().ok_or_else(|| anyhow::anyhow!("in-process only"))?;
        for (i, g) in created.iter().enumerate() {
            let token = tokens
                .issue(
                    Principal::Gate { tenant_id: tenant.id.clone(), estate_id: estate.id.clone(), gate_id: g.clone() },
                    "bench-watch",
                    3600,
                )?
                .token;
            let mut client = GateServiceClient::with_interceptor(
                stream_channels[i % stream_channels.len()].clone(),
                bearer(&token)?,
            );
            let (seen_tx, ready_tx) = (seen_tx.clone(), ready_tx.clone());
            watchers.push(tokio::spawn(async move {
                let Ok(resp) = client.watch_changes(WatchChangesRequest {}).await else { return };
                let mut stream = resp.into_inner();
                while let Ok(Some(change)) = stream.message().await {
                    if change.change == "subscribed" {
                        let _ = ready_tx.send(());
                    } else {
                        let _ = seen_tx.send((change.credential_id, Instant::now()));
                    }
                }
            }));
        }
        for _ in 0..created.len() {
            ready_rx.recv().await;
        }
        let mut latencies = Vec::new();
        let mut rpc = Vec::new();
        let mut missing = 0usize;
        for id in card_ids.iter().rev().take(args.revocations) {
            let t0 = Instant::now();
            cr.revoke_credential(ChangeCredentialRequest { id: id.clone(), reason: "bench".into() }).await?;
            rpc.push(t0.elapsed().as_micros() as u64);
            let mut got = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while got < created.len() {
                match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
                    Ok(Some((cid, at))) if cid == *id => {
                        latencies.push(at.duration_since(t0).as_micros() as u64);
                        got += 1;
                    }
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            missing += created.len() - got;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let n = latencies.len();
        let s = summarise(latencies, Duration::from_secs(1), 0, 0.0);
        let r = summarise(rpc, Duration::from_secs(1), 0, 0.0);
        println!(
            "revoke-to-gate, {} gates x {} revocations ({n} deliveries, {missing} missing): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
            created.len(),
            args.revocations,
            s.p50,
            s.p99,
            s.p999
        );
        println!("  (of which the operator's RevokeCredential call itself: p50 {:.2} ms, p99 {:.2} ms)", r.p50, r.p99);
        for w in watchers {
            w.abort();
        }
    }
    if args.idle_streams > 0 {
        let tokens = mesh.tokens.as_ref().ok_or_else(|| anyhow::anyhow!("in-process only"))?;
        idle_streams(&args, &mut op, tokens, &tenant.id, &estate.id, &connect).await?;
    }
    drop(load);
    mesh.stop().await;
    Ok(())
}

/// Does, right after a decision phase, the audit work its decisions left
/// behind, so that it is charged to them and not to the phase after: the
/// person and estate indexes brought up to the log's head (the mesh's
/// indexer does it every second, from memory; this handle reads the entries
/// back, so the charge is if anything too high) and, on SQLite, a passive
/// checkpoint of the WAL (the mesh's checkpointer runs every 250 ms).
/// Returns the wall time taken and the entries indexed; `None` when the mesh
/// is not in this process.
async fn settle(mesh: &Mesh, tenant: &str) -> anyhow::Result<Option<(Duration, usize)>> {
    let (Some(audit), Some(db)) = (&mesh.audit, &mesh.db) else { return Ok(None) };
    let t0 = Instant::now();
    let entries = audit.index_entries_now(tenant).await?;
    if db.backend() == estate_store::Backend::Sqlite {
        sqlx::query::<sqlx::Any>("PRAGMA wal_checkpoint(PASSIVE)").execute(db.pool()).await?;
    }
    Ok(Some((t0.elapsed(), entries)))
}

/// Undelivered outbox rows of the in-process mesh.
async fn audit_backlog(mesh: &Mesh) -> Option<i64> {
    let db = mesh.db.as_ref()?;
    sqlx::query_scalar::<sqlx::Any, i64>("SELECT COUNT(*) FROM outbox_events WHERE delivered_at IS NULL")
        .fetch_one(db.pool())
        .await
        .ok()
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Opens `idle_streams` WatchChanges streams, one gate each, and reports the
/// process's resident memory before and after (server and client sides both
/// live in this process, so the figure per stream is an upper bound for the
/// server).
async fn idle_streams<F, Fut>(
    args: &Args,
    op: &mut Identity,
    tokens: &estate_auth::TokenAuthority,
    tenant: &str,
    estate: &str,
    connect: &F,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Channel>>,
{
    let n = args.idle_streams;
    let mut gate_ids = Vec::with_capacity(n);
    for i in 0..n {
        gate_ids.push(create_gate(op, estate, format!("Idle gate {i}")).await?);
    }
    let mut channels = Vec::new();
    for _ in 0..n.div_ceil(100) {
        channels.push(connect().await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_mib();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut tasks = Vec::with_capacity(n);
    let started = Instant::now();
    for (i, g) in gate_ids.iter().enumerate() {
        let token = tokens
            .issue(
                Principal::Gate { tenant_id: tenant.to_owned(), estate_id: estate.to_owned(), gate_id: g.clone() },
                "bench-idle",
                3600,
            )?
            .token;
        let mut client = GateServiceClient::with_interceptor(channels[i % channels.len()].clone(), bearer(&token)?);
        let ready_tx = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(resp) = client.watch_changes(WatchChangesRequest {}).await else { return };
            let mut stream = resp.into_inner();
            let _ = stream.message().await;
            let _ = ready_tx.send(());
            while let Ok(Some(_)) = stream.message().await {}
        }));
    }
    let mut ready = 0;
    while ready < n {
        match tokio::time::timeout(Duration::from_secs(30), ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            _ => break,
        }
    }
    let opened = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mib();
    let t0 = Instant::now();
    let mut h = HealthClient::new(connect().await?);
    h.check(HealthCheckRequest { service: String::new() }).await?;
    println!(
        "idle streams: {ready} of {n} subscribed in {:.1} s; RSS {before:.0} -> {after:.0} MiB ({:.1} KiB per stream, client side included); a health check meanwhile took {:.2} ms",
        opened.as_secs_f64(),
        (after - before) * 1024.0 / ready.max(1) as f64,
        t0.elapsed().as_secs_f64() * 1000.0
    );
    for t in tasks {
        t.abort();
    }
    Ok(())
}
