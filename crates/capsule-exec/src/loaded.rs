//! A verified artifact loaded into the engine: what every run and session of it shares.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use manifest_schema::Manifest;

use crate::sandbox::Program;

/// A verified artifact, loaded and ready to run; shared by every run of it.
pub struct Loaded {
    manifest: Manifest,
    /// The folder the manifest was read from: no grant of its runs may reach it.
    dir: PathBuf,
    program: Program,
    /// The memory an instance starts with, for saving sessions (read once, when needed).
    initial_memory: tokio::sync::OnceCell<Arc<Vec<u8>>>,
}

impl Loaded {
    pub(crate) fn new(manifest: Manifest, dir: PathBuf, program: Program) -> Self {
        Self { manifest, dir, program, initial_memory: Default::default() }
    }

    /// The same program under another manifest (another build of the same artifact), read
    /// from `dir`: the compiled code and the initial memory are shared.
    pub(crate) fn with_manifest(&self, manifest: Manifest, dir: PathBuf) -> Self {
        Self { manifest, dir, program: self.program.clone(), initial_memory: self.initial_memory.clone() }
    }

    /// The folder its manifest was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Linear memory the snapshot starts with.
    pub fn initial_memory_bytes(&self) -> u64 {
        self.program.initial_memory_bytes()
    }

    pub(crate) fn program(&self) -> &Program {
        &self.program
    }

    /// The linear memory a fresh instance starts with.
    pub(crate) async fn initial_memory(&self) -> Result<Arc<Vec<u8>>, String> {
        let read = async {
            let mut sandbox = self.program.instantiate_idle(u64::MAX).await.map_err(|e| e.to_string())?;
            let memory = sandbox.memory().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(Arc::new(memory.to_vec()))
        };
        self.initial_memory.get_or_try_init(|| read).await.cloned()
    }

    /// A fresh instance that runs nothing; what one idle sandbox costs is measured with it.
    pub async fn instantiate_idle(&self) -> Result<impl Sized, String> {
        let ram = self.manifest.tasks[0].options.ram.bytes();
        self.program.instantiate_idle(ram).await.map_err(|e| e.to_string())
    }
}
