//! The runtime as two modules, so that a build never compiles the runtime's code again:
//!
//! - the **code module**: the runtime, except that its memory and the initial values of its
//!   globals are imported. A snapshot changes data, never code, so it is compiled once per
//!   runtime and engine configuration, and every project built on that runtime shares it;
//! - a **state module** per build: no code, only a memory image and the globals' values. It
//!   imports the host functions the runtime imports and exports everything the code module
//!   imports, named by position (export `"3"` is the code module's fourth import), which is
//!   how `capsule_exec` links an instance of one to an instance of the other.
//!
//! The builder makes the state module of the runtime's initial state, imports the user's
//! module in an instance of the pair, reads the memory and globals back (the code module
//! exports its globals for this) and writes them as the project's state module.

use wasm_encoder::reencode::{Reencode, RoundtripReencoder, utils};
use wasm_encoder::{
    ConstExpr, DataSection, EntityType, ExportKind, ExportSection, GlobalSection, GlobalType, ImportSection,
    MemorySection, MemoryType, Module, TypeSection, ValType,
};
use wasmparser::{Parser, Payload, TypeRef};

/// The module name of what the code module imports from the state module.
const STATE_IMPORTS: &str = "capsule:state";
/// The code module's export of its global number `k` (read when snapshotting).
pub fn global_export(k: usize) -> String {
    format!("capsule:global{k}")
}

const WASM_PAGE: usize = 1 << 16;
/// Memory is written to the state module in runs of non-zero chunks of this size.
const CHUNK: usize = 4096;

/// A runtime this split does not apply to: it must define exactly one 32-bit memory and its
/// globals, import only functions, and initialise memory with active segments only.
#[derive(Debug, thiserror::Error)]
#[error("the runtime cannot be split into code and state: {0}")]
pub struct SplitError(String);

impl From<wasmparser::BinaryReaderError> for SplitError {
    fn from(error: wasmparser::BinaryReaderError) -> Self {
        Self(error.to_string())
    }
}

impl From<wasm_encoder::reencode::Error<std::convert::Infallible>> for SplitError {
    fn from(error: wasm_encoder::reencode::Error<std::convert::Infallible>) -> Self {
        Self(error.to_string())
    }
}

/// A global's value, as the state module initialises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    I32(i32),
    I64(i64),
    F32(u32),
    F64(u64),
}

impl Value {
    fn ty(self) -> ValType {
        match self {
            Self::I32(_) => ValType::I32,
            Self::I64(_) => ValType::I64,
            Self::F32(_) => ValType::F32,
            Self::F64(_) => ValType::F64,
        }
    }

    fn const_expr(self) -> ConstExpr {
        match self {
            Self::I32(x) => ConstExpr::i32_const(x),
            Self::I64(x) => ConstExpr::i64_const(x),
            Self::F32(bits) => ConstExpr::f32_const(f32::from_bits(bits).into()),
            Self::F64(bits) => ConstExpr::f64_const(f64::from_bits(bits).into()),
        }
    }
}

/// Linear memory and globals at one moment: the runtime's start, or a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Whole pages.
    pub memory: Vec<u8>,
    pub globals: Vec<Value>,
}

struct HostFunction {
    module: String,
    name: String,
    params: Vec<ValType>,
    results: Vec<ValType>,
}

/// What the two modules are made from, read once from the runtime.
pub struct Layout {
    host_functions: Vec<HostFunction>,
    memory: wasmparser::MemoryType,
    globals: Vec<wasmparser::GlobalType>,
}

