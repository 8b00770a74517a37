//! Load generator for meshauthz's gRPC Check: a realistic request mix (several SPIFFE principals,
//! methods and paths, a pool of valid RS256 and ES256 tokens plus invalid ones; allows and denials),
//! closed-loop (N concurrent streams) or open-loop (fixed rate: sends follow a schedule whatever
//! the answers do, so a slow server cannot slow the load down), HdrHistogram latencies, and a check
//! of every answer against the expected decision.
//!
//! Open-loop latency is measured from the actual send. Tokio's timer has millisecond resolution,
//! so measuring from the scheduled instant would add up to a millisecond of generator jitter to
//! every sample; instead the send lag behind the schedule is reported separately (`lag_p99_us`),
//! and a large lag means the generator, not the server, fell behind.
//!
//! ```text
//! cargo bench --bench loadgen -- setup --dir D            # keys, JWKS, config, token pool
//! meshauthz serve --config D/meshauthz.yaml &
//! cargo bench --bench loadgen -- run --dir D --target 127.0.0.1:9191 --concurrency 64 --duration 10
//! cargo bench --bench loadgen -- run --dir D --target … --rate 5000 --duration 10
//! ```
//!
//! Under `cargo test` (no `--bench` argument) it runs a short self-check against an in-process
//! server instead, so the generator itself never rots.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use common::{Keys, Req, repo};
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use hdrhistogram::Histogram;
use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Passed by `cargo bench`; absent under `cargo test`.
    #[arg(long, global = true)]
    bench: bool,
}

/// What `run` and `envoy` share: where the setup is and how to send.
#[derive(clap::Args)]
struct LoadArgs {
    /// The directory `setup` wrote.
    #[arg(long)]
    dir: PathBuf,
    /// Closed loop: this many requests in flight.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Open loop: requests per second.
    #[arg(long)]
    rate: Option<u64>,
    /// Seconds of measurement (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Label for the result line.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write keys, JWKS, a config for the bundled policy and the token pool into DIR.
    Setup {
        #[arg(long)]
        dir: PathBuf,
        /// Also write a data document with this many extra role bindings.
        #[arg(long, default_value_t = 0)]
        bindings: usize,
        #[arg(long, default_value_t = 0)]
        worker_threads: usize,
    },
    /// Send load and print one JSON line of results.
    Run {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long)]
        target: String,
        /// HTTP/2 connections to spread the streams over.
        #[arg(long, default_value_t = 4)]
        connections: usize,
    },
    /// Start an Envoy (benches/envoy/) and send the mix through it over HTTPS with workload
    /// certificates; print one JSON line of results.
    Envoy {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, value_enum)]
        variant: Variant,
        /// meshauthz's gRPC address (for the ext-authz variant).
        #[arg(long)]
        meshauthz: Option<String>,
        /// Envoy worker threads.
        #[arg(long, default_value_t = 1)]
        envoy_concurrency: usize,
    },
    /// Sustained load against the release binary while the issuer rotates its keys and the
    /// policy is reloaded every PERIOD seconds; prints a Markdown report (see benches/soak.sh).
    Soak {
        /// The meshauthz binary to run.
        #[arg(long)]
        server_bin: PathBuf,
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Seconds between key rotations (policy reloads happen at the same pace).
        #[arg(long, default_value_t = 5)]
        period: u64,
        /// Keep the issuer's keys (to tell what RSS growth comes from).
        #[arg(long)]
        no_rotate: bool,
        /// Leave the policy alone (likewise).
        #[arg(long)]
        no_reload: bool,
    },
}

/// One request shape with its expected answer under the bundled policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Template {
    principal: Option<String>,
    method: String,
    path: String,
    /// Index into the token pool, or a literal bad token.
    token: Option<TokenRef>,
    allowed: bool,
    status: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum TokenRef {
    Valid { scope: String },
    Invalid,
}

#[derive(Debug, Serialize, Deserialize)]
struct Pool {
    /// Valid tokens by scope, RS256 and ES256 alternating.
    tokens: Vec<(String, String)>,
    invalid: Vec<String>,
}

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";

