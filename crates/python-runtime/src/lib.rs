//! The contract between a Capsule host and the CPython reactor built by
//! `cargo xtask build-runtime`. `ABI.md` in this crate describes it in prose; the C side is
//! `c/capsule_runtime.c` and the Python side `python/capsule/_runtime.py`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// File name of the built runtime module.
pub const RUNTIME_FILE: &str = "capsule-python.wasm";

/// Environment variable naming a runtime module to use instead of the workspace's build.
pub const RUNTIME_ENV: &str = "CAPSULE_RUNTIME";

/// Where the runtime is: `$CAPSULE_RUNTIME`, else the one `cargo xtask build-runtime` wrote.
pub fn runtime_path() -> PathBuf {
    if let Some(path) = std::env::var_os(RUNTIME_ENV) {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target")), PathBuf::from);
    target.join("python-runtime").join(RUNTIME_FILE)
}

/// Module name of every host function the runtime imports.
pub const HOST_MODULE: &str = "capsule";

/// Functions the runtime exports.
pub mod exports {
    /// `() -> ()`: Wizer's initialisation entry; reads an [`InitRequest`](super::InitRequest) on stdin.
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

/// Functions the runtime imports from [`HOST_MODULE`].
pub mod imports {
    /// `(ptr: i32, len: i32) -> i32`: a JSON request to the host; returns the reply's length,
    /// or -1 if the host refused to answer.
    pub const HOST_CALL: &str = "host_call";
    /// `(destination: i32) -> ()`: copy the reply of the last `host_call` into guest memory.
    pub const HOST_REPLY: &str = "host_reply";
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
    /// Something failed on the host's side.
    Host,
    /// The arguments or the task name were not acceptable.
    InvalidInput,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exception => "exception",
            Self::Timeout => "timeout",
            Self::Fuel => "fuel",
            Self::Memory => "memory",
            Self::Host => "host",
            Self::InvalidInput => "invalid_input",
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
            (false, None) => Err(GuestError {
                kind: ErrorKind::Host,
                exc_type: String::new(),
                message: "the runtime reported a failure without details".into(),
                traceback: String::new(),
            }),
        }
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
    fn parses_success_reply() {
        let reply: InvokeReply = serde_json::from_str(r#"{"ok": true, "result": [1, "a"]}"#).unwrap();
        assert_eq!(reply.into_result().unwrap(), serde_json::json!([1, "a"]));
    }
}
