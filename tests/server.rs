//! The real gRPC server on ephemeral ports, called with a tonic client.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;

use common::*;
use jsonwebtoken::Algorithm;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct CaseFile {
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    note: String,
    principal: Option<String>,
    method: String,
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    token: Option<TokenSpec>,
    want: Want,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Claims { sub: String, scope: String },
    Invalid(#[allow(dead_code)] String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Want {
    allowed: bool,
    status: u16,
    body: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    removed: Vec<String>,
}

fn shop_config(dir: &std::path::Path, jwks_uri: &str, engine: &str) -> std::path::PathBuf {
    write_config(
        dir,
        &format!(
            r#"
policy:
  paths: ["{{policies}}"]
  decision: "data.envoy.authz.result"
  engine: {engine}
jwt:
  providers:
    - name: test
      issuer: "{ISSUER}"
      audiences: ["{AUDIENCE}"]
      jwks: {{ uri: "{jwks_uri}" }}
      claims_to_headers: [{{ claim: sub, header: x-jwt-sub }}]
decision_log: {{ enabled: false }}
"#
        ),
    )
}

#[tokio::test]
async fn bundled_policy_cases_rvm() {
    bundled_policy_cases("rvm").await;
}

#[tokio::test]
async fn bundled_policy_cases_interpreter() {
    bundled_policy_cases("interpreter").await;
}

async fn bundled_policy_cases(engine: &str) {
    let keys = Keys::generate(Algorithm::RS256, "k1");
    let jwks = JwksServer::start(&[&keys]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&shop_config(dir.path(), &jwks.uri(), engine)).await;
    assert_eq!(server.app.authz.policy.current().engine(), engine);

    let text = std::fs::read_to_string(repo().join("tests/cases/bundled_policy.yaml")).unwrap();
    let file: CaseFile = yaml_serde::from_str(&text).unwrap();
    assert!(file.cases.len() >= 15, "the case table went missing");
    let mut failures = Vec::new();
    for case in &file.cases {
        let mut req = Req {
            principal: case.principal.as_deref(),
            method: &case.method,
            path: &case.path,
            headers: Vec::new(),
        };
        for (k, v) in &case.headers {
            req.headers.push((k.as_str(), v.clone()));
        }
        match &case.token {
            Some(TokenSpec::Claims { sub, scope }) => {
                req = req.bearer(&keys.sign(&claims(sub, scope)));
            }
            Some(TokenSpec::Invalid(_)) => req = req.bearer("not.a.token"),
            None => {}
        }
        let got = server.check(req.build()).await;
        let w = &case.want;
        let mut problems = Vec::new();
        if got.allowed != w.allowed {
            problems.push(format!("allowed {} (want {})", got.allowed, w.allowed));
        }
        if got.status != w.status {
            problems.push(format!("status {} (want {})", got.status, w.status));
        }
        if let Some(body) = &w.body
            && &got.body != body
        {
            problems.push(format!("body {:?} (want {body:?})", got.body));
        }
        for (name, value) in &w.headers {
            if got.header(name) != Some(value.as_str()) {
                problems.push(format!(
                    "header {name}: {:?} (want {value:?})",
                    got.header(name)
                ));
            }
        }
        for name in &w.removed {
            if !got.removed.contains(name) {
                problems.push(format!("{name} not removed (removed: {:?})", got.removed));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("[{engine}] {}: {}", case.note, problems.join("; ")));
        }
    }
    server.stop().await;
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}

/// Starts a server on a single policy module (and optional data) written to a temp dir.
async fn server_with_policy(rego: &str, extra_config: &str) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pdir = dir.path().join("policies");
    std::fs::create_dir(&pdir).unwrap();
    std::fs::write(pdir.join("policy.rego"), rego).unwrap();
    let file = write_config(
        dir.path(),
        &format!(
            "policy:\n  paths: [policies]\n{extra_config}\ndecision_log: {{ enabled: false }}\n"
        ),
    );
    (TestServer::start(&file).await, dir)
}

/// OPA-Envoy's own example policy, unchanged: a boolean `allow` over `input.attributes` and
/// `input.parsed_path`, in Rego v1 as OPA 1.x users write it.
const OPA_ENVOY_V1: &str = r#"
package envoy.authz

import rego.v1