/// The mix: roughly 70 % allowed, 30 % denied (403 by policy, 401 for bad or missing tokens).
fn mix() -> Vec<Template> {
    let t =
        |p: Option<&str>, m: &str, path: &str, token: Option<TokenRef>, allowed, status| Template {
            principal: p.map(str::to_owned),
            method: m.into(),
            path: path.into(),
            token,
            allowed,
            status,
        };
    let valid = |s: &str| Some(TokenRef::Valid { scope: s.into() });
    vec![
        t(Some(FRONTEND), "GET", "/api/products/42", None, true, 200),
        t(
            Some(FRONTEND),
            "GET",
            "/api/products?page=2",
            None,
            true,
            200,
        ),
        t(
            Some(FRONTEND),
            "GET",
            "/api/products/7",
            valid("orders:read"),
            true,
            200,
        ),
        t(
            Some(FRONTEND),
            "GET",
            "/api/orders/7",
            valid("orders:read"),
            true,
            200,
        ),
        t(
            Some(CHECKOUT),
            "POST",
            "/api/orders",
            valid("orders:write"),
            true,
            200,
        ),
        t(
            Some(CHECKOUT),
            "POST",
            "/api/orders",
            valid("orders:write profile"),
            true,
            200,
        ),
        t(Some(CHECKOUT), "HEAD", "/api/products", None, true, 200),
        t(None, "GET", "/healthz", None, true, 200),
        t(
            Some(FRONTEND),
            "DELETE",
            "/api/products/42",
            None,
            false,
            403,
        ),
        t(
            Some(CHECKOUT),
            "POST",
            "/api/orders",
            valid("orders:read"),
            false,
            403,
        ),
        t(
            Some("spiffe://cluster.local/ns/other/sa/frontend"),
            "GET",
            "/api/products/1",
            None,
            false,
            403,
        ),
        t(
            Some(CHECKOUT),
            "POST",
            "/api/orders",
            Some(TokenRef::Invalid),
            false,
            401,
        ),
        t(Some(CHECKOUT), "POST", "/api/orders", None, false, 401),
    ]
}

fn setup(dir: &Path, bindings: usize, worker_threads: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let rsa = Keys::generate(Algorithm::RS256, "load-rsa");
    let ec = Keys::generate(Algorithm::ES256, "load-ec");
    std::fs::write(dir.join("jwks.json"), common::jwks_body(&[&rsa, &ec])).unwrap();
    std::fs::write(
        dir.join("tokens.json"),
        serde_json::to_string(&make_pool(&rsa, &ec)).unwrap(),
    )
    .unwrap();
    // Policies: the bundled ones, plus optionally a large bindings document.
    let policies = dir.join("policies");
    common::copy_dir(&repo().join("policies"), &policies);
    if bindings > 0 {
        let data_file = policies.join("rbac/data.json");
        let mut data: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&data_file).unwrap()).unwrap();
        for i in 0..bindings {
            data["bindings"][format!("team{}/svc{i}", i % 50)] =
                serde_json::json!(["catalog-reader", "order-reader"]);
        }
        std::fs::write(&data_file, data.to_string()).unwrap();
    }
    let config = format!(
        r#"server:
  grpc_addr: "127.0.0.1:0"
  http_addr: "127.0.0.1:0"
  worker_threads: {worker_threads}
policy:
  paths: [policies]
  decision: "data.envoy.authz.result"
  watch: false
jwt:
  providers:
    - name: load
      issuer: "{}"
      audiences: ["{}"]
      jwks: {{ file: jwks.json }}
      claims_to_headers: [{{ claim: sub, header: x-jwt-sub }}]
decision_log: {{ enabled: false }}
"#,
        common::ISSUER,
        common::AUDIENCE
    );
    std::fs::write(dir.join("meshauthz.yaml"), config).unwrap();
}

/// Valid tokens (RS256 and ES256 alternating, each scope of the mix) and forged ones: signed by
/// an unrelated key under the RSA key's kid.
fn make_pool(rsa: &Keys, ec: &Keys) -> Pool {
    let mut tokens = Vec::new();
    for scope in ["orders:read", "orders:write", "orders:write profile"] {
        for i in 0..50 {
            let key = if i % 2 == 0 { rsa } else { ec };
            let mut c = common::claims(&format!("user{i}"), scope);
            c["exp"] = serde_json::json!(common::now() + 24 * 3600);
            tokens.push((scope.to_string(), key.sign(&c)));
        }
    }
    let other = Keys::generate(Algorithm::RS256, &rsa.kid);
    let invalid: Vec<String> = (0..20)
        .map(|i| other.sign(&common::claims(&format!("forger{i}"), "orders:write")))
        .collect();
    Pool { tokens, invalid }
}

