//! The contract between a Capsule host and the CPython reactor built by
//! `cargo xtask build-runtime`. `ABI.md` in this crate describes it in prose; the C side is
//! `c/capsule_runtime.c` and the Python side `python/capsule/_runtime.py`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which runtime module a project is built on, `[runtime] flavour` in capsule.toml.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// CPython and its standard library: the small, fast default.
    #[default]
    Base,
    /// The base plus numpy and pandas, their C extension modules linked in as built-in
    /// modules.
    Data,
}

impl Flavour {
    pub const ALL: [Flavour; 2] = [Flavour::Base, Flavour::Data];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Data => "data",
        }
    }

    /// File name of the built runtime module.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Base => "capsule-python.wasm",
            Self::Data => "capsule-python-data.wasm",
        }
    }

    /// The packages this flavour has beyond the standard library, which the build imports
    /// into the snapshot when a project's code imports them.
    pub fn packages(self) -> &'static [&'static str] {
        match self {
            Self::Base => &[],
            Self::Data => &["numpy", "pandas"],
        }
    }

    /// The module of this flavour, which lives beside the base runtime `base` (see
    /// [`runtime_path`]).
    pub fn beside(self, base: &Path) -> PathBuf {
        match self {
            Self::Base => base.to_path_buf(),
            _ => base.with_file_name(self.file_name()),
        }
    }
}

/// Environment variable naming a (base) runtime module to use instead of the installed one;
/// the other flavours are found beside it.
pub const RUNTIME_ENV: &str = "CAPSULE_RUNTIME";

/// Where an installation keeps the base runtime, relative to the folder of the `capsule`
/// binary (`<prefix>/bin/capsule` and `<prefix>/share/capsule/capsule-python.wasm`: the
/// wheel, the tarball, `cargo xtask install`), the other flavours beside it. A
/// `<file>.sha256` beside each is checked.
pub const INSTALLED_RUNTIME: &str = "../share/capsule/capsule-python.wasm";

/// Where the base runtime is: `$CAPSULE_RUNTIME`; else the one installed beside the running
/// binary; else, for a binary built in this checkout, the one `cargo xtask build-runtime`
/// wrote there.
pub fn runtime_path() -> PathBuf {
    if let Some(path) = std::env::var_os(RUNTIME_ENV) {
        return PathBuf::from(path);
    }
    let installed = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join(INSTALLED_RUNTIME)));
    if let Some(installed) = installed.filter(|path| path.is_file()) {
        return installed;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target")), PathBuf::from);
    target.join("python-runtime").join(Flavour::Base.file_name())
}

/// Module name of every host function the runtime imports.
pub const HOST_MODULE: &str = "capsule";

/// Module name of the BLAS kernels the data runtime leaves to the host.
pub const BLAS_MODULE: &str = "capsule_blas";

/// Functions the runtime exports.
pub mod exports {
    /// `() -> ()`: the build's initialisation entry; reads an [`InitRequest`](super::InitRequest) on stdin.
    pub const INITIALIZE: &str = "capsule_initialize";
    /// `() -> i64`: the registered tasks as JSON ([`RegisteredTask`](super::RegisteredTask) list).
    pub const DESCRIBE: &str = "capsule_describe";
    /// `(ptr: i32, len: i32) -> i64`: run a task; request and reply are JSON.
    pub const INVOKE: &str = "capsule_invoke";
    /// `(len: i32) -> i32`: allocate guest memory for a request.
    pub const ALLOC: &str = "capsule_alloc";
    /// `(ptr: i32) -> ()`: free memory returned by `ALLOC` or handed back by `DESCRIBE`/`INVOKE`.
    pub const FREE: &str = "capsule_free";
    pub const MEMORY: &str = "memory";
}

/// Functions the runtime imports from [`HOST_MODULE`] (and the data runtime from [`BLAS_MODULE`]).
pub mod imports {
    /// `(ptr: i32, len: i32) -> i32`: a JSON request to the host; returns the reply's length,
    /// or -1 if the host refused to answer.
    pub const HOST_CALL: &str = "host_call";
    /// `(destination: i32) -> ()`: copy the reply of the last `host_call` into guest memory.
    pub const HOST_REPLY: &str = "host_reply";
    /// From [`BLAS_MODULE`](super::BLAS_MODULE): `(m: i32, n: i32, k: i32, alpha: f64, a: i32,
    /// b: i32, c: i32, ldc: i32) -> ()`: OpenBLAS's double GEMM micro-kernel,
    /// `C += alpha * A * B` on packed panels of A and B.
    pub const DGEMM_KERNEL: &str = "dgemm_kernel";
    /// From [`BLAS_MODULE`](super::BLAS_MODULE): as [`DGEMM_KERNEL`] in single precision
    /// (`alpha: f32`).
    pub const SGEMM_KERNEL: &str = "sgemm_kernel";
}

