//! Policy lifecycle through the real server: hot reload under load, broken edits, SIGHUP-free
//! reload triggers, and the decision log.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use jsonwebtoken::Algorithm;

const POLICY_A: &str =
    "package envoy.authz\nimport rego.v1\nallow if input.parsed_path[0] == \"a\"\n";
const POLICY_B: &str =
    "package envoy.authz\nimport rego.v1\nallow if input.parsed_path[0] in {\"a\", \"b\"}\n";

/// Replaces a file the way editors and ConfigMap updates do: write aside, then rename over.
fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp-edit");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A temp dir with `policies/policy.rego` holding `text`, and a config watching it.
fn watched_policy(text: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pdir = dir.path().join("policies");
    std::fs::create_dir(&pdir).unwrap();
    let policy_file = pdir.join("policy.rego");
    std::fs::write(&policy_file, text).unwrap();
    let config = write_config(
        dir.path(),
        "policy:\n  paths: [policies]\n  debounce: 50ms\ndecision_log: { enabled: false }\n",
    );
    (dir, policy_file, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_policy_under_load_switches_decisions_without_errors() {
    let (_dir, policy_file, config) = watched_policy(POLICY_A);
    let server = Arc::new(TestServer::start(&config).await);
    let (_, ready) = server.get("/readyz").await;
    let first: serde_json::Value = serde_json::from_str(&ready).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (server, stop) = (server.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            // (time since start, allowed) for "/b"; "/a" must be allowed throughout.
            let mut seen = Vec::new();
            let mut wrong_a = 0;
            while !stop.load(Ordering::Relaxed) {
                let b = server.check(request(None, "GET", "/b")).await;
                seen.push((started.elapsed(), b.allowed, b.status));
                if !server.check(request(None, "GET", "/a/x")).await.allowed {
                    wrong_a += 1;
                }
            }
            (seen, wrong_a)
        }));
    }

    tokio::time::sleep(Duration::from_millis(400)).await;
    let edited_at = started.elapsed();
    replace(&policy_file, POLICY_B);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    let mut first_allow = Duration::MAX;
    for c in clients {
        let (seen, wrong_a) = c.await.unwrap();
        assert_eq!(wrong_a, 0, "/a must be allowed by both revisions");
        total += seen.len();
        // Each client sees only deny (403) then allow, never back: no half-loaded state.
        let mut allowed_yet = false;
        for (at, allowed, status) in &seen {
            if *allowed {
                allowed_yet = true;
                first_allow = first_allow.min(*at);
            } else {
                assert!(
                    !allowed_yet,
                    "a decision went back to the old policy at {at:?}"
                );
                assert_eq!(*status, 403, "only policy denials, never errors");
                assert!(
                    *at < edited_at + Duration::from_secs(1),
                    "old policy still served at {at:?}"
                );
            }
        }
        assert!(allowed_yet, "the new policy never took effect for a client");
    }
    assert!(total > 100, "too little load to prove anything: {total}");
    let delay = first_allow.saturating_sub(edited_at);
    assert!(delay < Duration::from_secs(1), "took {delay:?}");
    eprintln!("{total} checks during the swap; new policy live {delay:?} after the edit");

    let (_, ready) = server.get("/readyz").await;
    let second: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_ne!(first["policy_revision"], second["policy_revision"]);

    // A broken edit: reported, and the last good policy keeps serving.
    replace(
        &policy_file,
        "package envoy.authz\nimport rego.v1\nallow if {\n",
    );
    let reported = eventually(Duration::from_secs(3), async || {
        server
            .get("/metrics")
            .await
            .1
            .contains(r#"meshauthz_policy_reloads_total{result="error"} 1"#)
    })
    .await;
    assert!(reported, "a failed reload is counted");
    assert!(server.check(request(None, "GET", "/b")).await.allowed);
    let (_, ready) = server.get("/readyz").await;
    let third: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(second["policy_revision"], third["policy_revision"]);

    // Deleting the file: no modules, so the reload fails and the last good policy still serves.
    std::fs::remove_file(&policy_file).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.check(request(None, "GET", "/b")).await.allowed);
}

