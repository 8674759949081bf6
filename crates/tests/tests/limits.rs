//! Limits that always hold: fuel, memory, deadline, retries, bounded output, and a host that
//! carries on after every kind of failure.

use std::sync::{Mutex, MutexGuard, PoisonError};

use manifest_schema::{Compute, Metering};
use python_runtime::ErrorKind;
use serde_json::json;
use tests::{Built, build_into, load, shared};

const LIMITS: &str = "valid/limits.py";

/// About 1,200 fuel per iteration: more than `LOW` buys, far less than `HIGH`.
const ITERATIONS: u64 = 6_000_000;

#[test]
fn fuel_budgets_are_enforced_and_reported() {
    let built = shared(LIMITS);
    let low = built.run("count_low", vec![json!(ITERATIONS)]);
    assert_eq!(low.error.as_ref().map(|e| e.kind), Some(ErrorKind::Fuel), "{:?}", low.error);
    assert_eq!(low.execution.fuel_consumed, Compute::LOW_FUEL, "a failed attempt reports the fuel it used");

    let high = built.run("count_high", vec![json!(ITERATIONS)]);
    assert!(high.success, "{:?}", high.error);
    let n = ITERATIONS as u128;
    assert_eq!(high.result, json!(n * (n - 1) / 2));
    assert!(high.execution.fuel_consumed > Compute::LOW_FUEL && high.execution.fuel_consumed < Compute::HIGH_FUEL);

    let exhausted = built.run("count_custom", vec![json!(1_000_000_000)]);
    assert_eq!(exhausted.error.map(|e| e.kind), Some(ErrorKind::Fuel));
    assert_eq!(exhausted.execution.fuel_consumed, 50_000_000, "a custom budget is exact");
    let within = built.run("count_custom", vec![json!(1_000)]);
    assert!(within.success && within.execution.fuel_consumed < 50_000_000, "{:?}", within.error);
}

#[test]
fn time_metering_counts_a_budget_in_cpu_time_instead_of_fuel() {
    let project = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures::path(LIMITS), project.path().join("limits.py")).unwrap();
    std::fs::write(project.path().join("capsule.toml"), "[runtime]\nmetering = \"time\"\n").unwrap();
    let output = build_into(&project.path().join("limits.py"), &project.path().join(".capsule/build"), true);
    assert_eq!(output.manifest.engine.metering, Metering::Time);
    assert!(std::fs::read_to_string(&output.manifest_path).unwrap().contains("metering = \"time\""));
    let built = load(output);

    let within = built.run("count_low", vec![json!(1_000)]);
    assert!(within.success, "{:?}", within.error);
    assert_eq!(within.result, json!(499_500));
    assert_eq!(within.execution.fuel_consumed, 0, "nothing counts fuel");

    // 50,000,000 fuel buys ~7 ms under time metering; the loop would run for minutes (and
    // meet the 5-minute deadline, a `timeout`, if nothing counted its time).
    let exhausted = built.run("count_custom", vec![json!(1_000_000_000)]);
    let error = exhausted.error.expect("stopped");
    assert_eq!(error.kind, ErrorKind::Fuel, "{}", error.message);
    assert!(error.message.contains("0.01 s of CPU under time metering"), "{}", error.message);

    // Deadlines are looked at whenever the code yields, here at every epoch tick.
    assert_deadlines_stop_busy_loops_and_sleeps(&built);

    // The same engine runs fuel-metered artifacts beside it.
    let fuel = shared(LIMITS).run("count_custom", vec![json!(1_000_000_000)]);
    assert_eq!(fuel.execution.fuel_consumed, 50_000_000);
}

/// Held by the tests that measure this process's resident memory and by those that make it
/// grow (a memory bomb, 100 MiB of output): the harness runs a file's tests on parallel
/// threads of one process, so a measurement would otherwise count another test's memory.
static HOST_MEMORY: Mutex<()> = Mutex::new(());

fn host_memory_to_myself() -> MutexGuard<'static, ()> {
    HOST_MEMORY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("a number of kB") * 1024
}

