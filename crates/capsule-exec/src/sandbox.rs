//! One attempt of one task: a fresh instance of the snapshot, with its own fuel, memory limit
//! and deadline, that is thrown away afterwards. Nothing a task does survives into the next.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use manifest_schema::HostPolicy;
use python_runtime::{ErrorKind, GuestError, InvokeReply, InvokeRequest, RegisteredTask, exports, unpack_buffer};
use serde_json::Value;
use wasmtime::{Engine, InstancePre, Module, Store, Trap, TypedFunc, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::host::{HostState, Phase, linker};
use crate::net::{HostRequest, Network};
use crate::output::{Captured, LiveSink, TeeOutput};
use crate::subtasks::{Scope, Subtasks};

/// The limits of one attempt.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub fuel: u64,
    pub memory_bytes: u64,
    pub timeout: Duration,
}

/// Where a task's stdout and stderr are shown while it runs.
#[derive(Debug, Clone, Copy)]
pub struct Streams {
    pub stdout: LiveSink,
    pub stderr: LiveSink,
}

/// What one attempt did.
#[derive(Debug)]
pub struct Attempt {
    pub result: Result<Value, GuestError>,
    pub fuel_consumed: u64,
    pub peak_memory_bytes: u64,
    pub host_requests: Vec<HostRequest>,
    pub duration: Duration,
    pub stdout: Captured,
    pub stderr: Captured,
}

/// What a task may reach beyond its own memory.
#[derive(Clone, Default)]
pub struct Access {
    pub hosts: HostPolicy,
    pub dirs: Vec<Preopen>,
    /// Where the task is in its run, for calling sub-tasks.
    pub subtasks: Option<Scope>,
}

/// A host folder the task sees at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    pub host: std::path::PathBuf,
    pub guest: String,
    pub writable: bool,
}

/// An instance held without running; dropping it frees the sandbox.
pub struct IdleSandbox {
    _store: Store<HostState>,
    _instance: wasmtime::Instance,
}

/// A loaded module, pre-linked so each attempt only instantiates it. Cloning is cheap.
#[derive(Clone)]
pub struct Program {
    engine: Engine,
    pre: InstancePre<HostState>,
}

impl Program {
    pub fn new(engine: &Engine, module: &Module) -> Result<Self> {
        let pre = linker(engine)?
            .instantiate_pre(module)
            .map_err(|e| anyhow!("{e}"))
            .context("linking the module against the host")?;
        Ok(Self { engine: engine.clone(), pre })
    }

    /// Linear memory the module has before any code runs (the snapshot's size).
    pub fn initial_memory_bytes(&self) -> u64 {
        self.pre
            .module()
            .exports()
            .find_map(|export| export.ty().memory().map(|m| m.minimum() * m.page_size()))
            .unwrap_or(0)
    }

