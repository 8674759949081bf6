//! Finds the `@task` functions of a Python file by parsing it, before any Python runs.
//!
//! Options must be literals so that limits are known at build time and can be written into
//! the manifest; anything else is reported with the file, line and column, and a hint.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use manifest_schema::{
    Compute, FileGrant, FileMode, TaskDefaults, UnitError, normalise_grant_path, parse_duration, parse_memory,
};
use rustpython_parser::Parse;
use rustpython_parser::ast::{self, Constant, Expr, Ranged, Stmt};
use rustpython_parser::source_code::RandomLocator;
use rustpython_parser::text_size::TextSize;

/// One problem in the source, located for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.path, self.line, self.column, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Every problem found in one pass, in source order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// A `@task` function and its limits, as written in the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredTask {
    pub name: String,
    /// The Python function's name (top level of the module).
    pub function: String,
    pub line: usize,
    pub compute: Compute,
    pub memory_bytes: u64,
    pub timeout: Option<Duration>,
    pub max_retries: u32,
    pub env: BTreeMap<String, String>,
    pub env_passthrough: Vec<String>,
    pub allowed_hosts: Vec<String>,
    pub allowed_files: Vec<FileGrant>,
}

/// A parsed module: its tasks and the modules it imports (for bundling local modules).
#[derive(Debug, Clone, Default)]
pub struct ModuleInfo {
    pub tasks: Vec<DiscoveredTask>,
    /// Absolute imports, e.g. `helpers.text` for `from helpers.text import x`.
    pub imports: BTreeSet<String>,
}

const OPTIONS: &[&str] = &[
    "name",
    "compute",
    "ram",
    "timeout",
    "max_retries",
    "env_vars",
    "env_passthrough",
    "allowed_hosts",
    "allowed_files",
];

struct Parser<'a> {
    path: &'a str,
    locator: RandomLocator<'a>,
    problems: Vec<Diagnostic>,
}

impl Parser<'_> {
    fn report(&mut self, at: TextSize, message: impl Into<String>, hint: Option<String>) {
        let location = self.locator.locate(at);
        self.problems.push(Diagnostic {
            path: self.path.to_string(),
            line: location.row.get() as usize,
            column: location.column.get() as usize,
            message: message.into(),
            hint,
        });
    }
}

/// Parses `source` (shown to the user as `path`) and lists its tasks and imports; options a
/// task leaves out take the value of `defaults`.
pub fn parse_module(source: &str, path: &str, defaults: &TaskDefaults) -> Result<ModuleInfo, Diagnostics> {
    let mut parser = Parser { path, locator: RandomLocator::new(source), problems: Vec::new() };
    let suite = match ast::Suite::parse(source, path) {
        Ok(suite) => suite,
        Err(error) => {
            parser.report(
                error.offset,
                format!("syntax error: {}", error.error),
                Some("`capsule build` reads the file as Python 3 source; fix the syntax and rebuild".into()),
            );
            return Err(Diagnostics(parser.problems));
        }
    };

    let aliases = TaskAliases::collect(&suite);
    let mut info = ModuleInfo::default();
    collect_imports(&suite, &mut info.imports);
    for stmt in &suite {
        let (name, decorators, is_async) = match stmt {
            Stmt::FunctionDef(def) => (def.name.as_str(), &def.decorator_list, false),
            Stmt::AsyncFunctionDef(def) => (def.name.as_str(), &def.decorator_list, true),
            _ => continue,
        };
        for decorator in decorators {
            let Some(call) = aliases.match_decorator(decorator) else { continue };
            if is_async {
                parser.report(
                    stmt.start(),
                    format!("`@task` cannot decorate `async def {name}`"),
                    Some("make it a plain `def`; tasks run to completion in their own sandbox".into()),
                );
                continue;
            }
            let line = parser.locator.locate(stmt.start()).row.get() as usize;
            if let Some(task) = parse_options(&mut parser, name, line, call, defaults) {
                info.tasks.push(task);
            }
        }
    }
    check_duplicate_names(&mut parser, &info.tasks, &suite);
    if parser.problems.is_empty() { Ok(info) } else { Err(Diagnostics(parser.problems)) }
}

