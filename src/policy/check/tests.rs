use std::path::PathBuf;

use super::*;

fn module(text: &str) -> Module {
    Module {
        path: PathBuf::from("p.rego"),
        text: text.to_string(),
    }
}

/// (policy body after `package t`, expected findings as `line:col: message` prefixes)
const CASES: &[(&str, &[&str])] = &[
    ("allow if contains(input.path, \"x\")", &[]),
    (
        "allow if contians(input.path, \"x\")",
        &["p.rego:2:10: unknown function contians (did you mean contains?)"],
    ),
    (
        "allow if http.send({\"method\": \"get\", \"url\": \"http://x\"}).status_code == 200",
        &["p.rego:2:10: http.send is not supported by meshauthz"],
    ),
    // A user function, called by its short name, by its full path, and through an import.
    ("f(x) := x\nallow if f(1) == 1", &[]),
    ("f(x) := x\nallow if data.t.f(1) == 1", &[]),
    ("import data.t as me\nf(x) := x\nallow if me.f(1) == 1", &[]),
    ("default f(_) := 0\nallow if f(1) == 0", &[]),
    ("allow if { print(\"x\"); true }", &[]),
    // Calls hidden in comprehensions and `else` branches are found too.
    (
        "xs := [y | some y in [1]; strings.revers(\"a\") == y]",
        &["p.rego:2:27: unknown function strings.revers (did you mean strings.reverse?)"],
    ),
    (
        "allow if false\nelse := true if { lowr(\"A\") == \"a\" }",
        &["p.rego:3:19: unknown function lowr (did you mean lower?)"],
    ),
    // An OPA builtin regorus does not have.
    (
        "allow if rego.parse_module(\"a\", \"package a\")",
        &["p.rego:2:10: rego.parse_module is not supported by meshauthz"],
    ),
];

#[test]
fn calls_table() {
    for (body, expected) in CASES {
        let m = module(&format!("package t\n{body}\n"));
        let found: Vec<String> = calls(&[m], false).iter().map(ToString::to_string).collect();
        assert_eq!(found.len(), expected.len(), "{body}: {found:?}");
        for (f, e) in found.iter().zip(expected.iter()) {
            assert!(f.starts_with(e), "{body}: got {f:?}, want prefix {e:?}");
        }
    }
}

#[test]
fn a_function_defined_in_another_module_resolves() {
    let lib = Module {
        path: PathBuf::from("lib.rego"),
        text: "package lib\nhelper(x) := x\n".into(),
    };
    let user = module("package t\nimport data.lib\nallow if lib.helper(1) == 1\n");
    assert!(calls(&[user, lib], false).is_empty());
}

#[test]
fn every_listed_opa_builtin_is_a_name() {
    let names: Vec<&str> = OPA_BUILTINS.lines().collect();
    assert!(names.len() > 150, "{} names", names.len());
    assert!(names.contains(&"http.send") && names.contains(&"io.jwt.decode_verify"));
    assert!(names.iter().all(|n| !n.is_empty() && !n.contains(' ')));
}

/// docs/policy.md lists the OPA builtins meshauthz refuses; keep it the computed set.
#[test]
fn docs_list_the_unsupported_builtins() {
    let mut want: Vec<&str> = OPA_BUILTINS
        .lines()
        .filter(|n| !is_builtin(n) || unsupported_reason(n).is_some())
        .filter(|n| !n.starts_with("internal."))
        .collect();
    want.sort_unstable();
    let doc = include_str!("../../../docs/policy.md");
    let section = doc
        .split("<!-- unsupported-builtins -->")
        .nth(1)
        .expect("docs/policy.md has the unsupported-builtins markers");
    let listed: Vec<&str> = section
        .split_whitespace()
        .filter_map(|w| {
            w.strip_prefix('`')
                .and_then(|w| w.strip_suffix("`,").or(w.strip_suffix('`')))
        })
        .collect();
    assert_eq!(listed, want, "update docs/policy.md");
}