/// One prebuilt request (the generator spends no time building requests) with its expected answer under the bundled policy.
#[derive(Debug, Clone)]
struct Shape {
    principal: Option<String>,
    method: String,
    path: String,
    token: Option<String>,
    allowed: bool,
    status: u16,
}

/// The mix expanded over the token pool and shuffled, so consecutive requests differ.
fn shapes(pool: &Pool) -> Vec<Shape> {
    let mut out = Vec::new();
    for (i, t) in mix().iter().enumerate() {
        for j in 0..20 {
            let token = match &t.token {
                Some(TokenRef::Valid { scope }) => {
                    let matching: Vec<&String> = pool
                        .tokens
                        .iter()
                        .filter(|(s, _)| s == scope)
                        .map(|(_, t)| t)
                        .collect();
                    Some(matching[(i + j) % matching.len()].clone())
                }
                Some(TokenRef::Invalid) => Some(pool.invalid[j % pool.invalid.len()].clone()),
                None => None,
            };
            out.push(Shape {
                principal: t.principal.clone(),
                method: t.method.clone(),
                path: t.path.clone(),
                token,
                allowed: t.allowed,
                status: t.status,
            });
        }
    }
    fastrand::seed(7);
    fastrand::shuffle(&mut out);
    out
}

/// Where the load goes: meshauthz's Check directly, or HTTPS through an Envoy.
enum Target {
    Grpc {
        clients: Vec<AuthorizationClient<Channel>>,
        reqs: Vec<CheckRequest>,
    },
    Https {
        /// One client (one mTLS identity) per request, by principal.
        clients: Vec<reqwest::Client>,
        reqs: Vec<reqwest::Request>,
        /// Envoy's native filters answer 403 where meshauthz answers 401 ("token required"),
        /// so the comparison checks allow/deny only.
        check_status: bool,
    },
}

struct Load {
    target: Target,
    expected: Vec<(bool, u16)>,
}

impl Load {
    fn grpc(clients: Vec<AuthorizationClient<Channel>>, shapes: &[Shape]) -> Load {
        let reqs = shapes
            .iter()
            .map(|s| {
                let mut r = Req {
                    principal: s.principal.as_deref(),
                    method: &s.method,
                    path: &s.path,
                    headers: Vec::new(),
                };
                if let Some(t) = &s.token {
                    r = r.bearer(t);
                }
                r.build()
            })
            .collect();
        Load {
            target: Target::Grpc { clients, reqs },
            expected: shapes.iter().map(|s| (s.allowed, s.status)).collect(),
        }
    }

    /// HTTPS through Envoy: each request goes out on the client holding its principal's
    /// certificate (a request without a principal uses the first one; only public paths have none).
    fn https(
        base: &str,
        identities: &[(&str, reqwest::Client)],
        shapes: &[Shape],
        check_status: bool,
    ) -> Load {
        let mut clients = Vec::new();
        let mut reqs = Vec::new();
        for s in shapes {
            let who = identities
                .iter()
                .position(|(p, _)| Some(*p) == s.principal.as_deref())
                .unwrap_or(0);
            let client = identities[who].1.clone();
            let mut b = client.request(
                reqwest::Method::from_bytes(s.method.as_bytes()).unwrap(),
                format!("{base}{}", s.path),
            );
            if let Some(t) = &s.token {
                b = b.bearer_auth(t);
            }
            reqs.push(b.build().unwrap());
            clients.push(client);
        }
        Load {
            target: Target::Https {
                clients,
                reqs,
                check_status,
            },
            expected: shapes.iter().map(|s| (s.allowed, s.status)).collect(),
        }
    }

    fn len(&self) -> usize {
        self.expected.len()
    }