/// The names under which `task` is reachable: `from capsule import task as t`,
/// `import capsule as c` (then `@c.task`).
#[derive(Default)]
struct TaskAliases {
    decorators: BTreeSet<String>,
    modules: BTreeSet<String>,
}

impl TaskAliases {
    fn collect(suite: &[Stmt]) -> Self {
        let mut aliases = Self::default();
        for stmt in suite {
            match stmt {
                Stmt::ImportFrom(import) if import.module.as_deref() == Some("capsule") && level(import) == 0 => {
                    for alias in &import.names {
                        if alias.name.as_str() == "task" {
                            let local = alias.asname.as_ref().unwrap_or(&alias.name);
                            aliases.decorators.insert(local.to_string());
                        }
                    }
                }
                Stmt::Import(import) => {
                    for alias in &import.names {
                        if alias.name.as_str() == "capsule" {
                            let local = alias.asname.as_ref().unwrap_or(&alias.name);
                            aliases.modules.insert(local.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        aliases
    }

    fn is_task(&self, expr: &Expr) -> bool {
        match expr {
            Expr::Name(name) => self.decorators.contains(name.id.as_str()),
            Expr::Attribute(attr) => {
                attr.attr.as_str() == "task"
                    && matches!(&*attr.value, Expr::Name(module) if self.modules.contains(module.id.as_str()))
            }
            _ => false,
        }
    }

    /// `Some(None)` for a bare `@task`, `Some(Some(call))` for `@task(...)`.
    fn match_decorator<'e>(&self, decorator: &'e Expr) -> Option<Option<&'e ast::ExprCall>> {
        match decorator {
            Expr::Call(call) if self.is_task(&call.func) => Some(Some(call)),
            other if self.is_task(other) => Some(None),
            _ => None,
        }
    }
}

fn level(import: &ast::StmtImportFrom) -> u32 {
    import.level.map_or(0, |l| l.to_u32())
}

fn collect_imports(body: &[Stmt], imports: &mut BTreeSet<String>) {
    for stmt in body {
        match stmt {
            Stmt::Import(import) => {
                imports.extend(import.names.iter().map(|a| a.name.to_string()));
            }
            Stmt::ImportFrom(import) if level(import) == 0 => {
                if let Some(module) = &import.module {
                    imports.insert(module.to_string());
                    // `from pkg import sub` may name a submodule.
                    for alias in &import.names {
                        imports.insert(format!("{module}.{}", alias.name));
                    }
                }
            }
            Stmt::FunctionDef(def) => collect_imports(&def.body, imports),
            Stmt::AsyncFunctionDef(def) => collect_imports(&def.body, imports),
            Stmt::ClassDef(def) => collect_imports(&def.body, imports),
            Stmt::If(s) => {
                collect_imports(&s.body, imports);
                collect_imports(&s.orelse, imports);
            }
            Stmt::For(s) => {
                collect_imports(&s.body, imports);
                collect_imports(&s.orelse, imports);
            }
            Stmt::While(s) => {
                collect_imports(&s.body, imports);
                collect_imports(&s.orelse, imports);
            }
            Stmt::With(s) => collect_imports(&s.body, imports),
            Stmt::Try(s) => {
                collect_imports(&s.body, imports);
                for handler in &s.handlers {
                    let ast::ExceptHandler::ExceptHandler(h) = handler;
                    collect_imports(&h.body, imports);
                }
                collect_imports(&s.orelse, imports);
                collect_imports(&s.finalbody, imports);
            }
            _ => {}
        }
    }
}

fn parse_options(
    parser: &mut Parser<'_>,
    function: &str,
    line: usize,
    call: Option<&ast::ExprCall>,
    defaults: &TaskDefaults,
) -> Option<DiscoveredTask> {
    let mut task = DiscoveredTask {
        name: function.to_string(),
        function: function.to_string(),
        line,
        compute: defaults.compute,
        memory_bytes: defaults.memory_bytes,
        timeout: defaults.timeout,
        max_retries: defaults.max_retries,
        env: BTreeMap::new(),
        env_passthrough: Vec::new(),
        allowed_hosts: Vec::new(),
        allowed_files: Vec::new(),
    };
    let Some(call) = call else { return Some(task) };
    let before = parser.problems.len();
    if let Some(arg) = call.args.first() {
        parser.report(
            arg.start(),
            "`@task` takes only keyword options",
            Some("write options by name, e.g. `@task(name=\"fetch\", timeout=\"30s\")`".into()),
        );
    }
    for keyword in &call.keywords {
        let Some(option) = &keyword.arg else {
            parser.report(keyword.start(), "`@task(**options)` cannot be read at build time", Some(literal_hint()));
            continue;
        };
        let value = &keyword.value;
        match option.as_str() {
            "name" => match string_literal(value) {
                Some(name) if !name.is_empty() => task.name = name.to_string(),
                _ => parser.report(value.start(), "`name` must be a non-empty string literal", Some(literal_hint())),
            },
            "compute" => {
                let parsed = match (string_literal(value), int_literal(value)) {
                    (Some(text), _) => Some(Compute::parse(text)),
                    (None, Some(fuel)) => {
                        Some(u64::try_from(fuel).map_err(|_| negative("compute")).and_then(Compute::from_fuel))
                    }
                    _ => None,
                };
                match parsed {
                    Some(Ok(compute)) => task.compute = compute,
                    Some(Err(error)) => report_unit(parser, value, "compute", error),
                    None => parser.report(
                        value.start(),
                        "`compute` must be a string or integer literal",
                        Some(literal_hint()),
                    ),
                }
            }
            "ram" => match (string_literal(value).map(parse_memory), int_literal(value)) {
                (Some(Ok(bytes)), _) => task.memory_bytes = bytes,
                (Some(Err(error)), _) => report_unit(parser, value, "ram", error),
                (None, Some(number)) => parser.report(
                    value.start(),
                    format!("`ram={number}` has no unit"),
                    Some(format!(
                        "write it as a string with a unit, e.g. `ram=\"{number}MB\"` or `ram=\"{number}MiB\"`"
                    )),
                ),
                (None, None) => parser.report(
                    value.start(),
                    "`ram` must be a string literal such as \"256MB\"",
                    Some(literal_hint()),
                ),
            },
            "timeout" => match string_literal(value).map(parse_duration) {
                Some(Ok(duration)) => task.timeout = Some(duration),
                Some(Err(error)) => report_unit(parser, value, "timeout", error),
                None => parser.report(
                    value.start(),
                    "`timeout` must be a string literal such as \"30s\"",
                    Some(literal_hint()),
                ),
            },
            "max_retries" => match int_literal(value).map(u32::try_from) {
                Some(Ok(retries)) => task.max_retries = retries,
                _ => {
                    parser.report(value.start(), "`max_retries` must be an integer literal >= 0", Some(literal_hint()))
                }
            },
            "env_vars" => match string_dict(value) {
                Some(env) => task.env = env,
                None => parser.report(
                    value.start(),
                    "`env_vars` must be a dict literal of strings to strings",
                    Some("write it inline, e.g. `env_vars={\"MODE\": \"prod\"}`".into()),
                ),
            },
            "env_passthrough" => match string_list(value) {
                Some(names) => match names.iter().find(|n| task.env.contains_key(*n) || !is_env_name(n)) {
                    Some(name) => parser.report(
                        value.start(),
                        format!("`{name}` in `env_passthrough` is not a usable environment variable name, or is also in `env_vars`"),
                        Some("list names such as \"API_TOKEN\" (letters, digits, `_`), each once".into()),
                    ),
                    None => task.env_passthrough = names,
                },
                None => parser.report(value.start(), "`env_passthrough` must be a list of string literals", Some(literal_hint())),
            },
            "allowed_hosts" => match string_list(value) {
                Some(rules) => match manifest_schema::HostPolicy::parse(&rules) {
                    Ok(_) => task.allowed_hosts = rules,
                    Err(error) => report_unit(parser, value, "allowed_hosts", error),
                },
                None => parser.report(value.start(), "`allowed_hosts` must be a list of string literals", Some(literal_hint())),
            },
            "allowed_files" => match file_grants(value) {
                Ok(grants) => task.allowed_files = grants,
                Err((at, error)) => parser.report(at, format!("invalid `allowed_files`: {}", error.message), error.hint),
            },
            unknown => {
                let hint = match closest(unknown, OPTIONS) {
                    Some(close) => format!("did you mean `{close}`? `@task` takes {}", list(OPTIONS)),
                    None => format!("`@task` takes {}", list(OPTIONS)),
                };
                parser.report(keyword.start(), format!("unknown `@task` option `{unknown}`"), Some(hint));
            }
        }
    }
    (parser.problems.len() == before).then_some(task)
}

fn negative(option: &str) -> UnitError {
    UnitError { message: format!("`{option}` cannot be negative"), hint: None }
}

fn report_unit(parser: &mut Parser<'_>, value: &Expr, option: &str, error: UnitError) {
    parser.report(value.start(), format!("invalid `{option}`: {}", error.message), error.hint);
}

fn literal_hint() -> String {
    "options are read before any code runs, so they must be literals, not variables or expressions".into()
}

fn list(options: &[&str]) -> String {
    options.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ")
}

fn string_literal(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Constant(c) => match &c.value {
            Constant::Str(s) => Some(s.as_str()),
            _ => None,
        },
        _ => None,
    }
}

fn int_literal(expr: &Expr) -> Option<i128> {
    match expr {
        Expr::Constant(c) => match &c.value {
            Constant::Int(i) => i.to_string().parse().ok(),
            _ => None,
        },
        Expr::UnaryOp(op) if matches!(op.op, ast::UnaryOp::USub) => int_literal(&op.operand).map(|i| -i),
        _ => None,
    }
}

fn string_list(expr: &Expr) -> Option<Vec<String>> {
    let items = match expr {
        Expr::List(list) => &list.elts,
        Expr::Tuple(tuple) => &tuple.elts,
        _ => return None,
    };
    items.iter().map(|item| string_literal(item).map(str::to_string)).collect()
}

/// `["./data", {"path": "./out", "mode": "read-write"}]`, located at the faulty element.
fn file_grants(expr: &Expr) -> Result<Vec<FileGrant>, (TextSize, UnitError)> {
    let shape = |at: TextSize| {
        (
            at,
            UnitError {
                message: "write a list of folders: strings, or dicts with `path` and `mode`".into(),
                hint: Some("e.g. `allowed_files=[\"./data\", {\"path\": \"./out\", \"mode\": \"read-write\"}]`".into()),
            },
        )
    };
    let items = match expr {
        Expr::List(list) => &list.elts,
        Expr::Tuple(tuple) => &tuple.elts,
        _ => return Err(shape(expr.start())),
    };
    let mut grants = Vec::new();
    for item in items {
        let (path, mode) = match item {
            Expr::Dict(dict) => {
                let (mut path, mut mode) = (None, FileMode::ReadOnly);
                for (key, value) in dict.keys.iter().zip(&dict.values) {
                    match key.as_ref().and_then(string_literal) {
                        Some("path") => path = Some(string_literal(value).ok_or_else(|| shape(value.start()))?),
                        Some("mode") => {
                            let text = string_literal(value).ok_or_else(|| shape(value.start()))?;
                            mode = FileMode::parse(text).map_err(|e| (value.start(), e))?;
                        }
                        _ => return Err(shape(key.as_ref().map_or(item.start(), |k| k.start()))),
                    }
                }
                (path.ok_or_else(|| shape(item.start()))?, mode)
            }
            other => (string_literal(other).ok_or_else(|| shape(other.start()))?, FileMode::ReadOnly),
        };
        let path = normalise_grant_path(path).map_err(|e| (item.start(), e))?;
        grants.push(FileGrant { path, mode });
    }
    Ok(grants)
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn string_dict(expr: &Expr) -> Option<BTreeMap<String, String>> {
    let Expr::Dict(dict) = expr else { return None };
    let mut env = BTreeMap::new();
    for (key, value) in dict.keys.iter().zip(&dict.values) {
        let key = string_literal(key.as_ref()?)?;
        env.insert(key.to_string(), string_literal(value)?.to_string());
    }
    Some(env)
}

fn check_duplicate_names(parser: &mut Parser<'_>, tasks: &[DiscoveredTask], suite: &[Stmt]) {
    let mut first_line: BTreeMap<&str, usize> = BTreeMap::new();
    for task in tasks {
        if let Some(line) = first_line.get(task.name.as_str()) {
            let at = suite
                .iter()
                .find(|s| parser.locator.locate(s.start()).row.get() as usize == task.line)
                .map_or(TextSize::from(0), |s| s.start());
            parser.report(
                at,
                format!("task name `{}` is already used by the task on line {line}", task.name),
                Some("give one of them another `name=`".into()),
            );
        } else {
            first_line.insert(&task.name, task.line);
        }
    }
}

/// The candidate within edit distance 2 of `word`, or one that contains it (`retries`).
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| c)
        .or_else(|| candidates.iter().copied().find(|c| word.len() >= 3 && c.contains(word)))
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(source: &str) -> Vec<DiscoveredTask> {
        parse_module(source, "main.py", &TaskDefaults::default()).unwrap().tasks
    }

    #[test]
    fn finds_every_import_form() {
        let found = tasks(
            "from capsule import task\nimport capsule\nimport capsule as cap\nfrom capsule import task as t\n\
             @task\ndef a(): pass\n@capsule.task\ndef b(): pass\n@cap.task(name='c2')\ndef c(): pass\n@t()\ndef d(): pass\n\
             @other\ndef e(): pass\n",
        );
        let names: Vec<&str> = found.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c2", "d"]);
        assert_eq!(found[2].function, "c");
        assert_eq!(found[2].line, 10, "the line of `def`, as in Python tracebacks");
    }

    #[test]
    fn reads_options() {
        let found = tasks(
            "from capsule import task\n@task(name='x', compute='HIGH', ram='64MB', timeout='500ms', max_retries=3, env_vars={'A': 'b'})\ndef f(): pass\n\
             @task(compute=1000)\ndef g(): pass\n@task(compute='2000')\ndef h(): pass\n",
        );
        assert_eq!(found[0].compute, Compute::High);
        assert_eq!(found[0].memory_bytes, 64_000_000);
        assert_eq!(found[0].timeout, Some(Duration::from_millis(500)));
        assert_eq!(found[0].max_retries, 3);
        assert_eq!(found[0].env["A"], "b");
        assert_eq!(found[1].compute, Compute::Fuel(1000));
        assert_eq!(found[2].compute, Compute::Fuel(2000));
        assert_eq!(found[1].memory_bytes, manifest_schema::defaults::MEMORY_BYTES);
    }

    #[test]
    fn unrelated_task_decorators_are_ignored() {
        assert!(tasks("from celery import task\n@task\ndef f(): pass\n").is_empty());
    }

    #[test]
    fn collects_absolute_imports() {
        let info = parse_module(
            "import json\nfrom helpers.text import shout\ndef f():\n    import util\n    from . import rel\n",
            "main.py",
            &TaskDefaults::default(),
        )
        .unwrap();
        let imports: Vec<&str> = info.imports.iter().map(String::as_str).collect();
        assert_eq!(imports, ["helpers.text", "helpers.text.shout", "json", "util"]);
    }

    #[test]
    fn suggests_close_option_names() {
        assert_eq!(closest("rma", OPTIONS), Some("ram"));
        assert_eq!(closest("timout", OPTIONS), Some("timeout"));
        assert_eq!(closest("retries", OPTIONS), Some("max_retries"));
        assert_eq!(closest("colour", OPTIONS), None);
    }
}
