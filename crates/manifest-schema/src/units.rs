//! The values `@task` options take: compute levels, memory sizes and durations.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::problem::Problem;

/// CPU budget of a task, in Wasm fuel units (about one per Wasm instruction executed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compute {
    Low,
    Medium,
    High,
    Fuel(u64),
}

impl Compute {
    /// Fuel of the named levels. README.md says how much CPU time each buys (measured).
    pub const LOW_FUEL: u64 = 5_000_000_000;
    pub const MEDIUM_FUEL: u64 = 50_000_000_000;
    pub const HIGH_FUEL: u64 = 500_000_000_000;
    /// Fuel a pure-Python loop burns per second of CPU on the reference machine (README's
    /// compute levels): what converts a budget to time under time metering.
    pub const FUEL_PER_SECOND: u64 = 7_000_000_000;

    pub fn fuel(self) -> u64 {
        match self {
            Self::Low => Self::LOW_FUEL,
            Self::Medium => Self::MEDIUM_FUEL,
            Self::High => Self::HIGH_FUEL,
            Self::Fuel(fuel) => fuel,
        }
    }

    /// The CPU time a fuel budget of `fuel` buys, for time metering.
    pub fn time_of(fuel: u64) -> std::time::Duration {
        std::time::Duration::from_secs_f64(fuel as f64 / Self::FUEL_PER_SECOND as f64)
    }

    /// Parses `"LOW"`, `"MEDIUM"`, `"HIGH"` (any case) or a positive integer given as text.
    pub fn parse(text: &str) -> Result<Self, Problem> {
        let trimmed = text.trim();
        match trimmed.to_ascii_uppercase().as_str() {
            "LOW" => return Ok(Self::Low),
            "MEDIUM" => return Ok(Self::Medium),
            "HIGH" => return Ok(Self::High),
            _ => {}
        }
        let digits: String = trimmed.chars().filter(|c| *c != '_').collect();
        match digits.parse::<u64>() {
            Ok(fuel) => Self::from_fuel(fuel),
            Err(_) => Err(Problem::hinted(
                format!("`{text}` is not a compute level"),
                "use \"LOW\", \"MEDIUM\", \"HIGH\" or a fuel budget such as \"50000000\"",
            )),
        }
    }

    pub fn from_fuel(fuel: u64) -> Result<Self, Problem> {
        if fuel == 0 {
            return Err(Problem::hinted("a fuel budget of 0 cannot run anything", "give a positive number"));
        }
        Ok(Self::Fuel(fuel))
    }
}

impl fmt::Display for Compute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Low => f.write_str("LOW"),
            Self::Medium => f.write_str("MEDIUM"),
            Self::High => f.write_str("HIGH"),
            Self::Fuel(fuel) => write!(f, "{fuel}"),
        }
    }
}

/// In the manifest, a level is its name and a budget its number: `"LOW"` or `1000000`.
impl Serialize for Compute {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Fuel(fuel) => serializer.serialize_u64(*fuel),
            level => serializer.collect_str(level),
        }
    }
}

impl<'de> Deserialize<'de> for Compute {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Fuel(u64),
            Level(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Fuel(fuel) => Self::from_fuel(fuel),
            Raw::Level(text) => Self::parse(&text),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// A memory size in bytes; written as an integer in the manifest (and read from text such as
/// `"512MiB"` too, as clients may send it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bytes(bytes) => Ok(Self(bytes)),
            Raw::Text(text) => Self::parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, Problem> {
        parse_memory(text).map(Self)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            b if b >= 1 << 20 && b % (1 << 20) == 0 => write!(f, "{}MiB", b >> 20),
            b if b >= 1_000_000 && b % 1_000_000 == 0 => write!(f, "{}MB", b / 1_000_000),
            b => write!(f, "{b}B"),
        }
    }
}

/// A wall-clock limit; written as text in the manifest (`"30s"`, `"500ms"`), read back exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timeout(pub Duration);

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) { write!(f, "{}s", ms / 1000) } else { write!(f, "{ms}ms") }
    }
}

impl Serialize for Timeout {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map(Self).map_err(serde::de::Error::custom)
    }
}

