//! The `meshauthz` command line. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meshauthz::app::{self, App};
use meshauthz::config::{Config, DEFAULT_CONFIG_PATH};

#[derive(Parser)]
#[command(
    name = "meshauthz",
    about = "External authorization for Envoy and Istio",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ext_authz gRPC server and the HTTP health/metrics listener.
    Serve {
        /// Config file.
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH, env = "MESHAUTHZ_CONFIG")]
        config: PathBuf,
        /// Log as plain text instead of JSON.
        #[arg(long)]
        text_logs: bool,
        /// Override `server.grpc_addr` (e.g. 127.0.0.1:0 for an ephemeral port).
        #[arg(long)]
        grpc_addr: Option<std::net::SocketAddr>,
        /// Override `server.http_addr`.
        #[arg(long)]
        http_addr: Option<std::net::SocketAddr>,
    },
    /// Decide one request offline and print the decision as JSON.
    Eval {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// A protojson CheckRequest (decided by the whole pipeline, tokens verified) or an
        /// OPA-Envoy input document (evaluated as given); `-` reads standard input.
        #[arg(long, short)]
        input: PathBuf,
        /// Also print the input document the policy evaluated.
        #[arg(long)]
        print_input: bool,
    },
    /// Run the `test_*` rules of policy trees (like `opa test`); exit 1 if any fails.
    Test {
        /// Policy files or directories (their data documents are loaded too).
        #[arg(default_value = "policies")]
        paths: Vec<PathBuf>,
        /// Show what failing tests evaluated to, and their print() output.
        #[arg(long, short)]
        verbose: bool,
        /// Parse modules as Rego v0.
        #[arg(long)]
        v0: bool,
    },
    /// Check a config: load it, compile every policy, check the decision rule exists; with
    /// --check-jwks also fetch every JWKS. Exit 1 on any problem (for CI and init containers).
    Validate {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        check_jwks: bool,
    },
    /// Mint a token from the bundled demo issuer (its private key is in the repository: for
    /// trying things out only). Prints the token.
    DemoToken {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The jwt provider whose issuer, audience and key id the token carries.
        #[arg(long, default_value = "demo")]
        provider: String,
        /// PEM private key; default: demo/signing-key.pem beside the config file.
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long, default_value = "alice")]
        sub: String,
        /// A scope (repeat for several); the token's `scope` claim joins them with spaces.
        #[arg(long)]
        scope: Vec<String>,
        /// Lifetime, e.g. 1h or 10m.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshauthz: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::DemoToken {
            config,
            provider,
            key,
            sub,
            scope,
            ttl,
        } => {
            let loaded = Config::load(&config)?;
            let key = key.unwrap_or_else(|| {
                config
                    .parent()
                    .unwrap_or(std::path::Path::new("."))
                    .join("demo/signing-key.pem")
            });
            let req = meshauthz::demo::Request {
                sub,
                scopes: scope,
                ttl: ttl.into(),
            };
            println!(
                "{}",
                meshauthz::demo::token(&loaded.jwt.providers, &provider, &key, &req)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("meshauthz {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            config,
            text_logs,
            grpc_addr,
            http_addr,
        } => {
            meshauthz::telemetry::init_tracing(!text_logs);
            let mut config = Config::load(&config)?;
            if let Some(a) = grpc_addr {
                config.server.grpc_addr = a;
            }
            if let Some(a) = http_addr {
                config.server.http_addr = a;
            }
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = config.server.worker_threads {
                rt.worker_threads(n);
            }
            let rt = rt
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            rt.block_on(async {
                let app = App::build(config)?;
                let grpc = tokio::net::TcpListener::bind(app.config.server.grpc_addr)
                    .await
                    .with_context(|| format!("cannot listen on {}", app.config.server.grpc_addr))?;
                let http = tokio::net::TcpListener::bind(app.config.server.http_addr)
                    .await
                    .with_context(|| format!("cannot listen on {}", app.config.server.http_addr))?;
                let signal = app::shutdown_signal(app.clone());
                app.serve(grpc, http, signal).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Test { paths, verbose, v0 } => {
            let version = if v0 {
                meshauthz::policy::RegoVersion::V0
            } else {
                meshauthz::policy::RegoVersion::V1
            };
            let results = meshauthz::policy::testing::run(&paths, version)?;
            let root = std::env::current_dir().unwrap_or_default();
            let (text, ok) = meshauthz::policy::testing::report(&results, verbose, &root);
            print!("{text}");
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Validate { config, check_jwks } => {
            let mut config = Config::load(&config)?;
            config.decision_log.enabled = false;
            let file = config.file.clone();
            let app = App::build(config)?;
            let policy = app.authz.policy.current();
            println!(
                "{}: ok: {} modules, decision rule {} ({} engine), revision {}",
                file.display(),
                policy.modules().len(),
                policy.decision_rule(),
                policy.engine(),
                policy.revision()
            );
            let mut ok = true;
            if check_jwks {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the runtime")?;
                for (provider, result) in rt.block_on(app.authz.jwt.check_all_jwks()) {
                    match result {
                        Ok(n) => println!("jwt provider {provider}: JWKS ok, {n} keys"),
                        Err(e) => {
                            ok = false;
                            println!("jwt provider {provider}: JWKS error: {e}");
                        }
                    }
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Eval {
            config,
            input,
            print_input,
        } => {
            let mut config = Config::load(&config)?;
            config.decision_log.enabled = false;
            let input = app::read_eval_input(&input)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            let checked = rt.block_on(async {
                let app = App::build(config)?;
                anyhow::Ok(match input {
                    app::EvalInput::Document(doc) => app.authz.check_document(doc),
                    app::EvalInput::Check(attrs) => {
                        app.authz.jwt.start();
                        let ctx = meshauthz::authz::Context {
                            capture_input: true,
                            ..Default::default()
                        };
                        app.authz.check_with(*attrs, ctx).await
                    }
                })
            })?;
            println!("{}", meshauthz::app::decision_json(&checked, print_input));
            Ok(if checked.computed_allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}