impl Layout {
    /// The runtime's layout and its initial state (data segments applied to zeroed memory,
    /// globals at their initialisers).
    pub fn read(runtime: &[u8]) -> Result<(Self, State), SplitError> {
        let refuse = |what: &str| Err(SplitError(what.to_string()));
        let mut types = Vec::new();
        let mut host_functions = Vec::new();
        let mut memory = None;
        let mut globals = Vec::new();
        let mut values = Vec::new();
        let mut segments = Vec::new();
        for payload in Parser::new(0).parse_all(runtime) {
            match payload? {
                Payload::TypeSection(section) => {
                    for ty in section.into_iter_err_on_gc_types() {
                        types.push(ty?);
                    }
                }
                Payload::ImportSection(section) => {
                    for import in section.into_imports() {
                        let import = import?;
                        let TypeRef::Func(ty) = import.ty else {
                            return refuse("it imports something other than functions");
                        };
                        let ty = types.get(ty as usize).ok_or_else(|| SplitError("an import has no type".into()))?;
                        let convert = |types: &[wasmparser::ValType]| {
                            types.iter().map(|&t| RoundtripReencoder.val_type(t)).collect::<Result<Vec<_>, _>>()
                        };
                        host_functions.push(HostFunction {
                            module: import.module.to_string(),
                            name: import.name.to_string(),
                            params: convert(ty.params())?,
                            results: convert(ty.results())?,
                        });
                    }
                }
                Payload::MemorySection(section) => {
                    for ty in section {
                        if memory.replace(ty?).is_some() {
                            return refuse("it has more than one memory");
                        }
                    }
                }
                Payload::GlobalSection(section) => {
                    for global in section {
                        let global = global?;
                        globals.push(global.ty);
                        values.push(constant(&global.init_expr)?);
                    }
                }
                Payload::DataSection(section) => {
                    for data in section {
                        let data = data?;
                        let wasmparser::DataKind::Active { memory_index: 0, offset_expr } = data.kind else {
                            return refuse("it has passive data segments");
                        };
                        let Value::I32(offset) = constant(&offset_expr)? else {
                            return refuse("a data segment's offset is not an i32 constant");
                        };
                        segments.push((offset as u32 as usize, data.data));
                    }
                }
                Payload::StartSection { .. } => return refuse("it has a start function"),
                Payload::DataCountSection { .. } => return refuse("it uses bulk-memory data segments"),
                _ => {}
            }
        }
        let Some(memory) = memory else { return refuse("it defines no memory") };
        if memory.memory64 || memory.shared || memory.page_size_log2.is_some() {
            return refuse("its memory is not a plain 32-bit memory");
        }
        let mut bytes = vec![0; memory.initial as usize * WASM_PAGE];
        for (offset, data) in segments {
            let end = offset.checked_add(data.len()).filter(|&end| end <= bytes.len());
            let Some(end) = end else { return refuse("a data segment lies outside the initial memory") };
            bytes[offset..end].copy_from_slice(data);
        }
        let layout = Self { host_functions, memory, globals };
        Ok((layout, State { memory: bytes, globals: values }))
    }

    /// How many globals the runtime has (the code module exports each, see [`global_export`]).
    pub fn globals(&self) -> usize {
        self.globals.len()
    }

    /// The runtime with its memory and its globals' initial values imported, and its globals
    /// exported as [`global_export`]; every function body is unchanged but for global indices.
    pub fn code_module(&self, runtime: &[u8]) -> Result<Vec<u8>, SplitError> {
        let mut module = Module::new();
        CodeModule { layout: self }.parse_core_module(&mut module, Parser::new(0), runtime)?;
        Ok(module.finish())
    }

    /// The module holding `state`, for this runtime's code module.
    pub fn state_module(&self, state: &State) -> Result<Vec<u8>, SplitError> {
        let types_match = state.globals.len() == self.globals.len()
            && state
                .globals
                .iter()
                .zip(&self.globals)
                .all(|(v, g)| RoundtripReencoder.val_type(g.content_type).ok() == Some(v.ty()));
        if !types_match || !state.memory.len().is_multiple_of(WASM_PAGE) {
            return Err(SplitError("the state does not fit the runtime's globals and memory".into()));
        }
        let mut types = TypeSection::new();
        let mut imports = ImportSection::new();
        let mut exports = ExportSection::new();
        for (index, function) in self.host_functions.iter().enumerate() {
            let index = index as u32;
            types.ty().function(function.params.iter().copied(), function.results.iter().copied());
            imports.import(&function.module, &function.name, EntityType::Function(index));
            exports.export(&index.to_string(), ExportKind::Func, index);
        }
        let mut position = self.host_functions.len();
        let mut memories = MemorySection::new();
        memories.memory(MemoryType {
            minimum: (state.memory.len() / WASM_PAGE) as u64,
            maximum: self.memory.maximum,
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        exports.export(&position.to_string(), ExportKind::Memory, 0);
        let mut globals = GlobalSection::new();
        for (k, value) in state.globals.iter().enumerate() {
            position += 1;
            globals.global(GlobalType { val_type: value.ty(), mutable: false, shared: false }, &value.const_expr());
            exports.export(&position.to_string(), ExportKind::Global, k as u32);
        }
        let mut data = DataSection::new();
        for (offset, bytes) in non_zero_runs(&state.memory) {
            data.active(0, &ConstExpr::i32_const(offset as u32 as i32), bytes.iter().copied());
        }
        let mut module = Module::new();
        module.section(&types).section(&imports).section(&memories).section(&globals).section(&exports).section(&data);
        Ok(module.finish())
    }
}

/// The value of a constant initialiser of the kind wasm-ld writes.
fn constant(expr: &wasmparser::ConstExpr<'_>) -> Result<Value, SplitError> {
    let mut operators = expr.get_operators_reader();
    let value = match operators.read()? {
        wasmparser::Operator::I32Const { value } => Value::I32(value),
        wasmparser::Operator::I64Const { value } => Value::I64(value),
        wasmparser::Operator::F32Const { value } => Value::F32(value.bits()),
        wasmparser::Operator::F64Const { value } => Value::F64(value.bits()),
        _ => return Err(SplitError("a global or data offset is not a plain constant".into())),
    };
    match operators.read()? {
        wasmparser::Operator::End => Ok(value),
        _ => Err(SplitError("a global or data offset is not a plain constant".into())),
    }
}

/// The stretches of `memory` that are not all zeros, at chunk granularity.
fn non_zero_runs(memory: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut chunks = memory.chunks(CHUNK).enumerate().peekable();
    std::iter::from_fn(move || {
        let (first, _) = chunks.by_ref().find(|(_, chunk)| chunk.iter().any(|&b| b != 0))?;
        let mut end = first + 1;
        while chunks.next_if(|(_, chunk)| chunk.iter().any(|&b| b != 0)).is_some() {
            end += 1;
        }
        let start = first * CHUNK;
        Some((start, &memory[start..(end * CHUNK).min(memory.len())]))
    })
}

/// Rewrites the runtime into the code module: imports after the host functions, globals
/// renumbered past them.
struct CodeModule<'a> {
    layout: &'a Layout,
}

impl Reencode for CodeModule<'_> {
    type Error = std::convert::Infallible;

