//! Rego policies: loading, compiling and evaluating the decision rule with regorus.
//!
//! A [`Policy`] is an immutable, fully compiled snapshot of every module and data document under
//! the configured paths, identified by a content hash ([`Policy::revision`]). The server holds the
//! current snapshot in a [`Store`] and swaps it whole on reload, so a request evaluates against
//! exactly one revision from start to end and never against a half-loaded one.
//!
//! Evaluation reuses one regorus engine per worker thread (cloned from the snapshot's prototype
//! the first time that thread sees the revision): a clone shares the parsed modules and data, so
//! the per-request cost is setting the input and walking the rules.

pub mod check;
mod loader;
mod store;
pub mod testing;
mod watch;

use std::cell::RefCell;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::{Program, RegoVM};
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{CompiledPolicy, Engine, Value};
use serde::Deserialize;

use crate::config::{self, Ctx};

pub use loader::{Sources, collect};
pub use store::{ReloadOutcome, Store};
pub use watch::spawn_watcher;

/// Rego language version the modules are parsed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegoVersion {
    /// Rego v1 (OPA 1.x default): `if` and `contains` keywords are required.
    V1,
    /// Rego v0 (OPA 0.x): for policies written before OPA 1.0.
    V0,
}

/// Which regorus evaluator runs the decision rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// The compiled RVM when the policy compiles for it, else the interpreter (logged).
    Auto,
    /// regorus's register VM (compiled program; several times faster). Load fails if the policy
    /// uses something it cannot compile.
    Rvm,
    /// regorus's tree-walking interpreter (supports everything regorus supports).
    Interpreter,
}

/// Validated `policy:` section.
#[derive(Debug, Clone)]
pub struct Config {
    /// Files and directories holding `*.rego` modules and `*.json`/`*.yaml` data documents.
    pub paths: Vec<PathBuf>,
    /// The rule whose value is the decision, e.g. `data.envoy.authz.allow`.
    pub decision: String,
    pub rego_version: RegoVersion,
    pub engine: EngineKind,
    /// Compute and log decisions but allow every request.
    pub dry_run: bool,
    /// Watch the paths and reload on change.
    pub watch: bool,
    /// Quiet period after the last file event before a reload starts.
    pub debounce: Duration,
    /// Wall-clock budget for one evaluation; past it the request is denied.
    pub eval_timeout: Duration,
    /// Most RVM instructions one evaluation may execute; past it the request is denied.
    pub max_instructions: usize,
    /// Run the tree's `test_*` rules before a reloaded revision goes live; refuse it if any fail.
    pub test_on_reload: bool,
    /// How many recent Check inputs the reload gate replays (0: the gate is off).
    pub reload_gate_samples: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    paths: Vec<String>,
    #[serde(default = "default_decision")]
    decision: String,
    #[serde(default = "default_rego_version")]
    rego_version: RegoVersion,
    #[serde(default = "default_engine")]
    engine: EngineKind,
    #[serde(default)]
    dry_run: bool,
    #[serde(default = "default_true")]
    watch: bool,
    #[serde(default = "default_debounce")]
    debounce: String,
    #[serde(default = "default_eval_timeout")]
    eval_timeout: String,
    #[serde(default = "default_max_instructions")]
    max_instructions: usize,
    #[serde(default)]
    test_on_reload: bool,
    #[serde(default = "default_reload_gate_samples")]
    reload_gate_samples: usize,
}

fn default_reload_gate_samples() -> usize {
    64
}

/// Inputs beyond this many are not kept for the gate: each sample is held in memory.
const MAX_RELOAD_GATE_SAMPLES: usize = 1024;

fn default_max_instructions() -> usize {
    1_000_000
}

fn default_decision() -> String {
    "data.envoy.authz.allow".into()
}
fn default_rego_version() -> RegoVersion {
    RegoVersion::V1
}
fn default_engine() -> EngineKind {
    EngineKind::Auto
}
fn default_true() -> bool {
    true
}
fn default_debounce() -> String {
    "200ms".into()
}
fn default_eval_timeout() -> String {
    "100ms".into()
}

