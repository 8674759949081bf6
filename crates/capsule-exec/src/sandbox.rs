//! One attempt of one task: a fresh instance of the snapshot, with its own fuel, memory limit
//! and deadline, that is thrown away afterwards. Nothing a task does survives into the next.

use std::sync::Arc;
use std::time::{Duration, Instant};

use manifest_schema::{Compute, Metering};
use python_runtime::{ErrorKind, GuestError, InvokeReply, InvokeRequest, RegisteredTask, exports, unpack_buffer};
use serde_json::Value;
use wasmtime::{Engine, Extern, Instance, InstancePre, Module, ModuleExport, Store, Trap, TypedFunc, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::cancel::{Cancel, Stopped, until_stopped};
use crate::config::{EPOCH_TICK, FUEL_YIELD_INTERVAL};
use crate::events::Stream;
use crate::host::{HostCalls, RefuseHostCalls, SandboxState, linker};
use crate::outcome::{Captured, HttpCall};
use crate::output::TeeOutput;
use crate::quota::FileQuota;

/// The limits of one attempt.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub fuel: u64,
    pub memory_bytes: u64,
    pub timeout: Duration,
    pub files: FileQuota,
}

/// A host folder the task sees at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    pub host: std::path::PathBuf,
    pub guest: String,
    pub writable: bool,
}

/// Everything an attempt runs with besides its request.
pub struct AttemptSetup<'a> {
    pub limits: Limits,
    pub dirs: &'a [Preopen],
    pub host_calls: Box<dyn HostCalls>,
    pub stdout: TeeOutput,
    pub stderr: TeeOutput,
    pub cancel: &'a Cancel,
}

/// What one attempt did.
#[derive(Debug)]
pub struct Attempt {
    pub result: Result<Value, GuestError>,
    pub fuel_consumed: u64,
    pub peak_memory_bytes: u64,
    pub http_calls: Vec<HttpCall>,
    pub duration: Duration,
    pub stdout: Captured,
    pub stderr: Captured,
}

/// A loaded artifact, pre-linked so each attempt only instantiates it: the build's state
/// module (memory image and globals, which imports the host functions) and the runtime's
/// code module, which imports everything from it. Cloning is cheap.
#[derive(Clone)]
pub struct Program {
    engine: Engine,
    state: InstancePre<SandboxState>,
    code: Module,
    /// The state module's export for each import of the code module, in order.
    links: Arc<[ModuleExport]>,
    metering: Metering,
}

const NO_RUN: &str = "this sandbox belongs to no run";

impl Program {
    /// `state` and `code` compiled by `engine`, whose code counts CPU by `metering`.
    pub fn new(engine: &Engine, state: &Module, code: &Module, metering: Metering) -> wasmtime::Result<Self> {
        let pre = linker(engine)?.instantiate_pre(state)?;
        let links = code
            .imports()
            .enumerate()
            .map(|(position, import)| {
                state.get_export_index(&position.to_string()).ok_or_else(|| {
                    wasmtime::format_err!(
                        "the state module has nothing for the code's import `{}.{}`",
                        import.module(),
                        import.name()
                    )
                })
            })
            .collect::<wasmtime::Result<_>>()?;
        Ok(Self { engine: engine.clone(), state: pre, code: code.clone(), links, metering })
    }

    /// Linear memory the state module starts with (the snapshot's size).
    pub fn initial_memory_bytes(&self) -> u64 {
        self.state
            .module()
            .exports()
            .find_map(|export| export.ty().memory().map(|m| m.minimum() * m.page_size()))
            .unwrap_or(0)
    }

