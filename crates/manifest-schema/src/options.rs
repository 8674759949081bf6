//! The `@task` options: their typed values ([`TaskOptions`]) and the one table
//! ([`OPTIONS`]) that turns a literal written in Python source or in `capsule.toml` into
//! them. Discovery, `capsule.toml` defaults, the manifest and the build key all go through
//! here; ARCHITECTURE.md has the recipe for adding an option.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::files::{FileGrant, FileMode, normalise_grant_path};
use crate::hosts::{HostPolicy, HostRule};
use crate::problem::Problem;
use crate::units::{ByteSize, Compute, Timeout, parse_duration};

/// Default limits for options a task leaves out.
pub mod defaults {
    use crate::units::{ByteSize, Compute};

    pub const COMPUTE: Compute = Compute::Medium;
    pub const RAM: ByteSize = ByteSize(256 << 20);
    pub const MAX_RETRIES: u32 = 1;
    pub const MAX_WRITTEN: ByteSize = ByteSize(1 << 30);
    pub const MAX_FILES_CREATED: u64 = 10_000;
}

/// Every option of a task but its name, typed, with defaults for those left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskOptions {
    /// CPU budget in Wasm fuel (about one unit per instruction).
    pub compute: Compute,
    /// Limit of the whole linear memory.
    pub ram: ByteSize,
    /// Wall-clock limit per attempt; absent means the runner's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Timeout>,
    /// Further attempts after a retryable failure.
    pub max_retries: u32,
    /// Variables the task sees in `os.environ`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
    /// Names of the runner's own variables the task also sees (values read at run time).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_passthrough: Vec<String>,
    /// Hosts the task may reach over HTTP; empty means no network.
    #[serde(default, skip_serializing_if = "HostPolicy::is_empty")]
    pub allowed_hosts: HostPolicy,
    /// Project folders the task may use; empty means no file system.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_files: Vec<FileGrant>,
    /// Bytes a call may write to files, all together (each attempt starts from zero).
    #[serde(default = "max_written_default", skip_serializing_if = "is_max_written_default")]
    pub max_written: ByteSize,
    /// Files and folders a call may create (each attempt starts from zero).
    #[serde(default = "max_files_created_default", skip_serializing_if = "is_max_files_created_default")]
    pub max_files_created: u64,
    /// Secrets the host adds to the task's HTTP requests, by the name of the runner's
    /// environment variable that holds each value; the values never enter the sandbox.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, Secret>,
}

/// How the host sends one secret: in `header`, as `format` with `{value}` replaced, and only
/// to `hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    pub header: String,
    pub format: String,
    pub hosts: HostPolicy,
}

impl Secret {
    /// Where the secret's value goes in its header.
    pub const PLACEHOLDER: &str = "{value}";

    /// The header's value for the secret's `value`.
    pub fn header_value(&self, value: &str) -> String {
        self.format.replace(Self::PLACEHOLDER, value)
    }
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            compute: defaults::COMPUTE,
            ram: defaults::RAM,
            timeout: None,
            max_retries: defaults::MAX_RETRIES,
            env_vars: BTreeMap::new(),
            env_passthrough: Vec::new(),
            allowed_hosts: HostPolicy::default(),
            allowed_files: Vec::new(),
            max_written: defaults::MAX_WRITTEN,
            max_files_created: defaults::MAX_FILES_CREATED,
            secrets: BTreeMap::new(),
        }
    }
}

// The file quotas are written into a manifest only when a task changes them.
fn max_written_default() -> ByteSize {
    defaults::MAX_WRITTEN
}

fn is_max_written_default(size: &ByteSize) -> bool {
    *size == defaults::MAX_WRITTEN
}

fn max_files_created_default() -> u64 {
    defaults::MAX_FILES_CREATED
}

fn is_max_files_created_default(count: &u64) -> bool {
    *count == defaults::MAX_FILES_CREATED
}

impl TaskOptions {
    /// What no single option can check: the option it concerns, and why.
    pub fn validate(&self) -> Result<(), (&'static str, Problem)> {
        let visible = |name: &String| self.env_vars.contains_key(name) || self.env_passthrough.contains(name);
        if let Some(name) = self.secrets.keys().find(|n| visible(n)) {
            return Err((
                "secrets",
                Problem::hinted(
                    format!(
                        "`{name}` is a secret, and also in `env_vars` or `env_passthrough`, which would show it to the task"
                    ),
                    "keep it in `secrets` only: the host adds it to requests, the task never sees it",
                ),
            ));
        }
        if let Some(name) = self.env_passthrough.iter().find(|n| self.env_vars.contains_key(*n)) {
            return Err((
                "env_passthrough",
                Problem::hinted(
                    format!("`{name}` is both in `env_vars` and in `env_passthrough`"),
                    "keep it in one of them",
                ),
            ));
        }
        Ok(())
    }
}

