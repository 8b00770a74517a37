//! Static checks run on every load path (validate, start, reload): a policy that calls a
//! function nobody defines, or an OPA builtin meshauthz does not have, must fail to load, not
//! fail every request that reaches the call.
//!
//! regorus resolves calls only when it evaluates them (the interpreter) or when it compiles the
//! rules reachable from the entry point (the RVM), so neither catches a typo in a rule that the
//! entry point reaches only through the fallback path. This walks every call in every module.
//! Resolution is deliberately lenient — a call is fine when its last name component is any
//! module's function — so a valid policy is never refused; a misspelt name still is.

use std::collections::BTreeSet;

use regorus::Engine;
use serde_json::Value as Json;

use super::loader::Module;

/// Every builtin OPA 1.20 declares (its `capabilities/v1.20.2.json`), one name per line.
const OPA_BUILTINS: &str = include_str!("opa_builtins.txt");

/// One call that cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `file:line:col` of the call.
    pub location: String,
    pub function: String,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// A call found in a module, with where it is.
struct Call {
    name: String,
    line: u64,
    col: u64,
}

/// Checks every call in `modules`; returns what cannot run, in file order.
pub fn calls(modules: &[Module], rego_v0: bool) -> Vec<Finding> {
    let mut parsed = Vec::new();
    let mut functions = BTreeSet::new();
    for m in modules {
        let Some(ast) = ast_of(m, rego_v0) else {
            continue; // a parse error is reported by the compile step, with its location
        };
        collect_function_names(&ast, &m.text, &mut functions);
        let mut calls = Vec::new();
        collect_calls(&ast, &m.text, &mut calls);
        parsed.push((m, calls));
    }
    let opa: BTreeSet<&str> = OPA_BUILTINS.lines().map(str::trim).collect();
    let mut findings = Vec::new();
    for (m, calls) in parsed {
        for call in calls {
            let Some(message) = problem(&call.name, &functions, &opa) else {
                continue;
            };
            findings.push(Finding {
                location: format!("{}:{}:{}", m.path.display(), call.line, call.col),
                function: call.name,
                message,
            });
        }
    }
    findings
}

/// Why `name` cannot be called, or `None` when it can.
fn problem(name: &str, functions: &BTreeSet<String>, opa: &BTreeSet<&str>) -> Option<String> {
    // Before the builtin table: regorus registers `http.send` as a stub that is undefined.
    if let Some(why) = unsupported_reason(name) {
        return Some(format!("{name} is not supported by meshauthz: {why}"));
    }
    if is_builtin(name) {
        return None;
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if functions.contains(last) {
        return None;
    }
    if opa.contains(name) {
        return Some(format!(
            "{name} is an OPA builtin that meshauthz does not support (see docs/policy.md, \"Builtins\")"
        ));
    }
    let mut message = format!("unknown function {name}");
    if let Some(near) = nearest(name, functions.iter().map(String::as_str)) {
        message.push_str(&format!(" (did you mean {near}?)"));
    }
    Some(message)
}

/// Builtins the engine has: what the RVM and the interpreter can both call.
pub fn is_builtin(name: &str) -> bool {
    name == "print" || regorus::unstable::BUILTINS.contains_key(name)
}

/// The OPA builtins people reach for most that cannot work here, and what to do instead.
fn unsupported_reason(name: &str) -> Option<&'static str> {
    Some(match name {
        "http.send" => {
            "a policy cannot make network calls on the request path; put the data in data documents (policy.paths) so it is loaded, versioned and reloaded with the policy"
        }
        "net.lookup_ip_addr" => "a policy cannot make DNS lookups on the request path",
        "rego.parse_module" | "rego.metadata.chain" | "rego.metadata.rule" => {
            "regorus does not expose module metadata to policies"
        }
        _ => return None,
    })
}

/// The closest known name by edit distance, when it is close enough to be a typo.
fn nearest<'a>(name: &str, user: impl Iterator<Item = &'a str>) -> Option<String> {
    let builtins = regorus::unstable::BUILTINS.keys().copied();
    builtins
        .chain(user)
        .map(|c| (strsim::levenshtein(name, c), c))
        .filter(|(d, c)| *d <= 2.max(name.len() / 4) && *d < c.len())
        .min()
        .map(|(_, c)| c.to_string())
}

/// The module's syntax tree as JSON (regorus's `ast` feature): walking JSON keeps this
/// independent of the shape of regorus's Rust AST types, which are not a stable API.
fn ast_of(m: &Module, rego_v0: bool) -> Option<Json> {
    let mut engine = Engine::new();
    engine.set_rego_v0(rego_v0);
    engine
        .add_policy(m.path.display().to_string(), m.text.clone())
        .ok()?;
    serde_json::from_str(&engine.get_ast_as_json().ok()?).ok()
}

/// The source text a node covers, from its `span`.
fn span_text<'a>(node: &Json, text: &'a str) -> Option<(&'a str, u64, u64)> {
    let span = node.get("span")?;
    let start = usize::try_from(span.get("start")?.as_u64()?).ok()?;
    let end = usize::try_from(span.get("end")?.as_u64()?).ok()?;
    // Line and column from the offset: regorus's own column for a dotted name is the dot's.
    let before = text.get(..start)?;
    let line = before.matches('\n').count() as u64 + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u64 + 1;
    Some((text.get(start..end)?, line, col))
}

/// The inner object of a one-variant enum node such as `{"Var": {...}}`.
fn variant(node: &Json) -> Option<&Json> {
    let obj = node.as_object()?;
    if obj.len() == 1 {
        obj.values().next()
    } else {
        None
    }
}

fn collect_calls(node: &Json, text: &str, out: &mut Vec<Call>) {
    match node {
        Json::Object(obj) => {
            if let Some(call) = obj.get("Call")
                && let Some(fcn) = call.get("fcn").and_then(variant)
                && let Some((name, line, col)) = span_text(fcn, text)
            {
                out.push(Call {
                    name: name.split_whitespace().collect(),
                    line,
                    col,
                });
            }
            obj.values().for_each(|v| collect_calls(v, text, out));
        }
        Json::Array(items) => items.iter().for_each(|v| collect_calls(v, text, out)),
        _ => {}
    }
}

/// Last name components of every rule that takes arguments (`f(x) := …`, `default f(_) := …`).
fn collect_function_names(node: &Json, text: &str, out: &mut BTreeSet<String>) {
    match node {
        Json::Object(obj) => {
            let head = obj
                .get("Func")
                .or_else(|| obj.get("Default").filter(|d| has_args(d)));
            if let Some(head) = head
                && let Some(refr) = head.get("refr").and_then(variant)
                && let Some((name, _, _)) = span_text(refr, text)
                && let Some(last) = name.rsplit('.').next()
            {
                out.insert(last.trim().to_string());
            }
            obj.values()
                .for_each(|v| collect_function_names(v, text, out));
        }
        Json::Array(items) => items
            .iter()
            .for_each(|v| collect_function_names(v, text, out)),
        _ => {}
    }
}

fn has_args(node: &Json) -> bool {
    node.get("args")
        .and_then(Json::as_array)
        .is_some_and(|a| !a.is_empty())
}

#[cfg(test)]
mod tests;