default allow := false

allow if {
	input.attributes.request.http.method == "GET"
	input.parsed_path[0] == "people"
}

allow if {
	input.attributes.request.http.method == "POST"
	input.parsed_path == ["people"]
	input.attributes.request.http.headers["x-role"] == "admin"
}
"#;

/// The same policy as written for OPA 0.x (Rego v0 syntax).
const OPA_ENVOY_V0: &str = r#"
package envoy.authz

default allow = false

allow {
	input.attributes.request.http.method == "GET"
	input.parsed_path[0] == "people"
}

allow {
	input.attributes.request.http.method == "POST"
	input.parsed_path == ["people"]
	input.attributes.request.http.headers["x-role"] == "admin"
}
"#;

#[tokio::test]
async fn opa_envoy_policies_run_unchanged() {
    for (rego, extra) in [(OPA_ENVOY_V1, ""), (OPA_ENVOY_V0, "  rego_version: v0\n")] {
        let (server, _dir) = server_with_policy(rego, extra).await;
        let cases = [
            (
                Req {
                    method: "GET",
                    path: "/people/1",
                    ..Default::default()
                },
                true,
                200,
            ),
            (
                Req {
                    method: "GET",
                    path: "/people?x=1",
                    ..Default::default()
                },
                true,
                200,
            ),
            (
                Req {
                    method: "GET",
                    path: "/orders",
                    ..Default::default()
                },
                false,
                403,
            ),
            (
                Req {
                    method: "POST",
                    path: "/people",
                    ..Default::default()
                },
                false,
                403,
            ),
            (
                Req {
                    method: "POST",
                    path: "/people",
                    ..Default::default()
                }
                .header("x-role", "admin"),
                true,
                200,
            ),
        ];
        for (req, allowed, status) in cases {
            let got = server.check(req.build()).await;
            assert_eq!(
                (got.allowed, got.status),
                (allowed, status),
                "{extra} {req:?}"
            );
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn object_decisions_carry_status_headers_body_and_metadata() {
    let rego = r#"
package envoy.authz
import rego.v1

allow := {
	"allowed": true,
	"headers": {"x-user": "u1", "x-multi": ["a", "b"]},
	"response_headers_to_add": {"x-served-by": "meshauthz"},
	"request_headers_to_remove": ["x-internal"],
	"dynamic_metadata": {"tier": "gold"},
} if input.parsed_path[0] == "ok"

allow := {
	"allowed": false,
	"http_status": 429,
	"headers": [{"retry-after": "5"}, {"x-reason": "quota"}],
	"body": "slow down",
} if input.parsed_path[0] == "quota"

allow := {"allowed": false} if input.parsed_path[0] == "plain"

allow := {"allowed": "yes"} if input.parsed_path[0] == "badtype"

allow := {"allowed": false, "http_status": 999} if input.parsed_path[0] == "badstatus"

allow := {"headers": {}} if input.parsed_path[0] == "noallowed"

allow := 42 if input.parsed_path[0] == "number"
"#;
    let (server, _dir) = server_with_policy(rego, "").await;

    let ok = server.check(request(None, "GET", "/ok")).await;
    assert!(ok.allowed);
    assert_eq!(ok.header("x-user"), Some("u1"));
    let multi = &ok.headers["x-multi"];
    // One overwriting option (OVERWRITE_IF_EXISTS_OR_ADD = 2) with the values joined: Envoy
    // applies an overwrite and appends of one name so that only the last value survives.
    assert_eq!(multi, &vec![("a,b".to_string(), 2)]);
    assert_eq!(ok.removed, vec!["x-internal".to_string()]);
    let meta = ok.metadata.clone().unwrap();
    assert!(meta.fields.contains_key("tier"));
    assert!(
        meta.fields.contains_key("decision_id"),
        "decision id is always in metadata"
    );

    let quota = server.check(request(None, "GET", "/quota")).await;
    assert_eq!((quota.allowed, quota.status), (false, 429));
    assert_eq!(quota.body, "slow down");
    assert_eq!(quota.header("retry-after"), Some("5"));
    assert_eq!(quota.header("x-reason"), Some("quota"));
    assert_eq!(quota.grpc_code, 7, "PERMISSION_DENIED");

    let plain = server.check(request(None, "GET", "/plain")).await;
    assert_eq!((plain.allowed, plain.status), (false, 403));

    for path in ["/badtype", "/badstatus", "/noallowed", "/number"] {
        let got = server.check(request(None, "GET", path)).await;
        assert_eq!(
            (got.allowed, got.status),
            (false, 500),
            "{path} is an ill-typed decision"
        );
    }

    // No rule body matches: the decision is undefined → 403.
    let undefined = server.check(request(None, "GET", "/nothing")).await;
    assert_eq!((undefined.allowed, undefined.status), (false, 403));
    server.stop().await;
}

#[tokio::test]
async fn runtime_errors_deny_with_500_on_both_engines() {
    // Two definitions of a complete rule that both hold: a conflict, which OPA reports as an
    // evaluation error. A failing builtin instead makes its expression undefined (OPA's default).
    let rego = r#"
package envoy.authz
import rego.v1

allow := true if input.attributes.request.http.headers["x-n"]
allow := false if input.attributes.request.http.headers["x-n"] == "conflict"
allow := true if to_number(input.attributes.request.http.headers["x-m"]) > 1
"#;
    for engine in ["rvm", "interpreter"] {
        let (server, _dir) = server_with_policy(rego, &format!("  engine: {engine}\n")).await;
        let req = |name: &'static str, v: &str| {
            Req {
                method: "GET",
                path: "/",
                ..Default::default()
            }
            .header(name, v)
            .build()
        };
        assert!(server.check(req("x-n", "5")).await.allowed, "{engine}");
        let err = server.check(req("x-n", "conflict")).await;
        assert!(!err.allowed, "{engine}: a conflict must never allow");
        // Both engines report the conflict alike: a 500 naming where the rules are.
        assert_eq!(
            (err.status, err.reason.as_str()),
            (500, "policy_error"),
            "{engine}"
        );
        assert!(server.check(req("x-m", "5")).await.allowed, "{engine}");
        let undefined = server.check(req("x-m", "five")).await;
        assert_eq!(
            (undefined.allowed, undefined.status),
            (false, 403),
            "{engine}"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let (server, _dir) = server_with_policy(OPA_ENVOY_V1, "").await;
    // No attributes at all.
    let empty = server
        .check(envoy_types::ext_authz::v3::pb::CheckRequest::default())
        .await;
    assert_eq!((empty.allowed, empty.status), (false, 400));
    // Invalid percent-encoding.
    let bad = server.check(request(None, "GET", "/people/%zz")).await;
    assert_eq!((bad.allowed, bad.status), (false, 400));
    // Over the header limit.
    let mut req = Req {
        method: "GET",
        path: "/people/1",
        ..Default::default()
    };
    for i in 0..200 {
        req.headers
            .push((Box::leak(format!("x-h{i}").into_boxed_str()), "v".into()));
    }
    let many = server.check(req.build()).await;
    assert_eq!((many.allowed, many.status), (false, 400));
    // Over the path limit.
    let long = format!("/people/{}", "a".repeat(9000));
    let too_long = server.check(request(None, "GET", &long)).await;
    assert_eq!((too_long.allowed, too_long.status), (false, 400));
    server.stop().await;
}

#[tokio::test]
async fn input_document_has_peer_and_opa_envoy_fields() {
    // The policy returns parts of its input in a header so the test can see them.
    let rego = r#"
package envoy.authz
import rego.v1

allow := {"allowed": true, "headers": {"x-input": json.marshal({
	"peer": object.get(input, "peer", null),
	"parsed_path": input.parsed_path,
	"parsed_query": input.parsed_query,
	"version": input.version,
	"method": input.attributes.request.http.method,
	"source": input.attributes.source.address.socketAddress,
})}}
"#;
    let (server, _dir) = server_with_policy(rego, "").await;
    let got = server
        .check(request(
            Some("spiffe://cluster.local/ns/shop/sa/checkout"),
            "GET",
            "/api/v1/orders?limit=10&limit=20",
        ))
        .await;
    let doc: serde_json::Value = serde_json::from_str(got.header("x-input").unwrap()).unwrap();
    assert_eq!(
        doc,
        serde_json::json!({
            "peer": {
                "spiffe_id": "spiffe://cluster.local/ns/shop/sa/checkout",
                "trust_domain": "cluster.local",
                "namespace": "shop",
                "service_account": "checkout",
                "istio_principal": "cluster.local/ns/shop/sa/checkout",
            },
            "parsed_path": ["api", "v1", "orders"],
            "parsed_query": {"limit": ["10", "20"]},
            "version": {"ext_authz": "v3", "encoding": "protojson"},
            "method": "GET",
            "source": {"address": "10.0.0.7", "portValue": 51000},
        })
    );
    // Without a principal there is no input.peer.
    let anon = server.check(request(None, "GET", "/")).await;
    let doc: serde_json::Value = serde_json::from_str(anon.header("x-input").unwrap()).unwrap();
    assert_eq!(doc["peer"], serde_json::Value::Null);
    server.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let (server, _dir) = server_with_policy(OPA_ENVOY_V1, "").await;
    assert_eq!(server.get("/healthz").await.0, 200);
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 200);
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["decision_rule"], "data.envoy.authz.allow");
    let revision = ready["policy_revision"].as_str().unwrap().to_string();
    assert_eq!(revision.len(), 16);

    server.check(request(None, "GET", "/people")).await;
    server.check(request(None, "GET", "/nope")).await;
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains(
            r#"meshauthz_check_requests_total{decision="allow",reason="policy_allowed"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"meshauthz_check_requests_total{decision="deny",reason="policy_denied"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            r#"meshauthz_policy_revision{{revision="{revision}"}} 1"#
        )),
        "{metrics}"
    );

    // gRPC health reflects serving.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn dry_run_allows_but_reports_the_computed_denial() {
    let (server, _dir) = server_with_policy(OPA_ENVOY_V1, "  dry_run: true\n").await;
    let got = server.check(request(None, "DELETE", "/people/1")).await;
    assert!(got.allowed, "dry-run enforces allow");
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains(
            r#"meshauthz_check_requests_total{decision="deny",reason="policy_denied"} 1"#
        ),
        "metrics count what the policy decided: {metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn http_mode_trusts_xfcc_only_when_configured() {
    // As Envoy writes it: every element carries the certificate's Hash.
    let xfcc = "By=spiffe://cluster.local/ns/shop/sa/backend;Hash=9a0b;URI=spiffe://cluster.local/ns/shop/sa/frontend";
    for (trusted, want) in [(true, 200), (false, 403)] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            dir.path(),
            &format!(
                "server:\n  http_authz: {{ enabled: true, trusted_xfcc: {trusted} }}\npolicy:\n  paths: [\"{{policies}}\"]\n  decision: data.envoy.authz.result\ndecision_log: {{ enabled: false }}\n"
            ),
        );
        let server = TestServer::start(&config).await;
        let resp = reqwest::Client::new()
            .get(format!(
                "http://{}/authz/api/products/1?page=2",
                server.http
            ))
            .header("x-forwarded-client-cert", xfcc)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), want, "trusted_xfcc: {trusted}");
        assert!(resp.headers().contains_key("x-meshauthz-decision-id"));
        if trusted {
            assert_eq!(
                resp.headers()["x-meshauthz-peer"],
                "spiffe://cluster.local/ns/shop/sa/frontend"
            );
        }
        // A malformed XFCC is a 400 when trusted.
        let bad = reqwest::Client::new()
            .get(format!("http://{}/authz/api/products/1", server.http))
            .header("x-forwarded-client-cert", "URI=\"unterminated")
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status().as_u16(), if trusted { 400 } else { 403 });
        server.stop().await;
    }
}

