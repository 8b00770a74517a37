//! End to end through a real Envoy: HTTPS with client certificates carrying SPIFFE URI SANs, the
//! ext_authz filter calling meshauthz over gRPC, and an upstream that reports what it received.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;

use common::mesh::{Authz, Envoy, Pki, echo_server};
use common::*;
use jsonwebtoken::Algorithm;

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";

#[derive(Clone, Copy)]
enum Mode {
    /// Envoy calls the gRPC listener in plaintext.
    Grpc,
    /// Envoy calls the gRPC listener over mTLS.
    GrpcTls,
    /// Envoy calls the HTTP ext_authz endpoint.
    Http,
}

/// meshauthz (bundled policies, copied so a test may edit them), a JWKS server, an upstream and
/// Envoy in front.
struct Mesh {
    pki: Pki,
    keys: Keys,
    envoy: Envoy,
    server: Option<TestServer>,
    policies: std::path::PathBuf,
    _jwks: JwksServer,
    _dir: tempfile::TempDir,
}

impl Mesh {
    async fn start() -> Mesh {
        Mesh::start_with(Mode::Grpc).await
    }

    async fn start_with(mode: Mode) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        let pki = Pki::new(&certs);
        let policies = dir.path().join("policies");
        common::copy_dir(&repo().join("policies"), &policies);
        let keys = Keys::generate(Algorithm::RS256, "mesh-key");
        let jwks = JwksServer::start(&[&keys]).await;
        // meshauthz's own serving certificate, from the mesh CA (for the mTLS mode).
        let (cert, key) = pki.issue(None, &["localhost"]);
        std::fs::write(certs.join("meshauthz.pem"), cert).unwrap();
        std::fs::write(certs.join("meshauthz-key.pem"), key).unwrap();
        let tls = if matches!(mode, Mode::GrpcTls) {
            "  tls: { cert_file: certs/meshauthz.pem, key_file: certs/meshauthz-key.pem, client_ca_file: certs/ca.pem, listeners: [grpc] }\n"
        } else {
            ""
        };
        let config = write_config(
            dir.path(),
            &format!(
                r#"
server:
{tls}  http_authz: {{ enabled: true, path_prefix: /authz, trusted_xfcc: true }}
policy:
  paths: [policies]
  decision: "data.envoy.authz.result"
  debounce: 50ms
jwt:
  providers:
    - name: corp
      issuer: "{ISSUER}"
      audiences: ["{AUDIENCE}"]
      jwks: {{ uri: "{}" }}
      claims_to_headers: [{{ claim: sub, header: x-jwt-sub }}]
decision_log: {{ enabled: false }}
"#,
                jwks.uri()
            ),
        );
        let server = if matches!(mode, Mode::GrpcTls) {
            TestServer::start_tls(&config).await
        } else {
            TestServer::start(&config).await
        };
        let upstream = echo_server().await;
        let (grpc, http) = (server.grpc, server.http);
        let authz = match mode {
            Mode::Grpc => Authz::Grpc { grpc, http },
            Mode::GrpcTls => Authz::GrpcTls { grpc, http },
            Mode::Http => Authz::Http { grpc, http },
        };
        let envoy = Envoy::start(&pki, authz, upstream).await;
        Mesh {
            pki,
            keys,
            envoy,
            server: Some(server),
            policies,
            _jwks: jwks,
            _dir: dir,
        }
    }

    async fn get(
        &self,
        spiffe: &str,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut req = self
            .pki
            .client(spiffe)
            .request(method, self.envoy.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("request through envoy failed: {e}\n{}", self.envoy.log()));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.text().await.unwrap())
    }
}

/// What the upstream received.
fn upstream_saw(body: &str) -> BTreeMap<String, Vec<String>> {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not an echo: {e}: {body}"))
}