/// Environment variable, read only while initialising, that sets `PYTHONHASHSEED`.
pub const HASH_SEED_ENV: &str = "CAPSULE_HASH_SEED";

/// The C stack the runtime was linked with (`-z stack-size`). The host's `max_wasm_stack`
/// must be at least as large or deep C recursion traps before Python's own limit.
pub const C_STACK_BYTES: usize = 8 << 20;

/// Splits the `(pointer << 32) | length` value that `DESCRIBE` and `INVOKE` return.
/// `None` means the guest could not allocate the reply.
pub fn unpack_buffer(packed: i64) -> Option<(u32, u32)> {
    let packed = packed as u64;
    let pointer = (packed >> 32) as u32;
    (pointer != 0).then_some((pointer, packed as u32))
}

/// What the build hands the runtime while initialising: the user's modules, as source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitRequest {
    pub entry_module: String,
    pub modules: Vec<SourceModule>,
    /// Files that packages read beside their modules (`pkgutil.get_data`,
    /// `importlib.resources`): templates, certificates, time zone archives.
    #[serde(default)]
    pub data_files: Vec<DataFile>,
    /// Packages of the runtime to import before the user's module (see
    /// [`Flavour::packages`]), so that the snapshot holds them imported.
    #[serde(default)]
    pub preload: Vec<String>,
}

/// A package's data file, by the path its module's `__file__` makes: e.g.
/// `site-packages/dateutil/zoneinfo/dateutil-zoneinfo.tar.gz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataFile {
    pub path: String,
    /// Base64 in the JSON request.
    #[serde(with = "base64_bytes")]
    pub contents: Vec<u8>,
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceModule {
    /// Dotted module name, e.g. `helpers.text`.
    pub name: String,
    /// Path relative to the project root, used in tracebacks, e.g. `helpers/text.py`.
    pub path: String,
    pub source: String,
    pub is_package: bool,
}

/// A task as the Python module registered it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisteredTask {
    pub name: String,
    /// `module.qualname` of the function.
    pub function: String,
    pub options: Value,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InvokeRequest {
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: serde_json::Map<String, Value>,
    /// Exactly the environment the task sees in `os.environ`.
    pub env: BTreeMap<String, String>,
    /// 1 for the first attempt, 2 for the first retry; `capsule.attempt()` in Python.
    pub attempt: u32,
}

/// How a task attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The task raised a Python exception.
    Exception,
    /// The wall-clock deadline passed.
    Timeout,
    /// The fuel budget ran out.
    Fuel,
    /// The memory limit was reached.
    Memory,
    /// The sandbox's stack ran out (runaway recursion below Python's own limit, in C code).
    StackOverflow,
    /// Something failed on the host's side.
    Host,
    /// The arguments or the task name were not acceptable.
    InvalidInput,
    /// The run was stopped from outside (`capsule stop`, a cancelled request).
    Cancelled,
    /// A resumed run's journal would not replay a step: the code makes other calls than the
    /// run it resumes, or a record was changed outside Capsule. Resuming again cannot help.
    Diverged,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exception => "exception",
            Self::Timeout => "timeout",
            Self::Fuel => "fuel",
            Self::Memory => "memory",
            Self::StackOverflow => "stack_overflow",
            Self::Host => "host",
            Self::InvalidInput => "invalid_input",
            Self::Cancelled => "cancelled",
            Self::Diverged => "diverged",
        }
    }
}

/// A failure as the guest reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestError {
    #[serde(rename = "type")]
    pub kind: ErrorKind,
    /// The Python exception class, e.g. `ValueError`; empty when not from Python.
    #[serde(default)]
    pub exc_type: String,
    pub message: String,
    #[serde(default)]
    pub traceback: String,
}

impl GuestError {
    /// A failure that did not come from Python code (no exception type, no traceback).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, exc_type: String::new(), message: message.into(), traceback: String::new() }
    }
}

/// The JSON reply of `INVOKE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvokeReply {
    pub ok: bool,
    #[serde(default)]
    pub result: Value,
    #[serde(default)]
    pub error: Option<GuestError>,
}

impl InvokeReply {
    pub fn into_result(self) -> Result<Value, GuestError> {
        match (self.ok, self.error) {
            (true, _) => Ok(self.result),
            (false, Some(error)) => Err(error),
            (false, None) => Err(GuestError::new(ErrorKind::Host, "the runtime reported a failure without details")),
        }
    }
}