    /// Sends request `i` (on connection `conn` for gRPC) and checks the answer.
    async fn one(&self, i: usize, conn: usize, counters: &Counters) {
        counters.sent.fetch_add(1, Ordering::Relaxed);
        let i = i % self.len();
        let (want_allowed, want_status) = self.expected[i];
        let got = match &self.target {
            Target::Grpc { clients, reqs } => {
                let mut client = clients[conn % clients.len()].clone();
                client.check(reqs[i].clone()).await.ok().map(|resp| {
                    let o = common::Outcome::from(resp.into_inner());
                    (o.allowed, o.status, true)
                })
            }
            Target::Https {
                clients,
                reqs,
                check_status,
            } => {
                let req = reqs[i].try_clone().unwrap();
                match clients[i].execute(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        // Read the body so the stream completes before the next request.
                        let _ = resp.bytes().await;
                        Some((status == 200, status, *check_status))
                    }
                    Err(_) => None,
                }
            }
        };
        match got {
            None => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            Some((allowed, status, check_status)) => {
                if allowed != want_allowed || (check_status && status != want_status) {
                    counters.wrong.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut kinds) = counters.wrong_kinds.lock() {
                        *kinds.entry((want_status, status)).or_default() += 1;
                    }
                }
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    errors: AtomicU64,
    wrong: AtomicU64,
    /// Wrong answers by (expected status, status received), to tell what went wrong.
    wrong_kinds: std::sync::Mutex<std::collections::BTreeMap<(u16, u16), u64>>,
}

#[derive(Debug, Serialize)]
struct Report {
    label: String,
    mode: String,
    target_rps: Option<u64>,
    requests: u64,
    seconds: f64,
    rps: f64,
    errors: u64,
    wrong_decisions: u64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    /// Open loop: how far sends fell behind their schedule (p99, µs).
    lag_p99_us: u64,
    /// "want→got: count" for wrong answers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    wrong_kinds: Vec<String>,
}

async fn connect(target: &str, n: usize) -> Vec<AuthorizationClient<Channel>> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        let ch = Channel::from_shared(format!("http://{target}"))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {target}: {e}"));
        out.push(AuthorizationClient::new(ch));
    }
    out
}

/// How long to send for and how.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Closed loop: requests in flight.
    concurrency: Option<usize>,
    /// Open loop: requests per second (takes precedence).
    rate: Option<u64>,
    warmup: Duration,
    duration: Duration,
    /// gRPC connections to spread requests over.
    connections: usize,
}

impl Plan {
    /// A command-line run: one second of warm-up, then `--duration` seconds measured.
    fn measured(args: &LoadArgs, connections: usize) -> Plan {
        Plan {
            concurrency: args.concurrency,
            rate: args.rate,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(args.duration),
            connections,
        }
    }
}

