//! What the host gives a sandbox: WASI (with stdio only), a memory limiter, and the
//! `capsule.host_call` channel.

use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use manifest_schema::HostPolicy;
use python_runtime::{HOST_MODULE, exports, imports};
use serde_json::{Value, json};
use wasmtime::{Caller, Engine, Extern, Linker, ResourceLimiter};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::net::Network;
use crate::subtasks::Subtasks;

/// Largest request a guest may send through `host_call`.
const MAX_HOST_REQUEST: usize = 16 << 20;

/// Per-sandbox state held in the wasmtime `Store`.
pub struct HostState {
    pub wasi: WasiP1Ctx,
    pub limiter: MemoryLimiter,
    pub phase: Phase,
    pub network: Network,
    /// Calls to other tasks; `None` where there is no run to belong to.
    pub subtasks: Option<Subtasks>,
    /// The reply of the last `host_call`, waiting for `host_reply` to copy it.
    pending_reply: Vec<u8>,
}

/// What the sandbox is doing; host calls behave accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Snapshotting at build time: module-level code must not reach the outside world.
    Build,
    /// Running a task.
    Run,
}

impl HostState {
    /// A sandbox with no network; see [`HostState::with_network`].
    pub fn new(wasi: WasiP1Ctx, memory_limit: u64, phase: Phase) -> Self {
        Self {
            wasi,
            limiter: MemoryLimiter::new(memory_limit),
            phase,
            network: Network::new(HostPolicy::default(), Instant::now()),
            subtasks: None,
            pending_reply: Vec::new(),
        }
    }

    pub fn with_network(mut self, network: Network) -> Self {
        self.network = network;
        self
    }

    async fn handle(&mut self, request: &[u8]) -> Value {
        let refuse = |message: String| json!({"ok": false, "error": {"kind": "refused", "message": message}});
        let Ok(request) = serde_json::from_slice::<Value>(request) else {
            return refuse("host requests are JSON objects".into());
        };
        let method = request.get("method").and_then(Value::as_str).unwrap_or_default();
        match (self.phase, method) {
            (Phase::Build, method) => refuse(format!(
                "`{method}` is not available while `capsule build` imports the module; call it inside a task"
            )),
            (Phase::Run, "http.request") => self.network.handle(&request["request"]).await,
            (Phase::Run, "task.call" | "task.spawn" | "task.wait") => {
                let Some(subtasks) = self.subtasks.as_mut() else {
                    return refuse("calling other tasks needs a run (this sandbox has none)".into());
                };
                match method {
                    "task.call" => subtasks.call(&request).await,
                    "task.spawn" => subtasks.spawn(&request),
                    _ => subtasks.wait(&request).await,
                }
            }
            (Phase::Run, method) => refuse(format!("unknown host method `{method}`")),
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
    pub fn new(limit: u64) -> Self {
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

fn guest_memory(caller: &mut Caller<'_, HostState>) -> wasmtime::Result<wasmtime::Memory> {
    match caller.get_export(exports::MEMORY) {
        Some(Extern::Memory(memory)) => Ok(memory),
        _ => Err(wasmtime::format_err!("the module exports no memory")),
    }
}

/// A linker with WASI preview 1 and Capsule's host functions.
pub fn linker(engine: &Engine) -> Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |state: &mut HostState| &mut state.wasi)
        .map_err(|e| anyhow!("{e}"))
        .context("adding WASI to the linker")?;
    linker
        .func_wrap_async(
            HOST_MODULE,
            imports::HOST_CALL,
            |mut caller: Caller<'_, HostState>, (pointer, len): (i32, i32)| {
                Box::new(async move {
                    let len = usize::try_from(len).unwrap_or(usize::MAX);
                    if len > MAX_HOST_REQUEST {
                        return Ok(-1);
                    }
                    let memory = guest_memory(&mut caller)?;
                    let mut request = vec![0; len];
                    memory.read(&caller, pointer as u32 as usize, &mut request)?;
                    let reply = caller.data_mut().handle(&request).await;
                    let bytes = serde_json::to_vec(&reply).expect("JSON values serialise");
                    let reply_len = i32::try_from(bytes.len()).unwrap_or(-1);
                    caller.data_mut().pending_reply = bytes;
                    Ok(reply_len)
                })
            },
        )
        .map_err(|e| anyhow!("{e}"))?;
    linker
        .func_wrap(
            HOST_MODULE,
            imports::HOST_REPLY,
            |mut caller: Caller<'_, HostState>, destination: i32| -> wasmtime::Result<()> {
                let memory = guest_memory(&mut caller)?;
                let reply = std::mem::take(&mut caller.data_mut().pending_reply);
                memory.write(&mut caller, destination as u32 as usize, &reply)?;
                Ok(())
            },
        )
        .map_err(|e| anyhow!("{e}"))?;
    Ok(linker)
}