#[derive(Debug, Deserialize)]
struct PathCases {
    cases: Vec<PathCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathCase {
    note: String,
    path: String,
    reject: PathWant,
    normalize: PathWant,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathWant {
    status: u16,
    parsed: Option<Vec<String>>,
}

const ECHO_PATH: &str = r#"
package envoy.authz
import rego.v1

allow := {"allowed": true, "headers": {"x-parsed-path": json.marshal(input.parsed_path)}}
"#;

#[tokio::test]
async fn ambiguous_paths_table_in_both_modes() {
    let text = std::fs::read_to_string(repo().join("tests/cases/paths.yaml")).unwrap();
    let file: PathCases = yaml_serde::from_str(&text).unwrap();
    let mut failures = Vec::new();
    for mode in ["reject", "normalize"] {
        let (server, _dir) = server_with_policy(
            ECHO_PATH,
            &format!("limits: {{ ambiguous_paths: {mode} }}\n"),
        )
        .await;
        for case in &file.cases {
            let want = if mode == "reject" {
                &case.reject
            } else {
                &case.normalize
            };
            let got = server.check(request(None, "GET", &case.path)).await;
            let parsed: Option<Vec<String>> = got
                .header("x-parsed-path")
                .map(|h| serde_json::from_str(h).unwrap());
            if got.status != want.status || (want.parsed.is_some() && parsed != want.parsed) {
                failures.push(format!(
                    "[{mode}] {} ({:?}): status {} parsed {parsed:?}, want {} {:?}",
                    case.note, case.path, got.status, want.status, want.parsed
                ));
            }
            if want.status == 400 && got.reason != "bad_path" {
                failures.push(format!("[{mode}] {}: reason {}", case.note, got.reason));
            }
        }
        server.stop().await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[derive(Debug, Deserialize)]
struct LimitCases {
    cases: Vec<LimitCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitCase {
    note: String,
    path_bytes: Option<usize>,
    headers: Option<usize>,
    header_bytes: Option<usize>,
    token_bytes: Option<usize>,
    /// A signed token whose claims nest this deep (the claims object itself is level 1).
    claims_depth: Option<usize>,
    #[serde(default)]
    duplicate_authorization: bool,
    /// Header names (any case) that each carry a bearer token signed by the wrong key: the
    /// token must be found and refused whatever the names' case.
    #[serde(default)]
    forged_token_headers: Vec<String>,
    want: u16,
    reason: Option<String>,
}

#[tokio::test]
async fn limits_table() {
    let keys = Keys::generate(Algorithm::ES256, "k");
    let jwks = JwksServer::start(&[&keys]).await;
    let extra = format!(
        "jwt:\n  providers:\n    - {{ name: corp, issuer: \"{ISSUER}\", jwks: {{ uri: \"{}\" }} }}\n",
        jwks.uri()
    );
    let (server, _dir) = server_with_policy(ECHO_PATH, &extra).await;
    // Same kid, other key: a forgery the verifier must see to refuse.
    let forger = Keys::generate(Algorithm::ES256, "k");
    let text = std::fs::read_to_string(repo().join("tests/cases/limits.yaml")).unwrap();
    let file: LimitCases = yaml_serde::from_str(&text).unwrap();
    let mut failures = Vec::new();
    let names: Vec<String> = (0..200).map(|i| format!("x-h{i}")).collect();
    for case in &file.cases {
        let path = match case.path_bytes {
            Some(n) => format!("/{}", "a".repeat(n - 1)),
            None => "/".to_string(),
        };
        let mut req = Req {
            method: "GET",
            path: &path,
            ..Default::default()
        };
        // The request already carries 5 headers (:method, :path, :authority, :scheme, x-request-id).
        for name in names.iter().take(case.headers.map_or(0, |n| n - 5)) {
            req = req.header(name, "v");
        }
        if let Some(n) = case.header_bytes {
            req = req.header("x-big", "v".repeat(n));
        }
        if let Some(n) = case.token_bytes {
            req = req.bearer(&"a".repeat(n));
        }
        if let Some(depth) = case.claims_depth {
            let mut nested = serde_json::json!("leaf");
            for _ in 1..depth {
                nested = serde_json::json!([nested]);
            }
            let mut c = claims("a", "");
            c["deep"] = nested;
            req = req.bearer(&keys.sign(&c));
        }
        for name in &case.forged_token_headers {
            req = req.header(name, format!("Bearer {}", forger.sign(&claims("a", ""))));
        }
        if case.duplicate_authorization {
            let t = keys.sign(&claims("a", ""));
            req = req.header("authorization", format!("Bearer {t},Bearer {t}"));
        }
        let got = server.check(req.build()).await;
        if got.status != case.want || case.reason.as_ref().is_some_and(|r| r != &got.reason) {
            failures.push(format!(
                "{}: status {} reason {:?}, want {} {:?}",
                case.note, got.status, got.reason, case.want, case.reason
            ));
        }
    }
    server.stop().await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