async fn run(load: Arc<Load>, plan: Plan, label: String) -> Report {
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut lag_hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mode;
    let mut measured = 0u64;
    if let Some(rate) = plan.rate {
        mode = "open".to_string();
        // Open loop. The schedule runs on its own OS thread with std::thread::sleep (hrtimer,
        // ~50 µs slack) rather than Tokio's millisecond timer, which would send in 1 ms bursts
        // and charge the server for the generator's queueing.
        let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Duration, Duration)>();
        let handle = tokio::runtime::Handle::current();
        let (load2, counters2) = (load.clone(), counters.clone());
        let connections = plan.connections.max(1);
        let scheduler = std::thread::spawn(move || {
            let mut next = start;
            let mut i = 0usize;
            while next < end {
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
                let scheduled = next;
                let (load, counters, tx) = (load2.clone(), counters2.clone(), tx.clone());
                handle.spawn(async move {
                    let sent = Instant::now();
                    load.one(i, i % connections, &counters).await;
                    let _ = tx.send((scheduled, sent.elapsed(), sent - scheduled));
                });
                i += 1;
                next += interval;
            }
        });
        while let Some((scheduled, latency, lag)) = rx.recv().await {
            if scheduled >= measure_from {
                hist.record(latency.as_micros() as u64).unwrap();
                lag_hist.record(lag.as_micros() as u64).unwrap();
                measured += 1;
            }
        }
        scheduler.join().unwrap();
    } else {
        let n = plan.concurrency.unwrap_or(64);
        mode = format!("closed/{n}");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Duration)>();
        let mut tasks = Vec::new();
        for w in 0..n {
            let (load, counters, tx) = (load.clone(), counters.clone(), tx.clone());
            let conn = w % plan.connections.max(1);
            tasks.push(tokio::spawn(async move {
                let mut i = w * 7919;
                while Instant::now() < end {
                    let t0 = Instant::now();
                    load.one(i, conn, &counters).await;
                    let _ = tx.send((t0, t0.elapsed()));
                    i += 1;
                }
            }));
        }
        drop(tx);
        while let Some((t0, latency)) = rx.recv().await {
            if t0 >= measure_from && t0 < end {
                hist.record(latency.as_micros() as u64).unwrap();
                measured += 1;
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    let seconds = plan.duration.as_secs_f64();
    Report {
        label,
        mode,
        target_rps: plan.rate,
        requests: measured,
        seconds,
        rps: measured as f64 / seconds,
        errors: counters.errors.load(Ordering::Relaxed),
        wrong_decisions: counters.wrong.load(Ordering::Relaxed),
        p50_us: hist.value_at_quantile(0.5),
        p90_us: hist.value_at_quantile(0.9),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
        lag_p99_us: lag_hist.value_at_quantile(0.99),
        wrong_kinds: counters
            .wrong_kinds
            .lock()
            .map(|k| {
                k.iter()
                    .map(|((want, got), n)| format!("{want}→{got}: {n}"))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// The three Envoy configurations of the side-by-side comparison (benches/envoy/).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Variant {
    /// No authorization filter: the baseline route.
    Plain,
    /// ext_authz over gRPC to meshauthz.
    ExtAuthz,
    /// Envoy's jwt_authn + rbac expressing the bundled policy.
    Native,
}

/// Renders benches/envoy/envoy.yaml for `variant` and starts Envoy on it.
async fn start_envoy(
    variant: Variant,
    dir: &Path,
    pki: &common::mesh::Pki,
    meshauthz: Option<&str>,
    concurrency: usize,
) -> common::mesh::Envoy {
    let benches = repo().join("benches/envoy");
    let template = std::fs::read_to_string(benches.join("envoy.yaml")).unwrap();
    let snippet = match variant {
        Variant::Plain => None,
        Variant::ExtAuthz => Some(benches.join("ext-authz.yaml")),
        Variant::Native => Some(benches.join("native.yaml")),
    };
    let port = match (variant, meshauthz) {
        (Variant::ExtAuthz, None) => panic!("the ext-authz variant needs --meshauthz"),
        (_, Some(addr)) => addr.rsplit(':').next().unwrap().to_string(),
        (_, None) => "9".into(),
    };
    let config = common::mesh::splice(&template, "${HTTP_FILTERS}", snippet.as_deref())
        .replace("${CERTS}", &pki.dir.display().to_string())
        .replace("${MESHAUTHZ_PORT}", &port)
        .replace("${ISSUER}", common::ISSUER)
        .replace("${AUDIENCE}", common::AUDIENCE)
        .replace("${JWKS}", &dir.join("jwks.json").display().to_string());
    common::mesh::Envoy::start_config(&config, concurrency).await
}

const PRINCIPALS: [&str; 3] = [
    FRONTEND,
    CHECKOUT,
    "spiffe://cluster.local/ns/other/sa/frontend",
];

/// HTTPS load through a freshly started Envoy of `variant`.
async fn run_envoy(
    variant: Variant,
    dir: &Path,
    meshauthz: Option<&str>,
    envoy_concurrency: usize,
    plan: Plan,
    label: String,
) -> Report {
    let certs = tempfile::tempdir().unwrap();
    let pki = common::mesh::Pki::new(certs.path());
    let envoy = start_envoy(variant, dir, &pki, meshauthz, envoy_concurrency).await;
    let identities: Vec<(&str, reqwest::Client)> =
        PRINCIPALS.iter().map(|p| (*p, pki.client(p))).collect();
    let load = Load::https(
        &envoy.url(""),
        &identities,
        &shapes(&read_pool(dir)),
        variant != Variant::Native,
    );
    let report = run(Arc::new(load), plan, label).await;
    if report.errors > 0 {
        eprintln!("envoy log:\n{}", envoy.log());
    }
    report
}

fn read_pool(dir: &Path) -> Pool {
    serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).unwrap()).unwrap()
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    match cli.command {
        Some(Cmd::Setup {
            dir,
            bindings,
            worker_threads,
        }) => setup(&dir, bindings, worker_threads),
        Some(Cmd::Run {
            load,
            target,
            connections,
        }) => {
            let plan = Plan::measured(&load, connections);
            let report = rt.block_on(async {
                let clients = connect(&target, connections).await;
                let shapes = shapes(&read_pool(&load.dir));
                run(Arc::new(Load::grpc(clients, &shapes)), plan, load.label).await
            });
            println!("{}", serde_json::to_string(&report).unwrap());
        }
        Some(Cmd::Envoy {
            load,
            variant,
            meshauthz,
            envoy_concurrency,
        }) => {
            let plan = Plan::measured(&load, 1);
            let report = rt.block_on(run_envoy(
                variant,
                &load.dir,
                meshauthz.as_deref(),
                envoy_concurrency,
                plan,
                load.label,
            ));
            println!("{}", serde_json::to_string(&report).unwrap());
        }
        Some(Cmd::Soak {
            server_bin,
            seconds,
            rate,
            period,
            no_rotate,
            no_reload,
        }) => {
            let report = rt.block_on(soak(
                &server_bin,
                Duration::from_secs(seconds),
                rate,
                Duration::from_secs(period),
                Churn {
                    rotate: !no_rotate,
                    reload: !no_reload,
                },
            ));
            println!("{}", report.markdown());
            if !report.passed() || !report.flat() {
                std::process::exit(1);
            }
        }
        None if !cli.bench => self_check(&rt),
        None => eprintln!("usage: loadgen setup|run|envoy (see the module docs)"),
    }
}

/// `cargo test`: short runs against an in-process server, directly and through each Envoy
/// variant; every decision must be right, which also proves the native jwt_authn + rbac config
/// grants and denies exactly what the bundled policy does on the mix.
fn self_check(rt: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), 0, 0);
    let plan = Plan {
        concurrency: Some(8),
        rate: None,
        warmup: Duration::from_millis(200),
        duration: Duration::from_millis(500),
        connections: 2,
    };
    rt.block_on(async {
        let server = common::TestServer::start(&dir.path().join("meshauthz.yaml")).await;
        let grpc = server.grpc.to_string();
        let load = Load::grpc(connect(&grpc, 2).await, &shapes(&read_pool(dir.path())));
        let mut reports = vec![run(Arc::new(load), plan, "self-check grpc".into()).await];
        let open = Plan {
            rate: Some(500),
            ..plan
        };
        let load = Load::grpc(connect(&grpc, 2).await, &shapes(&read_pool(dir.path())));
        reports.push(run(Arc::new(load), open, "self-check grpc open".into()).await);
        for variant in [Variant::Plain, Variant::ExtAuthz, Variant::Native] {
            let label = format!("self-check envoy {variant:?}");
            reports.push(run_envoy(variant, dir.path(), Some(&grpc), 1, plan, label).await);
        }
        for report in &reports {
            println!("loadgen self-check: {report:?}");
            assert!(report.requests > 50, "{report:?}");
            let wrong_expected = if report.label.ends_with("Plain") {
                // The plain route allows everything: exactly the mix's denials are "wrong".
                report.wrong_decisions
            } else {
                0
            };
            assert_eq!(
                (report.errors, report.wrong_decisions),
                (0, wrong_expected),
                "{report:?}"
            );
        }
        let soaked = soak(
            Path::new(env!("CARGO_BIN_EXE_meshauthz")),
            Duration::from_secs(3),
            300,
            Duration::from_secs(1),
            Churn {
                rotate: true,
                reload: true,
            },
        )
        .await;
        println!("loadgen self-check soak:\n{}", soaked.markdown());
        assert!(soaked.passed(), "{soaked:?}");
        // Debug-build RSA key generation eats into the 3 s, so count rather than fix segments.
        assert!(soaked.rotations >= 1, "{soaked:?}");
        assert_eq!(soaked.segments, soaked.rotations + 1, "{soaked:?}");
        assert!(soaked.reloads_ok >= 1, "{soaked:?}");
        let plain = &reports[2];
        assert!(
            plain.wrong_decisions > 0,
            "the plain route must disagree with the policy on denials, or the check checks nothing"
        );
        server.stop().await;
    });
}

