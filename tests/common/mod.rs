//! Shared test harness: the real server on ephemeral ports, a tonic client, real signing keys,
//! and a real HTTP server for JWKS.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::KeyPair as _;
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
use jsonwebtoken::{Algorithm, EncodingKey};
use meshauthz::app::App;
use meshauthz::config::Config;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub mod mesh;

pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "shop-api";

/// The repository root (for bundled config and policies).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------------
// The server

pub struct TestServer {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    client: AuthorizationClient<tonic::transport::Channel>,
}

impl TestServer {
    /// Starts the real server from a config file, on port 0 for both listeners.
    pub async fn start(config_file: &Path) -> TestServer {
        let config = Config::load(config_file).unwrap_or_else(|e| panic!("{e}"));
        Self::start_config(config).await
    }

    /// Like [`TestServer::start`] for a config whose gRPC listener uses TLS: no plaintext client.
    pub async fn start_tls(config_file: &Path) -> TestServer {
        let config = Config::load(config_file).unwrap_or_else(|e| panic!("{e}"));
        Self::start_inner(config, false).await
    }

    pub async fn start_config(config: Config) -> TestServer {
        Self::start_inner(config, true).await
    }

    async fn start_inner(config: Config, plaintext: bool) -> TestServer {
        let app = App::build(config).unwrap_or_else(|e| panic!("{e:#}"));
        let grpc_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = grpc_l.local_addr().unwrap();
        let http = http_l.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.clone().serve(grpc_l, http_l, async move {
            let _ = rx.await;
        }));
        let client = if plaintext {
            connect(grpc).await
        } else {
            // A client that is never used: TLS tests build their own.
            AuthorizationClient::new(
                tonic::transport::Channel::from_shared(format!("http://{grpc}"))
                    .unwrap()
                    .connect_lazy(),
            )
        };
        TestServer {
            grpc,
            http,
            app,
            stop: Some(tx),
            task: Some(task),
            client,
        }
    }

    pub async fn check(&self, req: CheckRequest) -> Outcome {
        let resp = self
            .client
            .clone()
            .check(req)
            .await
            .expect("a Check must never fail at the gRPC level")
            .into_inner();
        Outcome::from(resp)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = reqwest::get(format!("http://{}{}", self.http, path))
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    /// Stops the server and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

async fn connect(addr: SocketAddr) -> AuthorizationClient<tonic::transport::Channel> {
    for _ in 0..50 {
        if let Ok(c) = AuthorizationClient::connect(format!("http://{addr}")).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server at {addr} did not accept connections");
}

/// Copies a directory tree (the bundled policies into a test's own, editable copy).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A config file in a temp dir; `{policies}` in the text is replaced with the bundled policy dir.
pub fn write_config(dir: &Path, yaml: &str) -> PathBuf {
    let file = dir.join("meshauthz.yaml");
    let text = yaml.replace("{policies}", &repo().join("policies").display().to_string());
    std::fs::write(&file, text).unwrap();
    file
}

// ---------------------------------------------------------------------------------------------
// Requests and responses

#[derive(Debug, Clone, Default)]
pub struct Req<'a> {
    pub principal: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub headers: Vec<(&'a str, String)>,
}

pub fn request(principal: Option<&str>, method: &str, path: &str) -> CheckRequest {
    Req {
        principal,
        method,
        path,
        headers: Vec::new(),
    }
    .build()
}

impl<'a> Req<'a> {
    pub fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    /// A CheckRequest shaped like the ones Envoy sends through an mTLS listener.
    pub fn build(&self) -> CheckRequest {
        let mut headers: std::collections::HashMap<String, String> = [
            (":method", self.method.to_string()),
            (":path", self.path.to_string()),
            (":authority", "shop.test".to_string()),
            (":scheme", "https".to_string()),
            (
                "x-request-id",
                "11111111-2222-3333-4444-555555555555".to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in &self.headers {
            headers.insert(k.to_string(), v.clone());
        }
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(attribute_context::Peer {
                    address: Some(core::Address {
                        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                            address: "10.0.0.7".into(),
                            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                                51000,
                            )),
                            ..Default::default()
                        })),
                    }),
                    principal: self.principal.unwrap_or_default().to_string(),
                    ..Default::default()
                }),
                destination: Some(attribute_context::Peer {
                    principal: "spiffe://cluster.local/ns/shop/sa/backend".into(),
                    ..Default::default()
                }),
                request: Some(attribute_context::Request {
                    time: None,
                    http: Some(attribute_context::HttpRequest {
                        id: "42".into(),
                        method: self.method.into(),
                        headers,
                        path: self.path.into(),
                        host: "shop.test".into(),
                        scheme: "https".into(),
                        protocol: "HTTP/1.1".into(),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
    }
}

/// The parts of a CheckResponse tests look at.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub allowed: bool,
    pub status: u16,
    /// Header name → (value, append action) for every header in the response.
    pub headers: BTreeMap<String, Vec<(String, i32)>>,
    pub removed: Vec<String>,
    pub body: String,
    pub grpc_code: i32,
    /// The denial's reason category (meshauthz puts it in the gRPC status message).
    pub reason: String,
    pub metadata: Option<envoy_types::pb::google::protobuf::Struct>,
}

impl Outcome {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(|(v, _)| v.as_str())
    }
}

impl From<CheckResponse> for Outcome {
    fn from(r: CheckResponse) -> Outcome {
        let mut o = Outcome {
            grpc_code: r.status.as_ref().map_or(-1, |s| s.code),
            reason: r.status.map(|s| s.message).unwrap_or_default(),
            metadata: r.dynamic_metadata,
            ..Default::default()
        };
        let mut add = |hs: &[envoy_types::ext_authz::v3::pb::HeaderValueOption]| {
            for h in hs {
                let hv = h.header.clone().unwrap();
                o.headers
                    .entry(hv.key)
                    .or_default()
                    .push((hv.value, h.append_action));
            }
        };
        match r.http_response {
            Some(HttpResponse::OkResponse(ok)) => {
                add(&ok.headers);
                o.allowed = true;
                o.status = 200;
                o.removed = ok.headers_to_remove;
            }
            Some(HttpResponse::DeniedResponse(d)) => {
                add(&d.headers);
                o.status = u16::try_from(d.status.map_or(0, |s| s.code)).unwrap();
                o.body = d.body;
            }
            _ => panic!("response without http_response"),
        }
        o
    }
}

// ---------------------------------------------------------------------------------------------
// Keys and tokens

/// A real key pair of one algorithm, with its public JWK.
pub struct Keys {
    pub alg: Algorithm,
    pub kid: String,
    pub encoding: EncodingKey,
    pub jwk: serde_json::Value,
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

impl Keys {
    pub fn generate(alg: Algorithm, kid: &str) -> Keys {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::rand::SystemRandom;
        use aws_lc_rs::signature as sig;
        let rng = SystemRandom::new();
        let encoding = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => {
                let kp =
                    aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
                let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp).unwrap();
                EncodingKey::from_rsa_pem(pem("PRIVATE KEY", der.as_ref()).as_bytes()).unwrap()
            }
            Algorithm::ES256 => {
                let doc =
                    sig::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                        .unwrap();
                EncodingKey::from_ec_der(doc.as_ref())
            }
            Algorithm::ES384 => {
                let doc =
                    sig::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
                        .unwrap();
                EncodingKey::from_ec_der(doc.as_ref())
            }
            Algorithm::EdDSA => {
                // jsonwebtoken derives Ed25519 JWKs only from v1 PKCS#8; build this one by hand.
                use base64::Engine as _;
                let doc = sig::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
                let public = sig::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
                let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(public.public_key().as_ref());
                return Keys {
                    alg,
                    kid: kid.to_string(),
                    encoding: EncodingKey::from_ed_der(doc.as_ref()),
                    jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA"}),
                };
            }
            other => panic!("no asymmetric key for {other:?}"),
        };
        let mut jwk = serde_json::to_value(
            jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, alg).unwrap(),
        )
        .unwrap();
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        Keys {
            alg,
            kid: kid.to_string(),
            encoding,
            jwk,
        }
    }

    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }

    /// A validly signed token with extra header parameters (`crit`, …) the encoder has no
    /// field for.
    pub fn sign_with_header(
        &self,
        extra_header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> String {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut header = json!({"alg": format!("{:?}", self.alg), "typ": "JWT", "kid": self.kid});
        for (k, v) in extra_header.as_object().unwrap() {
            header[k] = v.clone();
        }
        let message = format!(
            "{}.{}",
            e.encode(header.to_string()),
            e.encode(claims.to_string())
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &self.encoding, self.alg).unwrap();
        format!("{message}.{signature}")
    }
}

