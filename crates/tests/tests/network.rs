//! HTTP from tasks against a real server on 127.0.0.1 that this test starts, and the
//! `allowed_hosts` rules around it.

use serde_json::{Value, json};
use tests::server::{start_server, start_tls_server};
use tests::{build_into, load, shared};

const NETWORK: &str = "valid/network.py";

fn run(task: &str, args: Vec<Value>) -> capsule_exec::Outcome {
    let outcome = shared(NETWORK).run(task, args);
    assert!(outcome.success, "{task}: {:?}", outcome.error);
    outcome
}

#[test]
fn requests_of_every_method_round_trip_through_the_host() {
    let base = start_server();
    let outcome = run("round_trips", vec![json!(base)]);
    assert_eq!(
        outcome.result,
        json!({
            "get": [200, true, {"hello": "world"}, "application/json"],
            "post": {"method": "POST", "body": "{\"n\": 1}", "authorized": true},
            "put": {"method": "PUT", "body": "plain text", "authorized": false},
            "delete": {"method": "DELETE", "body": "", "authorized": false},
            "missing": [404, false, "missing"],
        })
    );
    let calls = &outcome.execution.host_requests;
    assert_eq!(calls.len(), 5);
    assert_eq!(calls[0].url, format!("{base}/json"), "the query string is not recorded");
    assert_eq!((calls[0].method.as_str(), calls[0].status, calls[0].bytes), ("GET", Some(200), 18));
    let envelope = serde_json::to_string(&outcome).unwrap();
    assert!(!envelope.contains("secret"), "credentials never reach the envelope");
}

#[test]
fn urlopen_goes_through_the_same_path() {
    let base = start_server();
    assert_eq!(run("with_urllib", vec![json!(base)]).result, json!([200, "{\"hello\": \"world\"}"]));
}

#[test]
fn hosts_outside_the_rules_are_refused_with_the_reason() {
    let base = start_server();
    let message = |task: &str| run(task, vec![json!(base)]).result.as_str().unwrap().to_string();
    assert!(message("without_allowed_hosts").contains("no `allowed_hosts`"), "{}", message("without_allowed_hosts"));
    assert!(message("host_not_listed").contains("not in this task's `allowed_hosts` (\"api.example.com\")"));
    let loopback = message("loopback_by_name");
    assert!(loopback.contains("`localhost` resolves to 127.0.0.1, a loopback"), "{loopback}");
}

#[test]
fn every_redirect_hop_is_checked() {
    let base = start_server();
    let result = run("redirects", vec![json!(base)]).result;
    assert_eq!(result[0], json!(200));
    assert_eq!(result[1], json!(true));
    let refused = result[2].as_str().unwrap();
    assert!(refused.contains("redirect to `http://169.254.169.254/latest/meta-data/` refused"), "{refused}");
    assert!(refused.contains("link-local"), "{refused}");
}

#[test]
fn a_server_that_does_not_answer_times_out_and_the_task_survives() {
    let base = start_server();
    let result = run("slow_server", vec![json!(base)]).result;
    assert!(result.as_str().unwrap().starts_with("timed out"), "{result}");
}

#[test]
fn oversized_responses_are_refused() {
    let base = start_server();
    assert_eq!(run("too_large", vec![json!(base)]).result, json!("too large"));
}

#[test]
fn only_declared_and_passed_through_variables_are_visible() {
    let runner = [("CAPSULE_TEST_PASSED_THROUGH", "from the host"), ("CAPSULE_TEST_NOT_DECLARED", "hidden")];
    let result = shared(NETWORK).run_in_environment("environment", vec![], &runner).result;
    assert_eq!(result, json!({"FIXED": "1", "CAPSULE_TEST_PASSED_THROUGH": "from the host"}));
}

#[test]
fn a_secret_goes_over_https_to_its_host_and_port_only_and_never_into_the_sandbox() {
    let runner = [("CAPSULE_TEST_TOKEN", "s3cret-value")];
    let (https, http) = (start_tls_server(), start_server());
    let port = https.rsplit(':').next().unwrap();
    let project = tempfile::tempdir().unwrap();
    let source = std::fs::read_to_string(fixtures::path("valid/secrets.py")).unwrap();
    std::fs::write(project.path().join("secrets.py"), source.replace("8443", port)).unwrap();
    let built = load(build_into(&project.path().join("secrets.py"), &project.path().join(".capsule/build"), true));

    let outcome = built.run_in_environment("with_secret", vec![json!(https), json!(http)], &runner);
    assert!(outcome.success, "{:?}", outcome.error);
    assert_eq!(outcome.result["here"], "Bearer s3cret-value", "added by the host, over the task's own header");
    assert_eq!(outcome.result["elsewhere"], Value::Null, "another host does not receive it");
    let refused = |what: &str| outcome.result[what].as_str().unwrap().to_string();
    assert!(
        refused("redirect elsewhere")
            .contains("carries the secret `CAPSULE_TEST_TOKEN`, which goes to its own hosts only"),
        "{}",
        refused("redirect elsewhere")
    );
    assert!(
        refused("redirect to http").contains("goes over HTTPS only, not `http://`"),
        "{}",
        refused("redirect to http")
    );
    let clear = refused("in clear");
    assert!(clear.contains("would carry the secret `CAPSULE_TEST_TOKEN`") && clear.contains("HTTPS only"), "{clear}");
    assert_eq!(outcome.result["environment"], json!([]), "the task's environment is empty");
    // The test server echoed the header into the result; nothing of Capsule's own records it.
    let records = serde_json::to_string(&(&outcome.execution, &outcome.output)).unwrap();
    assert!(!records.contains("s3cret-value"), "the value is in no record of the run: {records}");

    let unset = built.run_in_environment("with_unset_secret", vec![json!(https)], &runner);
    let unset = unset.result.as_str().unwrap().to_string();
    assert!(unset.contains("the secret `CAPSULE_TEST_UNSET_TOKEN` for `127.0.0.1` is not set"), "{unset}");
}
