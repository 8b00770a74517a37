//! regorus agrees with OPA: the bundled policy's decision for every request shape we test
//! (the bundled case table, the inputs captured from a real Envoy, and extra shapes for the
//! rules the table does not reach), evaluated by meshauthz on both regorus engines and by OPA's
//! own Go engine (`tests/opa_eval.py`, PyPI `opa-golib-python-bindings`, installed into .venv by
//! tests/run.sh). Both the object decision (`result`) and the OPA-Envoy boolean (`allow`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use common::{Req, repo};
use meshauthz::identity::SpiffeId;
use meshauthz::input::{self, Extras};
use meshauthz::policy::{Config, EngineKind, Policy, RegoVersion};
use meshauthz::server::attributes_from_proto;
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

/// The fields of tests/cases/bundled_policy.yaml this test needs (the rest is ignored).
#[derive(Debug, Deserialize)]
struct Case {
    note: String,
    principal: Option<String>,
    method: String,
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    token: Option<serde_json::Value>,
}

/// `input.jwt` as the verifier builds it, for the given claims.
fn jwt_doc(claims: serde_json::Value) -> regorus::Value {
    let doc = json!({
        "provider": "corp",
        "header": {"alg": "RS256", "kid": "k", "typ": "JWT"},
        "claims": claims,
    });
    regorus::Value::from_json_str(&doc.to_string()).unwrap()
}

fn document(
    principal: Option<&str>,
    method: &str,
    path: &str,
    headers: &BTreeMap<String, String>,
    claims: Option<serde_json::Value>,
) -> regorus::Value {
    let mut req = Req {
        principal,
        method,
        path,
        headers: Vec::new(),
    };
    for (k, v) in headers {
        req.headers
            .push((Box::leak(k.clone().into_boxed_str()), v.clone()));
    }
    let attrs = attributes_from_proto(req.build());
    let http = attrs.http().unwrap();
    let target = meshauthz::path::parse(&http.path).unwrap();
    let peer = attrs
        .source_principal()
        .and_then(|p| SpiffeId::parse(p).ok());
    input::document(
        &attrs,
        Extras {
            target: Some(&target),
            peer: peer.as_ref(),
            jwt: claims.map(jwt_doc),
            parsed_body: None,
            truncated_body: false,
        },
    )
}

/// note, principal, method, path, token claims.
type Shape<'a> = (
    &'a str,
    Option<&'a str>,
    &'a str,
    &'a str,
    Option<serde_json::Value>,
);

/// Every input the comparison runs, with a name for failure messages.
fn inputs() -> Vec<(String, regorus::Value)> {
    let mut out = Vec::new();
    let text = std::fs::read_to_string(repo().join("tests/cases/bundled_policy.yaml")).unwrap();
    let cases: Cases = yaml_serde::from_str(&text).unwrap();
    for c in &cases.cases {
        let claims = match &c.token {
            // An invalid token is refused before the policy runs: nothing to compare.
            Some(serde_json::Value::String(_)) => continue,
            Some(t) => Some(json!({
                "iss": "https://issuer.test", "aud": "api", "exp": 4_000_000_000u64,
                "sub": t["sub"], "scope": t["scope"],
            })),
            None => None,
        };
        out.push((
            c.note.clone(),
            document(
                c.principal.as_deref(),
                &c.method,
                &c.path,
                &c.headers,
                claims,
            ),
        ));
    }
    for i in 0..5 {
        let path = repo().join(format!("tests/golden/input-{i}.json"));
        let text = std::fs::read_to_string(&path).unwrap();
        out.push((
            format!("captured Envoy request {i}"),
            regorus::Value::from_json_str(&text).unwrap(),
        ));
    }
    // Shapes for rules the table does not reach.
    let none = BTreeMap::new();
    let frontend = Some("spiffe://cluster.local/ns/shop/sa/frontend");
    let checkout = Some("spiffe://cluster.local/ns/shop/sa/checkout");
    let extra: Vec<Shape> = vec![
        (
            "scp array claim",
            frontend,
            "GET",
            "/api/orders/1",
            Some(json!({"scp": ["orders:read"]})),
        ),
        (
            "scp array without the scope",
            frontend,
            "GET",
            "/api/orders/1",
            Some(json!({"scp": ["x"]})),
        ),
        (
            "empty scope string",
            checkout,
            "POST",
            "/api/orders",
            Some(json!({"scope": ""})),
        ),
        (
            "scope with extra spaces",
            checkout,
            "POST",
            "/api/orders",
            Some(json!({"scope": "  orders:write  "})),
        ),
        (
            "scope of the wrong type",
            checkout,
            "POST",
            "/api/orders",
            Some(json!({"scope": 7})),
        ),
        (
            "deeper path than the glob",
            frontend,
            "GET",
            "/api/products/1/2",
            None,
        ),
        (
            "glob segment must be non-empty",
            frontend,
            "GET",
            "/api/products/",
            None,
        ),
        (
            "HEAD on the catalog",
            checkout,
            "HEAD",
            "/api/products",
            None,
        ),
        ("readyz without identity", None, "GET", "/readyz", None),
        (
            "deny-listed principal",
            Some("spiffe://cluster.local/ns/shop/sa/compromised"),
            "GET",
            "/api/products/1",
            None,
        ),
        (
            "other trust domain",
            Some("spiffe://other.domain/ns/shop/sa/frontend"),
            "GET",
            "/api/products/1",
            None,
        ),
        (
            "not an Istio-shaped SPIFFE ID",
            Some("spiffe://cluster.local/workload/x"),
            "GET",
            "/api/products/1",
            None,
        ),
        (
            "no identity on a protected route",
            None,
            "POST",
            "/api/orders",
            None,
        ),
        (
            "unbound service account needing a token",
            Some("spiffe://cluster.local/ns/shop/sa/nobody"),
            "POST",
            "/api/orders",
            None,
        ),
    ];
    for (note, principal, method, path, claims) in extra {
        let claims = claims.map(|mut c| {
            c["iss"] = json!("https://issuer.test");
            c["exp"] = json!(4_000_000_000u64);
            c
        });
        out.push((
            note.to_string(),
            document(principal, method, path, &none, claims),
        ));
    }
    out
}