pub fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// Valid claims for the test issuer and audience, expiring in an hour.
pub fn claims(sub: &str, scope: &str) -> serde_json::Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "scope": scope,
        "iat": now(),
        "exp": now() + 3600,
        "jti": format!("jti-{sub}-{}", fastrand::u64(..)),
    })
}

/// A JWS with an arbitrary header (for attacks the encoder refuses to make).
pub fn raw_token(
    header: &serde_json::Value,
    claims: &serde_json::Value,
    signature: &[u8],
) -> String {
    use base64::Engine as _;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        e.encode(header.to_string()),
        e.encode(claims.to_string()),
        e.encode(signature)
    )
}

// ---------------------------------------------------------------------------------------------
// A real JWKS server

#[derive(Clone)]
pub struct JwksServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<JwksState>>,
    fetches: Arc<AtomicUsize>,
}

struct JwksState {
    body: String,
    status: u16,
    delay: Duration,
}

impl JwksServer {
    pub async fn start(keys: &[&Keys]) -> JwksServer {
        let state = Arc::new(Mutex::new(JwksState {
            body: jwks_body(keys),
            status: 200,
            delay: Duration::ZERO,
        }));
        let fetches = Arc::new(AtomicUsize::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (s, f) = (state.clone(), fetches.clone());
        let discovery = serde_json::json!({
            "issuer": format!("http://{addr}"),
            "jwks_uri": format!("http://{addr}/keys"),
        })
        .to_string();
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || {
                    let body = discovery.clone();
                    async move { ([("content-type", "application/json")], body) }
                }),
            )
            .route(
                "/keys",
                axum::routing::get(move || {
                    let (s, f) = (s.clone(), f.clone());
                    async move {
                        f.fetch_add(1, Ordering::SeqCst);
                        let (body, status, delay) = {
                            let st = s.lock().unwrap();
                            (st.body.clone(), st.status, st.delay)
                        };
                        tokio::time::sleep(delay).await;
                        (
                            axum::http::StatusCode::from_u16(status).unwrap(),
                            [("content-type", "application/json")],
                            body,
                        )
                    }
                }),
            );
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        JwksServer {
            addr,
            state,
            fetches,
        }
    }

    pub fn uri(&self) -> String {
        format!("http://{}/keys", self.addr)
    }

    pub fn set_keys(&self, keys: &[&Keys]) {
        self.state.lock().unwrap().body = jwks_body(keys);
    }

    pub fn set_status(&self, status: u16) {
        self.state.lock().unwrap().status = status;
    }

    pub fn set_body(&self, body: &str) {
        self.state.lock().unwrap().body = body.to_string();
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

pub fn jwks_body(keys: &[&Keys]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// Polls `f` until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
