//! The states a run and a task call go through, under the names every record and view uses:
//! the journal, the daemon's registry and API, `capsule list` and `capsule runs`, and cluster
//! workers' reports.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Accepted by a daemon, waiting for a free worker.
    Queued,
    Running,
    Ok,
    Failed,
    /// Stopped from outside.
    Cancelled,
    /// Its process ended before it did (shutdown, crash); it can be resumed.
    Interrupted,
}

/// Where a task call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    Running,
    Ok,
    Failed,
    /// Its result came from the journal (or the cluster's records): it did not run again.
    Replayed,
    /// Its run ended while it was still running.
    Aborted,
}

impl RunState {
    pub const ALL: [Self; 6] =
        [Self::Queued, Self::Running, Self::Ok, Self::Failed, Self::Cancelled, Self::Interrupted];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
        }
    }

    /// Whether the run has ended for good (an interrupted run can be resumed).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Ok | Self::Failed | Self::Cancelled)
    }
}

impl CallStatus {
    pub const ALL: [Self; 5] = [Self::Running, Self::Ok, Self::Failed, Self::Replayed, Self::Aborted];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Replayed => "replayed",
            Self::Aborted => "aborted",
        }
    }

    /// `Ok` or `Failed`, as a call that ran to its end with `success`.
    pub fn ended(success: bool) -> Self {
        if success { Self::Ok } else { Self::Failed }
    }
}

/// A state's name that is not one of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a known state")]
pub struct UnknownState(pub String);

macro_rules! named {
    ($type:ty) => {
        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $type {
            type Err = UnknownState;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                Self::ALL.into_iter().find(|state| state.as_str() == text).ok_or_else(|| UnknownState(text.into()))
            }
        }
    };
}

named!(RunState);
named!(CallStatus);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for state in RunState::ALL {
            assert_eq!(state.as_str().parse::<RunState>(), Ok(state));
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        for status in CallStatus::ALL {
            assert_eq!(status.as_str().parse::<CallStatus>(), Ok(status));
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        assert!("done".parse::<RunState>().is_err());
    }
}
