//! The runner's environment as a run sees it: where `env_passthrough` and `secrets` read
//! their values. By default the process's own; an embedder (or a test) gives its own map
//! instead of changing the process's environment.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Variables a run may read from its runner.
#[derive(Debug, Clone, Default)]
pub struct Environment(Option<Arc<BTreeMap<String, String>>>);

impl Environment {
    /// Exactly these variables, whatever the process's environment holds.
    pub fn of(variables: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(Some(Arc::new(variables.into_iter().collect())))
    }

    /// The value of `name`, if it is set (and valid Unicode).
    pub fn get(&self, name: &str) -> Option<String> {
        match &self.0 {
            Some(variables) => variables.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
    }
}