impl RawConfig {
    pub fn validate(self, ctx: &Ctx<'_>) -> Result<Config, config::Error> {
        if self.paths.is_empty() {
            return Err(ctx.err(
                "policy.paths",
                "expected at least one file or directory of policies",
            ));
        }
        if !is_rule_path(&self.decision) {
            return Err(ctx.err(
                "policy.decision",
                format!(
                    "expected a rule path such as \"data.envoy.authz.allow\", got {:?}",
                    self.decision
                ),
            ));
        }
        Ok(Config {
            paths: self.paths.iter().map(|p| ctx.resolve(p)).collect(),
            decision: self.decision,
            rego_version: self.rego_version,
            engine: self.engine,
            dry_run: self.dry_run,
            watch: self.watch,
            debounce: ctx.duration("policy.debounce", &self.debounce)?,
            eval_timeout: ctx.duration("policy.eval_timeout", &self.eval_timeout)?,
            max_instructions: if self.max_instructions == 0 {
                return Err(ctx.err("policy.max_instructions", "expected a positive number"));
            } else {
                self.max_instructions
            },
            test_on_reload: self.test_on_reload,
            reload_gate_samples: if self.reload_gate_samples > MAX_RELOAD_GATE_SAMPLES {
                return Err(ctx.err(
                    "policy.reload_gate_samples",
                    format!(
                        "expected at most {MAX_RELOAD_GATE_SAMPLES} (each sample is kept in memory)"
                    ),
                ));
            } else {
                self.reload_gate_samples
            },
        })
    }
}