    fn global_index(&mut self, global: u32) -> Result<u32, wasm_encoder::reencode::Error<Self::Error>> {
        Ok(global + self.layout.globals.len() as u32)
    }

    fn parse_import_section(
        &mut self,
        imports: &mut ImportSection,
        section: wasmparser::ImportSectionReader<'_>,
    ) -> Result<(), wasm_encoder::reencode::Error<Self::Error>> {
        utils::parse_import_section(self, imports, section)?;
        let memory = self.layout.memory;
        imports.import(
            STATE_IMPORTS,
            "memory",
            EntityType::Memory(MemoryType {
                minimum: memory.initial,
                maximum: memory.maximum,
                memory64: false,
                shared: false,
                page_size_log2: None,
            }),
        );
        for (k, global) in self.layout.globals.iter().enumerate() {
            let val_type = self.val_type(global.content_type)?;
            imports.import(
                STATE_IMPORTS,
                &format!("global{k}"),
                EntityType::Global(GlobalType { val_type, mutable: false, shared: false }),
            );
        }
        Ok(())
    }

    fn parse_memory_section(
        &mut self,
        _: &mut MemorySection,
        _: wasmparser::MemorySectionReader<'_>,
    ) -> Result<(), wasm_encoder::reencode::Error<Self::Error>> {
        Ok(())
    }

    fn parse_global_section(
        &mut self,
        globals: &mut GlobalSection,
        section: wasmparser::GlobalSectionReader<'_>,
    ) -> Result<(), wasm_encoder::reencode::Error<Self::Error>> {
        for (k, global) in section.into_iter().enumerate() {
            let ty = self.global_type(global?.ty)?;
            globals.global(ty, &ConstExpr::global_get(k as u32));
        }
        Ok(())
    }

    fn parse_export_section(
        &mut self,
        exports: &mut ExportSection,
        section: wasmparser::ExportSectionReader<'_>,
    ) -> Result<(), wasm_encoder::reencode::Error<Self::Error>> {
        utils::parse_export_section(self, exports, section)?;
        for k in 0..self.layout.globals.len() {
            exports.export(&global_export(k), ExportKind::Global, self.global_index(k as u32)?);
        }
        Ok(())
    }