    fn store(
        &self,
        limits: &Limits,
        streams: Streams,
        network: Network,
        dirs: &[Preopen],
    ) -> Result<(Store<HostState>, TeeOutput, TeeOutput)> {
        let stdout = TeeOutput::new(streams.stdout);
        let stderr = TeeOutput::new(streams.stderr);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone()).stderr(stderr.clone());
        for dir in dirs {
            let perms = if dir.writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly };
            wasi.preopened_dir(&dir.host, &dir.guest, perms)
                .map_err(|e| anyhow!("cannot open `{}` for the task: {e}", dir.host.display()))?;
        }
        let wasi = wasi.build_p1();
        let state = HostState::new(wasi, limits.memory_bytes, Phase::Run).with_network(network);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        Ok((store, stdout, stderr))
    }

    /// A fresh instance that runs nothing, kept alive by the returned value; what one idle
    /// sandbox costs is measured with it.
    pub async fn instantiate_idle(&self, limits: &Limits) -> Result<IdleSandbox> {
        let streams = Streams { stdout: LiveSink::Quiet, stderr: LiveSink::Quiet };
        let (mut store, _, _) =
            self.store(limits, streams, Network::new(HostPolicy::default(), Instant::now()), &[])?;
        store.set_fuel(limits.fuel).map_err(|e| anyhow!("{e}"))?;
        store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
        let instance = self.pre.instantiate_async(&mut store).await.map_err(|e| anyhow!("{e}"))?;
        Ok(IdleSandbox { _store: store, _instance: instance })
    }

    /// The tasks the snapshot's Python module registered.
    pub async fn describe(&self) -> Result<Vec<RegisteredTask>> {
        let limits = Limits { fuel: u64::MAX, memory_bytes: u64::MAX, timeout: Duration::from_secs(60) };
        let streams = Streams { stdout: LiveSink::Quiet, stderr: LiveSink::Quiet };
        let (mut store, _, stderr) =
            self.store(&limits, streams, Network::new(HostPolicy::default(), Instant::now()), &[])?;
        store.set_fuel(u64::MAX).map_err(|e| anyhow!("{e}"))?;
        store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
        let reply = async {
            let instance = self.pre.instantiate_async(&mut store).await?;
            let describe: TypedFunc<(), i64> = instance.get_typed_func(&mut store, exports::DESCRIBE)?;
            let packed = describe.call_async(&mut store, ()).await?;
            read_reply(&mut store, &instance, packed)
        }
        .await
        .map_err(|e| anyhow!("{e}\n{}", stderr.captured().text))
        .context("asking the snapshot for its tasks")?;
        serde_json::from_slice(&reply).context("the runtime described its tasks in an unexpected format")
    }

    /// Runs one attempt of `request` in a fresh instance, with the given access.
    pub async fn run(&self, request: &InvokeRequest, limits: &Limits, access: &Access, streams: Streams) -> Attempt {
        let started = Instant::now();
        let deadline = started + limits.timeout;
        // Sub-task and HTTP calls of this attempt share one sequence: their positions in it
        // identify them in the journal.
        let sequence = Arc::new(AtomicU32::new(0));
        let journal = access.subtasks.as_ref().and_then(|scope| scope.journal.clone());
        let network = Network::new(access.hosts.clone(), deadline).with_journal(journal, sequence.clone());
        let (mut store, stdout, stderr) = match self.store(limits, streams, network, &access.dirs) {
            Ok((mut store, stdout, stderr)) => {
                store.data_mut().subtasks =
                    access.subtasks.clone().map(|scope| Subtasks::new(scope, deadline, sequence.clone()));
                (store, stdout, stderr)
            }
            Err(error) => {
                return Attempt {
                    result: Err(failure(ErrorKind::Host, format!("{error:#}"), String::new())),
                    fuel_consumed: 0,
                    peak_memory_bytes: 0,
                    host_requests: Vec::new(),
                    duration: started.elapsed(),
                    stdout: Captured::default(),
                    stderr: Captured::default(),
                };
            }
        };
        store.set_fuel(limits.fuel).expect("fuel is enabled in the engine config");
        // CPU-bound code is stopped at the next epoch tick after the deadline; code waiting in
        // the host (e.g. `time.sleep`) is stopped by the timeout around the whole call.
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= deadline { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
        });
        let call = tokio::time::timeout(limits.timeout, self.invoke(&mut store, request)).await;
        let fuel_left = store.get_fuel().unwrap_or(0);
        let limiter = &store.data().limiter;
        let result = match call {
            Err(_elapsed) => Err(timeout_error(limits.timeout)),
            Ok(Ok(reply)) => reply.into_result(),
            Ok(Err(error)) => Err(classify_trap(&error, limits, limiter.exceeded(), &stderr.captured())),
        };
        // A MemoryError raised because the limiter refused to grow is a memory failure.
        let result = result.map_err(|mut error| {
            if limiter.exceeded() && error.exc_type == "MemoryError" {
                error.kind = ErrorKind::Memory;
            }
            if error.kind == ErrorKind::Memory && error.message.is_empty() {
                error.message = format!("the task reached its memory limit of {} bytes", limits.memory_bytes);
            }
            error
        });
        Attempt {
            result,
            fuel_consumed: limits.fuel.saturating_sub(fuel_left),
            peak_memory_bytes: limiter.peak(),
            host_requests: std::mem::take(&mut store.data_mut().network.requests),
            duration: started.elapsed(),
            stdout: stdout.captured(),
            stderr: stderr.captured(),
        }
    }

    async fn invoke(&self, store: &mut Store<HostState>, request: &InvokeRequest) -> wasmtime::Result<InvokeReply> {
        let instance = self.pre.instantiate_async(&mut *store).await?;
        let alloc: TypedFunc<i32, i32> = instance.get_typed_func(&mut *store, exports::ALLOC)?;
        let free: TypedFunc<i32, ()> = instance.get_typed_func(&mut *store, exports::FREE)?;
        let invoke: TypedFunc<(i32, i32), i64> = instance.get_typed_func(&mut *store, exports::INVOKE)?;
        let memory = instance
            .get_memory(&mut *store, exports::MEMORY)
            .ok_or_else(|| wasmtime::format_err!("the module exports no memory"))?;

        let body = serde_json::to_vec(request).expect("requests serialise");
        let len = i32::try_from(body.len()).map_err(|_| wasmtime::format_err!("request too large"))?;
        let pointer = alloc.call_async(&mut *store, len).await?;
        if pointer == 0 {
            return Err(wasmtime::format_err!("the sandbox could not allocate {len} bytes for the request"));
        }
        memory.write(&mut *store, pointer as u32 as usize, &body)?;
        let packed = invoke.call_async(&mut *store, (pointer, len)).await?;
        free.call_async(&mut *store, pointer).await?;
        let reply = read_reply(store, &instance, packed)?;
        serde_json::from_slice(&reply).map_err(|e| wasmtime::format_err!("the runtime's reply is not valid JSON: {e}"))
    }
}

