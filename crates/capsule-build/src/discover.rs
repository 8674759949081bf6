//! Finds the `@task` functions of a Python file by parsing it, before any Python runs.
//!
//! Options must be literals so that limits are known at build time and can be written into
//! the manifest; anything else is reported with the file, line and column, and a hint.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use manifest_schema::TaskOptions;
use manifest_schema::options::{self, Literal, TaskSpec, Value};
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

impl manifest_schema::Explain for Diagnostics {
    fn problems(&self) -> Vec<manifest_schema::Problem> {
        self.0
            .iter()
            .map(|d| manifest_schema::Problem {
                message: format!("{}:{}:{}: {}", d.path, d.line, d.column, d.message),
                hint: d.hint.clone(),
            })
            .collect()
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
pub fn parse_module(source: &str, path: &str, defaults: &TaskOptions) -> Result<ModuleInfo, Diagnostics> {
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
        let (name, decorators, is_async, arguments, body) = match stmt {
            Stmt::FunctionDef(def) => (def.name.as_str(), &def.decorator_list, false, &def.args, &def.body),
            Stmt::AsyncFunctionDef(def) => (def.name.as_str(), &def.decorator_list, true, &def.args, &def.body),
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
            if let Some(mut task) = parse_options(&mut parser, name, line, call, defaults) {
                task.signature = crate::signature::read(arguments, body);
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
    defaults: &TaskOptions,
) -> Option<DiscoveredTask> {
    let mut spec = TaskSpec { name: None, options: defaults.clone() };
    let before = parser.problems.len();
    if let Some(call) = call {
        if let Some(arg) = call.args.first() {
            parser.report(
                arg.start(),
                "`@task` takes only keyword options",
                Some("write options by name, e.g. `@task(name=\"fetch\", timeout=\"30s\")`".into()),
            );
        }
        for keyword in &call.keywords {
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
                .keywords
                .iter()
                .find(|k| k.arg.as_deref() == Some(option))
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
        Expr::Constant(constant) => match &constant.value {
            Constant::Str(text) => Value::Str(text.clone()),
            Constant::Int(int) => Value::Int(int.to_string().parse().map_err(|_| expr.start())?),
            Constant::Float(x) => Value::Float(*x),
            Constant::Bool(b) => Value::Bool(*b),
            Constant::None => Value::None,
            _ => return Err(expr.start()),
        },
        Expr::UnaryOp(op) if matches!(op.op, ast::UnaryOp::USub) => match literal(&op.operand)?.value {
            Value::Int(n) => Value::Int(-n),
            Value::Float(x) => Value::Float(-x),
            _ => return Err(expr.start()),
        },
        Expr::List(list) => Value::List(items(&list.elts)?),
        Expr::Tuple(tuple) => Value::List(items(&tuple.elts)?),
        Expr::Dict(dict) => Value::Dict(
            dict.keys
                .iter()
                .zip(&dict.values)
                .map(|(key, value)| Ok::<_, TextSize>((literal(key.as_ref().ok_or(value.start())?)?, literal(value)?)))
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
}
