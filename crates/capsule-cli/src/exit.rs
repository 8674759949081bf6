//! Exit codes and how failures are shown: one table, one renderer.

use std::process::ExitCode;

use manifest_schema::{Explain, Problem, problem::render};

/// Why a command ended, as its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The command did what was asked.
    Success = 0,
    /// The task ran and failed (after its retries), or was stopped.
    TaskFailed = 1,
    /// The command line, a file or an id named something that is not there or not valid.
    Usage = 2,
    /// `capsule build` (or the build step of `run`) failed.
    Build = 3,
    /// An artifact or manifest could not be loaded (hash, engine, format).
    Load = 4,
    /// Capsule itself failed: a bug, or the machine refused something (disk, threads).
    Internal = 70,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// A command that failed before or around its task: what to show, and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub problems: Vec<Problem>,
}

impl Failure {
    pub fn new(exit: Exit, error: &dyn Explain) -> Self {
        Self { exit, problems: error.problems() }
    }

    pub fn usage(error: &dyn Explain) -> Self {
        Self::new(Exit::Usage, error)
    }

    pub fn problem(exit: Exit, problem: Problem) -> Self {
        Self { exit, problems: vec![problem] }
    }

    /// Prints the problems on stderr and gives the exit code.
    pub fn report(&self) -> ExitCode {
        eprint!("{}", render(&self.problems));
        self.exit.into()
    }
}

impl From<capsule_exec::EngineError> for Failure {
    fn from(error: capsule_exec::EngineError) -> Self {
        use capsule_exec::EngineError;
        let exit = match &error {
            EngineError::Load(_) => Exit::Load,
            EngineError::Setup(_) => Exit::Internal,
            EngineError::Journal(
                capsule_exec::JournalError::Database { .. } | capsule_exec::JournalError::Folder { .. },
            ) => Exit::Internal,
            _ => Exit::Usage,
        };
        Self::new(exit, &error)
    }
}

impl From<capsule_exec::LoadError> for Failure {
    fn from(error: capsule_exec::LoadError) -> Self {
        Self::new(Exit::Load, &error)
    }
}

impl From<capsule_exec::JournalError> for Failure {
    fn from(error: capsule_exec::JournalError) -> Self {
        Self::from(capsule_exec::EngineError::Journal(error))
    }
}

#[cfg(feature = "build")]
impl From<capsule_build::BuildError> for Failure {
    fn from(error: capsule_build::BuildError) -> Self {
        Self::new(Exit::Build, &error)
    }
}