#[tokio::test]
async fn decision_log_lines_for_allow_policy_deny_and_jwt_deny_hold_no_secrets() {
    let keys = Keys::generate(Algorithm::ES256, "k");
    let jwks = JwksServer::start(&[&keys]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("decisions.log");
    let config = write_config(
        dir.path(),
        &format!(
            r#"
policy:
  paths: ["{{policies}}"]
  decision: "data.envoy.authz.result"
jwt:
  providers:
    - name: corp
      issuer: "{ISSUER}"
      audiences: ["{AUDIENCE}"]
      jwks: {{ uri: "{}" }}
decision_log:
  output: "{}"
  headers: ["x-request-id", "cookie-free-header"]
"#,
            jwks.uri(),
            log.display()
        ),
    );
    let server = TestServer::start(&config).await;
    let token = keys.sign(&claims("alice", "orders:read"));
    let frontend = Some("spiffe://cluster.local/ns/shop/sa/frontend");
    let allow = Req {
        principal: frontend,
        method: "GET",
        path: "/api/orders/7?access_token=SECRETQUERY",
        ..Default::default()
    }
    .bearer(&token)
    .header("cookie", "session=SECRETCOOKIE");
    assert!(server.check(allow.build()).await.allowed);
    let deny = Req {
        principal: frontend,
        method: "DELETE",
        path: "/api/products/1",
        ..Default::default()
    };
    assert_eq!(server.check(deny.build()).await.status, 403);
    // Same kid, another key: a forgery.
    let forged = Keys::generate(Algorithm::ES256, "k").sign(&claims("alice", "orders:write"));
    let jwt_deny = Req {
        principal: frontend,
        method: "GET",
        path: "/api/orders/7",
        ..Default::default()
    }
    .bearer(&forged);
    assert_eq!(server.check(jwt_deny.build()).await.status, 401);

    let mut lines = Vec::new();
    let written = eventually(Duration::from_secs(3), async || {
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        lines.len() >= 3
    })
    .await;
    assert!(written, "three decision lines: {lines:?}");
    let text = lines.join("\n");
    for secret in [
        token.as_str(),
        forged.as_str(),
        "SECRETQUERY",
        "SECRETCOOKIE",
        "authorization",
    ] {
        assert!(
            !text.contains(secret),
            "the log must not contain {secret:?}:\n{text}"
        );
    }
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let revision = server.app.authz.policy.current().revision().to_string();
    for e in &entries {
        for key in [
            "time",
            "decision_id",
            "allowed",
            "status",
            "reason",
            "method",
            "path",
            "policy_revision",
            "eval_us",
            "duration_us",
        ] {
            assert!(e.get(key).is_some(), "{key} missing in {e}");
        }
        assert_eq!(e["policy_revision"], revision.as_str());
        assert_eq!(e["peer"], "spiffe://cluster.local/ns/shop/sa/frontend");
        assert_eq!(
            e["headers"]["x-request-id"],
            "11111111-2222-3333-4444-555555555555"
        );
    }
    assert_eq!(
        (&entries[0]["allowed"], &entries[0]["reason"]),
        (&true.into(), &"policy_allowed".into())
    );
    assert_eq!(entries[0]["path"], "/api/orders/7");
    assert_eq!(entries[0]["jwt_sub"], "alice");
    assert_eq!(entries[0]["jwt_provider"], "corp");
    assert_eq!(entries[0]["jwt_fingerprint"].as_str().unwrap().len(), 12);
    assert_eq!(
        (&entries[1]["status"], &entries[1]["reason"]),
        (&403.into(), &"policy_denied".into())
    );
    assert_eq!(
        (&entries[2]["status"], &entries[2]["reason"]),
        (&401.into(), &"jwt_bad_signature".into())
    );
    for l in &lines {
        println!("{l}");
    }
    server.stop().await;
}

/// Every way a policy file can go bad on disk: each reload fails, is counted, and the last good
/// revision keeps deciding. (The server runs as root in CI, so "unreadable" is made with a
/// symlink loop and invalid UTF-8 rather than file modes, which root ignores.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_file_faults_keep_the_last_good_policy_serving() {
    type Fault = fn(&std::path::Path);
    let faults: &[(&str, Fault)] = &[
        ("truncated mid-write", |p| {
            // Written in place, not renamed: the watcher sees the half-written file.
            std::fs::write(p, &POLICY_B[..POLICY_B.len() / 2]).unwrap();
        }),
        ("emptied", |p| std::fs::write(p, "").unwrap()),
        ("replaced by a directory", |p| {
            std::fs::remove_file(p).unwrap();
            std::fs::create_dir(p).unwrap();
        }),
        ("replaced by a dangling symlink", |p| {
            std::fs::remove_file(p).unwrap();
            std::os::unix::fs::symlink(p.with_extension("gone"), p).unwrap();
        }),
        ("unreadable: a symlink loop", |p| {
            std::fs::remove_file(p).unwrap();
            std::os::unix::fs::symlink(p, p).unwrap();
        }),
        ("unreadable: not UTF-8", |p| {
            std::fs::write(p, b"package envoy.authz\n\xff\xfe allow := true\n").unwrap();
        }),
        ("deleted", |p| std::fs::remove_file(p).unwrap()),
    ];

    let (_dir, policy_file, config) = watched_policy(POLICY_B);
    let server = TestServer::start(&config).await;
    let revision = |body: String| {
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["policy_revision"].clone()
    };
    let good = revision(server.get("/readyz").await.1);

    for (i, (name, fault)) in faults.iter().enumerate() {
        fault(&policy_file);
        let errors = format!(
            r#"meshauthz_policy_reloads_total{{result="error"}} {}"#,
            i + 1
        );
        let counted = eventually(Duration::from_secs(3), async || {
            server.get("/metrics").await.1.contains(&errors)
        })
        .await;
        assert!(counted, "{name}: the failed reload is counted");
        for path in ["/a", "/b/c"] {
            let o = server.check(request(None, "GET", path)).await;
            assert!(
                o.allowed,
                "{name}: {path} still decided by the last good policy"
            );
        }
        assert!(!server.check(request(None, "GET", "/c")).await.allowed);
        assert_eq!(revision(server.get("/readyz").await.1), good, "{name}");

        // Put the good file back (same bytes: the revision does not change, nothing reloads).
        match std::fs::symlink_metadata(&policy_file) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(&policy_file).unwrap(),
            Ok(_) => std::fs::remove_file(&policy_file).unwrap(),
            Err(_) => {}
        }
        replace(&policy_file, POLICY_B);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = server.get("/metrics").await.1;
    assert!(
        text.contains(&format!(
            r#"meshauthz_policy_reloads_total{{result="error"}} {}"#,
            faults.len()
        )),
        "exactly one failed reload per fault"
    );
}