impl TaskOptions {
    /// The options of a code string (`capsule python`, `run_python`, sessions, MCP), before
    /// what the caller sets: the task defaults, without retries (a cell is not run twice).
    pub fn for_code() -> Self {
        Self { max_retries: 0, ..Self::default() }
    }

    /// `given` (options in the manifest's form, any of them left out) over the options of a
    /// code string: what the daemon's API reads for code strings and sessions.
    /// Refused, in words naming the option at fault, when one is not valid.
    pub fn code_options(given: serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        let mut options = match serde_json::to_value(Self::for_code()).expect("options serialise") {
            serde_json::Value::Object(options) => options,
            _ => unreachable!("options serialise as an object"),
        };
        options.extend(given);
        serde_path_to_error::deserialize(serde_json::Value::Object(options)).map_err(|error| {
            match error.path().to_string().as_str() {
                "." => error.inner().to_string(),
                path => format!("`{path}`: {}", error.inner()),
            }
        })
    }
}

/// A task as declared: its name, if given, and its options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskSpec {
    pub name: Option<String>,
    pub options: TaskOptions,
}

/// A literal value as written in Python source or TOML, with the byte offset where it
/// starts (for locating errors; 0 where there is no source).
#[derive(Debug, Clone, PartialEq)]
pub struct Literal {
    pub value: Value,
    pub at: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i128),
    Float(f64),
    Bool(bool),
    None,
    List(Vec<Literal>),
    Dict(Vec<(Literal, Literal)>),
}

/// An option value that was refused, located at the literal (or item) at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError {
    pub at: u32,
    pub problem: Problem,
}

/// Why a literal did not set an option.
enum Refusal {
    /// The literal (or the item of it at this offset) does not have the option's shape.
    Shape(u32),
    /// It has the shape, but its value is wrong.
    Value(ValueError),
}

impl From<ValueError> for Refusal {
    fn from(error: ValueError) -> Self {
        Self::Value(error)
    }
}

/// One `@task` option: its name, what its values look like, and how a literal sets it.
pub struct OptionSpec {
    pub name: &'static str,
    /// What a value must be, for messages: "a string such as \"30s\"".
    pub expects: &'static str,
    /// Whether `capsule.toml` may set a project-wide `default_<name>`.
    pub has_default: bool,
    apply: fn(&mut TaskSpec, &Literal) -> Result<(), Refusal>,
}

impl OptionSpec {
    pub fn apply(&self, spec: &mut TaskSpec, literal: &Literal) -> Result<(), ValueError> {
        (self.apply)(spec, literal).map_err(|refusal| match refusal {
            Refusal::Value(error) => error,
            Refusal::Shape(at) => ValueError { at, problem: self.not_a_literal() },
        })
    }

    /// The problem with a value that is not a literal of this option's shape.
    pub fn not_a_literal(&self) -> Problem {
        Problem::hinted(
            format!("`{}` must be {}", self.name, self.expects),
            "options are read from the source before any Python runs, so write the value itself, not a variable or an expression",
        )
    }
}