    /// An instance of the program in `store`: the state module's, then the code module's
    /// linked to it. Its code yields to the host regularly, so that the caller can stop it
    /// (`cancel::until_stopped`); fuel (when metered) is unlimited until the caller sets its
    /// limits.
    pub async fn instantiate(&self, store: &mut Store<SandboxState>) -> wasmtime::Result<Instance> {
        match self.metering {
            Metering::Fuel => {
                store.set_fuel(u64::MAX)?;
                store.fuel_async_yield_interval(Some(FUEL_YIELD_INTERVAL))?;
            }
            Metering::Time => store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1))),
        }
        let state = self.state.instantiate_async(&mut *store).await?;
        let imports = self
            .links
            .iter()
            .map(|link| state.get_module_export(&mut *store, link).expect("checked in `Program::new`"))
            .collect::<Vec<Extern>>();
        Instance::new_async(store, &self.code, &imports).await
    }

    /// A sandbox (store, WASI, limiter) for this program; instantiated on its first call.
    pub fn sandbox(
        &self,
        memory_bytes: u64,
        dirs: &[Preopen],
        host_calls: Box<dyn HostCalls>,
        stdout: TeeOutput,
        stderr: TeeOutput,
    ) -> Result<Sandbox, String> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone()).stderr(stderr.clone());
        for dir in dirs {
            let perms = if dir.writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly };
            wasi.preopened_dir(&dir.host, &dir.guest, perms)
                .map_err(|e| format!("cannot open `{}` for the task: {e}", dir.host.display()))?;
        }
        let state = SandboxState::new(wasi.build_p1(), memory_bytes, host_calls);
        let mut store = Store::new(&self.engine, state);
        SandboxState::limit(&mut store);
        Ok(Sandbox { program: self.clone(), store, instance: None, broken: false, stdout, stderr, memory_bytes })
    }

    fn quiet_sandbox(&self, memory_bytes: u64) -> Result<Sandbox, String> {
        let (stdout, stderr) = (TeeOutput::quiet(Stream::Stdout), TeeOutput::quiet(Stream::Stderr));
        self.sandbox(memory_bytes, &[], Box::new(RefuseHostCalls(NO_RUN)), stdout, stderr)
    }

    /// A fresh instance that runs nothing, kept alive by the returned value; what one idle
    /// sandbox costs is measured with it.
    pub async fn instantiate_idle(&self, memory_bytes: u64) -> wasmtime::Result<Sandbox> {
        let mut sandbox = self.quiet_sandbox(memory_bytes).map_err(wasmtime::Error::msg)?;
        sandbox.instantiate().await?;
        Ok(sandbox)
    }

    /// The tasks the snapshot's Python module registered.
    pub async fn describe(&self) -> Result<Vec<RegisteredTask>, String> {
        let mut sandbox = self.quiet_sandbox(u64::MAX)?;
        let reply = async {
            let instance = sandbox.instantiate().await?;
            let store = &mut sandbox.store;
            let describe: TypedFunc<(), i64> = instance.get_typed_func(&mut *store, exports::DESCRIBE)?;
            let packed = describe.call_async(&mut *store, ()).await?;
            read_reply(store, &instance, packed)
        }
        .await
        .map_err(|e| format!("asking the snapshot for its tasks: {e}\n{}", sandbox.stderr.captured().text))?;
        serde_json::from_slice(&reply)
            .map_err(|e| format!("the runtime described its tasks in an unexpected format: {e}"))
    }

    /// Runs one attempt of `request` in a fresh instance.
    pub async fn run(&self, request: &InvokeRequest, setup: AttemptSetup<'_>) -> Attempt {
        let started = Instant::now();
        let AttemptSetup { limits, dirs, host_calls, stdout, stderr, cancel } = setup;
        match self.sandbox(limits.memory_bytes, dirs, host_calls, stdout, stderr) {
            Ok(mut sandbox) => sandbox.call(request, &limits, None, cancel).await,
            Err(message) => Attempt {
                result: Err(GuestError::new(ErrorKind::Host, message)),
                fuel_consumed: 0,
                peak_memory_bytes: 0,
                http_calls: Vec::new(),
                duration: started.elapsed(),
                stdout: Captured::default(),
                stderr: Captured::default(),
            },
        }
    }
}

/// A store and, once called, its instance. For a task's attempt it serves one call; for a
/// session it serves call after call, its Python state carrying over, until a call ends in a
/// trap (then it is `broken` and must be replaced).
pub struct Sandbox {
    program: Program,
    store: Store<SandboxState>,
    instance: Option<Instance>,
    broken: bool,
    stdout: TeeOutput,
    stderr: TeeOutput,
    memory_bytes: u64,
}

impl Sandbox {
    async fn instantiate(&mut self) -> wasmtime::Result<Instance> {
        if let Some(instance) = self.instance {
            return Ok(instance);
        }
        let instance = self.program.instantiate(&mut self.store).await?;
        self.instance = Some(instance);
        Ok(instance)
    }

    /// Whether what the guest prints is reported (it is captured either way).
    pub fn mute(&self, muted: bool) {
        self.stdout.mute(muted);
        self.stderr.mute(muted);
    }

