//! Bad input that must be answered, not escaped: oversized Checks and bodies are denials (never
//! a gRPC error `failure_mode_allow` would turn into an allow), and credentials in a JWKS URL
//! never appear where the URL is shown.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;

const BODY_POLICY: &str = r#"
package envoy.authz
import rego.v1

allow := {"allowed": true, "headers": {"x-parsed": json.marshal(input.parsed_body != null), "x-truncated": json.marshal(input.truncated_body)}}
"#;

async fn body_server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("p")).unwrap();
    std::fs::write(dir.path().join("p/policy.rego"), BODY_POLICY).unwrap();
    let config = write_config(
        dir.path(),
        "policy:\n  paths: [p]\ndecision_log: { enabled: false }\nlimits: { max_body_bytes: 65536, max_body_depth: 8 }\n",
    );
    (TestServer::start(&config).await, dir)
}

fn with_body(body: String) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    let mut req = request(None, "POST", "/api/upload");
    let http = req
        .attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap();
    http.headers
        .insert("content-type".into(), "application/json".into());
    http.body = body;
    req
}

#[tokio::test]
async fn bodies_are_bounded_and_oversized_checks_are_denials() {
    let (server, _dir) = body_server().await;
    // (note, body, want status, parsed, truncated)
    let json_of = |n: usize| format!("{{\"pad\": \"{}\"}}", "x".repeat(n));
    let deep = format!("{}1{}", "[".repeat(50), "]".repeat(50));
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        (
            "a small JSON body is parsed",
            json_of(100),
            200,
            "true",
            "false",
        ),
        ("a body too deep is not parsed", deep, 200, "false", "true"),
        ("a 3.9 MB body is refused", json_of(3_900_000), 413, "", ""),
        // Over tonic's default 4 MiB decode limit: still decoded, and denied.
        (
            "a 5 MiB Check is refused, not a gRPC error",
            json_of(5 << 20),
            413,
            "",
            "",
        ),
    ];
    for (note, body, status, parsed, truncated) in cases {
        let got = server.check(with_body(body)).await;
        assert_eq!(got.status, status, "{note}: {got:?}");
        if status == 200 {
            assert_eq!(got.header("x-parsed"), Some(parsed), "{note}");
            assert_eq!(got.header("x-truncated"), Some(truncated), "{note}");
        } else {
            assert_eq!(got.reason, "limit_exceeded", "{note}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn jwks_url_credentials_never_appear_in_readyz_or_decision_logs() {
    let jwks = JwksServer::start(&[]).await;
    jwks.set_status(500);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("p")).unwrap();
    std::fs::write(
        dir.path().join("p/policy.rego"),
        "package envoy.authz\nimport rego.v1\nallow if input.jwt\n",
    )
    .unwrap();
    let log = dir.path().join("decisions.log");
    let uri = jwks.uri().replace("http://", "http://svc:hunter2@") + "?api_key=topsecret";
    let config = write_config(
        dir.path(),
        &format!(
            r#"
policy: {{ paths: [p] }}
jwt:
  providers:
    - name: corp
      issuer: "{ISSUER}"
      jwks: {{ uri: "{uri}", max_wait: 2s }}
decision_log: {{ enabled: true, output: "{}" }}
"#,
            log.display()
        ),
    );
    let server = TestServer::start(&config).await;
    let k = Keys::generate(jsonwebtoken::Algorithm::ES256, "k");
    let got = server
        .check(
            Req {
                method: "GET",
                path: "/x",
                ..Req::default()
            }
            .bearer(&k.sign(&claims("alice", "")))
            .build(),
        )
        .await;
    assert_eq!(got.reason, "jwt_keys_unavailable");
    let (_, readyz) = server.get("/readyz").await;
    assert!(readyz.contains("HTTP 500"), "{readyz}");
    server.stop().await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("jwt_keys_unavailable"), "{logged}");
    for shown in [&readyz, &logged] {
        assert!(
            !shown.contains("hunter2") && !shown.contains("topsecret"),
            "credentials shown: {shown}"
        );
        assert!(shown.contains("api_key=***"), "{shown}");
    }
}

/// Connections that send nothing are closed on both listeners, and at `max_connections` a new
/// connection waits until one closes, then is served.
#[tokio::test]
async fn silent_connections_are_closed_and_capped() {
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("p")).unwrap();
    std::fs::write(
        dir.path().join("p/policy.rego"),
        "package envoy.authz\nimport rego.v1\nallow := true\n",
    )
    .unwrap();
    let config = write_config(
        dir.path(),
        "server: { max_connections: 8, header_read_timeout: 1s, idle_timeout: 3s }\npolicy: { paths: [p] }\ndecision_log: { enabled: false }\n",
    );
    let server = TestServer::start(&config).await;
    // TestServer's own client holds one gRPC connection; fill the rest of both listeners.
    let mut silent = Vec::new();
    for (addr, n) in [(server.grpc, 7), (server.http, 8)] {
        for _ in 0..n {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
    }
    // At the cap, a new gRPC client is served once the silent connections are closed.
    let checked = tokio::spawn({
        let grpc = server.grpc;
        async move {
            let mut client = envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::connect(
                format!("http://{grpc}"),
            )
            .await
            .unwrap();
            client.check(request(None, "GET", "/x")).await.is_ok()
        }
    });
    // Not served while the silent connections hold every place (they close after 1 s).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !checked.is_finished(),
        "a connection beyond max_connections was served"
    );
    for mut conn in silent {
        // Read to the end: an HTTP/2 server speaks first (its SETTINGS frame), then closes.
        let drained = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut buf = [0u8; 256];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(drained.is_ok(), "a silent connection was never closed");
    }
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(10), checked)
            .await
            .unwrap()
            .unwrap(),
        "the waiting client was served"
    );
    server.stop().await;
}