    fn parse_data_section(
        &mut self,
        _: &mut DataSection,
        _: wasmparser::DataSectionReader<'_>,
    ) -> Result<(), wasm_encoder::reencode::Error<Self::Error>> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime shaped like wasm-ld's output: host imports, one memory with data, a stack
    /// pointer, an export that reads and writes both.
    fn runtime() -> Vec<u8> {
        let mut types = TypeSection::new();
        types.ty().function([ValType::I32], [ValType::I32]);
        types.ty().function([], [ValType::I32]);
        let mut imports = ImportSection::new();
        imports.import("host", "double", EntityType::Function(0));
        let mut functions = wasm_encoder::FunctionSection::new();
        functions.function(1);
        let mut memories = MemorySection::new();
        memories.memory(MemoryType { minimum: 2, maximum: None, memory64: false, shared: false, page_size_log2: None });
        let mut globals = GlobalSection::new();
        globals
            .global(GlobalType { val_type: ValType::I32, mutable: true, shared: false }, &ConstExpr::i32_const(1024));
        let mut exports = ExportSection::new();
        exports.export("memory", ExportKind::Memory, 0);
        exports.export("run", ExportKind::Func, 1);
        let mut code = wasm_encoder::CodeSection::new();
        let mut body = wasm_encoder::Function::new([]);
        // stack_pointer += 1; return double(stack_pointer) + memory[70000]
        body.instructions()
            .global_get(0)
            .i32_const(1)
            .i32_add()
            .global_set(0)
            .global_get(0)
            .call(0)
            .i32_const(70000)
            .i32_load8_u(wasm_encoder::MemArg { offset: 0, align: 0, memory_index: 0 })
            .i32_add()
            .end();
        code.function(&body);
        let mut data = DataSection::new();
        data.active(0, &ConstExpr::i32_const(70000), [7u8]);
        let mut module = Module::new();
        module
            .section(&types)
            .section(&imports)
            .section(&functions)
            .section(&memories)
            .section(&globals)
            .section(&exports)
            .section(&code)
            .section(&data);
        module.finish()
    }

    fn validate(wasm: &[u8]) {
        wasmparser::Validator::new().validate_all(wasm).expect("valid module");
    }

    #[test]
    fn reads_the_initial_state() {
        let (layout, state) = Layout::read(&runtime()).unwrap();
        assert_eq!(state.memory.len(), 2 * WASM_PAGE);
        assert_eq!(state.memory[70000], 7);
        assert_eq!(state.memory.iter().filter(|&&b| b != 0).count(), 1);
        assert_eq!(state.globals, [Value::I32(1024)]);
        assert_eq!(layout.host_functions.len(), 1);
    }

    #[test]
    fn both_modules_are_valid_and_link_by_position() {
        let runtime = runtime();
        let (layout, mut state) = Layout::read(&runtime).unwrap();
        let code = layout.code_module(&runtime).unwrap();
        validate(&code);
        state.memory.extend(vec![0; WASM_PAGE]);
        state.memory[3 * WASM_PAGE - 1] = 9;
        state.globals[0] = Value::I32(2048);
        let image = layout.state_module(&state).unwrap();
        validate(&image);

        let engine = wasmtime::Engine::default();
        let code = wasmtime::Module::new(&engine, &code).unwrap();
        let image = wasmtime::Module::new(&engine, &image).unwrap();
        let mut store = wasmtime::Store::new(&engine, ());
        let mut linker = wasmtime::Linker::new(&engine);
        linker.func_wrap("host", "double", |x: i32| x * 2).unwrap();
        let held = linker.instantiate(&mut store, &image).unwrap();
        let imports: Vec<wasmtime::Extern> = (0..code.imports().len())
            .map(|i| held.get_export(&mut store, &i.to_string()).expect("an export per import"))
            .collect();
        let instance = wasmtime::Instance::new(&mut store, &code, &imports).unwrap();
        let run = instance.get_typed_func::<(), i32>(&mut store, "run").unwrap();
        assert_eq!(run.call(&mut store, ()).unwrap(), 2049 * 2 + 7);
        let memory = instance.get_memory(&mut store, "memory").unwrap();
        assert_eq!(memory.data(&store).len(), 3 * WASM_PAGE);
        assert_eq!(memory.data(&store)[3 * WASM_PAGE - 1], 9);
        let global = instance.get_global(&mut store, &global_export(0)).unwrap();
        assert_eq!(global.get(&mut store).i32(), Some(2049));
    }

    #[test]
    fn the_state_module_holds_only_the_non_zero_chunks() {
        let mut memory = vec![0u8; WASM_PAGE];
        memory[5] = 1;
        memory[CHUNK + 1] = 2;
        memory[5 * CHUNK] = 3;
        let runs: Vec<_> = non_zero_runs(&memory).map(|(offset, bytes)| (offset, bytes.len())).collect();
        assert_eq!(runs, [(0, 2 * CHUNK), (5 * CHUNK, CHUNK)]);
    }

    #[test]
    fn a_runtime_with_passive_data_is_refused() {
        let mut data = DataSection::new();
        data.passive([1u8]);
        let mut module = Module::new();
        module.section(&data);
        let error = Layout::read(&module.finish()).err().expect("refused").to_string();
        assert!(error.contains("passive data segments"), "{error}");
    }
}
