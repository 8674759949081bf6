//! Finds the `@task` functions of a Python file by parsing it, before any Python runs.
//!
//! Options must be literals so that limits are known at build time and can be written into
//! the manifest; anything else is reported with the file, line and column, and a hint.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use manifest_schema::TaskOptions;
use manifest_schema::options::{self, Literal, TaskSpec, Value};
use ruff_python_ast::{self as ast, Expr, Number, PythonVersion, Stmt};
use ruff_python_parser::ParseOptions;
use ruff_source_file::{LineIndex, OneIndexed};
use ruff_text_size::{Ranged, TextSize};

/// One problem in the source, located for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

/// The located message; its hint is shown by the front door's renderer, never pasted in.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.path, self.line, self.column, self.message)
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

impl manifest_schema::Explain for Diagnostics {
    fn category(&self) -> manifest_schema::Category {
        manifest_schema::Category::Build
    }

    fn problems(&self) -> Vec<manifest_schema::Problem> {
        self.0.iter().map(|d| manifest_schema::Problem { message: d.to_string(), hint: d.hint.clone() }).collect()
    }
}

/// A `@task` function and its options, as written in the source over the project's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveredTask {
    pub name: String,
    /// The Python function's name (top level of the module).
    pub function: String,
    pub line: usize,
    pub options: TaskOptions,
    pub signature: manifest_schema::Signature,
}

/// A parsed module: its tasks and the modules it imports (for bundling local modules).
#[derive(Debug, Clone, Default)]
pub struct ModuleInfo {
    pub tasks: Vec<DiscoveredTask>,
    /// Absolute imports, e.g. `helpers.text` for `from helpers.text import x`.
    pub imports: BTreeSet<String>,
}

/// The Python the runtime runs: discovery accepts its grammar, no later one.
const PYTHON: PythonVersion = PythonVersion::PY313;

struct Parser<'a> {
    path: &'a str,
    source: &'a str,
    lines: LineIndex,
    problems: Vec<Diagnostic>,
}

impl Parser<'_> {
    fn line(&self, at: TextSize) -> usize {
        self.lines.line_index(at).get()
    }

    fn report(&mut self, at: TextSize, message: impl Into<String>, hint: Option<String>) {
        let location = self.lines.line_column(at, self.source);
        self.problems.push(Diagnostic {
            path: self.path.to_string(),
            line: location.line.get(),
            column: location.column.get(),
            message: message.into(),
            hint,
        });
    }
}

/// `source` parsed as Python 3.13 parses it: the located problem, when it does not.
fn parse_suite(parser: &mut Parser<'_>) -> Option<ast::Suite> {
    let hint = || Some("`capsule build` reads the file as Python 3.13 source; fix the syntax and rebuild".to_string());
    if let Some((line, cookie)) = parser.source.strip_prefix('\u{feff}').and_then(coding_cookie)
        && !names_utf8(cookie)
    {
        let at = parser.lines.line_start(line, parser.source);
        parser.report(
            at,
            format!("encoding problem: the file starts with a UTF-8 mark but declares `{cookie}`"),
            hint(),
        );
        return None;
    }
    let options = ParseOptions::from(ruff_python_ast::PySourceType::Python).with_target_version(PYTHON);
    let parsed = match ruff_python_parser::parse(parser.source, options) {
        Ok(parsed) => parsed,
        Err(error) => {
            parser.report(error.location.start(), format!("syntax error: {}", error.error), hint());
            return None;
        }
    };
    if let Some(newer) = parsed.unsupported_syntax_errors().first() {
        parser.report(newer.range.start(), format!("syntax error: {newer}"), hint());
        return None;
    }
    parsed.try_into_module().map(|module| module.into_syntax().body)
}

/// The PEP 263 encoding declaration (`# -*- coding: NAME -*-`) on the first line, or on the
/// second after a comment or blank first line: its line and name.
fn coding_cookie(source: &str) -> Option<(OneIndexed, &str)> {
    for (index, line) in source.lines().take(2).enumerate() {
        let text = line.trim_start_matches([' ', '\t', '\x0c']);
        if text.is_empty() {
            continue;
        }
        if !text.starts_with('#') {
            return None;
        }
        if let Some(at) = text.find("coding").filter(|at| matches!(text.as_bytes().get(at + 6), Some(b':' | b'='))) {
            let name = text[at + 7..].trim_start_matches([' ', '\t']);
            let end = name.find(|c: char| !(c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))).unwrap_or(name.len());
            return Some((OneIndexed::from_zero_indexed(index), &name[..end]));
        }
    }
    None
}

