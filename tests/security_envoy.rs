//! Regression tests for the fail-open and bypass paths of the adversarial review, each through a
//! real Envoy (SPIFFE client certificates, ext_authz over gRPC and over HTTP) where Envoy takes
//! part in the attack: what reaches the upstream is what the echo server saw.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mesh::{Authz, Envoy, EnvoyOptions, Pki, echo_server};
use common::*;
use jsonwebtoken::Algorithm;

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
const INTRUDER: &str = "spiffe://cluster.local/ns/shop/sa/intruder";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Grpc,
    Http,
}

const MODES: [Mode; 2] = [Mode::Grpc, Mode::Http];

/// What a test changes in the standard mesh.
#[derive(Default)]
struct Setup {
    /// A policy of its own (`package custom`, decision `data.custom.result`) instead of the
    /// bundled one.
    policy: Option<&'static str>,
    /// Extra keys under `policy:`.
    policy_extra: &'static str,
    /// Extra top-level config sections.
    config_extra: &'static str,
    /// Extra keys under the provider's `jwks:`.
    jwks_extra: &'static str,
    envoy: EnvoyOptions,
    jwks_delay: Option<Duration>,
}

struct Mesh {
    pki: Pki,
    keys: Keys,
    envoy: Envoy,
    _server: TestServer,
    _jwks: JwksServer,
    _dir: tempfile::TempDir,
}

impl Mesh {
    async fn start(mode: Mode, setup: Setup) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        let pki = Pki::new(&certs);
        let policies = dir.path().join("policies");
        let decision = match setup.policy {
            Some(rego) => {
                std::fs::create_dir_all(policies.join("custom")).unwrap();
                std::fs::write(policies.join("custom/custom.rego"), rego).unwrap();
                "data.custom.result"
            }
            None => {
                common::copy_dir(&repo().join("policies"), &policies);
                "data.envoy.authz.result"
            }
        };
        let keys = Keys::generate(Algorithm::RS256, "mesh-key");
        let jwks = JwksServer::start(&[&keys]).await;
        if let Some(d) = setup.jwks_delay {
            jwks.set_delay(d);
        }
        let config = write_config(
            dir.path(),
            &format!(
                r#"
server:
  http_authz: {{ enabled: true, path_prefix: /authz, trusted_xfcc: true }}
policy:
  paths: [policies]
  decision: "{decision}"
  watch: false
{policy_extra}
jwt:
  providers:
    - name: corp
      issuer: "{ISSUER}"
      audiences: ["{AUDIENCE}"]
      jwks: {{ uri: "{}" {jwks_extra} }}
      claims_to_headers: [{{ claim: sub, header: x-jwt-sub }}]
decision_log: {{ enabled: false }}
{config_extra}
"#,
                jwks.uri(),
                policy_extra = setup.policy_extra,
                jwks_extra = setup.jwks_extra,
                config_extra = setup.config_extra,
            ),
        );
        let server = TestServer::start(&config).await;
        let upstream = echo_server().await;
        let (grpc, http) = (server.grpc, server.http);
        let authz = match mode {
            Mode::Grpc => Authz::Grpc { grpc, http },
            Mode::Http => Authz::Http { grpc, http },
        };
        let envoy = Envoy::start_with(&pki, authz, upstream, &setup.envoy).await;
        Mesh {
            pki,
            keys,
            envoy,
            _server: server,
            _jwks: jwks,
            _dir: dir,
        }
    }

    async fn send(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = client.request(method, self.envoy.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("request through envoy failed: {e}\n{}", self.envoy.log()));
        Answer::read(resp).await
    }

    async fn get(&self, spiffe: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send(
            &self.pki.client(spiffe),
            reqwest::Method::GET,
            path,
            headers,
        )
        .await
    }
}