/// Every `@task` option, in the order the documentation lists them. The Python SDK's
/// `TASK_OPTIONS` must name the same (a test checks).
pub static OPTIONS: &[OptionSpec] = &[
    OptionSpec { name: "name", expects: "a non-empty string", has_default: false, apply: set_name },
    OptionSpec {
        name: "compute",
        expects: "\"LOW\", \"MEDIUM\", \"HIGH\" or a number of fuel units",
        has_default: true,
        apply: set_compute,
    },
    OptionSpec { name: "ram", expects: "a string such as \"256MB\"", has_default: true, apply: set_ram },
    OptionSpec { name: "timeout", expects: "a string such as \"30s\"", has_default: true, apply: set_timeout },
    OptionSpec { name: "max_retries", expects: "an integer >= 0", has_default: true, apply: set_max_retries },
    OptionSpec {
        name: "env_vars",
        expects: "a dict of strings to strings, e.g. `{\"MODE\": \"prod\"}`",
        has_default: true,
        apply: set_env_vars,
    },
    OptionSpec {
        name: "env_passthrough",
        expects: "a list of variable names, e.g. `[\"API_TOKEN\"]`",
        has_default: true,
        apply: set_env_passthrough,
    },
    OptionSpec {
        name: "allowed_hosts",
        expects: "a list of host rules, e.g. `[\"api.example.com\", \"*.example.org\"]`",
        has_default: true,
        apply: set_allowed_hosts,
    },
    OptionSpec {
        name: "secrets",
        expects: "a dict of variable names to {\"header\": ..., \"format\": \"Bearer {value}\", \"hosts\": [...]}",
        has_default: true,
        apply: set_secrets,
    },
    OptionSpec {
        name: "allowed_files",
        expects: "a list of folders, each \"./path\" or {\"path\": \"./path\", \"mode\": \"read-write\"}",
        has_default: true,
        apply: set_allowed_files,
    },
    OptionSpec {
        name: "max_written",
        expects: "a string such as \"100MB\"",
        has_default: true,
        apply: set_max_written,
    },
    OptionSpec {
        name: "max_files_created",
        expects: "an integer >= 0",
        has_default: true,
        apply: set_max_files_created,
    },
];

pub fn option(name: &str) -> Option<&'static OptionSpec> {
    OPTIONS.iter().find(|o| o.name == name)
}

pub fn option_names() -> impl Iterator<Item = &'static str> {
    OPTIONS.iter().map(|o| o.name)
}

fn refuse(at: &Literal, problem: Problem) -> Refusal {
    Refusal::Value(ValueError { at: at.at, problem })
}

fn shape(at: &Literal) -> Refusal {
    Refusal::Shape(at.at)
}

fn str_of(literal: &Literal) -> Result<&str, Refusal> {
    match &literal.value {
        Value::Str(text) => Ok(text),
        _ => Err(shape(literal)),
    }
}

fn items(literal: &Literal) -> Result<&[Literal], Refusal> {
    match &literal.value {
        Value::List(items) => Ok(items),
        _ => Err(shape(literal)),
    }
}

fn set_name(spec: &mut TaskSpec, literal: &Literal) -> Result<(), Refusal> {
    match str_of(literal)? {
        "" => Err(shape(literal)),
        name => {
            spec.name = Some(name.to_string());
            Ok(())
        }
    }
}

fn set_compute(spec: &mut TaskSpec, literal: &Literal) -> Result<(), Refusal> {
    let compute = match &literal.value {
        Value::Str(text) => Compute::parse(text),
        Value::Int(fuel) => u64::try_from(*fuel)
            .map_err(|_| Problem::hinted(format!("`{fuel}` is not a fuel budget"), "give a positive number"))
            .and_then(Compute::from_fuel),
        _ => return Err(shape(literal)),
    };
    spec.options.compute = compute.map_err(|p| refuse(literal, p))?;
    Ok(())
}

fn set_ram(spec: &mut TaskSpec, literal: &Literal) -> Result<(), Refusal> {
    spec.options.ram = byte_size("ram", literal)?;
    Ok(())
}

fn set_max_written(spec: &mut TaskSpec, literal: &Literal) -> Result<(), Refusal> {
    spec.options.max_written = byte_size("max_written", literal)?;
    Ok(())
}

/// A size written with its unit, e.g. `"256MiB"`.
fn byte_size(option: &str, literal: &Literal) -> Result<ByteSize, Refusal> {
    match &literal.value {
        Value::Str(text) => ByteSize::parse(text).map_err(|p| refuse(literal, p)),
        Value::Int(number) => Err(refuse(
            literal,
            Problem::hinted(
                format!("`{option}={number}` has no unit"),
                format!(
                    "write it as a string with a unit, e.g. `{option}=\"{number}MB\"` or `{option}=\"{number}MiB\"`"
                ),
            ),
        )),
        _ => Err(shape(literal)),
    }
}

fn set_timeout(spec: &mut TaskSpec, literal: &Literal) -> Result<(), Refusal> {
    let text = str_of(literal)?;
    spec.options.timeout = Some(Timeout(parse_duration(text).map_err(|p| refuse(literal, p))?));
    Ok(())
}

fn set_max_retries(spec: &mut TaskSpec, literal: &Literal) -> Result<(), Refusal> {
    spec.options.max_retries = u32::try_from(count(literal)?).map_err(|_| shape(literal))?;
    Ok(())
}