/// What a soak run saw.
#[derive(Debug, Default)]
struct SoakReport {
    seconds: f64,
    rate: u64,
    period: u64,
    segments: usize,
    requests: u64,
    errors: u64,
    wrong: u64,
    rotations: usize,
    jwks_fetches: usize,
    reloads_ok: u64,
    reloads_failed: u64,
    worst_p99_us: u64,
    median_p50_us: u64,
    /// One sample after every segment.
    samples: Vec<SoakSample>,
    rss_start: Rss,
}

/// The server's state after one soak segment.
#[derive(Debug, Clone, Copy, Default)]
struct SoakSample {
    /// Seconds since the load started.
    t: f64,
    rss: Rss,
    /// `meshauthz_jwt_cache_entries` at the end of the segment.
    cache_entries: u64,
    p99_us: u64,
    max_us: u64,
}

/// Resident memory (KiB) from /proc/PID/status: anonymous pages are the heap and stacks; file
/// pages are the mapped binary and libraries (shared, reclaimable).
#[derive(Debug, Clone, Copy, Default)]
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

/// Anonymous RSS may rise by this much in the second half over the first half's peak and still
/// count as flat (bounded caches fill during the first half).
const FLAT_TOLERANCE_KIB: u64 = 1024;

impl SoakReport {
    fn passed(&self) -> bool {
        self.errors == 0 && self.wrong == 0 && self.requests > 0 && self.reloads_failed == 0
    }