/// A request the guest sends through `capsule.host_call`, tagged by `method`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method")]
pub enum HostRequest {
    /// An HTTP request, made by the host under the task's `allowed_hosts`.
    #[serde(rename = "http.request")]
    Http { request: HttpRequest },
    /// Run another task as a sub-task and wait for its result.
    #[serde(rename = "task.call")]
    TaskCall(TaskCall),
    /// Start a sub-task; the reply's value is a handle for `task.wait`.
    #[serde(rename = "task.spawn")]
    TaskSpawn(TaskCall),
    /// Wait for a spawned sub-task; replies like `task.call`.
    #[serde(rename = "task.wait")]
    TaskWait { handle: u64 },
}

impl HostRequest {
    /// The `method` as the guest wrote it, for messages.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Http { .. } => "http.request",
            Self::TaskCall(_) => "task.call",
            Self::TaskSpawn(_) => "task.spawn",
            Self::TaskWait { .. } => "task.wait",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRequest {
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body_base64: Option<String>,
    /// Seconds.
    #[serde(default)]
    pub timeout: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpResponse {
    pub status: u16,
    /// The URL of the final response, after redirects.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body_base64: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskCall {
    pub task: String,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: serde_json::Map<String, Value>,
}

/// Why an HTTP request got no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpErrorKind {
    /// `allowed_hosts` does not permit the host or its address.
    Refused,
    Timeout,
    /// The response body is larger than the host accepts.
    TooLarge,
    /// The request itself is malformed (URL, method, body).
    Invalid,
    /// Connecting or reading failed.
    Connection,
}

/// Why the host did not do what the guest asked. Serialised as one shape,
/// `{"type": ..., "message": ..., "exc_type": ..., "traceback": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum HostError {
    Http {
        #[serde(rename = "type")]
        kind: HttpErrorKind,
        message: String,
    },
    /// A sub-task failed (or could not start), with the envelope's error types.
    Task(GuestError),
}

/// The host's answer to a [`HostRequest`]: `{"ok": true, "value": ...}` or
/// `{"ok": false, "error": {"type": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq)]
pub enum HostReply {
    Ok(Value),
    Err(HostError),
}

impl HostReply {
    pub fn http(response: &HttpResponse) -> Self {
        Self::Ok(serde_json::to_value(response).expect("responses serialise"))
    }

    pub fn http_error(kind: HttpErrorKind, message: impl Into<String>) -> Self {
        Self::Err(HostError::Http { kind, message: message.into() })
    }

    pub fn task_error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::Err(HostError::Task(GuestError::new(kind, message)))
    }

    pub fn to_json(&self) -> Vec<u8> {
        let value = match self {
            Self::Ok(value) => serde_json::json!({"ok": true, "value": value}),
            Self::Err(error) => serde_json::json!({"ok": false, "error": error}),
        };
        serde_json::to_vec(&value).expect("JSON values serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_pointer_and_length() {
        let packed = ((0x0012_3400_u64 << 32) | 17) as i64;
        assert_eq!(unpack_buffer(packed), Some((0x0012_3400, 17)));
        assert_eq!(unpack_buffer(0), None);
    }

    #[test]
    fn parses_failure_reply() {
        let reply: InvokeReply = serde_json::from_str(
            r#"{"ok": false, "error": {"type": "exception", "exc_type": "ValueError", "message": "bad", "traceback": "tb"}}"#,
        )
        .unwrap();
        let error = reply.into_result().unwrap_err();
        assert_eq!(error.kind, ErrorKind::Exception);
        assert_eq!(error.exc_type, "ValueError");
    }

    #[test]
    fn host_calls_have_one_shape_each_way() {
        let request: HostRequest =
            serde_json::from_str(r#"{"method": "task.call", "task": "add", "args": [1, 2]}"#).unwrap();
        assert_eq!(
            request,
            HostRequest::TaskCall(TaskCall {
                task: "add".into(),
                args: vec![1.into(), 2.into()],
                kwargs: Default::default()
            })
        );
        assert!(serde_json::from_str::<HostRequest>(r#"{"method": "fs.read"}"#).is_err());
        let refused = HostReply::http_error(HttpErrorKind::Refused, "no");
        assert_eq!(
            String::from_utf8(refused.to_json()).unwrap(),
            r#"{"ok":false,"error":{"type":"refused","message":"no"}}"#
        );
        let failed = HostReply::task_error(ErrorKind::Fuel, "out");
        let json: Value = serde_json::from_slice(&failed.to_json()).unwrap();
        assert_eq!(json["error"]["type"], "fuel");
        assert_eq!(HostReply::Ok(7.into()).to_json(), br#"{"ok":true,"value":7}"#);
    }

    #[test]
    fn parses_success_reply() {
        let reply: InvokeReply = serde_json::from_str(r#"{"ok": true, "result": [1, "a"]}"#).unwrap();
        assert_eq!(reply.into_result().unwrap(), serde_json::json!([1, "a"]));
    }
}
