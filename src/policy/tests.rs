use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::telemetry::Metrics;

fn config(dir: &Path) -> Config {
    Config {
        paths: vec![dir.to_path_buf()],
        decision: "data.envoy.authz.allow".into(),
        rego_version: RegoVersion::V1,
        engine: EngineKind::Auto,
        dry_run: false,
        watch: false,
        debounce: Duration::from_millis(50),
        eval_timeout: Duration::from_millis(100),
        max_instructions: 1_000_000,
        test_on_reload: false,
        reload_gate_samples: 64,
    }
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

const ALLOW_ROLE: &str =
    "package envoy.authz\nimport rego.v1\nallow if input.role in data.shop.roles.admins\n";

/// A policy tree allowing the roles in `data.shop.roles.admins` (just `root`).
fn shop() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "authz.rego", ALLOW_ROLE);
    write(
        dir.path(),
        "shop/roles/data.json",
        r#"{"admins": ["root"]}"#,
    );
    dir
}

fn input(role: &str) -> Value {
    Value::from_json_str(&format!(r#"{{"role": "{role}"}}"#)).unwrap()
}

#[test]
fn data_documents_mount_at_their_directory() {
    let dir = shop();
    write(dir.path(), "shop/other.yaml", "x: 1\n");
    let p = Policy::load(&config(dir.path())).unwrap();
    assert_eq!(p.evaluate(input("root")).unwrap(), Value::from(true));
    assert_eq!(p.evaluate(input("guest")).unwrap(), Value::Undefined);
    assert_eq!(
        p.evaluate_rule("data.shop.x", None)
            .unwrap_or(Value::Undefined),
        Value::Undefined,
        "data is not a rule"
    );
}

#[test]
fn test_files_and_dot_entries_are_skipped() {
    let dir = shop();
    write(dir.path(), "authz_test.rego", "this is not rego");
    write(dir.path(), ".hidden/broken.rego", "neither is this");
    let p = Policy::load(&config(dir.path())).unwrap();
    assert_eq!(p.modules().len(), 1);
    let with_tests = collect(&[dir.path().to_path_buf()], true).unwrap();
    assert_eq!(with_tests.modules.len(), 2);
}

#[test]
fn syntax_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "bad.rego",
        "package envoy.authz\n\nallow if {\n  input.x ==\n}\n",
    );
    let err = Policy::load(&config(dir.path())).unwrap_err().to_string();
    let file = dir.path().join("bad.rego");
    assert!(
        err.starts_with(&format!("{}:5:1: ", file.display())),
        "{err}"
    );
    assert!(err.contains("expecting expression"), "{err}");
}

#[test]
fn a_missing_decision_rule_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "p.rego",
        "package other\nimport rego.v1\nallow := true\n",
    );
    let err = Policy::load(&config(dir.path())).unwrap_err();
    assert!(matches!(err, Error::MissingDecision { .. }), "{err}");
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Policy::load(&config(empty.path())),
        Err(Error::NoModules(_))
    ));
}

#[test]
fn bad_data_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "authz.rego", ALLOW_ROLE);
    write(dir.path(), "shop/roles/data.json", "{not json");
    let err = Policy::load(&config(dir.path())).unwrap_err().to_string();
    assert!(err.contains("shop/roles/data.json"), "{err}");
}

#[test]
fn reload_swaps_good_policies_and_keeps_the_last_good_one() {
    let dir = shop();
    let metrics = Arc::new(Metrics::new());
    let store = Store::load(config(dir.path()), metrics.clone()).unwrap();
    let first = store.current().revision().to_string();
    assert!(matches!(store.reload(), ReloadOutcome::Unchanged));

    write(
        dir.path(),
        "shop/roles/data.json",
        r#"{"admins": ["root", "ops"]}"#,
    );
    assert!(matches!(store.reload(), ReloadOutcome::Reloaded { .. }));
    let second = store.current().revision().to_string();
    assert_ne!(first, second);
    assert_eq!(
        store.current().evaluate(input("ops")).unwrap(),
        Value::from(true)
    );

    write(
        dir.path(),
        "authz.rego",
        "package envoy.authz\nallow if {\n",
    );
    assert!(matches!(store.reload(), ReloadOutcome::Failed { .. }));
    assert_eq!(
        store.current().revision(),
        second,
        "the last good policy keeps serving"
    );
    assert_eq!(
        store.current().evaluate(input("ops")).unwrap(),
        Value::from(true)
    );
    assert!(
        metrics
            .encode()
            .contains(r#"meshauthz_policy_reloads_total{result="error"} 1"#)
    );
}

#[test]
fn configmap_symlink_layout_loads() {
    // What a Kubernetes ConfigMap volume looks like: visible names are symlinks into ..data.
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("..2026_11_23_01_00_00.000000001");
    write(&v1, "authz.rego", ALLOW_ROLE);
    write(
        &v1,
        "data.json",
        r#"{"shop": {"roles": {"admins": ["root"]}}}"#,
    );
    std::os::unix::fs::symlink(&v1, dir.path().join("..data")).unwrap();
    for f in ["authz.rego", "data.json"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), dir.path().join(f)).unwrap();
    }
    let p = Policy::load(&config(dir.path())).unwrap();
    assert_eq!(p.modules().len(), 1);
    assert_eq!(p.evaluate(input("root")).unwrap(), Value::from(true));
}