fn ours(
    engine: EngineKind,
    rule: &str,
    docs: &[(String, regorus::Value)],
) -> Vec<serde_json::Value> {
    let cfg = Config {
        paths: vec![repo().join("policies")],
        decision: rule.into(),
        rego_version: RegoVersion::V1,
        engine,
        dry_run: false,
        watch: false,
        debounce: std::time::Duration::from_millis(100),
        eval_timeout: std::time::Duration::from_secs(5),
        max_instructions: 1_000_000,
        test_on_reload: false,
        reload_gate_samples: 64,
    };
    let policy = Policy::load(&cfg).unwrap();
    docs.iter()
        .map(|(_, doc)| match policy.evaluate(doc.clone()) {
            Ok(regorus::Value::Undefined) => json!({"undefined": true}),
            Ok(v) => json!({"result": serde_json::from_str::<serde_json::Value>(&v.to_json_str().unwrap()).unwrap()}),
            Err(e) => json!({"error": e.to_string()}),
        })
        .collect()
}

/// OPA's answers, one per input, from tests/opa_eval.py.
fn opa(rule: &str, docs: &[(String, regorus::Value)]) -> Vec<serde_json::Value> {
    let python =
        std::env::var_os("OPA_PYTHON").map_or_else(|| repo().join(".venv/bin/python"), Into::into);
    let mut child = Command::new(&python)
        .arg(repo().join("tests/opa_eval.py"))
        .arg("--policies")
        .arg(repo().join("policies"))
        .arg("--query")
        .arg(rule)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run tests/run.sh, which installs OPA's bindings)",
                python.display()
            )
        });
    let mut stdin = child.stdin.take().unwrap();
    for (_, doc) in docs {
        let line = doc.to_json_str().unwrap().replace('\n', "");
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "opa_eval.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn bundled_policy_decisions_agree_with_opa() {
    let docs = inputs();
    assert!(docs.len() > 30, "{} inputs", docs.len());
    let mut failures = Vec::new();
    let mut allowed = 0;
    let mut strict_only = std::collections::BTreeSet::new();
    for rule in ["data.envoy.authz.result", "data.envoy.authz.allow"] {
        let reference = opa(rule, &docs);
        assert_eq!(reference.len(), docs.len(), "one OPA answer per input");
        for engine in [EngineKind::Rvm, EngineKind::Interpreter] {
            for (i, got) in ours(engine, rule, &docs).iter().enumerate() {
                // The bindings run OPA with StrictBuiltinErrors (no switch to turn it off), so a
                // builtin type error (split(7, " ")) is an error there; OPA's default, which
                // OPA-Envoy and meshauthz use, makes that expression undefined. Such inputs
                // must still be denials here.
                if reference[i].get("error").is_some() {
                    let denied = got == &json!({"result": false})
                        || got["result"]["allowed"] == json!(false);
                    if !denied {
                        failures.push(format!(
                            "{rule} on {engine:?}, {}: OPA (strict) errors, regorus allows: {got}",
                            docs[i].0
                        ));
                    }
                    strict_only.insert(docs[i].0.clone());
                    continue;
                }
                if got != &reference[i] {
                    failures.push(format!(
                        "{rule} on {engine:?}, {}: regorus {got}, OPA {}",
                        docs[i].0, reference[i]
                    ));
                }
                if rule.ends_with("allow") && got == &json!({"result": true}) {
                    allowed += 1;
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let expected: std::collections::BTreeSet<String> =
        ["scope of the wrong type".to_string()].into();
    assert_eq!(
        strict_only, expected,
        "only the builtin type error differs by strictness"
    );
    // Both outcomes are exercised (counted over the two engines).
    assert!(
        allowed > 10 && allowed < docs.len() * 2 - 10,
        "{allowed} allows"
    );
    eprintln!("{} inputs × 2 rules × 2 engines agree with OPA", docs.len());
}
