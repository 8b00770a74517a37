//! TLS and mTLS on meshauthz's own listeners, and certificate rotation without a restart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::mesh::Pki;
use common::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const POLICY: &str =
    "package envoy.authz\nimport rego.v1\nallow if input.peer.service_account == \"frontend\"\n";

/// Writes the server certificate (for `localhost`) issued by `pki`, atomically (rename).
fn write_server_cert(pki: &Pki, dir: &Path) {
    let (cert, key) = pki.issue(None, &["localhost"]);
    for (name, text) in [("server.pem", cert), ("server-key.pem", key)] {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

async fn tls_server(dir: &Path, client_ca: Option<&Path>) -> TestServer {
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/p.rego"), POLICY).unwrap();
    let ca_line = client_ca
        .map(|p| format!("    client_ca_file: \"{}\"\n", p.display()))
        .unwrap_or_default();
    let config = write_config(
        dir,
        &format!(
            "server:\n  tls:\n    cert_file: server.pem\n    key_file: server-key.pem\n{ca_line}    reload_interval: 100ms\npolicy:\n  paths: [policies]\ndecision_log: {{ enabled: false }}\n"
        ),
    );
    TestServer::start_tls(&config).await
}

async fn grpc_client(
    addr: std::net::SocketAddr,
    pki: &Pki,
    identity: Option<(String, String)>,
) -> Result<AuthorizationClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(AuthorizationClient::new(channel))
}

fn https_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test]
async fn mtls_on_both_listeners_requires_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    write_server_cert(&pki, dir.path());
    let server = tls_server(dir.path(), Some(&dir.path().join("ca.pem"))).await;

    // gRPC over mTLS: the Check is answered.
    let identity = pki.issue(Some("spiffe://cluster.local/ns/mesh/sa/envoy"), &[]);
    let mut client = grpc_client(server.grpc, &pki, Some(identity))
        .await
        .unwrap();
    let resp = client
        .check(request(
            Some("spiffe://cluster.local/ns/shop/sa/frontend"),
            "GET",
            "/",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(Outcome::from(resp).allowed);

    // Without a client certificate the handshake is refused.
    let refused = match grpc_client(server.grpc, &pki, None).await {
        Err(_) => true,
        Ok(mut c) => c.check(request(None, "GET", "/")).await.is_err(),
    };
    assert!(
        refused,
        "a client without a certificate must not get an answer"
    );

    // HTTPS with a client certificate on the HTTP listener.
    let ok = pki
        .client("spiffe://cluster.local/ns/monitoring/sa/prometheus")
        .get(format!("https://127.0.0.1:{}/readyz", server.http.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let anonymous = https_client(&pki.ca_pem)
        .get(format!("https://127.0.0.1:{}/readyz", server.http.port()))
        .send()
        .await;
    assert!(
        anonymous.is_err(),
        "HTTPS without a client certificate is refused"
    );
    // Plain HTTP on the TLS listener gets nothing useful either.
    assert!(
        reqwest::get(format!("http://{}/readyz", server.http))
            .await
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
    );
    server.stop().await;
}

#[tokio::test]
async fn rotated_certificates_are_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Pki::new(&dir.path().join("old").tap_mkdir());
    let new_ca = Pki::new(&dir.path().join("new").tap_mkdir());
    write_server_cert(&old_ca, dir.path());
    let server = tls_server(dir.path(), None).await;
    let url = format!("https://127.0.0.1:{}/healthz", server.http.port());

    let trusts_old = https_client(&old_ca.ca_pem);
    let trusts_new = https_client(&new_ca.ca_pem);
    assert!(trusts_old.get(&url).send().await.is_ok());
    assert!(trusts_new.get(&url).send().await.is_err());

    // cert-manager writes a certificate from a new issuer.
    write_server_cert(&new_ca, dir.path());
    let rotated = eventually(Duration::from_secs(5), async || {
        https_client(&new_ca.ca_pem).get(&url).send().await.is_ok()
    })
    .await;
    assert!(rotated, "the new certificate is served");
    assert!(https_client(&old_ca.ca_pem).get(&url).send().await.is_err());

    // A broken rotation (garbage key) keeps the last good certificate serving.
    std::fs::write(dir.path().join("server-key.pem"), "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(https_client(&new_ca.ca_pem).get(&url).send().await.is_ok());
    server.stop().await;
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