fn set_max_files_created(spec: &mut TaskSpec, literal: &Literal) -> Result<(), Refusal> {
    spec.options.max_files_created = count(literal)?;
    Ok(())
}

/// An integer >= 0.
fn count(literal: &Literal) -> Result<u64, Refusal> {
    match &literal.value {
        Value::Int(n) => u64::try_from(*n).map_err(|_| shape(literal)),
        _ => Err(shape(literal)),
    }
}

fn set_env_vars(spec: &mut TaskSpec, literal: &Literal) -> Result<(), Refusal> {
    let Value::Dict(pairs) = &literal.value else { return Err(shape(literal)) };
    let mut env = BTreeMap::new();
    for (key, value) in pairs {
        let name = str_of(key)?;
        if !is_env_name(name) {
            return Err(refuse(key, not_an_env_name(name)));
        }
        env.insert(name.to_string(), str_of(value)?.to_string());
    }
    spec.options.env_vars = env;
    Ok(())
}

fn set_env_passthrough(spec: &mut TaskSpec, literal: &Literal) -> Result<(), Refusal> {
    let mut names = Vec::new();
    for item in items(literal)? {
        let name = str_of(item)?;
        if !is_env_name(name) || names.iter().any(|n| n == name) {
            return Err(refuse(item, not_an_env_name(name)));
        }
        names.push(name.to_string());
    }
    spec.options.env_passthrough = names;
    Ok(())
}

fn set_allowed_hosts(spec: &mut TaskSpec, literal: &Literal) -> Result<(), Refusal> {
    let mut rules = Vec::new();
    for item in items(literal)? {
        rules.push(HostRule::parse(str_of(item)?).map_err(|p| refuse(item, p))?);
    }
    spec.options.allowed_hosts = HostPolicy::from_rules(rules);
    Ok(())
}

fn set_allowed_files(spec: &mut TaskSpec, literal: &Literal) -> Result<(), Refusal> {
    let mut grants = Vec::new();
    for item in items(literal)? {
        let (path, mode) = match &item.value {
            Value::Str(path) => (path.as_str(), FileMode::ReadOnly),
            Value::Dict(pairs) => {
                let (mut path, mut mode) = (None, FileMode::ReadOnly);
                for (key, value) in pairs {
                    match str_of(key)? {
                        "path" => path = Some(str_of(value)?),
                        "mode" => mode = FileMode::parse(str_of(value)?).map_err(|p| refuse(value, p))?,
                        _ => return Err(shape(key)),
                    }
                }
                (path.ok_or_else(|| shape(item))?, mode)
            }
            _ => return Err(shape(item)),
        };
        let path = normalise_grant_path(path).map_err(|p| refuse(item, p))?;
        grants.push(FileGrant { path, mode });
    }
    spec.options.allowed_files = grants;
    Ok(())
}

