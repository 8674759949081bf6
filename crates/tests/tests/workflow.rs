//! Sub-tasks in their own sandboxes: results, concurrency, independent limits, guards.

use python_runtime::ErrorKind;
use serde_json::json;
use tests::{block_on, quiet_run, shared};

const WORKFLOW: &str = "valid/workflow.py";

#[test]
fn a_fan_out_of_32_returns_every_result_in_order_and_children_overlap() {
    let outcome = shared(WORKFLOW).run("fan_out", vec![]);
    assert!(outcome.success, "{:?}", outcome.error);
    let results = outcome.result.as_array().unwrap();
    assert_eq!(results.len(), 32);
    for (n, result) in results.iter().enumerate() {
        assert_eq!(result["n"], json!(n));
        assert_eq!(result["square"], json!(n * n));
    }
    let spans: Vec<(f64, f64)> =
        results.iter().map(|r| (r["started"].as_f64().unwrap(), r["ended"].as_f64().unwrap())).collect();
    let overlapping = spans.iter().enumerate().any(|(i, a)| spans.iter().skip(i + 1).any(|b| a.0 < b.1 && b.0 < a.1));
    assert!(overlapping, "spawned sub-tasks ran one after another: {spans:?}");
}

#[test]
fn a_direct_call_runs_the_sub_task_and_returns_its_result() {
    assert_eq!(shared(WORKFLOW).run("call_one", vec![json!(7)]).result, json!(49));
}

#[test]
fn children_out_of_fuel_or_memory_fail_alone_and_the_parent_sees_their_type() {
    let outcome = shared(WORKFLOW).run("siblings_fail_alone", vec![]);
    assert!(outcome.success, "{:?}", outcome.error);
    assert_eq!(outcome.result, json!([9, ["fuel", "spin"], ["memory", "hog"], 16]));
}

#[test]
fn arguments_that_are_not_json_are_refused_naming_the_argument() {
    let result = shared(WORKFLOW).run("bad_argument", vec![]).result;
    assert_eq!(result[0], json!("invalid_input"));
    assert!(result[1].as_str().unwrap().contains("argument 1 of `square` is not JSON"), "{result}");
}

#[test]
fn unbounded_recursion_of_sub_tasks_stops_at_the_depth_limit() {
    let error = shared(WORKFLOW).run("recurse", vec![]).error.expect("the depth guard stops it");
    assert_eq!(error.kind, ErrorKind::Exception);
    assert_eq!(error.exc_type, "TaskError");
    assert!(error.message.contains("nest 8 deep at most"), "{}", error.message);
}

#[test]
fn a_fork_bomb_ends_with_a_clear_error_and_the_host_carries_on() {
    let built = shared(WORKFLOW);
    let error = built.run("fork_bomb", vec![]).error.expect("the guards stop it");
    assert_eq!(error.exc_type, "TaskError");
    assert!(error.message.contains("at most"), "{}", error.message);
    assert_eq!(built.run("still_fine", vec![]).result, json!("still fine"));
}

#[test]
fn an_engine_for_one_run_has_a_sandbox_for_every_unfinished_sub_task() {
    // The most sandboxes one run can hold at once: its task and, with as many workers,
    // every sub-task it may have unfinished, all running. (The engine allocates them on
    // demand; a pool would have to be this large.)
    let built = shared(WORKFLOW);
    let engine = capsule_exec::Engine::for_one_run().unwrap();
    let loaded = engine.load(&built.output.manifest_path).unwrap();
    let count = capsule_exec::limits::MAX_UNFINISHED_SUBTASKS;
    let mut request = quiet_run("wide_fan_out", vec![json!(count)]);
    request.order.workers = Some(count as usize);
    let outcome = block_on(async { engine.prepare(&loaded, request).expect("the run starts").run().await });
    assert!(outcome.success, "{:?}", outcome.error);
    assert_eq!(outcome.result, json!((0..count).sum::<u32>()));
}