/// Envoy's answer, and what the upstream saw if the request reached it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    async fn read(resp: reqwest::Response) -> Answer {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap();
        Answer {
            status,
            headers,
            body,
        }
    }

    /// The upstream's echo of the request it received; `None` if the request never got there.
    fn upstream(&self) -> Option<BTreeMap<String, Vec<String>>> {
        let seen: BTreeMap<String, Vec<String>> = serde_json::from_str(&self.body).ok()?;
        seen.contains_key(":path").then_some(seen)
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------------------------
// 1. A denial is never answered with a status Envoy or the client reads as success or interim.

const STATUS_FROM_QUERY: &str = r#"
package custom
import rego.v1

result := {"allowed": false, "http_status": to_number(input.parsed_query.s[0]), "body": "denied"}
"#;

#[tokio::test]
async fn a_denial_with_a_success_or_interim_status_is_an_invalid_decision() {
    for mode in MODES {
        let mesh = Mesh::start(
            mode,
            Setup {
                policy: Some(STATUS_FROM_QUERY),
                ..Setup::default()
            },
        )
        .await;
        for status in ["200", "204", "299", "100", "101"] {
            let a = mesh
                .get(
                    FRONTEND,
                    &format!("/api/x?s={status}"),
                    &[("x-jwt-sub", "admin")],
                )
                .await;
            // invalid_decision is a 500; over HTTP it goes out as 403, since Envoy's
            // http_service reads a 5xx as the server failing (failure_mode_allow's allow).
            let want = if mode == Mode::Http { 403 } else { 500 };
            assert_eq!(a.status, want, "{mode:?} s={status}: {a:?}");
            if mode == Mode::Http {
                assert!(a.headers.contains_key("x-meshauthz-decision-id"), "{a:?}");
            }
            assert!(
                a.upstream().is_none(),
                "{mode:?} s={status} reached the upstream"
            );
        }
        // A redirect or an error is relayed as the policy asked.
        let a = mesh.get(FRONTEND, "/api/x?s=302", &[]).await;
        assert_eq!((a.status, a.body.as_str()), (302, "denied"), "{mode:?}");
        assert!(a.upstream().is_none());
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A claim that cannot be a header value removes the header instead of keeping the forgery.

#[tokio::test]
async fn a_claim_no_header_can_carry_removes_the_forged_header() {
    for mode in MODES {
        let mesh = Mesh::start(mode, Setup::default()).await;
        for sub in [
            "alice\r\nx-evil: 1",
            "alice\nbob",
            "a\u{0}b",
            "a\u{1}b",
            "del\u{7f}",
        ] {
            let token = mesh.keys.sign(&claims(sub, ""));
            let auth = bearer(&token);
            let a = mesh
                .get(
                    FRONTEND,
                    "/api/products/1",
                    &[("authorization", &auth), ("x-jwt-sub", "admin")],
                )
                .await;
            assert_eq!(a.status, 200, "{mode:?} {sub:?}: {a:?}");
            let seen = a.upstream().unwrap();
            assert!(
                !seen.contains_key("x-jwt-sub"),
                "{mode:?} {sub:?}: {seen:?}"
            );
            assert!(!seen.contains_key("x-evil"), "{mode:?} {sub:?}: {seen:?}");
        }
        // A representable claim is still set, overwriting the forged copy.
        let auth = bearer(&mesh.keys.sign(&claims("alice", "")));
        let a = mesh
            .get(
                FRONTEND,
                "/api/products/1",
                &[("authorization", &auth), ("x-jwt-sub", "admin")],
            )
            .await;
        assert_eq!(
            a.upstream().unwrap()["x-jwt-sub"],
            vec!["alice"],
            "{mode:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Dry-run changes the verdict, never the identity headers.

#[tokio::test]
async fn dry_run_shapes_identity_headers_as_enforcing_does() {
    for mode in MODES {
        let mesh = Mesh::start(
            mode,
            Setup {
                policy_extra: "  dry_run: true",
                ..Setup::default()
            },
        )
        .await;
        // The policy would deny the intruder (403): allowed in dry-run, with the verified sub.
        let auth = bearer(&mesh.keys.sign(&claims("alice", "")));
        let a = mesh
            .get(
                INTRUDER,
                "/api/products/1",
                &[("authorization", &auth), ("x-jwt-sub", "admin")],
            )
            .await;
        assert_eq!(a.status, 200, "{mode:?}: {a:?}");
        let seen = a.upstream().unwrap();
        assert_eq!(seen["x-jwt-sub"], vec!["alice"], "{mode:?}: {seen:?}");
        // A would-be 401 (a token signed by another key): the forged copy is removed.
        let forged = Keys::generate(Algorithm::RS256, "mesh-key").sign(&claims("alice", ""));
        let auth = bearer(&forged);
        let a = mesh
            .get(
                FRONTEND,
                "/api/products/1",
                &[("authorization", &auth), ("x-jwt-sub", "admin")],
            )
            .await;
        assert_eq!(a.status, 200, "{mode:?}: {a:?}");
        let seen = a.upstream().unwrap();
        assert!(!seen.contains_key("x-jwt-sub"), "{mode:?}: {seen:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Underscore spellings of identity headers.

#[tokio::test]
async fn underscore_spellings_of_identity_headers_never_reach_the_upstream() {
    for mode in MODES {
        // An Envoy that lets underscores through: meshauthz removes them itself.
        let mesh = Mesh::start(
            mode,
            Setup {
                envoy: EnvoyOptions {
                    underscores: "ALLOW",
                    ..EnvoyOptions::default()
                },
                ..Setup::default()
            },
        )
        .await;
        let auth = bearer(&mesh.keys.sign(&claims("alice", "")));
        for headers in [
            vec![("x_jwt_sub", "admin")],
            vec![("x_jwt_sub", "admin"), ("authorization", auth.as_str())],
        ] {
            let a = mesh.get(FRONTEND, "/api/products/1", &headers).await;
            assert_eq!(a.status, 200, "{mode:?}: {a:?}");
            let seen = a.upstream().unwrap();
            assert!(
                !seen.contains_key("x_jwt_sub"),
                "{mode:?} {headers:?}: {seen:?}"
            );
        }
        // The shipped Envoy configs refuse such names outright.
        let strict = Mesh::start(mode, Setup::default()).await;
        let a = strict
            .get(FRONTEND, "/api/products/1", &[("x_jwt_sub", "admin")])
            .await;
        assert_eq!(a.status, 400, "{mode:?}: {a:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 8. A wait for keys ends before Envoy's own timeout (1 s in tests/e2e/authz-grpc.yaml), so
// meshauthz's 401 arrives rather than Envoy's status_on_error.

#[tokio::test]
async fn a_jwks_wait_is_bounded_by_envoys_deadline() {
    let mesh = Mesh::start(
        Mode::Grpc,
        Setup {
            jwks_extra: ", max_wait: 5s",
            jwks_delay: Some(Duration::from_secs(3)),
            ..Setup::default()
        },
    )
    .await;
    let auth = bearer(&mesh.keys.sign(&claims("alice", "")));
    let start = Instant::now();
    let a = mesh
        .get(FRONTEND, "/api/products/1", &[("authorization", &auth)])
        .await;
    let took = start.elapsed();
    assert_eq!(
        a.status, 401,
        "meshauthz answered, not Envoy's timeout: {a:?} after {took:?}"
    );
    assert_eq!(
        a.headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
}

// ---------------------------------------------------------------------------------------------
// 9. A decision the transport cannot carry out is not an allow.

const QUERY_REWRITE: &str = r#"
package custom
import rego.v1

result := {"allowed": true, "query_parameters_to_set": {"tenant": "shop"}, "query_parameters_to_remove": ["debug"]}
"#;

#[tokio::test]
async fn query_rewrites_are_enforced_over_grpc_and_refused_over_http() {
    let grpc = Mesh::start(
        Mode::Grpc,
        Setup {
            policy: Some(QUERY_REWRITE),
            ..Setup::default()
        },
    )
    .await;
    let a = grpc.get(FRONTEND, "/api/x?debug=1&a=b", &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    let path = &a.upstream().unwrap()[":path"][0];
    assert!(
        path.contains("tenant=shop") && !path.contains("debug"),
        "{path}"
    );

    let http = Mesh::start(
        Mode::Http,
        Setup {
            policy: Some(QUERY_REWRITE),
            ..Setup::default()
        },
    )
    .await;
    let a = http.get(FRONTEND, "/api/x?debug=1", &[]).await;
    // invalid_decision (500), sent as 403 over HTTP: it is meshauthz's answer, not Envoy's.
    assert_eq!(a.status, 403, "{a:?}");
    assert!(a.headers.contains_key("x-meshauthz-decision-id"), "{a:?}");
    assert!(a.upstream().is_none());
}

// ---------------------------------------------------------------------------------------------
// 10, 11, 16. Certificates that try to pass as another workload.

#[tokio::test]
async fn certificates_that_mimic_another_workload_get_no_identity() {
    for mode in MODES {
        let mesh = Mesh::start(mode, Setup::default()).await;
        let auth = bearer(&mesh.keys.sign(&claims("alice", "orders:write")));
        let headers = [("authorization", auth.as_str())];
        let place_order = |client: reqwest::Client| {
            let mesh = &mesh;
            async move {
                mesh.send(&client, reqwest::Method::POST, "/api/orders", &headers)
                    .await
            }
        };
        // The real checkout may place the order.
        let a = place_order(mesh.pki.client(CHECKOUT)).await;
        assert_eq!(a.status, 200, "{mode:?}: {a:?}");

        // URI SANs holding XFCC separators: Envoy writes them unescaped.
        for san in [
            format!("spiffe://cluster.local/ns/shop/sa/x,Hash=00;URI={CHECKOUT}"),
            format!("spiffe://cluster.local/ns/shop/sa/x;URI={CHECKOUT}"),
        ] {
            let a = place_order(mesh.pki.client_for(Some(&san), &[])).await;
            let want = if mode == Mode::Http { 400 } else { 403 };
            assert_eq!(a.status, want, "{mode:?} {san}: {a:?}");
            assert!(a.upstream().is_none());
        }
        // A DNS SAN spelled like a SPIFFE ID, no URI SAN (gRPC: Envoy falls back to the DNS
        // SAN for source.principal; HTTP: XFCC has no URI).
        let a = place_order(mesh.pki.client_for(None, &[CHECKOUT])).await;
        assert_eq!(a.status, 403, "{mode:?} DNS SAN: {a:?}");
        // Another trust domain with shop's namespace and service account.
        let a = place_order(mesh.pki.client("spiffe://evil/ns/shop/sa/checkout")).await;
        assert_eq!(a.status, 403, "{mode:?} trust domain: {a:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 17. Bodies: media types in any case, and bodies Envoy cut.

const BODY_FACTS: &str = r#"
package custom
import rego.v1

result := {"allowed": true, "headers": {
	"x-parsed": json.marshal(input.parsed_body != null),
	"x-truncated": json.marshal(input.truncated_body),
}}
"#;

#[tokio::test]
async fn bodies_are_parsed_case_insensitively_and_cut_bodies_are_truncated() {
    let mesh = Mesh::start(
        Mode::Grpc,
        Setup {
            policy: Some(BODY_FACTS),
            envoy: EnvoyOptions {
                authz: vec![
                    "with_request_body: { max_request_bytes: 1024, allow_partial_message: true }"
                        .into(),
                ],
                ..EnvoyOptions::default()
            },
            ..Setup::default()
        },
    )
    .await;
    let client = mesh.pki.client(FRONTEND);
    let facts = |a: &Answer| {
        let seen = a.upstream().unwrap();
        (seen["x-parsed"][0].clone(), seen["x-truncated"][0].clone())
    };
    let small = r#"{"amount": 5}"#;
    let a = client
        .post(mesh.envoy.url("/api/pay"))
        .header("content-type", "Application/JSON; charset=UTF-8")
        .body(small)
        .send()
        .await
        .unwrap();
    let a = Answer::read(a).await;
    assert_eq!(facts(&a), ("true".into(), "false".into()), "{a:?}");

    // A chunked body (no content-length) over Envoy's buffer: Envoy sends part of it.
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(4096));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.as_bytes().chunks(512).map(|c| Ok(c.to_vec())).collect();
    let a = client
        .post(mesh.envoy.url("/api/pay"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(tokio_stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let a = Answer::read(a).await;
    assert_eq!(facts(&a), ("false".into(), "true".into()), "{a:?}");
}

// ---------------------------------------------------------------------------------------------
// Multi-valued policy headers: every value reaches the upstream.

const MULTI: &str = r#"
package custom
import rego.v1

result := {"allowed": true, "headers": {"x-multi": ["a", "b", "c"]}}
"#;

#[tokio::test]
async fn every_value_of_a_multi_valued_policy_header_reaches_the_upstream() {
    let mesh = Mesh::start(
        Mode::Grpc,
        Setup {
            policy: Some(MULTI),
            ..Setup::default()
        },
    )
    .await;
    let a = mesh.get(FRONTEND, "/api/x", &[("x-multi", "forged")]).await;
    assert_eq!(a.status, 200, "{a:?}");
    let seen = a.upstream().unwrap();
    let values: Vec<String> = seen["x-multi"]
        .iter()
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .collect();
    assert_eq!(values, ["a", "b", "c"], "{seen:?}");
}

// ---------------------------------------------------------------------------------------------
// Normalize mode decides on exactly the path Envoy forwards, with the documented settings.

const ECHO_PATH: &str = r#"
package custom
import rego.v1

result := {"allowed": true, "headers": {"x-parsed-path": json.marshal(input.parsed_path)}}
"#;

#[derive(Debug, serde::Deserialize)]
struct PathCases {
    cases: Vec<PathCase>,
}

#[derive(Debug, serde::Deserialize)]
struct PathCase {
    note: String,
    path: String,
}

#[tokio::test]
async fn normalize_mode_decides_on_the_path_envoy_forwards() {
    let mesh = Mesh::start(
        Mode::Grpc,
        Setup {
            policy: Some(ECHO_PATH),
            config_extra: "limits: { ambiguous_paths: normalize }",
            envoy: EnvoyOptions {
                hcm: vec![
                    "normalize_path: true".into(),
                    "merge_slashes: true".into(),
                    "path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD".into(),
                ],
                ..EnvoyOptions::default()
            },
            ..Setup::default()
        },
    )
    .await;
    let text = std::fs::read_to_string(repo().join("tests/cases/paths.yaml")).unwrap();
    let file: PathCases = yaml_serde::from_str(&text).unwrap();
    let tls = raw_tls(&mesh.pki, FRONTEND);
    let mut failures = Vec::new();
    let mut forwarded = 0;
    for case in &file.cases {
        let (status, body) = raw_get(&tls, mesh.envoy.listener, &case.path).await;
        if status != 200 {
            continue; // Envoy refused it itself: nothing was decided on.
        }
        forwarded += 1;
        let seen: BTreeMap<String, Vec<String>> = serde_json::from_str(&body).unwrap();
        let upstream_path = seen[":path"][0].clone();
        let decided: Vec<String> = serde_json::from_str(&seen["x-parsed-path"][0]).unwrap();
        let path_only = upstream_path.split('?').next().unwrap();
        let from_upstream: Vec<String> = path_only
            .trim_start_matches('/')
            .split('/')
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        if decided != from_upstream {
            failures.push(format!(
                "{} ({:?}): Envoy forwarded {upstream_path:?}, meshauthz decided on {decided:?}",
                case.note, case.path
            ));
        }
        // Envoy normalizes before ext_authz runs, so the Check above already carried the clean
        // path. Where Envoy is not set to normalize, meshauthz sees the raw one: its own
        // normalization of the raw path must give what Envoy would have forwarded.
        let own = meshauthz::path::parse_with(&case.path, meshauthz::path::Mode::Normalize)
            .map(|t| t.segments);
        if own.as_ref() != Ok(&from_upstream) {
            failures.push(format!(
                "{} ({:?}): Envoy forwarded {upstream_path:?}, meshauthz normalizes it to {own:?}",
                case.note, case.path
            ));
        }
    }
    assert!(
        forwarded >= 10,
        "only {forwarded} cases reached the upstream"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A TLS client config presenting a workload certificate, for requests whose target must go to
/// Envoy byte for byte (an HTTP client library would resolve `..` itself).
fn raw_tls(pki: &Pki, spiffe: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = pki.issue(Some(spiffe), &[]);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    Arc::new(config)
}

async fn raw_get(
    tls: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    target: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let req = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