#[tokio::test]
async fn allowed_principal_with_valid_token_reaches_upstream_with_identity_headers() {
    let mesh = Mesh::start().await;
    let token = mesh.keys.sign(&claims("alice", "orders:write"));
    let auth = format!("Bearer {token}");
    let (status, _, body) = mesh
        .get(
            CHECKOUT,
            reqwest::Method::POST,
            "/api/orders",
            &[
                ("authorization", &auth),
                ("x-jwt-sub", "mallory"),
                (
                    "x-meshauthz-peer",
                    "spiffe://cluster.local/ns/shop/sa/admin",
                ),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", mesh.envoy.log());
    let seen = upstream_saw(&body);
    // Exactly the verified values: the client's forged copies were overwritten, not appended.
    assert_eq!(seen["x-jwt-sub"], vec!["alice"]);
    assert_eq!(seen["x-meshauthz-peer"], vec![CHECKOUT]);
    // Envoy's own view of the peer, as Istio sets it.
    assert!(seen["x-forwarded-client-cert"][0].contains(&format!("URI={CHECKOUT}")));
}

#[tokio::test]
async fn forged_claim_header_without_token_is_removed() {
    let mesh = Mesh::start().await;
    let (status, _, body) = mesh
        .get(
            FRONTEND,
            reqwest::Method::GET,
            "/api/products/1",
            &[("x-jwt-sub", "mallory")],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let seen = upstream_saw(&body);
    assert!(!seen.contains_key("x-jwt-sub"), "{seen:?}");
    assert_eq!(seen["x-meshauthz-peer"], vec![FRONTEND]);
}

#[tokio::test]
async fn wrong_service_account_is_forbidden_with_the_policy_body() {
    let mesh = Mesh::start().await;
    let (status, headers, body) = mesh
        .get(
            "spiffe://cluster.local/ns/shop/sa/intruder",
            reqwest::Method::GET,
            "/api/products/1",
            &[],
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(body, r#"{"error":"forbidden"}"#);
    assert_eq!(headers["content-type"], "application/json");
}

#[tokio::test]
async fn bad_token_is_401_with_www_authenticate() {
    let mesh = Mesh::start().await;
    let forged =
        Keys::generate(Algorithm::RS256, "mesh-key").sign(&claims("alice", "orders:write"));
    let auth = format!("Bearer {forged}");
    let (status, headers, _) = mesh
        .get(
            CHECKOUT,
            reqwest::Method::POST,
            "/api/orders",
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(
        headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
}

#[tokio::test]
async fn policy_supplied_status_body_and_headers_reach_the_client() {
    let mesh = Mesh::start().await;
    // The bundled policy answers a scoped route called without a token with its own 401.
    let (status, headers, body) = mesh
        .get(CHECKOUT, reqwest::Method::POST, "/api/orders", &[])
        .await;
    assert_eq!(status, 401);
    assert_eq!(body, r#"{"error":"token required"}"#);
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(headers["content-type"], "application/json");
}

#[tokio::test]
async fn meshauthz_stopped_means_envoy_denies() {
    let mut mesh = Mesh::start().await;
    let (status, _, _) = mesh
        .get(FRONTEND, reqwest::Method::GET, "/api/products/1", &[])
        .await;
    assert_eq!(status, 200);
    mesh.server.take().unwrap().stop().await;
    let (status, _, body) = mesh
        .get(FRONTEND, reqwest::Method::GET, "/api/products/1", &[])
        .await;
    assert_eq!(status, 403, "fail closed: {body}");
    assert!(
        !body.contains("x-meshauthz-peer"),
        "the upstream was not reached: {body}"
    );
}

#[tokio::test]
async fn a_policy_edit_takes_effect_through_envoy() {
    let mesh = Mesh::start().await;
    let path = "/api/products/1";
    let payments = "spiffe://cluster.local/ns/shop/sa/payments";
    assert_eq!(
        mesh.get(payments, reqwest::Method::GET, path, &[]).await.0,
        403
    );
    // Bind shop/payments to the catalog-reader role in the data document.
    let data_file = mesh.policies.join("rbac/data.json");
    let mut data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&data_file).unwrap()).unwrap();
    data["bindings"]["cluster.local/ns/shop/sa/payments"] = serde_json::json!(["catalog-reader"]);
    std::fs::write(&data_file, serde_json::to_string_pretty(&data).unwrap()).unwrap();
    let mut status = 0;
    for _ in 0..100 {
        status = mesh.get(payments, reqwest::Method::GET, path, &[]).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "the edited binding took effect through Envoy");
}

#[tokio::test]
async fn http_ext_authz_mode_decides_with_the_same_pipeline() {
    let mesh = Mesh::start_with(Mode::Http).await;
    // Identity from the XFCC header Envoy sets (SANITIZE_SET), token verified, headers upstream.
    let token = mesh.keys.sign(&claims("alice", "orders:write"));
    let auth = format!("Bearer {token}");
    let (status, _, body) = mesh
        .get(
            CHECKOUT,
            reqwest::Method::POST,
            "/api/orders?x=1",
            &[("authorization", &auth), ("x-jwt-sub", "mallory")],
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", mesh.envoy.log());
    let seen = upstream_saw(&body);
    assert_eq!(seen["x-jwt-sub"], vec!["alice"]);
    assert_eq!(seen["x-meshauthz-peer"], vec![CHECKOUT]);

    // A forged claim header without a token is removed.
    let (status, _, body) = mesh
        .get(
            FRONTEND,
            reqwest::Method::GET,
            "/api/products/1",
            &[("x-jwt-sub", "mallory")],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(!upstream_saw(&body).contains_key("x-jwt-sub"));

    // Denials relay the policy's status, body and allowed headers.
    let (status, headers, body) = mesh
        .get(FRONTEND, reqwest::Method::DELETE, "/api/products/1", &[])
        .await;
    assert_eq!(status, 403);
    assert_eq!(body, r#"{"error":"forbidden"}"#);
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers.contains_key("x-meshauthz-decision-id"));

    let forged = Keys::generate(Algorithm::RS256, "mesh-key").sign(&claims("alice", ""));
    let auth = format!("Bearer {forged}");
    let (status, headers, _) = mesh
        .get(
            CHECKOUT,
            reqwest::Method::POST,
            "/api/orders",
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(
        headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
}

#[tokio::test]
async fn envoy_reaches_meshauthz_over_mtls() {
    let mesh = Mesh::start_with(Mode::GrpcTls).await;
    let (status, _, body) = mesh
        .get(FRONTEND, reqwest::Method::GET, "/api/products/1", &[])
        .await;
    assert_eq!(status, 200, "{body}\n{}", mesh.envoy.log());
    assert_eq!(upstream_saw(&body)["x-meshauthz-peer"], vec![FRONTEND]);
    let (status, _, _) = mesh
        .get(FRONTEND, reqwest::Method::DELETE, "/api/products/1", &[])
        .await;
    assert_eq!(status, 403);
}
