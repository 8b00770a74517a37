//! CPU cost of one decision, without gRPC transport: input building, policy evaluation, JWT
//! verification (cold and cached), and the whole pipeline. Run: `cargo bench --bench decision`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use common::{Keys, Req, claims, repo};
use criterion::{Criterion, criterion_group, criterion_main};
use meshauthz::app::App;
use meshauthz::config::Config;
use meshauthz::identity::SpiffeId;
use meshauthz::input::{self, Extras};
use meshauthz::server::attributes_from_proto;

/// The bundled policy with a file JWKS holding one key per benchmarked algorithm.
fn setup(
    keys: &[&Keys],
    decision_log: &str,
    policy_extra: &str,
) -> (std::sync::Arc<App>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, common::jwks_body(keys)).unwrap();
    let yaml = format!(
        r#"
policy:
  paths: ["{}"]
  decision: "data.envoy.authz.result"
  {policy_extra}
jwt:
  providers:
    - name: bench
      issuer: "{}"
      audiences: ["{}"]
      jwks: {{ file: "{}" }}
      claims_to_headers: [{{ claim: sub, header: x-jwt-sub }}]
decision_log: {decision_log}
"#,
        repo().join("policies").display(),
        common::ISSUER,
        common::AUDIENCE,
        jwks.display()
    );
    let file = dir.path().join("meshauthz.yaml");
    std::fs::write(&file, yaml).unwrap();
    (App::build(Config::load(&file).unwrap()).unwrap(), dir)
}

fn bench(c: &mut Criterion) {
    let algs = meshauthz::jwt::ASYMMETRIC;
    let keys: Vec<Keys> = algs
        .iter()
        .map(|a| Keys::generate(*a, &format!("{a:?}")))
        .collect();
    let (app, _dir) = setup(&keys.iter().collect::<Vec<_>>(), "{ enabled: false }", "");
    // Without the reload gate's input samples: what recording them costs a Check.
    let (ungated, _dir3) = setup(
        &keys.iter().collect::<Vec<_>>(),
        "{ enabled: false }",
        "reload_gate_samples: 0",
    );
    // The same with the default decision log (every decision, one JSON line each) to a file.
    let (logged, _dir2) = setup(
        &keys.iter().collect::<Vec<_>>(),
        "{ output: /dev/null, buffer: 65536 }",
        "",
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for a in [&app, &logged, &ungated] {
            for p in a.authz.jwt.check_all_jwks().await {
                p.1.unwrap();
            }
        }
    });

    let token = keys[0].sign(&claims("alice", "orders:write"));
    let proto = Req {
        principal: Some("spiffe://cluster.local/ns/shop/sa/checkout"),
        method: "POST",
        path: "/api/orders",
        headers: Vec::new(),
    }
    .bearer(&token)
    .build();
    let attrs = attributes_from_proto(proto.clone());
    // Warm the verified-token cache and check the bundled policy allows this request.
    let checked = rt.block_on(app.authz.check(attrs.clone()));
    assert!(checked.decision.allowed, "{:?}", checked.decision.reason);

    c.bench_function("check/whole_pipeline_cached_jwt", |b| {
        b.iter(|| black_box(rt.block_on(app.authz.check(black_box(attrs.clone())))))
    });
    assert!(
        rt.block_on(ungated.authz.check(attrs.clone()))
            .decision
            .allowed
    );
    c.bench_function("check/whole_pipeline_cached_jwt_no_gate_samples", |b| {
        b.iter(|| black_box(rt.block_on(ungated.authz.check(black_box(attrs.clone())))))
    });
    assert!(
        rt.block_on(logged.authz.check(attrs.clone()))
            .decision
            .allowed
    );
    c.bench_function("check/whole_pipeline_cached_jwt_logged", |b| {
        b.iter(|| black_box(rt.block_on(logged.authz.check(black_box(attrs.clone())))))
    });
    c.bench_function("check/proto_to_attributes", |b| {
        b.iter(|| black_box(attributes_from_proto(black_box(proto.clone()))))
    });

    let http = attrs.http().unwrap();
    let target = meshauthz::path::parse(&http.path).unwrap();
    let peer = SpiffeId::parse(attrs.source_principal().unwrap()).unwrap();
    let verified = rt.block_on(app.authz.jwt.verify(&token)).unwrap();
    let build = || {
        input::document(
            &attrs,
            Extras {
                target: Some(&target),
                peer: Some(&peer),
                jwt: Some(verified.document.clone()),
                parsed_body: None,
                truncated_body: false,
            },
        )
    };
    c.bench_function("check/input_document", |b| b.iter(|| black_box(build())));
    let policy = app.authz.policy.current();
    let doc = build();
    c.bench_function("check/policy_evaluation", |b| {
        b.iter(|| black_box(policy.evaluate(black_box(doc.clone())).unwrap()))
    });

    let mut g = c.benchmark_group("jwt");
    g.bench_function("cached", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(app.authz.jwt.verify(black_box(&token)))
                    .unwrap(),
            )
        })
    });
    for k in &keys {
        let t = k.sign(&claims("alice", ""));
        g.bench_function(format!("cold/{:?}", k.alg), |b| {
            b.iter(|| {
                black_box(
                    rt.block_on(app.authz.jwt.verify_uncached(black_box(&t)))
                        .unwrap(),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