    /// Peak anonymous RSS of the first and of the second half of the run.
    fn halves(&self) -> (u64, u64) {
        let half = self.seconds / 2.0;
        let peak = |first: bool| {
            self.samples
                .iter()
                .filter(|s| (s.t <= half) == first)
                .map(|s| s.rss.anon)
                .max()
                .unwrap_or(0)
        };
        (peak(true), peak(false))
    }

    /// RSS is flat: nothing in the steady-state second half rises past the first half's peak
    /// (plus [`FLAT_TOLERANCE_KIB`]).
    fn flat(&self) -> bool {
        let (first, second) = self.halves();
        second <= first + FLAT_TOLERANCE_KIB
    }

    fn markdown(&self) -> String {
        let last = self.samples.last().copied().unwrap_or_default();
        let max = |f: fn(&Rss) -> u64| self.samples.iter().map(|s| f(&s.rss)).max().unwrap_or(0);
        let (first, second) = self.halves();
        let mib = |k: u64| k as f64 / 1024.0;
        let mut out = format!(
            "| soak | value |\n|---|---|\n\
             | duration | {:.0} s at {} checks/s (open loop) |\n\
             | requests | {} |\n| errors | {} |\n| wrong decisions | {} |\n\
             | JWKS rotations (new kid used at once) | {} ({} JWKS fetches) |\n\
             | policy reloads | {} ok, {} failed |\n\
             | latency | p50 {} µs (median over {} s segments), worst segment p99 {} µs |\n\
             | RSS | start {:.1} MiB (idle), end {:.1} MiB, max {:.1} MiB |\n\
             | anonymous RSS (heap) | start {:.1} MiB, end {:.1} MiB, max {:.1} MiB |\n\
             | anonymous RSS peak, first half → second half | {:.1} → {:.1} MiB: {} |\n\
             | file RSS (mapped binary) | end {:.1} MiB |\n\
             | verified-token cache | {} entries at the end |\n",
            self.seconds,
            self.rate,
            self.requests,
            self.errors,
            self.wrong,
            self.rotations,
            self.jwks_fetches,
            self.reloads_ok,
            self.reloads_failed,
            self.median_p50_us,
            self.period,
            self.worst_p99_us,
            mib(self.rss_start.total),
            mib(last.rss.total),
            mib(max(|r| r.total)),
            mib(self.rss_start.anon),
            mib(last.rss.anon),
            mib(max(|r| r.anon)),
            mib(first),
            mib(second),
            if self.flat() { "flat" } else { "NOT flat" },
            mib(last.rss.file),
            last.cache_entries,
        );
        out.push_str(
            "\n| t | RSS MiB | anonymous MiB | cache entries | segment p99 µs | segment max µs |\n\
             |---|---|---|---|---|---|\n",
        );
        let step = (self.samples.len() / 12).max(1);
        let mut rows: Vec<&SoakSample> = self.samples.iter().step_by(step).collect();
        if let Some(l) = self.samples.last()
            && !rows.last().is_some_and(|r| std::ptr::eq(*r, l))
        {
            rows.push(l);
        }
        for s in rows {
            out.push_str(&format!(
                "| {:.0} s | {:.1} | {:.1} | {} | {} | {} |\n",
                s.t,
                mib(s.rss.total),
                mib(s.rss.anon),
                s.cache_entries,
                s.p99_us,
                s.max_us
            ));
        }
        out
    }
}