/// `data.a.b_c.d`: `data` followed by one or more identifier components.
fn is_rule_path(s: &str) -> bool {
    let mut parts = s.split('.');
    parts.next() == Some("data")
        && s.len() > 5
        && parts.all(|p| {
            let mut chars = p.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS error is part of the message, not a `source`, so a chain prints it once.
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A Rego parse or compile error; regorus's message names file:line:column.
    #[error("{0}")]
    Compile(String),
    #[error("{path}: invalid data document: {message}")]
    Data { path: PathBuf, message: String },
    #[error("no .rego modules found under {0}")]
    NoModules(String),
    #[error("decision rule {rule} is not defined by any loaded module")]
    MissingDecision { rule: String },
    /// Calls that cannot run (unknown or unsupported functions), one `file:line:col: …` each.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Calls(Vec<check::Finding>),
    /// `policy.test_on_reload`: the revision's own `test_*` rules did not pass.
    #[error("{0}")]
    Tests(String),
    /// The reload gate: the revision fails where the serving one decided.
    #[error("{0}")]
    Gate(String),
}

/// Why an evaluation produced no value. Always turned into a denial by the caller.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("policy evaluation failed: {0}")]
    Runtime(String),
}

/// Conservative: true when the text names `parsed_body`, or uses `input` as a whole value
/// (`x := input`, `input[k]`, `walk(input, …)`), through which the body could be reached.
/// Only `input.<field>` paths and `with input as` are known not to reach it.
fn may_read_parsed_body(text: &str) -> bool {
    if text.contains("parsed_body") {
        return true;
    }
    let bytes = text.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut from = 0;
    while let Some(i) = text.get(from..).and_then(|t| t.find("input")) {
        let at = from + i;
        from = at + "input".len();
        let before = at.checked_sub(1).and_then(|j| bytes.get(j)).copied();
        let after = bytes.get(from).copied();
        if before.is_some_and(is_ident) || after.is_some_and(is_ident) {
            continue; // part of another name
        }
        let line_start = text
            .get(..at)
            .and_then(|t| t.rfind('\n'))
            .map_or(0, |j| j + 1);
        if text.get(line_start..at).is_some_and(|l| l.contains('#')) {
            continue; // in a comment
        }
        if after == Some(b'.') {
            continue; // a path into input, not the whole document
        }
        if text
            .get(..at)
            .is_some_and(|t| t.trim_end().ends_with("with"))
            && text
                .get(from..)
                .is_some_and(|t| t.trim_start().starts_with("as"))
        {
            continue;
        }
        return true;
    }
    false
}

/// Unique per compiled snapshot, so per-thread engines know when they are stale.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// One compiled revision of the policy tree.
pub struct Policy {
    prototype: Engine,
    /// The decision rule compiled for the RVM, with the data it runs against.
    rvm: Option<(Arc<Program>, Value)>,
    timer: ExecutionTimerConfig,
    max_instructions: usize,
    decision: String,
    revision: String,
    generation: u64,
    modules: Vec<PathBuf>,
    reads_parsed_body: bool,
    /// Why `engine: auto` runs this revision on the interpreter, if it does.
    fallback: Option<String>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("decision", &self.decision)
            .field("revision", &self.revision)
            .field("modules", &self.modules)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// This worker's engine and the generation it was cloned from.
    static ENGINE: RefCell<Option<(u64, Engine)>> = const { RefCell::new(None) };
    /// This worker's VM and the generation whose program it runs.
    static VM: RefCell<Option<(u64, RegoVM)>> = const { RefCell::new(None) };
}

impl Policy {
    /// Reads and compiles every module and data document under the configured paths.
    pub fn load(cfg: &Config) -> Result<Policy, Error> {
        let sources = collect(&cfg.paths, false)?;
        Self::compile(cfg, sources)
    }

    /// Compiles already collected sources.
    pub fn compile(cfg: &Config, sources: Sources) -> Result<Policy, Error> {
        if sources.modules.is_empty() {
            let paths: Vec<String> = cfg.paths.iter().map(|p| p.display().to_string()).collect();
            return Err(Error::NoModules(paths.join(", ")));
        }
        let mut engine = new_engine(cfg);
        sources.add_to(&mut engine)?;
        let findings = check::calls(&sources.modules, cfg.rego_version == RegoVersion::V0);
        if !findings.is_empty() {
            return Err(Error::Calls(findings));
        }
        let compiled = check_decision_rule(&mut engine, &cfg.decision)?;
        // The RVM compiler resolves every name reachable from the decision rule, so it is run
        // whatever the engine: an error in the policy it finds is a load error on every engine;
        // only a limitation of the compiler falls back (and says so).
        let (rvm, fallback) = match compile_rvm(&compiled, &engine, &cfg.decision) {
            Ok(p) if cfg.engine != EngineKind::Interpreter => (Some(p), None),
            Ok(_) => (None, None),
            Err(e) if is_policy_mistake(&e) => return Err(e),
            Err(e) if cfg.engine == EngineKind::Rvm => return Err(e),
            Err(e) if cfg.engine == EngineKind::Auto => (None, Some(e.to_string())),
            Err(_) => (None, None),
        };
        Ok(Policy {
            prototype: engine,
            rvm,
            timer: timer(cfg),
            max_instructions: cfg.max_instructions,
            decision: cfg.decision.clone(),
            revision: sources.revision,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            reads_parsed_body: sources
                .modules
                .iter()
                .any(|m| may_read_parsed_body(&m.text)),
            modules: sources.modules.into_iter().map(|m| m.path).collect(),
            fallback,
        })
    }

    /// Content hash of every loaded file: equal trees give equal revisions.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    pub fn modules(&self) -> &[PathBuf] {
        &self.modules
    }

    /// Whether any module may read `input.parsed_body`. A JSON body costs ~30 times its size
    /// once parsed into policy values, so it is parsed only for policies that may look at it.
    pub fn reads_parsed_body(&self) -> bool {
        self.reads_parsed_body
    }

    pub fn decision_rule(&self) -> &str {
        &self.decision
    }

    /// Why `engine: auto` runs this revision on the interpreter instead of the RVM.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Which evaluator this revision runs on.
    pub fn engine(&self) -> &'static str {
        if self.rvm.is_some() {
            "rvm"
        } else {
            "interpreter"
        }
    }

    /// Evaluates the decision rule for `input`. `Value::Undefined` means the rule had no value.
    pub fn evaluate(&self, input: Value) -> Result<Value, EvalError> {
        match &self.rvm {
            // The RVM reads a conflict between rule definitions as "undefined"; the interpreter
            // reports it with its location. Undefined is re-asked of the interpreter so both
            // engines fail alike (a cost only on the undefined path, which `default` avoids).
            Some((program, data)) => match self.evaluate_rvm(program, data, input.clone())? {
                Value::Undefined => self.evaluate_interpreter(input).map(|_| Value::Undefined),
                v => Ok(v),
            },
            None => self.evaluate_interpreter(input),
        }
    }

    fn evaluate_rvm(
        &self,
        program: &Arc<Program>,
        data: &Value,
        input: Value,
    ) -> Result<Value, EvalError> {
        VM.with(|slot| {
            let mut slot = slot.borrow_mut();
            let vm = match &mut *slot {
                Some((generation, vm)) if *generation == self.generation => vm,
                other => {
                    let mut vm = RegoVM::new();
                    vm.load_program(program.clone());
                    vm.set_data(data.clone())
                        .map_err(|e| EvalError::Runtime(compact(&e.to_string())))?;
                    vm.set_execution_timer_config(Some(self.timer));
                    vm.set_max_instructions(self.max_instructions);
                    &mut other.insert((self.generation, vm)).1
                }
            };
            vm.set_input(input);
            vm.execute()
                .map_err(|e| EvalError::Runtime(compact(&e.to_string())))
        })
    }

    fn evaluate_interpreter(&self, input: Value) -> Result<Value, EvalError> {
        ENGINE.with(|slot| {
            let mut slot = slot.borrow_mut();
            let engine = match &mut *slot {
                Some((generation, engine)) if *generation == self.generation => engine,
                other => &mut other.insert((self.generation, self.prototype.clone())).1,
            };
            engine.set_input(input);
            engine
                .eval_rule(self.decision.clone())
                .map_err(|e| EvalError::Runtime(compact(&e.to_string())))
        })
    }

    /// Evaluates an arbitrary rule (used by `meshauthz test`).
    pub fn evaluate_rule(&self, rule: &str, input: Option<Value>) -> Result<Value, EvalError> {
        let mut engine = self.prototype.clone();
        if let Some(input) = input {
            engine.set_input(input);
        }
        engine
            .eval_rule(rule.to_string())
            .map_err(|e| EvalError::Runtime(compact(&e.to_string())))
    }
}