/// Whether CPython's tokenizer takes `name` for UTF-8 itself, which a file starting with the
/// UTF-8 byte-order mark must declare (it takes `utf8` for another name).
fn names_utf8(name: &str) -> bool {
    let normal = name.to_ascii_lowercase().replace('_', "-");
    normal == "utf-8" || normal.starts_with("utf-8-")
}

/// Parses `source` (shown to the user as `path`) and lists its tasks and imports; options a
/// task leaves out take the value of `defaults`.
pub fn parse_module(source: &str, path: &str, defaults: &TaskOptions) -> Result<ModuleInfo, Diagnostics> {
    let mut parser = Parser { path, source, lines: LineIndex::from_source_text(source), problems: Vec::new() };
    let Some(suite) = parse_suite(&mut parser) else { return Err(Diagnostics(parser.problems)) };

    let aliases = TaskAliases::collect(&suite);
    let mut info = ModuleInfo::default();
    collect_imports(&suite, &mut info.imports);
    for stmt in &suite {
        let Stmt::FunctionDef(def) = stmt else { continue };
        let name = def.name.as_str();
        for decorator in &def.decorator_list {
            let Some(call) = aliases.match_decorator(&decorator.expression) else { continue };
            if def.is_async {
                // At `async`: tasks are top level, so the line's start.
                let at = parser.lines.line_start(parser.lines.line_index(def.name.start()), source);
                parser.report(
                    at,
                    format!("`@task` cannot decorate `async def {name}`"),
                    Some("make it a plain `def`; tasks run to completion in their own sandbox".into()),
                );
                continue;
            }
            // The line of `def`, as tracebacks show it.
            let line = parser.line(def.name.start());
            if let Some(mut task) = parse_options(&mut parser, name, line, call, defaults) {
                task.signature = crate::signature::read(&def.parameters, &def.body);
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
                Stmt::ImportFrom(import)
                    if import.module.as_ref().map(|m| m.as_str()) == Some("capsule") && import.level == 0 =>
                {
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

fn collect_imports(body: &[Stmt], imports: &mut BTreeSet<String>) {
    for stmt in body {
        match stmt {
            Stmt::Import(import) => {
                imports.extend(import.names.iter().map(|a| a.name.to_string()));
            }
            Stmt::ImportFrom(import) if import.level == 0 => {
                if let Some(module) = &import.module {
                    imports.insert(module.to_string());
                    // `from pkg import sub` may name a submodule.
                    for alias in &import.names {
                        imports.insert(format!("{module}.{}", alias.name));
                    }
                }
            }
            Stmt::FunctionDef(def) => collect_imports(&def.body, imports),
            Stmt::ClassDef(def) => collect_imports(&def.body, imports),
            Stmt::If(s) => {
                collect_imports(&s.body, imports);
                for clause in &s.elif_else_clauses {
                    collect_imports(&clause.body, imports);
                }
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
            Stmt::Match(s) => {
                for case in &s.cases {
                    collect_imports(&case.body, imports);
                }
            }
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
    defaults: &TaskOptions,
) -> Option<DiscoveredTask> {
    let mut spec = TaskSpec { name: None, options: defaults.clone() };
    let before = parser.problems.len();
    if let Some(call) = call {
        if let Some(arg) = call.arguments.args.first() {
            parser.report(
                arg.start(),
                "`@task` takes only keyword options",
                Some("write options by name, e.g. `@task(name=\"fetch\", timeout=\"30s\")`".into()),
            );
        }
        for keyword in &call.arguments.keywords {
            let Some(name) = &keyword.arg else {
                parser.report(
                    keyword.start(),
                    "`@task(**options)` cannot be read at build time",
                    Some("write each option by name, with its value".into()),
                );
                continue;
            };
            let Some(option) = options::option(name.as_str()) else {
                let takes = format!(
                    "`@task` takes {}",
                    options::option_names().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ")
                );
                let hint = match options::closest_option(name.as_str()) {
                    Some(close) => format!("did you mean `{close}`? {takes}"),
                    None => takes,
                };
                parser.report(keyword.start(), format!("unknown `@task` option `{name}`"), Some(hint));
                continue;
            };
            let value = match literal(&keyword.value) {
                Ok(value) => value,
                Err(_) => {
                    let problem = option.not_a_literal();
                    parser.report(keyword.value.start(), problem.message, problem.hint);
                    continue;
                }
            };
            if let Err(error) = option.apply(&mut spec, &value) {
                let mut message = error.problem.message;
                if !message.starts_with(&format!("`{name}")) {
                    message = format!("invalid `{name}`: {message}");
                }
                parser.report(TextSize::from(error.at), message, error.problem.hint);
            }
        }
        if let Err((option, problem)) = spec.options.validate() {
            let at = call
                .arguments
                .keywords
                .iter()
                .find(|k| k.arg.as_ref().map(|a| a.as_str()) == Some(option))
                .map_or(call.start(), |k| k.value.start());
            parser.report(at, problem.message, problem.hint);
        }
    }
    let name = spec.name.unwrap_or_else(|| function.to_string());
    (parser.problems.len() == before).then(|| DiscoveredTask {
        name,
        function: function.to_string(),
        line,
        options: spec.options,
        signature: manifest_schema::Signature::default(),
    })
}

/// The literal `expr` is, or the offset of the part of it that is not a literal.
fn literal(expr: &Expr) -> Result<Literal, TextSize> {
    let at = u32::from(expr.start());
    let items = |elements: &[Expr]| elements.iter().map(literal).collect::<Result<Vec<_>, _>>();
    let value = match expr {
        Expr::StringLiteral(text) => Value::Str(text.value.to_str().to_string()),
        Expr::NumberLiteral(number) => match &number.value {
            Number::Int(int) => Value::Int(int.to_string().parse().map_err(|_| expr.start())?),
            Number::Float(x) => Value::Float(*x),
            Number::Complex { .. } => return Err(expr.start()),
        },
        Expr::BooleanLiteral(b) => Value::Bool(b.value),
        Expr::NoneLiteral(_) => Value::None,
        Expr::UnaryOp(op) if matches!(op.op, ast::UnaryOp::USub) => match literal(&op.operand)?.value {
            Value::Int(n) => Value::Int(-n),
            Value::Float(x) => Value::Float(-x),
            _ => return Err(expr.start()),
        },
        Expr::List(list) => Value::List(items(&list.elts)?),
        Expr::Tuple(tuple) => Value::List(items(&tuple.elts)?),
        Expr::Dict(dict) => Value::Dict(
            dict.items
                .iter()
                .map(|item| {
                    let key = item.key.as_ref().ok_or(item.value.start())?;
                    Ok::<_, TextSize>((literal(key)?, literal(&item.value)?))
                })
                .collect::<Result<_, TextSize>>()?,
        ),
        _ => return Err(expr.start()),
    };
    Ok(Literal { value, at })
}

fn check_duplicate_names(parser: &mut Parser<'_>, tasks: &[DiscoveredTask], suite: &[Stmt]) {
    let mut first_line: BTreeMap<&str, usize> = BTreeMap::new();
    for task in tasks {
        if let Some(line) = first_line.get(task.name.as_str()) {
            let at = suite
                .iter()
                .filter_map(|s| if let Stmt::FunctionDef(def) = s { Some(def.name.start()) } else { None })
                .find(|at| parser.line(*at) == task.line)
                .unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use manifest_schema::{ByteSize, Compute, Timeout};

    use super::*;

    fn tasks(source: &str) -> Vec<DiscoveredTask> {
        parse_module(source, "main.py", &TaskOptions::default()).unwrap().tasks
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
        let options = &found[0].options;
        assert_eq!(options.compute, Compute::High);
        assert_eq!(options.ram, ByteSize(64_000_000));
        assert_eq!(options.timeout, Some(Timeout(Duration::from_millis(500))));
        assert_eq!(options.max_retries, 3);
        assert_eq!(options.env_vars["A"], "b");
        assert_eq!(found[1].options.compute, Compute::Fuel(1000));
        assert_eq!(found[2].options.compute, Compute::Fuel(2000));
        assert_eq!(found[1].options.ram, manifest_schema::defaults::RAM);
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
            &TaskOptions::default(),
        )
        .unwrap();
        let imports: Vec<&str> = info.imports.iter().map(String::as_str).collect();
        assert_eq!(imports, ["helpers.text", "helpers.text.shout", "json", "util"]);
    }

    /// Fuzz target: discovery answers any source, however damaged, with tasks or located
    /// problems, never a panic.
    #[test]
    fn fuzzed_sources_get_tasks_or_located_problems_never_a_panic() {
        let seeds: Vec<String> = ["valid/multi_task.py", "valid/modern_syntax.py", "invalid/several_problems.py"]
            .iter()
            .map(|f| std::fs::read_to_string(fixtures::path(f)).unwrap())
            .collect();
        bolero::check!().with_iterations(fixtures::fuzz_iterations()).for_each(|noise: &[u8]| {
            let seed = &seeds[usize::from(noise.first().copied().unwrap_or(0)) % seeds.len()];
            let source = fixtures::mutate(seed, noise);
            if let Err(Diagnostics(problems)) = parse_module(&source, "main.py", &TaskOptions::default()) {
                assert!(!problems.is_empty());
                for problem in problems {
                    assert!(problem.line >= 1 && problem.line <= source.lines().count().max(1) + 1, "{problem:?}");
                }
            }
        });
    }

    /// The native CPython that `cargo xtask build-runtime` builds from the pinned tarball (the
    /// runtime's own version), and the source tree holding its `Lib`.
    fn native_cpython() -> (std::path::PathBuf, std::path::PathBuf) {
        let link = python_runtime::runtime_path().parent().expect("runtime folder").join("native-python");
        let build = std::fs::canonicalize(&link)
            .ok()
            .filter(|dir| dir.join(".complete").exists())
            .unwrap_or_else(|| panic!("no native CPython at {}: run `cargo xtask build-runtime`", link.display()));
        let source = std::fs::read_dir(&build).unwrap().flatten().map(|e| e.path()).find(|p| p.is_dir()).unwrap();
        (source.join("cross-build/build/python"), source)
    }

    fn python_files(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                python_files(&path, found);
            } else if path.extension().is_some_and(|e| e == "py") {
                found.push(path);
            }
        }
    }

    /// Every `.py` of CPython's own `Lib` (its test suite included, with its deliberately
    /// broken files) gets the verdict `ast.parse` of the same CPython gives it.
    #[test]
    fn accepts_and_refuses_what_cpython_does_across_its_own_library() {
        use std::io::Write;
        let (python, source) = native_cpython();
        let mut files = Vec::new();
        python_files(&source.join("Lib"), &mut files);
        files.sort();
        // Discovery reads UTF-8 text; files in another encoding are out of its scope.
        let texts: Vec<(std::path::PathBuf, String)> =
            files.into_iter().filter_map(|path| Some((path.clone(), std::fs::read_to_string(&path).ok()?))).collect();
        assert!(texts.len() > 1500, "CPython's Lib has about 2000 modules, found {}", texts.len());

        let verdicts_script = "import ast, sys\n\
            for path in sys.stdin.read().splitlines():\n\
            \x20   try:\n\
            \x20       ast.parse(open(path, encoding='utf-8').read(), path)\n\
            \x20       print('ok')\n\
            \x20   except (SyntaxError, ValueError):\n\
            \x20       print('error')\n";
        let mut child = std::process::Command::new(&python)
            .args(["-I", "-c", verdicts_script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
        let list: String = texts.iter().map(|(path, _)| format!("{}\n", path.display())).collect();
        child.stdin.take().unwrap().write_all(list.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let verdicts: Vec<bool> = String::from_utf8(output.stdout).unwrap().lines().map(|l| l == "ok").collect();
        assert_eq!(verdicts.len(), texts.len());

        let mut disagreements = Vec::new();
        for ((path, text), cpython_accepts) in texts.iter().zip(verdicts) {
            let mut parser =
                Parser { path: "", source: text, lines: LineIndex::from_source_text(text), problems: Vec::new() };
            let accepted = parse_suite(&mut parser).is_some();
            if accepted != cpython_accepts {
                let why = parser.problems.first().map_or(String::new(), |p| format!(" ({}:{})", p.line, p.message));
                disagreements.push(format!("{}: cpython {cpython_accepts}, capsule {accepted}{why}", path.display()));
            }
        }
        assert!(disagreements.is_empty(), "{} disagreements:\n{}", disagreements.len(), disagreements.join("\n"));
    }
}