/// Parses a memory size such as `"64MB"`, `"1.5GiB"` or `"512 KiB"` into bytes.
/// `KB`/`MB`/`GB` are powers of 1000, `KiB`/`MiB`/`GiB` powers of 1024, `B` is bytes.
pub fn parse_memory(text: &str) -> Result<u64, Problem> {
    const UNITS: &[(&str, f64)] = &[
        ("kib", 1024.0),
        ("mib", 1024.0 * 1024.0),
        ("gib", 1024.0 * 1024.0 * 1024.0),
        ("kb", 1e3),
        ("mb", 1e6),
        ("gb", 1e9),
        ("b", 1.0),
    ];
    let hint = "write a size such as \"64MB\", \"512MiB\" or \"2GB\" (KB/MB/GB or KiB/MiB/GiB)";
    let (number, unit) =
        split_number(text).ok_or_else(|| Problem::hinted(format!("`{text}` is not a memory size"), hint))?;
    let Some((_, scale)) = UNITS.iter().find(|(name, _)| *name == unit.to_ascii_lowercase()) else {
        return Err(Problem::hinted(format!("`{unit}` in `{text}` is not a memory unit"), hint));
    };
    let bytes = number * scale;
    if bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(Problem::hinted(format!("`{text}` is out of range"), hint));
    }
    Ok(bytes.round() as u64)
}

/// Parses a duration such as `"500ms"`, `"30s"`, `"5m"`, `"1h"` or `"1.5s"`.
pub fn parse_duration(text: &str) -> Result<Duration, Problem> {
    let hint = "write a duration such as \"500ms\", \"30s\", \"5m\" or \"1h\"";
    let (number, unit) =
        split_number(text).ok_or_else(|| Problem::hinted(format!("`{text}` is not a duration"), hint))?;
    let seconds = match unit.to_ascii_lowercase().as_str() {
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        "" => return Err(Problem::hinted(format!("`{text}` has no unit"), hint)),
        _ => return Err(Problem::hinted(format!("`{unit}` in `{text}` is not a time unit"), hint)),
    };
    let duration =
        Duration::try_from_secs_f64(seconds).map_err(|_| Problem::hinted(format!("`{text}` is out of range"), hint))?;
    if duration.is_zero() {
        return Err(Problem::hinted(format!("a timeout of `{text}` leaves no time to run"), hint));
    }
    Ok(duration)
}

/// Splits `"1.5 GiB"` into `(1.5, "GiB")`.
fn split_number(text: &str) -> Option<(f64, &str)> {
    let trimmed = text.trim();
    let end = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_')).unwrap_or(trimmed.len());
    let digits: String = trimmed[..end].chars().filter(|c| *c != '_').collect();
    let number = digits.parse::<f64>().ok().filter(|n| n.is_finite())?;
    Some((number, trimmed[end..].trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_levels_and_budgets() {
        assert_eq!(Compute::parse("LOW").unwrap(), Compute::Low);
        assert_eq!(Compute::parse("medium").unwrap(), Compute::Medium);
        assert_eq!(Compute::parse("HIGH").unwrap().fuel(), Compute::HIGH_FUEL);
        assert_eq!(Compute::parse("1000000").unwrap(), Compute::Fuel(1_000_000));
        assert_eq!(Compute::parse("1_000").unwrap().fuel(), 1_000);
        assert!(Compute::parse("0").is_err());
        assert!(Compute::parse("FAST").unwrap_err().hint.unwrap().contains("LOW"));
        const { assert!(Compute::LOW_FUEL < Compute::MEDIUM_FUEL && Compute::MEDIUM_FUEL < Compute::HIGH_FUEL) };
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("64MB").unwrap(), 64_000_000);
        assert_eq!(parse_memory("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_memory("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_memory("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_memory("512kb").unwrap(), 512_000);
        assert_eq!(parse_memory("4096B").unwrap(), 4096);
        assert!(parse_memory("64").is_err());
        assert!(parse_memory("64XB").unwrap_err().message.contains("`XB`"));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("0MB").is_err());
    }

    #[test]
    fn typed_values_round_trip_as_written() {
        assert_eq!(Timeout(Duration::from_millis(1500)).to_string(), "1500ms");
        assert_eq!(Timeout(Duration::from_secs(120)).to_string(), "120s");
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
        assert_eq!(ByteSize(64_000_000).to_string(), "64MB");
        let json = serde_json_like(&Compute::Low);
        assert_eq!(json, "\"LOW\"");
    }

    fn serde_json_like(compute: &Compute) -> String {
        toml::Value::try_from(compute).unwrap().to_string()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("30").unwrap_err().message.contains("no unit"));
        assert!(parse_duration("3d").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
