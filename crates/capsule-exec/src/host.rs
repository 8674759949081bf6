//! What the host gives a sandbox: WASI (with stdio and granted folders only), a memory
//! limiter, the data runtime's BLAS kernels, and the `capsule.host_call` channel, answered by
//! whoever built the sandbox through [`HostCalls`].

use std::future::Future;
use std::pin::Pin;

use python_runtime::{ErrorKind, HOST_MODULE, HostReply, HostRequest, exports, imports};
use wasmtime::{Caller, Engine, Extern, Linker, ResourceLimiter};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::blas;
use crate::outcome::HttpCall;
use crate::quota::{self, CountsFiles, FileQuota, FileUsage};

/// Largest request a guest may send through `host_call`.
const MAX_HOST_REQUEST: usize = 16 << 20;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Answers a sandbox's host calls. The guest is single-threaded: calls come one at a time.
pub trait HostCalls: Send {
    fn call(&mut self, request: HostRequest) -> BoxFuture<'_, HostReply>;

    /// The HTTP calls made so far, for the envelope (taken, not copied).
    fn take_http_calls(&mut self) -> Vec<HttpCall> {
        Vec::new()
    }
}

/// Refuses every host call with one message; what a sandbox gets where nothing is allowed
/// (e.g. module-level code while `capsule build` snapshots it).
pub struct RefuseHostCalls(pub &'static str);

impl HostCalls for RefuseHostCalls {
    fn call(&mut self, request: HostRequest) -> BoxFuture<'_, HostReply> {
        let message = format!("`{}` is not available: {}", request.method(), self.0);
        Box::pin(async move { HostReply::task_error(ErrorKind::Host, message) })
    }
}

/// Per-sandbox state held in the wasmtime `Store`.
pub struct SandboxState {
    pub(crate) wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
    pub(crate) host_calls: Box<dyn HostCalls>,
    /// The reply of the last `host_call`, waiting for `host_reply` to copy it.
    pending_reply: Vec<u8>,
    files: FileUsage,
}

impl SandboxState {
    pub fn new(wasi: WasiP1Ctx, memory_limit: u64, host_calls: Box<dyn HostCalls>) -> Self {
        Self {
            wasi,
            limiter: MemoryLimiter::new(memory_limit),
            host_calls,
            pending_reply: Vec::new(),
            files: FileUsage::default(),
        }
    }

    /// Puts the state's memory limiter in charge of `store`.
    pub fn limit(store: &mut wasmtime::Store<Self>) {
        store.limiter(|state| &mut state.limiter);
    }

    pub fn memory(&self) -> &MemoryLimiter {
        &self.limiter
    }

    /// A new call (in a fresh sandbox, or the same one for a session): it has not exceeded
    /// its memory yet; what earlier calls of the sandbox wrote counts towards its file quota.
    pub(crate) fn start_call(&mut self, files: FileQuota) {
        self.limiter.exceeded = false;
        self.files.start_call(files);
    }

    /// What the sandbox's calls wrote and created so far, and setting it on a replacement.
    pub(crate) fn file_usage(&mut self) -> &mut FileUsage {
        &mut self.files
    }

    /// Which file quota refused the running call something, in words.
    pub(crate) fn file_quota_refusal(&self) -> Option<String> {
        self.files.refusal()
    }

    async fn handle(&mut self, request: &[u8]) -> HostReply {
        match serde_json::from_slice::<HostRequest>(request) {
            Ok(request) => self.host_calls.call(request).await,
            Err(error) => HostReply::task_error(ErrorKind::InvalidInput, format!("malformed host request: {error}")),
        }
    }
}

/// Caps a sandbox's linear memory and records its peak.
pub struct MemoryLimiter {
    limit: u64,
    peak: u64,
    exceeded: bool,
}

impl MemoryLimiter {
    fn new(limit: u64) -> Self {
        Self { limit, peak: 0, exceeded: false }
    }

    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Whether the guest ever asked for more memory than its limit.
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired as u64 > self.limit {
            self.exceeded = true;
            return Ok(false);
        }
        self.peak = self.peak.max(desired as u64);
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // CPython's function table is fixed at link time; growth would be a bug or an attack.
        Ok(desired <= 1 << 16)
    }
}

fn guest_memory(caller: &mut Caller<'_, SandboxState>) -> wasmtime::Result<wasmtime::Memory> {
    match caller.get_export(exports::MEMORY) {
        Some(Extern::Memory(memory)) => Ok(memory),
        _ => Err(wasmtime::format_err!("the module exports no memory")),
    }
}

impl CountsFiles for SandboxState {
    fn file_usage(&mut self) -> &mut FileUsage {
        &mut self.files
    }

    fn wasi(&mut self) -> &mut WasiP1Ctx {
        &mut self.wasi
    }
}

/// WASI's `EPERM`: the operation is not permitted.
const WASI_ERRNO_PERM: i32 = 63;

/// A linker with WASI preview 1 and Capsule's host functions.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<SandboxState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |state: &mut SandboxState| &mut state.wasi)?;
    quota::wrap_file_writes(&mut linker)?;
    // A task may not plant links in a folder it was granted that lead out of it (a host tool
    // opening the link later would follow it): creating symbolic links is refused outright.
    linker.allow_shadowing(true);
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "path_symlink",
        |_: Caller<'_, SandboxState>, _: i32, _: i32, _: i32, _: i32, _: i32| -> i32 { WASI_ERRNO_PERM },
    )?;
    linker.allow_shadowing(false);
    blas::add_to_linker(&mut linker)?;
    linker.func_wrap_async(
        HOST_MODULE,
        imports::HOST_CALL,
        |mut caller: Caller<'_, SandboxState>, (pointer, len): (i32, i32)| {
            Box::new(async move {
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > MAX_HOST_REQUEST {
                    return Ok(-1);
                }
                let memory = guest_memory(&mut caller)?;
                let mut request = vec![0; len];
                memory.read(&caller, pointer as u32 as usize, &mut request)?;
                let bytes = caller.data_mut().handle(&request).await.to_json();
                let reply_len = i32::try_from(bytes.len()).unwrap_or(-1);
                caller.data_mut().pending_reply = bytes;
                Ok(reply_len)
            })
        },
    )?;
    linker.func_wrap(
        HOST_MODULE,
        imports::HOST_REPLY,
        |mut caller: Caller<'_, SandboxState>, destination: i32| -> wasmtime::Result<()> {
            let memory = guest_memory(&mut caller)?;
            let reply = std::mem::take(&mut caller.data_mut().pending_reply);
            memory.write(&mut caller, destination as u32 as usize, &reply)?;
            Ok(())
        },
    )?;
    Ok(linker)
}