#[test]
fn a_memory_bomb_stops_at_its_limit_and_the_host_stays_bounded() {
    let _alone = host_memory_to_myself();
    let built = shared(LIMITS);
    built.run("still_fine", vec![]);
    let before = resident_bytes();
    for _ in 0..3 {
        let outcome = built.run("hog", vec![]);
        let error = outcome.error.expect("the bomb fails");
        assert_eq!(error.kind, ErrorKind::Memory, "{error:?}");
        assert!(outcome.execution.peak_memory_bytes <= 64_000_000, "{}", outcome.execution.peak_memory_bytes);
        assert!(
            outcome.execution.peak_memory_bytes > 48_000_000,
            "it did grow: {}",
            outcome.execution.peak_memory_bytes
        );
    }
    let grown = resident_bytes().saturating_sub(before);
    assert!(grown < 256 << 20, "the host grew by {} MiB", grown >> 20);
}

#[test]
fn deadlines_stop_busy_loops_and_sleeps() {
    assert_deadlines_stop_busy_loops_and_sleeps(&shared(LIMITS));
}

/// The fixture's `busy` and `sleepy` tasks, each with a 1 s deadline, end as timeouts.
fn assert_deadlines_stop_busy_loops_and_sleeps(built: &Built) {
    for task in ["busy", "sleepy"] {
        let error = built.run(task, vec![]).error.unwrap_or_else(|| panic!("{task} must time out"));
        assert_eq!(error.kind, ErrorKind::Timeout, "{task}: {error:?}");
    }
}

#[test]
fn a_task_failing_twice_then_succeeding_reports_three_attempts() {
    let outcome = shared(LIMITS).run("flaky", vec![]);
    assert!(outcome.success, "{:?}", outcome.error);
    assert_eq!(outcome.result, json!(3), "`capsule.attempt()` counts attempts");
    assert_eq!(outcome.execution.attempts, 3);
    let messages: Vec<&str> = outcome.execution.attempt_errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(messages, ["attempt 1 failed", "attempt 2 failed"]);

    let once = shared(LIMITS).run("fails_once_without_retries", vec![]);
    assert!(!once.success);
    assert_eq!(once.execution.attempts, 1, "max_retries=0 means one attempt");
}

#[test]
fn a_thousand_failing_tasks_leave_the_host_healthy_and_its_memory_flat() {
    let _alone = host_memory_to_myself();
    let built = shared(LIMITS);
    let fail_many = |count: usize| {
        for _ in 0..count {
            assert!(!built.run("fails_once_without_retries", vec![]).success);
        }
    };
    fail_many(100);
    let before = resident_bytes();
    fail_many(1_000);
    let grown = resident_bytes().saturating_sub(before);
    assert!(grown < 64 << 20, "the host grew by {} MiB over 1,000 failures", grown >> 20);
    assert_eq!(built.run("still_fine", vec![]).result, json!("still fine"));
}

#[test]
fn arguments_that_do_not_match_are_invalid_input_and_not_retried() {
    let outcome = shared(LIMITS).run("flaky", vec![json!("unexpected")]);
    let error = outcome.error.expect("flaky takes no arguments");
    assert_eq!(error.kind, ErrorKind::InvalidInput, "{error:?}");
    assert_eq!(outcome.execution.attempts, 1);
}

#[test]
fn output_is_captured_up_to_a_bound() {
    let _alone = host_memory_to_myself();
    let outcome = shared(LIMITS).run("flood", vec![]);
    assert_eq!(outcome.result, json!("flooded"));
    let stdout = &outcome.output.stdout;
    assert!(stdout.truncated, "100 MiB printed, 1 MiB kept");
    assert_eq!(stdout.text.len(), capsule_exec::limits::CAPTURE_LIMIT);
}

#[test]
fn the_host_runs_tasks_normally_after_every_kind_of_failure() {
    let _alone = host_memory_to_myself();
    let built = shared(LIMITS);
    for failing in [("count_custom", vec![json!(1_000_000_000)]), ("hog", vec![]), ("busy", vec![])] {
        assert!(!built.run(failing.0, failing.1).success);
        assert_eq!(built.run("still_fine", vec![]).result, json!("still fine"), "after {}", failing.0);
    }
}