fn rss(pid: u32) -> Rss {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Rss {
        total: field("VmRSS:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads a counter or gauge line from the Prometheus text.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Runs the binary on a copy of the bundled policy with a JWKS served by this process, then
/// sends `rate` checks/s for `total`, one segment per `period`. At each segment: a new RSA and EC
/// key (new kids) published and used for every valid token from then on (the previous keys stay
/// published one more period), and a policy reload that does not change any decision
/// (alternately the Rego module and the role-binding data are rewritten).
/// What changes every period during a soak.
#[derive(Debug, Clone, Copy)]
struct Churn {
    rotate: bool,
    reload: bool,
}

async fn soak(
    bin: &Path,
    total: Duration,
    rate: u64,
    period: Duration,
    churn: Churn,
) -> SoakReport {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    common::copy_dir(&repo().join("policies"), &policies);
    let _ = std::fs::remove_file(policies.join("envoy/authz/authz_test.rego"));
    let module = policies.join("envoy/authz/authz.rego");
    let data = policies.join("rbac/data.json");
    let (module_text, data_text) = (
        std::fs::read_to_string(&module).unwrap(),
        std::fs::read_to_string(&data).unwrap(),
    );

    let mut keys = (
        Keys::generate(Algorithm::RS256, "soak-rsa-0"),
        Keys::generate(Algorithm::ES256, "soak-ec-0"),
    );
    let jwks = common::JwksServer::start(&[&keys.0, &keys.1]).await;
    let (grpc_port, http_port) = (free_port(), free_port());
    let config = format!(
        r#"server:
  grpc_addr: "127.0.0.1:{grpc_port}"
  http_addr: "127.0.0.1:{http_port}"
policy:
  paths: [policies]
  decision: "data.envoy.authz.result"
  debounce: 100ms
jwt:
  providers:
    - name: soak
      issuer: "{}"
      audiences: ["{}"]
      jwks: {{ uri: "{}", refresh_interval: 1m, min_refetch_interval: 1s }}
      claims_to_headers: [{{ claim: sub, header: x-jwt-sub }}]
decision_log: {{ output: /dev/null }}
"#,
        common::ISSUER,
        common::AUDIENCE,
        jwks.uri()
    );
    let config_path = dir.path().join("meshauthz.yaml");
    std::fs::write(&config_path, config).unwrap();
    let stderr = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = tokio::process::Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{http_port}");
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready,
        "server did not become ready:\n{}",
        std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
    );

    let mut report = SoakReport {
        rate,
        period: period.as_secs(),
        rss_start: rss(pid),
        ..Default::default()
    };
    let clients = connect(&format!("127.0.0.1:{grpc_port}"), 4).await;
    let started = Instant::now();
    let mut p50s = Vec::new();
    let mut segment = 0usize;
    while started.elapsed() < total {
        if segment > 0 && churn.rotate {
            let next = (
                Keys::generate(Algorithm::RS256, &format!("soak-rsa-{segment}")),
                Keys::generate(Algorithm::ES256, &format!("soak-ec-{segment}")),
            );
            jwks.set_keys(&[&keys.0, &keys.1, &next.0, &next.1]);
            keys = next;
            report.rotations += 1;
        }
        if segment > 0 && churn.reload {
            // A reload that changes the revision but no decision.
            if segment.is_multiple_of(2) {
                std::fs::write(&module, format!("{module_text}\n# soak reload {segment}\n"))
                    .unwrap();
            } else {
                let mut d: serde_json::Value = serde_json::from_str(&data_text).unwrap();
                d["bindings"][format!("soak/reload-{segment}")] =
                    serde_json::json!(["catalog-reader"]);
                std::fs::write(&data, d.to_string()).unwrap();
            }
        }
        let load = Load::grpc(clients.clone(), &shapes(&make_pool(&keys.0, &keys.1)));
        let plan = Plan {
            concurrency: None,
            rate: Some(rate),
            warmup: Duration::ZERO,
            duration: period
                .min(total.saturating_sub(started.elapsed()))
                .max(Duration::from_millis(100)),
            connections: 4,
        };
        let r = run(Arc::new(load), plan, format!("segment {segment}")).await;
        report.requests += r.requests;
        report.errors += r.errors;
        report.wrong += r.wrong_decisions;
        report.worst_p99_us = report.worst_p99_us.max(r.p99_us);
        p50s.push(r.p50_us);
        let metrics = match http.get(format!("{base}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        report.samples.push(SoakSample {
            t: started.elapsed().as_secs_f64(),
            rss: rss(pid),
            cache_entries: metric(&metrics, "meshauthz_jwt_cache_entries "),
            p99_us: r.p99_us,
            max_us: r.max_us,
        });
        if r.errors > 0 || r.wrong_decisions > 0 {
            eprintln!("segment {segment}: {r:?}");
        }
        segment += 1;
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.segments = segment;
    report.jwks_fetches = jwks.fetches();
    p50s.sort_unstable();
    report.median_p50_us = p50s.get(p50s.len() / 2).copied().unwrap_or(0);
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    report.reloads_ok = metric(&metrics, r#"meshauthz_policy_reloads_total{result="ok"} "#);
    report.reloads_failed = metric(
        &metrics,
        r#"meshauthz_policy_reloads_total{result="error"} "#,
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server exited during the soak"
    );
    child.kill().await.unwrap();
    report
}
