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
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        target: String,
        /// Closed loop: this many requests in flight.
        #[arg(long)]
        concurrency: Option<usize>,
        /// Open loop: requests per second.
        #[arg(long)]
        rate: Option<u64>,
        /// Seconds of measurement (after one second of warm-up).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// HTTP/2 connections to spread the streams over.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Label for the result line.
        #[arg(long, default_value = "")]
        label: String,
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
    let mut tokens = Vec::new();
    for scope in ["orders:read", "orders:write", "orders:write profile"] {
        for i in 0..50 {
            let key = if i % 2 == 0 { &rsa } else { &ec };
            let mut c = common::claims(&format!("user{i}"), scope);
            c["exp"] = serde_json::json!(common::now() + 24 * 3600);
            tokens.push((scope.to_string(), key.sign(&c)));
        }
    }
    let other = Keys::generate(Algorithm::RS256, "load-rsa");
    let invalid: Vec<String> = (0..20)
        .map(|i| other.sign(&common::claims(&format!("forger{i}"), "orders:write")))
        .collect();
    std::fs::write(
        dir.join("tokens.json"),
        serde_json::to_string(&Pool { tokens, invalid }).unwrap(),
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

/// Prebuilt requests (so the generator spends no time building them) with expected answers.
fn requests(pool: &Pool) -> Vec<(CheckRequest, bool, u16)> {
    let mut out = Vec::new();
    for (i, t) in mix().iter().enumerate() {
        for j in 0..20 {
            let mut req = Req {
                principal: t.principal.as_deref(),
                method: &t.method,
                path: &t.path,
                headers: Vec::new(),
            };
            match &t.token {
                Some(TokenRef::Valid { scope }) => {
                    let matching: Vec<&String> = pool
                        .tokens
                        .iter()
                        .filter(|(s, _)| s == scope)
                        .map(|(_, t)| t)
                        .collect();
                    req = req.bearer(matching[(i + j) % matching.len()]);
                }
                Some(TokenRef::Invalid) => req = req.bearer(&pool.invalid[j % pool.invalid.len()]),
                None => {}
            }
            out.push((req.build(), t.allowed, t.status));
        }
    }
    // Interleave shapes so consecutive requests differ.
    fastrand::seed(7);
    fastrand::shuffle(&mut out);
    out
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    errors: AtomicU64,
    wrong: AtomicU64,
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

async fn one(
    client: &mut AuthorizationClient<Channel>,
    req: &(CheckRequest, bool, u16),
    counters: &Counters,
) {
    counters.sent.fetch_add(1, Ordering::Relaxed);
    match client.check(req.0.clone()).await {
        Ok(resp) => {
            let o = common::Outcome::from(resp.into_inner());
            if o.allowed != req.1 || o.status != req.2 {
                counters.wrong.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(_) => {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn run(
    target: &str,
    reqs: Arc<Vec<(CheckRequest, bool, u16)>>,
    concurrency: Option<usize>,
    rate: Option<u64>,
    duration: Duration,
    connections: usize,
    label: String,
) -> Report {
    let clients = connect(target, connections).await;
    let counters = Arc::new(Counters::default());
    let warmup = Duration::from_secs(1);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut lag_hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mode;
    let mut measured = 0u64;
    if let Some(rate) = rate {
        mode = "open".to_string();
        // Open loop: one send per tick; latency from the scheduled time.
        let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Duration, Duration)>();
        let mut next = start;
        let mut i = 0usize;
        while next < end {
            let now = Instant::now();
            if next > now {
                tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
            }
            let scheduled = next;
            let mut client = clients[i % clients.len()].clone();
            let reqs = reqs.clone();
            let counters = counters.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let sent = Instant::now();
                one(&mut client, &reqs[i % reqs.len()], &counters).await;
                let _ = tx.send((scheduled, sent.elapsed(), sent - scheduled));
            });
            i += 1;
            next += interval;
        }
        drop(tx);
        while let Some((scheduled, latency, lag)) = rx.recv().await {
            if scheduled >= measure_from {
                hist.record(latency.as_micros() as u64).unwrap();
                lag_hist.record(lag.as_micros() as u64).unwrap();
                measured += 1;
            }
        }
    } else {
        let n = concurrency.unwrap_or(64);
        mode = format!("closed/{n}");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Duration)>();
        let mut tasks = Vec::new();
        for w in 0..n {
            let mut client = clients[w % clients.len()].clone();
            let (reqs, counters, tx) = (reqs.clone(), counters.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = w * 7919;
                while Instant::now() < end {
                    let t0 = Instant::now();
                    one(&mut client, &reqs[i % reqs.len()], &counters).await;
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
    let seconds = duration.as_secs_f64();
    Report {
        label,
        mode,
        target_rps: rate,
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
    }
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
            dir,
            target,
            concurrency,
            rate,
            duration,
            connections,
            label,
        }) => {
            let pool: Pool =
                serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).unwrap())
                    .unwrap();
            let reqs = Arc::new(requests(&pool));
            let report = rt.block_on(run(
                &target,
                reqs,
                concurrency,
                rate,
                Duration::from_secs(duration),
                connections,
                label,
            ));
            println!("{}", serde_json::to_string(&report).unwrap());
        }
        None if !cli.bench => self_check(&rt),
        None => eprintln!("usage: loadgen setup|run (see the module docs)"),
    }
}

/// `cargo test`: a short run against an in-process server; every decision must be right.
fn self_check(rt: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), 0, 0);
    let pool: Pool =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokens.json")).unwrap())
            .unwrap();
    rt.block_on(async {
        let server = common::TestServer::start(&dir.path().join("meshauthz.yaml")).await;
        let report = run(
            &server.grpc.to_string(),
            Arc::new(requests(&pool)),
            Some(8),
            None,
            Duration::from_millis(500),
            2,
            "self-check".into(),
        )
        .await;
        assert!(report.requests > 50, "{report:?}");
        assert_eq!(
            (report.errors, report.wrong_decisions),
            (0, 0),
            "{report:?}"
        );
        println!("loadgen self-check: {report:?}");
        server.stop().await;
    });
}