    /// Bytes written and files created by its calls so far.
    pub fn file_totals(&mut self) -> (u64, u64) {
        self.store.data_mut().file_usage().totals()
    }

    /// Takes over the file totals of a sandbox this one replaces.
    pub fn set_file_totals(&mut self, totals: (u64, u64)) {
        self.store.data_mut().file_usage().set_totals(totals);
    }

    /// Whether a call was cut short inside the guest: its state can no longer be trusted.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// The guest's linear memory (instantiating it if need be).
    pub async fn memory(&mut self) -> wasmtime::Result<&mut [u8]> {
        let instance = self.instantiate().await?;
        let memory = instance
            .get_memory(&mut self.store, exports::MEMORY)
            .ok_or_else(|| wasmtime::format_err!("the module exports no memory"))?;
        Ok(memory.data_mut(&mut self.store))
    }

    /// Grows the guest's memory to at least `bytes`.
    pub async fn grow_memory_to(&mut self, bytes: u64) -> wasmtime::Result<()> {
        let instance = self.instantiate().await?;
        let memory = instance
            .get_memory(&mut self.store, exports::MEMORY)
            .ok_or_else(|| wasmtime::format_err!("the module exports no memory"))?;
        let (have, page) = (memory.data_size(&self.store) as u64, memory.page_size(&self.store));
        if bytes > have {
            memory.grow_async(&mut self.store, (bytes - have).div_ceil(page)).await?;
        }
        Ok(())
    }