/// A full disk under a file decision log (`/dev/full` answers every write with ENOSPC): requests
/// are decided as usual, the lines are dropped and counted, nothing blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_decision_log_drops_lines_not_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "policy:\n  paths: [\"{policies}\"]\n  decision: data.envoy.authz.result\n\
         decision_log: { output: /dev/full, buffer: 64 }\n",
    );
    let server = TestServer::start(&config).await;
    let started = Instant::now();
    for i in 0..500 {
        let path = if i % 2 == 0 {
            "/api/products/1"
        } else {
            "/admin"
        };
        let o = server
            .check(request(
                Some("spiffe://cluster.local/ns/shop/sa/frontend"),
                "GET",
                path,
            ))
            .await;
        assert_eq!(o.allowed, i % 2 == 0, "request {i} decided as usual");
    }
    eprintln!("500 checks with a full log disk in {:?}", started.elapsed());
    let dropped = eventually(Duration::from_secs(3), async || {
        let text = server.get("/metrics").await.1;
        text.lines()
            .find_map(|l| l.strip_prefix("meshauthz_decision_log_dropped_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            == Some(500)
    })
    .await;
    assert!(dropped, "every line that could not be written is counted");
}

/// Edits that compile but cannot evaluate — a misspelt function, an OPA builtin meshauthz
/// does not have, a rule conflict — written while serving under load: each is refused (the
/// first two by the static checks, the conflict by the reload gate on recent inputs), shown on
/// `/readyz` with its location, and the last good revision keeps every decision: no 500s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_that_cannot_evaluate_are_refused_while_serving_under_load() {
    let faults: &[(&str, &str, &str, &str)] = &[
        (
            "a misspelt function",
            "allow if contians(input.parsed_path[0], \"x\")\n",
            "error",
            "policy.rego:4:10: unknown function contians (did you mean contains?)",
        ),
        (
            "an unsupported builtin",
            "allow if http.send({\"method\": \"get\", \"url\": \"http://x\"}).status_code == 200\n",
            "error",
            "policy.rego:4:10: http.send is not supported by meshauthz",
        ),
        (
            "a rule conflict",
            "allow := \"yes\" if input.parsed_path[0] == \"a\"\n",
            "rejected",
            "conflict",
        ),
    ];
    let (_dir, policy_file, config) = watched_policy(POLICY_B);
    let server = Arc::new(TestServer::start(&config).await);
    let ready = |body: String| serde_json::from_str::<serde_json::Value>(&body).unwrap();
    let good = ready(server.get("/readyz").await.1)["policy_revision"].clone();

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (server, stop) = (server.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let (mut checks, mut wrong) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                for (path, allowed) in [("/a", true), ("/b/c", true), ("/c", false)] {
                    let o = server.check(request(None, "GET", path)).await;
                    checks += 1;
                    if o.allowed != allowed || (!o.allowed && o.status != 403) {
                        wrong.push(format!("{path}: {} {}", o.allowed, o.status));
                    }
                }
            }
            (checks, wrong)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut counts = std::collections::BTreeMap::new();
    for (name, rule, result, message) in faults {
        replace(&policy_file, &format!("{POLICY_B}{rule}"));
        let n = counts.entry(*result).or_insert(0);
        *n += 1;
        let counted = format!(r#"meshauthz_policy_reloads_total{{result="{result}"}} {n}"#);
        let seen = eventually(Duration::from_secs(5), async || {
            server.get("/metrics").await.1.contains(&counted)
        })
        .await;
        assert!(seen, "{name}: the refused reload is counted as {result}");
        let r = ready(server.get("/readyz").await.1);
        assert_eq!(r["policy_revision"], good, "{name}");
        let shown = &r["last_reload_error"];
        assert!(
            shown["message"].as_str().unwrap().contains(message),
            "{name}: {shown}"
        );
        assert!(shown["time"].is_string(), "{name}: {shown}");
        replace(&policy_file, POLICY_B);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (checks, wrong) = c.await.unwrap();
        assert!(wrong.is_empty(), "decisions changed or failed: {wrong:?}");
        total += checks;
    }
    assert!(total > 100, "too little load to prove anything: {total}");
    eprintln!("{total} checks while three unevaluable revisions were refused");
}