fn read_reply(store: &mut Store<HostState>, instance: &wasmtime::Instance, packed: i64) -> wasmtime::Result<Vec<u8>> {
    let (pointer, len) = unpack_buffer(packed)
        .ok_or_else(|| wasmtime::format_err!("the sandbox ran out of memory while writing its reply"))?;
    let memory = instance
        .get_memory(&mut *store, exports::MEMORY)
        .ok_or_else(|| wasmtime::format_err!("the module exports no memory"))?;
    let mut reply = vec![0; len as usize];
    memory.read(&*store, pointer as usize, &mut reply)?;
    Ok(reply)
}

fn failure(kind: ErrorKind, message: String, traceback: String) -> GuestError {
    GuestError { kind, exc_type: String::new(), message, traceback }
}

fn timeout_error(timeout: Duration) -> GuestError {
    failure(ErrorKind::Timeout, format!("the task did not finish within its {timeout:?} timeout"), String::new())
}

/// Turns a trap or host error into the envelope's error kinds.
fn classify_trap(error: &wasmtime::Error, limits: &Limits, memory_exceeded: bool, stderr: &Captured) -> GuestError {
    // What the runtime printed before trapping (e.g. a Python traceback) explains the trap.
    let tail: String = {
        let text = stderr.text.as_str();
        let start = text.len().saturating_sub(4096);
        let start = (start..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        text[start..].to_string()
    };
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => failure(
            ErrorKind::Fuel,
            format!("the task used up its compute budget of {} fuel", limits.fuel),
            String::new(),
        ),
        Some(Trap::Interrupt) => timeout_error(limits.timeout),
        Some(Trap::StackOverflow) => GuestError {
            kind: ErrorKind::Exception,
            exc_type: "StackOverflow".into(),
            message: "the task exhausted the sandbox's stack (runaway recursion in native code)".into(),
            traceback: tail,
        },
        _ if memory_exceeded => failure(
            ErrorKind::Memory,
            format!("the task needed more than its memory limit of {} bytes", limits.memory_bytes),
            tail,
        ),
        _ => failure(ErrorKind::Host, format!("the sandbox stopped: {error}"), tail),
    }
}