#[test]
fn runaway_evaluation_is_stopped_by_the_timer() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "slow.rego",
        "package envoy.authz\nimport rego.v1\nxs := numbers.range(1, 100000)\nallow if {\n  some i in xs\n  some j in xs\n  i == j + 100001\n}\n",
    );
    let mut cfg = config(dir.path());
    cfg.eval_timeout = Duration::from_millis(50);
    let p = Policy::load(&cfg).unwrap();
    // 10^10 steps unbounded; with the limits, an error after the budget, on either engine.
    let err = p.evaluate(Value::new_object()).unwrap_err().to_string();
    assert!(err.contains("time limit"), "{err}");
    // The instruction budget stops it too, whatever the clock says.
    let mut steps = cfg.clone();
    steps.eval_timeout = Duration::from_secs(3600);
    steps.max_instructions = 10_000;
    let err = Policy::load(&steps)
        .unwrap()
        .evaluate(Value::new_object())
        .unwrap_err()
        .to_string();
    assert!(err.contains("instruction limit of 10000"), "{err}");
    cfg.engine = EngineKind::Interpreter;
    let p = Policy::load(&cfg).unwrap();
    assert_eq!(p.engine(), "interpreter");
    let err = p.evaluate(Value::new_object()).unwrap_err().to_string();
    assert!(
        err.contains("time limit") || err.contains("execution"),
        "{err}"
    );
}

#[test]
fn rule_paths_are_validated() {
    for ok in ["data.envoy.authz.allow", "data.a", "data.a_b.c1"] {
        assert!(is_rule_path(ok), "{ok}");
    }
    for bad in [
        "",
        "data",
        "data.",
        "envoy.authz.allow",
        "data..x",
        "data.1a",
        "data.a-b",
    ] {
        assert!(!is_rule_path(bad), "{bad}");
    }
}

#[test]
fn reading_parsed_body_is_detected_conservatively() {
    let cases: &[(&str, bool)] = &[
        ("allow if input.parsed_body.amount < 10", true),
        ("allow if input[\"parsed_body\"]", true),
        (
            "allow if input.attributes.request.http.method == \"GET\"",
            false,
        ),
        ("allow if input.parsed_path[0] == \"x\"", false),
        ("x := input\nallow if x.y", true),
        ("allow if some k, v in input", true),
        ("allow if input[k] == 1", true),
        ("allow if walk(input, [p, v])", true),
        ("test_a if allow with input as {\"a\": 1}", false),
        ("# the whole input document\nallow if input.peer", false),
        ("allow if my_input == 1\ninputs := 2", false),
    ];
    for (text, want) in cases {
        assert_eq!(may_read_parsed_body(text), *want, "{text}");
    }
}

/// A policy whose decision rule conflicts with itself on some input: both engines must say so
/// (a 500 with the conflict's location), not one of them "undefined".
#[test]
fn rule_conflicts_are_errors_on_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "authz.rego",
        "package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if input.role == \"root\"\nallow := \"yes\" if input.role == \"root\"\n",
    );
    for engine in [EngineKind::Auto, EngineKind::Rvm, EngineKind::Interpreter] {
        let cfg = Config {
            engine,
            ..config(dir.path())
        };
        let p = Policy::load(&cfg).unwrap();
        let err = p.evaluate(input("root")).unwrap_err().to_string();
        assert!(
            err.contains("authz.rego:") && err.contains("conflict"),
            "{engine:?}: {err}"
        );
        assert_eq!(
            p.evaluate(input("guest")).unwrap(),
            Value::from(false),
            "{engine:?}"
        );
    }
}

