//! Capsule's runner. It loads artifacts that `capsule build` compiled, after checking their
//! hash, and runs tasks in fresh sandboxes with fuel, memory and deadline limits. It contains
//! no compiler: everything it runs was compiled ahead of time.

pub mod artifact;
pub mod cli;
pub mod engine;
pub mod host;
pub mod journal;
pub mod net;
pub mod output;
pub mod run;
pub mod sandbox;
pub mod subtasks;

use std::path::Path;

use anyhow::Result;
use wasmtime::{Engine, Module};

pub use artifact::{Artifact, LoadError};
pub use run::{Call, Outcome, run_task};
pub use sandbox::{Access, Limits, Preopen, Program, Streams};

/// The shared engine of a process, with its epoch ticker.
pub struct Runner {
    engine: engine::TickingEngine,
}

impl Runner {
    pub fn new() -> Result<Self> {
        Self::with_config(&engine::config())
    }

    /// A runner on `config`, which must be [`engine::config`] plus settings that do not
    /// change compiled code (the builder adds its compilation cache).
    pub fn with_config(config: &wasmtime::Config) -> Result<Self> {
        // TLS for tasks' HTTP calls; a provider installed earlier by the embedder is kept.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Self { engine: engine::TickingEngine::new(config)? })
    }

    pub fn engine(&self) -> &Engine {
        self.engine.engine()
    }

    /// Loads and verifies the artifact of `manifest`.
    pub fn load(&self, manifest: &Path) -> Result<(Artifact, Program), LoadError> {
        let artifact = Artifact::load(self.engine(), manifest)?;
        let program = self
            .program(&artifact.module)
            .map_err(|e| LoadError::Deserialize { path: manifest.to_path_buf(), message: format!("{e:#}") })?;
        Ok((artifact, program))
    }

    pub fn program(&self, module: &Module) -> Result<Program> {
        Program::new(self.engine(), module)
    }
}
