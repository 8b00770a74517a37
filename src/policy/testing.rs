//! `meshauthz test`: run the `test_*` rules of a policy tree, the way `opa test` does.
//!
//! Tests are discovered from the source: every rule whose name starts with `test_`, defined at the
//! start of a line in any module (test files included). Each is evaluated as
//! `data.<package>.<rule>` with the interpreter (which supports `with input as …` and
//! `with data.x as …`); a test passes when its value is `true`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use regorus::{Engine, Value};

use super::{Error, RegoVersion, collect, compact};

/// How one test ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Pass,
    /// The rule was false or undefined; carries what it evaluated to.
    Fail(String),
    /// Evaluation failed.
    Error(String),
}

#[derive(Debug, Clone)]
pub struct TestResult {
    pub file: PathBuf,
    /// `data.<package>.<rule>`.
    pub rule: String,
    pub outcome: Outcome,
    pub duration: Duration,
    /// Output of `print()` calls made by the test.
    pub prints: Vec<String>,
}

/// Runs every test under `paths`. Fails only if the policy tree does not load or compile.
pub fn run(paths: &[PathBuf], rego_version: RegoVersion) -> Result<Vec<TestResult>, Error> {
    let sources = collect(paths, true)?;
    let mut engine = Engine::new();
    engine.set_rego_v0(rego_version == RegoVersion::V0);
    engine.set_strict_builtin_errors(false);
    engine.set_gather_prints(true);
    sources.add_to(&mut engine)?;

    let mut tests = Vec::new();
    let mut seen = BTreeSet::new();
    for module in &sources.modules {
        let Some(package) = package_of(&module.text) else {
            continue;
        };
        for name in test_rules(&module.text) {
            let rule = format!("data.{package}.{name}");
            if seen.insert(rule.clone()) {
                tests.push((module.path.clone(), rule));
            }
        }
    }

    let mut results = Vec::new();
    for (file, rule) in tests {
        let start = Instant::now();
        let value = engine.eval_rule(rule.clone());
        let duration = start.elapsed();
        let prints = engine.take_prints().unwrap_or_default();
        let outcome = match value {
            Ok(Value::Bool(true)) => Outcome::Pass,
            Ok(Value::Undefined) => Outcome::Fail("undefined".into()),
            Ok(other) => Outcome::Fail(other.to_json_str().unwrap_or_else(|_| "?".into())),
            Err(e) => Outcome::Error(compact(&e.to_string())),
        };
        results.push(TestResult {
            file,
            rule,
            outcome,
            duration,
            prints,
        });
    }
    Ok(results)
}

/// The module's package path (`a.b` from `package a.b`).
fn package_of(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l.trim_start().strip_prefix("package ")?;
        let pkg = rest.split('#').next().unwrap_or("").trim();
        (!pkg.is_empty()).then(|| pkg.to_string())
    })
}

/// Names of `test_*` rules defined at the start of a line.
fn test_rules(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.strip_prefix("test_")?;
            let name: String = l
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            Some(format!("test_{name}"))
        })
        .collect()
}

/// Renders results as `opa test` does, one line per test, then a summary. Returns the text and
/// whether everything passed.
pub fn report(results: &[TestResult], verbose: bool, root: &Path) -> (String, bool) {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut current: Option<&Path> = None;
    let (mut pass, mut fail, mut error) = (0, 0, 0);
    for r in results {
        let shown = r.file.strip_prefix(root).unwrap_or(&r.file);
        if current != Some(shown) {
            let _ = writeln!(out, "{}:", shown.display());
            current = Some(shown);
        }
        let micros = r.duration.as_micros();
        let status = match &r.outcome {
            Outcome::Pass => {
                pass += 1;
                "PASS"
            }
            Outcome::Fail(_) => {
                fail += 1;
                "FAIL"
            }
            Outcome::Error(_) => {
                error += 1;
                "ERROR"
            }
        };
        let _ = writeln!(out, "  {}: {status} ({micros}µs)", r.rule);
        if verbose || !matches!(r.outcome, Outcome::Pass) {
            match &r.outcome {
                Outcome::Pass => {}
                Outcome::Fail(v) if verbose => {
                    let _ = writeln!(out, "    evaluated to: {v}");
                }
                Outcome::Fail(_) => {}
                Outcome::Error(e) => {
                    let _ = writeln!(out, "    {e}");
                }
            }
            if verbose {
                for p in &r.prints {
                    let _ = writeln!(out, "    print: {p}");
                }
            }
        }
    }
    let total = results.len();
    let _ = writeln!(out, "{}", "-".repeat(60));
    if total == 0 {
        let _ = writeln!(out, "no tests found");
    } else {
        let _ = writeln!(out, "PASS: {pass}/{total}");
        if fail > 0 {
            let _ = writeln!(out, "FAIL: {fail}/{total}");
        }
        if error > 0 {
            let _ = writeln!(out, "ERROR: {error}/{total}");
        }
    }
    (out, total > 0 && pass == total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovers_packages_and_test_rules() {
        let text = "# c\npackage a.b # x\nimport rego.v1\ntest_one if true\n  test_indented := 1\ntest_two := x if {\n}\nnot_test_three if true\ntest_one if false\n";
        assert_eq!(package_of(text).as_deref(), Some("a.b"));
        assert_eq!(test_rules(text), vec!["test_one", "test_two", "test_one"]);
    }
}