/// Unknown and unsupported calls fail the load on every engine, with file:line and the name.
#[test]
fn unknown_functions_fail_the_load_on_every_engine() {
    for (rule, name) in [
        ("allow if contians(input.role, \"x\")", "contians"),
        ("allow if http.send({\"url\": \"http://x\"})", "http.send"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "authz.rego",
            &format!("package envoy.authz\nimport rego.v1\ndefault allow := false\n{rule}\n"),
        );
        for engine in [EngineKind::Auto, EngineKind::Rvm, EngineKind::Interpreter] {
            let cfg = Config {
                engine,
                ..config(dir.path())
            };
            let err = Policy::load(&cfg).unwrap_err().to_string();
            assert!(
                err.contains("authz.rego:4:10:") && err.contains(name),
                "{engine:?}: {err}"
            );
        }
    }
}

/// The reload gate replays recent inputs: a revision that fails where the serving one decided
/// is refused (counted, shown), one that only decides differently goes live.
#[test]
fn reload_gate_refuses_new_errors_and_accepts_new_decisions() {
    let dir = shop();
    let metrics = Arc::new(Metrics::new());
    let store = Store::load(config(dir.path()), metrics.clone()).unwrap();
    let serving = store.current().revision().to_string();
    for role in ["root", "guest"] {
        store.record(&input(role));
    }

    // Fails (a conflict) only for root, whom the serving revision allowed.
    write(
        dir.path(),
        "authz.rego",
        "package envoy.authz\nimport rego.v1\nallow if input.role in data.shop.roles.admins\nallow := \"yes\" if input.role == \"root\"\n",
    );
    let ReloadOutcome::Failed { error } = store.reload() else {
        panic!("a revision that errors on a recent input went live");
    };
    let message = error.to_string();
    assert!(
        message.contains("fails on a recent input") && message.contains("conflict"),
        "{message}"
    );
    assert_eq!(store.current().revision(), serving);
    let shown = store.last_error().unwrap();
    assert_eq!(shown.stage, "gate");
    assert!(
        metrics
            .encode()
            .contains(r#"meshauthz_policy_reloads_total{result="rejected"} 1"#)
    );

    // Denies root now: a changed decision is what reloads are for.
    write(
        dir.path(),
        "authz.rego",
        "package envoy.authz\nimport rego.v1\nallow if input.role == \"guest\"\n",
    );
    assert!(matches!(store.reload(), ReloadOutcome::Reloaded { .. }));
    assert_eq!(
        store.current().evaluate(input("root")).unwrap(),
        Value::Undefined
    );
}

/// With nothing recorded the same conflicting revision would go live: the gate is what
/// refused it above, not the compiler.
#[test]
fn reload_gate_without_samples_lets_the_conflict_through() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "authz.rego", ALLOW_ROLE);
    write(dir.path(), "shop/roles/data.json", r#"{"admins": []}"#);
    let store = Store::load(config(dir.path()), Arc::new(Metrics::new())).unwrap();
    write(
        dir.path(),
        "authz.rego",
        "package envoy.authz\nimport rego.v1\nallow if input.role == \"root\"\nallow := \"yes\" if input.role == \"root\"\n",
    );
    assert!(matches!(store.reload(), ReloadOutcome::Reloaded { .. }));
}

#[test]
fn test_on_reload_refuses_a_revision_whose_tests_fail() {
    let dir = shop();
    write(
        dir.path(),
        "authz_test.rego",
        "package envoy.authz\nimport rego.v1\ntest_root if allow with input as {\"role\": \"root\"}\n",
    );
    let cfg = Config {
        test_on_reload: true,
        ..config(dir.path())
    };
    let store = Store::load(cfg, Arc::new(Metrics::new())).unwrap();
    write(
        dir.path(),
        "authz.rego",
        "package envoy.authz\nimport rego.v1\nallow if input.role == \"nobody\"\n",
    );
    let ReloadOutcome::Failed { error } = store.reload() else {
        panic!("a revision whose tests fail went live");
    };
    assert!(error.to_string().contains("test_root"), "{error}");
    assert_eq!(store.last_error().unwrap().stage, "tests");
    // Fixing the policy (tests pass again) lets it through.
    write(
        dir.path(),
        "authz.rego",
        "package envoy.authz\nimport rego.v1\nallow if input.role in {\"root\", \"ops\"}\n",
    );
    assert!(matches!(store.reload(), ReloadOutcome::Reloaded { .. }));
}