fn set_secrets(spec: &mut TaskSpec, literal: &Literal) -> Result<(), Refusal> {
    let Value::Dict(pairs) = &literal.value else { return Err(shape(literal)) };
    let mut secrets = BTreeMap::new();
    for (key, value) in pairs {
        let name = str_of(key)?;
        if !is_env_name(name) || secrets.contains_key(name) {
            return Err(refuse(key, not_an_env_name(name)));
        }
        let Value::Dict(fields) = &value.value else { return Err(shape(value)) };
        let (mut header, mut format, mut hosts) = (None, Secret::PLACEHOLDER.to_string(), None);
        for (field, item) in fields {
            match str_of(field)? {
                "header" => {
                    let text = str_of(item)?;
                    if text.is_empty()
                        || !text.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
                    {
                        return Err(refuse(
                            item,
                            Problem::hinted(
                                format!("`{text}` is not an HTTP header name"),
                                "e.g. \"Authorization\" or \"X-Api-Key\"",
                            ),
                        ));
                    }
                    header = Some(text.to_string());
                }
                "format" => {
                    let text = str_of(item)?;
                    if !text.contains(Secret::PLACEHOLDER) || text.contains(['\r', '\n']) {
                        return Err(refuse(
                            item,
                            Problem::hinted(
                                format!("the format `{text}` has no `{{value}}`"),
                                "e.g. \"Bearer {value}\"",
                            ),
                        ));
                    }
                    format = text.to_string();
                }
                "hosts" => {
                    let mut rules = Vec::new();
                    for rule in items(item)? {
                        rules.push(HostRule::parse(str_of(rule)?).map_err(|p| refuse(rule, p))?);
                    }
                    hosts = Some(HostPolicy::from_rules(rules)).filter(|h| !h.is_empty());
                }
                _ => return Err(shape(field)),
            }
        }
        let missing = |what: &str| {
            refuse(
                value,
                Problem::hinted(
                    format!("secret `{name}` has no `{what}`"),
                    "give \"header\" and \"hosts\", e.g. {\"header\": \"Authorization\", \"format\": \"Bearer {value}\", \"hosts\": [\"api.example.com\"]}",
                ),
            )
        };
        let header = header.ok_or_else(|| missing("header"))?;
        let hosts = hosts.ok_or_else(|| missing("hosts"))?;
        secrets.insert(name.to_string(), Secret { header, format, hosts });
    }
    spec.options.secrets = secrets;
    Ok(())
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn not_an_env_name(name: &str) -> Problem {
    Problem::hinted(
        format!("`{name}` is not a usable environment variable name, or is listed twice"),
        "use names such as \"API_TOKEN\" (letters, digits, `_`), each once",
    )
}

/// The option closest to a misspelt `word`: within two edits, or containing it (`retries`).
pub fn closest_option(word: &str) -> Option<&'static str> {
    option_names()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| c)
        .or_else(|| option_names().find(|c| word.len() >= 3 && c.contains(word)))
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

    #[test]
    fn a_code_strings_options_are_what_the_caller_set_over_the_defaults() {
        let given = serde_json::json!({"ram": "1GiB", "allowed_hosts": ["example.com"]});
        let options = TaskOptions::code_options(given.as_object().unwrap().clone()).unwrap();
        assert_eq!(options.ram.bytes(), 1 << 30);
        assert_eq!((options.compute, options.max_retries), (defaults::COMPUTE, 0));
        assert!(options.allowed_hosts.check_host("example.com", 443).is_ok());
        let wrong = serde_json::json!({"rma": "1GiB"});
        assert!(TaskOptions::code_options(wrong.as_object().unwrap().clone()).unwrap_err().contains("rma"));
        let bad = serde_json::json!({"ram": "lots"});
        let error = TaskOptions::code_options(bad.as_object().unwrap().clone()).unwrap_err();
        assert!(error.starts_with("`ram`: `lots` is not a memory size"), "{error}");
    }

    fn lit(value: Value) -> Literal {
        Literal { value, at: 0 }
    }

    fn s(text: &str) -> Literal {
        lit(Value::Str(text.into()))
    }

    fn apply(name: &str, literal: Literal) -> Result<TaskSpec, Problem> {
        let mut spec = TaskSpec::default();
        option(name).unwrap().apply(&mut spec, &literal).map_err(|e| e.problem)?;
        Ok(spec)
    }

    #[test]
    fn every_option_parses_its_literals() {
        assert_eq!(apply("name", s("fetch")).unwrap().name.as_deref(), Some("fetch"));
        assert_eq!(apply("compute", s("HIGH")).unwrap().options.compute, Compute::High);
        assert_eq!(apply("compute", lit(Value::Int(1000))).unwrap().options.compute, Compute::Fuel(1000));
        assert_eq!(apply("ram", s("64MB")).unwrap().options.ram, ByteSize(64_000_000));
        assert!(apply("ram", lit(Value::Int(64))).unwrap_err().message.contains("no unit"));
        assert_eq!(apply("timeout", s("500ms")).unwrap().options.timeout.unwrap().to_string(), "500ms");
        assert_eq!(apply("max_retries", lit(Value::Int(3))).unwrap().options.max_retries, 3);
        assert!(apply("max_retries", lit(Value::Int(-1))).is_err());
        let env = lit(Value::Dict(vec![(s("MODE"), s("prod"))]));
        assert_eq!(apply("env_vars", env).unwrap().options.env_vars["MODE"], "prod");
        let hosts = apply("allowed_hosts", lit(Value::List(vec![s("api.example.com")]))).unwrap();
        assert_eq!(hosts.options.allowed_hosts.texts().collect::<Vec<_>>(), ["api.example.com"]);
        let grant = lit(Value::Dict(vec![(s("path"), s("./out")), (s("mode"), s("rw"))]));
        let files = apply("allowed_files", lit(Value::List(vec![s("./data"), grant]))).unwrap();
        assert_eq!(files.options.allowed_files[1], FileGrant { path: "out".into(), mode: FileMode::ReadWrite });
        assert_eq!(apply("max_written", s("10MiB")).unwrap().options.max_written, ByteSize(10 << 20));
        assert!(
            apply("max_written", lit(Value::Int(10))).unwrap_err().message.contains("`max_written=10` has no unit")
        );
        assert_eq!(apply("max_files_created", lit(Value::Int(0))).unwrap().options.max_files_created, 0);
        assert!(apply("max_files_created", lit(Value::Int(-5))).is_err());
    }

    #[test]
    fn secrets_name_a_header_a_format_and_their_hosts() {
        let secret = |fields: Vec<(Literal, Literal)>| lit(Value::Dict(vec![(s("API_KEY"), lit(Value::Dict(fields)))]));
        let hosts = || (s("hosts"), lit(Value::List(vec![s("api.example.com")])));
        let full = secret(vec![(s("header"), s("Authorization")), (s("format"), s("Bearer {value}")), hosts()]);
        let parsed = apply("secrets", full).unwrap().options.secrets.remove("API_KEY").unwrap();
        assert_eq!(parsed.header_value("k"), "Bearer k");
        assert_eq!(parsed.hosts.texts().collect::<Vec<_>>(), ["api.example.com"]);
        let plain = apply("secrets", secret(vec![(s("header"), s("X-Api-Key")), hosts()])).unwrap();
        assert_eq!(plain.options.secrets["API_KEY"].header_value("k"), "k", "the format defaults to the bare value");
        let no_hosts = apply("secrets", secret(vec![(s("header"), s("X-Api-Key"))])).unwrap_err();
        assert!(no_hosts.message.contains("secret `API_KEY` has no `hosts`"), "{}", no_hosts.message);
        let no_value = apply("secrets", secret(vec![(s("header"), s("X")), (s("format"), s("Bearer")), hosts()]));
        assert!(no_value.unwrap_err().message.contains("has no `{value}`"));
        let bad_header = apply("secrets", secret(vec![(s("header"), s("Bad Header")), hosts()])).unwrap_err();
        assert!(bad_header.message.contains("is not an HTTP header name"), "{}", bad_header.message);

        let mut options = TaskOptions::default();
        options.secrets = apply("secrets", secret(vec![(s("header"), s("X")), hosts()])).unwrap().options.secrets;
        options.env_passthrough = vec!["API_KEY".into()];
        assert_eq!(options.validate().unwrap_err().0, "secrets", "a secret the task could read is refused");
    }

    #[test]
    fn errors_point_at_the_item_at_fault() {
        let bad = Literal { value: Value::Str("https://x.com".into()), at: 17 };
        let mut spec = TaskSpec::default();
        let error = option("allowed_hosts")
            .unwrap()
            .apply(&mut spec, &Literal { value: Value::List(vec![s("ok.com"), bad]), at: 3 })
            .unwrap_err();
        assert_eq!(error.at, 17);
    }

    #[test]
    fn suggests_close_option_names() {
        assert_eq!(closest_option("rma"), Some("ram"));
        assert_eq!(closest_option("timout"), Some("timeout"));
        assert_eq!(closest_option("retries"), Some("max_retries"));
        assert_eq!(closest_option("colour"), None);
    }

    #[test]
    fn options_round_trip_through_the_manifest_format() {
        let mut spec = TaskSpec::default();
        for (name, literal) in [
            ("compute", lit(Value::Int(5000))),
            ("timeout", s("90s")),
            ("allowed_hosts", lit(Value::List(vec![s("*.example.org:8443")]))),
        ] {
            option(name).unwrap().apply(&mut spec, &literal).unwrap();
        }
        let text = toml::to_string(&spec.options).unwrap();
        assert_eq!(toml::from_str::<TaskOptions>(&text).unwrap(), spec.options);
        assert!(toml::from_str::<TaskOptions>(&text.replace("max_retries", "retries")).is_err());
    }

    #[test]
    fn file_quotas_left_at_their_defaults_are_not_written() {
        let text = toml::to_string(&TaskOptions::default()).unwrap();
        assert!(!text.contains("max_written") && !text.contains("max_files_created"), "{text}");
        let options: TaskOptions = toml::from_str(&text).unwrap();
        assert_eq!(
            (options.max_written, options.max_files_created),
            (defaults::MAX_WRITTEN, defaults::MAX_FILES_CREATED)
        );
    }
}