/// A runaway rule must not hold a worker: regorus checks the clock every few steps.
fn timer(cfg: &Config) -> ExecutionTimerConfig {
    ExecutionTimerConfig {
        limit: cfg.eval_timeout,
        check_interval: NonZeroU32::MIN.saturating_add(63),
    }
}

fn new_engine(cfg: &Config) -> Engine {
    let mut engine = Engine::new();
    engine.set_rego_v0(cfg.rego_version == RegoVersion::V0);
    // As OPA by default: a failing builtin (to_number("x")) makes its expression undefined
    // rather than failing the whole evaluation; the RVM behaves the same way.
    engine.set_strict_builtin_errors(false);
    engine.set_execution_timer_config(timer(cfg));
    engine
}

/// RVM compile errors that are mistakes in the policy (the interpreter would fail the same
/// way, but only at evaluation), as opposed to constructs the RVM compiler does not support yet.
fn is_policy_mistake(e: &Error) -> bool {
    let Error::Compile(m) = e else { return false };
    [
        "Unknown function",
        "Undefined variable",
        "Invalid function expression",
        "unary - can only",
    ]
    .iter()
    .any(|s| m.contains(s))
}

fn compile_rvm(
    compiled: &CompiledPolicy,
    engine: &Engine,
    rule: &str,
) -> Result<(Arc<Program>, Value), Error> {
    let program = Compiler::compile_from_policy(compiled, &[rule])
        .map_err(|e| Error::Compile(format!("RVM: {}", compact(&e.to_string()))))?;
    Ok((program, engine.get_data()))
}

/// Fails unless some loaded module declares the decision rule: compiling with the rule as the
/// entry point resolves it against every module without evaluating anything.
fn check_decision_rule(engine: &mut Engine, rule: &str) -> Result<CompiledPolicy, Error> {
    match engine.compile_with_entrypoint(&rule.into()) {
        Ok(c) => Ok(c),
        Err(e) if e.to_string().contains("not a valid rule path") => Err(Error::MissingDecision {
            rule: rule.to_string(),
        }),
        Err(e) => Err(Error::Compile(compact(&e.to_string()))),
    }
}

/// Folds regorus's multi-line diagnostic (`--> file:line:col`, a source excerpt, `error: msg`)
/// into one `file:line:col: msg` line, which is what logs and CI output want.
pub fn compact(message: &str) -> String {
    let location = message
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("--> "));
    let error = message
        .lines()
        .rev()
        .find_map(|l| l.trim_start().strip_prefix("error: "));
    match (location, error) {
        (Some(loc), Some(err)) => format!("{}: {}", loc.trim(), err.trim()),
        _ => message.trim().replace('\n', " "),
    }
}

#[cfg(test)]
mod tests;