    /// One call of `request`, with fuel `limits.fuel` and a deadline of `limits.timeout` (the
    /// memory limit is the sandbox's); `host_calls` replaces the sandbox's for this call.
    pub async fn call(
        &mut self,
        request: &InvokeRequest,
        limits: &Limits,
        host_calls: Option<Box<dyn HostCalls>>,
        cancel: &Cancel,
    ) -> Attempt {
        let started = Instant::now();
        let deadline = started + limits.timeout;
        if let Some(host_calls) = host_calls {
            self.store.data_mut().host_calls = host_calls;
        }
        self.store.data_mut().start_call(limits.files);
        let metering = self.program.metering;
        let call = async {
            self.instantiate().await?;
            // Under fuel metering the code counts its own instructions; under time metering
            // each epoch tick seen while Wasm runs is counted against the budget's time.
            match metering {
                Metering::Fuel => self.store.set_fuel(limits.fuel)?,
                Metering::Time => {
                    let budget = Compute::time_of(limits.fuel);
                    let cpu_ticks = (budget.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64;
                    let mut ticks = 0u64;
                    self.store.epoch_deadline_callback(move |_| {
                        ticks += 1;
                        if ticks > cpu_ticks {
                            return Err(Trap::OutOfFuel.into());
                        }
                        Ok(UpdateDeadline::Yield(1))
                    });
                }
            }
            let instance = self.instance.expect("instantiated above");
            invoke(&mut self.store, &instance, request).await
        };
        let call = until_stopped(deadline, cancel, call).await;
        if !matches!(call, Ok(Ok(_))) {
            // Stopped inside the guest (or never started): its state is not to be reused.
            self.instance = None;
            self.broken = true;
        }
        // Nothing is counted under time metering: the attempt reports no fuel.
        let fuel_left = self.store.get_fuel().unwrap_or(limits.fuel);
        let memory = self.store.data().memory();
        let stderr = self.stderr.take();
        // Once the run is cancelled, whatever failed failed because of it (a parent sees its
        // cancelled child as an exception, for one).
        let result = match call {
            Ok(Ok(reply)) => reply.into_result(),
            Err(Stopped::Cancelled) => Err(cancelled_error()),
            Err(Stopped::Deadline) => Err(timeout_error(limits.timeout)),
            Ok(Err(error)) => {
                Err(classify_trap(&error, limits, metering, self.memory_bytes, memory.exceeded(), &stderr))
            }
        }
        .map_err(|error| if cancel.is_cancelled() { cancelled_error() } else { error });
        // A MemoryError raised because the limiter refused to grow is a memory failure.
        let result = result.map_err(|mut error| {
            if memory.exceeded() && error.exc_type == "MemoryError" {
                error.kind = ErrorKind::Memory;
            }
            if error.kind == ErrorKind::Memory && error.message.is_empty() {
                error.message = format!("the task reached its memory limit of {} bytes", self.memory_bytes);
            }
            if let Some(refusal) = self.store.data().file_quota_refusal() {
                error.message = format!("{} ({refusal})", error.message);
            }
            error
        });
        Attempt {
            result,
            fuel_consumed: limits.fuel.saturating_sub(fuel_left),
            peak_memory_bytes: memory.peak(),
            http_calls: self.store.data_mut().host_calls.take_http_calls(),
            duration: started.elapsed(),
            stdout: self.stdout.take(),
            stderr,
        }
    }
}

async fn invoke(
    store: &mut Store<SandboxState>,
    instance: &Instance,
    request: &InvokeRequest,
) -> wasmtime::Result<InvokeReply> {
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
    let reply = read_reply(store, instance, packed)?;
    serde_json::from_slice(&reply).map_err(|e| wasmtime::format_err!("the runtime's reply is not valid JSON: {e}"))
}

fn read_reply(
    store: &mut Store<SandboxState>,
    instance: &wasmtime::Instance,
    packed: i64,
) -> wasmtime::Result<Vec<u8>> {
    let (pointer, len) = unpack_buffer(packed)
        .ok_or_else(|| wasmtime::format_err!("the sandbox ran out of memory while writing its reply"))?;
    let memory = instance
        .get_memory(&mut *store, exports::MEMORY)
        .ok_or_else(|| wasmtime::format_err!("the module exports no memory"))?;
    let mut reply = vec![0; len as usize];
    memory.read(&*store, pointer as usize, &mut reply)?;
    Ok(reply)
}

fn timeout_error(timeout: Duration) -> GuestError {
    GuestError::new(ErrorKind::Timeout, format!("the task did not finish within its {timeout:?} timeout"))
}

fn cancelled_error() -> GuestError {
    GuestError::new(ErrorKind::Cancelled, "the run was stopped")
}

/// Turns a trap or host error into the envelope's error kinds.
fn classify_trap(
    error: &wasmtime::Error,
    limits: &Limits,
    metering: Metering,
    memory_bytes: u64,
    memory_exceeded: bool,
    stderr: &Captured,
) -> GuestError {
    // What the runtime printed before trapping (e.g. a Python traceback) explains the trap.
    let tail: String = {
        let text = stderr.text.as_str();
        let start = text.len().saturating_sub(4096);
        let start = (start..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        text[start..].to_string()
    };
    let with_tail = |kind, message: String| GuestError { traceback: tail.clone(), ..GuestError::new(kind, message) };
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => GuestError::new(
            ErrorKind::Fuel,
            match metering {
                Metering::Fuel => format!("the task used up its compute budget of {} fuel", limits.fuel),
                Metering::Time => format!(
                    "the task used up its compute budget of {} fuel, {:.2} s of CPU under time metering",
                    limits.fuel,
                    Compute::time_of(limits.fuel).as_secs_f64()
                ),
            },
        ),
        Some(Trap::StackOverflow) => with_tail(
            ErrorKind::StackOverflow,
            "the task exhausted the sandbox's stack (runaway recursion in native code)".into(),
        ),
        _ if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() => GuestError {
            exc_type: "SystemExit".into(),
            ..with_tail(
                ErrorKind::Exception,
                format!("the task ended the interpreter with exit status {} (`os._exit`)", exit.0),
            )
        },
        _ if memory_exceeded => {
            with_tail(ErrorKind::Memory, format!("the task needed more than its memory limit of {memory_bytes} bytes"))
        }
        _ => with_tail(ErrorKind::Host, format!("the sandbox stopped: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::is_retryable;

    fn classify(error: wasmtime::Error) -> GuestError {
        let limits = Limits { fuel: 1, memory_bytes: 1, timeout: Duration::from_secs(1), files: FileQuota::UNLIMITED };
        classify_trap(&error, &limits, Metering::Fuel, 1, false, &Captured::default())
    }

    #[test]
    fn a_stack_overflow_has_its_own_kind_and_is_not_retried() {
        let error = classify(Trap::StackOverflow.into());
        assert_eq!(error.kind, ErrorKind::StackOverflow);
        assert!(!is_retryable(error.kind), "the same snapshot overflows the same way again");
    }

    #[test]
    fn an_exit_of_the_interpreter_names_its_status() {
        let error = classify(wasmtime_wasi::I32Exit(7).into());
        assert_eq!((error.kind, error.exc_type.as_str()), (ErrorKind::Exception, "SystemExit"));
        assert!(error.message.contains("exit status 7"), "{}", error.message);
    }
}
