//! Capsule on several workers, as a user runs it: a real `nats-server -js` on loopback, real
//! `capsule worker` processes, a `capsule daemon --nats`, and tasks that count their HTTP
//! calls on a local server (so a call that ran twice shows).

mod support;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Daemon, Nats, SUBMITTER, WORKER, Worker, run, start_server};

const FAN_OUT: &str = r#"
import time
from capsule import gather, http, task

@task(allowed_hosts=["127.0.0.1"], timeout="60s", max_retries=0)
def work(base: str, i: int) -> int:
    http.get(f"{base}/hit/{i}")
    time.sleep(0.1)
    return i * i

@task(timeout="300s", max_retries=0)
def main(base: str, count: int = 200) -> int:
    total = 0
    for start in range(0, count, 50):
        handles = [work.spawn(base, i) for i in range(start, min(start + 50, count))]
        total += sum(gather(*handles))
    return total

@task(timeout="120s", max_retries=0)
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds

@task(allowed_hosts=["127.0.0.1"], timeout="60s", max_retries=0)
def long_call(base: str, seconds: float) -> str:
    http.get(f"{base}/hit/long")
    time.sleep(seconds)
    return "done"

@task(timeout="300s", max_retries=0)
def naps(count: int, seconds: float) -> list:
    return gather(*[nap.spawn(seconds) for _ in range(count)])
"#;

fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("main.py"), FAN_OUT).unwrap();
    dir
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn daemon_on(nats: &Nats) -> Daemon {
    Daemon::start(&["--nats", &nats.url, "--ack-wait", "2s", "--allow-unsigned"])
}

fn ended(view: &Value) -> bool {
    ["ok", "failed", "cancelled"].contains(&view["status"].as_str().unwrap_or(""))
}

fn run_view(daemon: &Daemon, id: &str) -> Option<Value> {
    let (code, stdout, _) = run(daemon.capsule().args(["list", "--all", "--json"]));
    if code != 0 {
        return None;
    }
    let runs: Value = serde_json::from_str(&stdout).ok()?;
    runs.as_array()?.iter().find(|r| r["id"] == id).cloned()
}

/// `capsule run main.py` of a fan-out of `count` calls through `daemon`, running.
fn fan_out(daemon: &Daemon, dir: &std::path::Path, server: &support::Server, count: u64) -> std::process::Child {
    daemon
        .capsule()
        .args(["run", "main.py", "--json", "--args-json"])
        .arg(format!(r#"["{}", {count}]"#, server.base))
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The fan-out's client ends well with the sum of the squares below `count`.
fn expect_sum_of_squares(client: std::process::Child, count: u64) {
    let output = support::output_within(client, Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let envelope: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(envelope["result"], (0..count).map(|i| i * i).sum::<u64>());
}

/// (calls hit once, calls hit more than once) among `/hit/0` .. `/hit/{count - 1}`.
fn hit_counts(server: &support::Server, count: u32) -> (u32, u32) {
    let hits = server.hits.lock().unwrap();
    let counts: Vec<u32> = (0..count).map(|i| hits.get(&format!("/hit/{i}")).copied().unwrap_or(0)).collect();
    assert!(counts.iter().all(|&n| n >= 1), "a call was lost: {counts:?}");
    (counts.iter().filter(|&&n| n == 1).count() as u32, counts.iter().filter(|&&n| n > 1).count() as u32)
}

#[test]
fn a_fan_out_spreads_over_workers_and_survives_a_killed_worker() {
    let nats = Nats::start();
    let server = start_server();
    let dir = project();
    let mut workers: Vec<Worker> =
        ["w1", "w2", "w3"].iter().map(|name| Worker::start(&nats, name, 4, dir.path())).collect();
    let daemon = daemon_on(&nats);

    let client = fan_out(&daemon, dir.path(), &server, 200);
    wait_for("a third of the calls", || server.hits.lock().unwrap().len() >= 70);
    // SIGKILL, in the middle of the run, of the worker running the top-level call: its calls
    // are delivered again to the other workers once their ack wait passes, and the top-level
    // call, run again, replays the sub-tasks that finished.
    let top_worker = run(daemon.capsule().args(["list", "--json"])).1;
    let runs: Value = serde_json::from_str(&top_worker).unwrap();
    let top = runs[0]["calls"].as_array().unwrap().iter().find(|c| c["parent"].is_null()).unwrap().clone();
    let victim = ["w1", "w2", "w3"].iter().position(|n| top["worker"] == *n).unwrap_or_else(|| panic!("{top}"));
    workers[victim].kill();
    expect_sum_of_squares(client, 200);

    let (_, twice) = hit_counts(&server, 200);
    assert!(twice <= 4, "only the calls running on the killed worker may run again; {twice} did");

    // `capsule list` shows which worker ran each call.
    let id = run(daemon.capsule().args(["list", "--all", "--json"])).1;
    let runs: Value = serde_json::from_str(&id).unwrap();
    let calls = runs[0]["calls"].as_array().unwrap().clone();
    assert_eq!(calls.len(), 201, "the top-level call and its 200 sub-tasks");
    let names: BTreeSet<&str> = calls.iter().filter_map(|c| c["worker"].as_str()).collect();
    assert!(names.len() >= 2 && names.iter().all(|n| ["w1", "w2", "w3"].contains(n)), "{names:?}");
    let (code, tree, _) = run(daemon.capsule().args(["list", "--all"]));
    assert_eq!(code, 0);
    let survivors = ["w1", "w2", "w3"].iter().enumerate().filter(|&(i, _)| i != victim);
    assert!(survivors.map(|(_, n)| format!("on {n}")).any(|on| tree.contains(&on)), "{tree}");

    // Each worker that ran calls fetched the project into its own cache, checked.
    for (worker, name) in workers.iter().zip(["w1", "w2", "w3"]).filter(|(_, name)| names.contains(name)) {
        let projects: Vec<_> = std::fs::read_dir(worker.cache.path().join("cluster"))
            .unwrap()
            .flatten()
            .filter(|entry| entry.file_name() != "compiled")
            .collect();
        assert_eq!(projects.len(), 1, "one project in {name}'s cache");
        let shared = std::fs::read_dir(worker.cache.path().join("cluster/compiled")).unwrap().count();
        assert_eq!(shared, 2, "each compiled file once in {name}'s shared folder");
        let files = std::fs::read_dir(projects[0].path()).unwrap().count();
        assert_eq!(files, 3, "the manifest, its state and the runtime's code in {name}'s cache");
    }
}

#[test]
fn a_killed_coordinator_is_replaced_and_the_next_one_waits_for_its_run() {
    let nats = Nats::start();
    let server = start_server();
    let dir = project();
    let _workers: Vec<Worker> = ["a", "b"].iter().map(|name| Worker::start(&nats, name, 4, dir.path())).collect();
    let mut daemon = daemon_on(&nats);
    let (code, id, stderr) = run(daemon
        .capsule()
        .args(["run", "main.py", "--detach", "--args-json"])
        .arg(format!(r#"["{}", 120]"#, server.base))
        .current_dir(dir.path()));
    assert_eq!(code, 0, "{stderr}");
    let id = id.trim().to_string();
    wait_for("some calls", || server.hits.lock().unwrap().len() >= 20);

    // The workers go on; the next daemon finds the run in its registry and waits for it.
    daemon.kill_and_restart(&["--nats", &nats.url, "--ack-wait", "2s", "--allow-unsigned"]);
    wait_for("the run to end", || run_view(&daemon, &id).is_some_and(|r| ended(&r)));
    let view = run_view(&daemon, &id).unwrap();
    assert_eq!(view["status"], "ok", "{view}");
    let (once, twice) = hit_counts(&server, 120);
    assert_eq!((once, twice), (120, 0), "no worker died: every call ran exactly once");
}

#[test]
fn a_tampered_artifact_in_the_store_is_refused_and_bad_messages_do_not_stop_workers() {
    let nats = Nats::start();
    let dir = project();
    let (code, _, stderr) = run(std::process::Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(["build", "main.py"])
        .current_dir(dir.path()));
    assert_eq!(code, 0, "{stderr}");
    let manifest = std::fs::read_to_string(dir.path().join(".capsule/build/main/manifest.toml")).unwrap();
    let artifact_sha256 = manifest
        .lines()
        .find_map(|line| line.strip_prefix("sha256 = \"").map(|rest| rest.trim_end_matches('"').to_string()))
        .unwrap();

    // Someone with write access to the store replaces the artifact, and sends junk.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = async_nats::connect(nats.url.as_str()).await.unwrap();
        let jetstream = async_nats::jetstream::new(client);
        let store = jetstream
            .create_object_store(async_nats::jetstream::object_store::Config {
                bucket: "capsule-artifacts".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        store.put(artifact_sha256.as_str(), &mut &b"not the artifact"[..]).await.unwrap();
        let _ = jetstream
            .create_stream(async_nats::jetstream::stream::Config {
                name: "CAPSULE_CALLS".into(),
                subjects: vec!["capsule.calls.>".into()],
                retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
                ..Default::default()
            })
            .await;
        for junk in [&b"\xff not json"[..], br#"{"version": 1}"#, br#"{"version":1,"namespace":"x","manifest_sha256":"../../etc","call":{"key":"r.0","depth":0,"task":"main","args":[],"kwargs":{}}}"#] {
            jetstream.publish("capsule.calls.junk", junk.into()).await.unwrap().await.unwrap();
        }
    });

    let _worker = Worker::start(&nats, "fresh", 2, dir.path());
    let daemon = daemon_on(&nats);
    let (code, stdout, _) = run(daemon
        .capsule()
        .args(["run", "main.py", "--json", "--args-json", r#"["http://127.0.0.1:9", 1]"#])
        .current_dir(dir.path()));
    assert_ne!(code, 0);
    let envelope: Value = serde_json::from_str(&stdout).unwrap();
    let message = envelope["error"]["message"].as_str().unwrap();
    assert!(message.contains(&artifact_sha256) && message.contains("refusing to run it"), "{message}");
    assert_eq!(envelope["error"]["type"], "host");
}

#[test]
fn stop_reaches_the_calls_on_the_workers() {
    let nats = Nats::start();
    let server = start_server();
    let dir = project();
    let _worker = Worker::start(&nats, "only", 4, dir.path());
    let daemon = daemon_on(&nats);
    let (code, id, stderr) = run(daemon
        .capsule()
        .args(["run", "main.py", "--task", "naps", "--detach", "--args-json", "[3, 100]"])
        .current_dir(dir.path()));
    assert_eq!(code, 0, "{stderr}");
    let id = id.trim().to_string();
    let running = |view: &Value| view["calls"].as_array().unwrap().iter().filter(|c| c["status"] == "running").count();
    wait_for("the naps to run", || run_view(&daemon, &id).is_some_and(|view| running(&view) == 4));

    let (code, _, stderr) = run(daemon.capsule().args(["stop", &id]));
    assert_eq!(code, 0, "{stderr}");
    wait_for("the run to end", || run_view(&daemon, &id).is_some_and(|r| ended(&r)));
    // The naps (100 s each) were stopped, not waited for.
    assert_eq!(run_view(&daemon, &id).unwrap()["status"], "cancelled");

    // The worker's slots are free again: a new run gets all four.
    let (code, stdout, stderr) = run(daemon
        .capsule()
        .args(["run", "main.py", "--args-json"])
        .arg(format!(r#"["{}", 8]"#, server.base))
        .current_dir(dir.path()));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "140");
}

#[test]
fn a_call_longer_than_the_ack_wait_is_kept_by_its_worker() {
    let nats = Nats::start();
    let server = start_server();
    let dir = project();
    let _workers: Vec<Worker> = ["x", "y"].iter().map(|name| Worker::start(&nats, name, 2, dir.path())).collect();
    let daemon = daemon_on(&nats);
    // Three times the ack wait (2 s): without its signs of life, the call would be handed to
    // the other worker, which would hit the server again.
    let (code, stdout, stderr) = run(daemon
        .capsule()
        .args(["run", "main.py", "--task", "long_call", "--args-json"])
        .arg(format!(r#"["{}", 6]"#, server.base))
        .current_dir(dir.path()));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "done");
    assert_eq!(server.hits.lock().unwrap().get("/hit/long"), Some(&1));
}

#[test]
fn a_full_queue_makes_callers_wait_not_fail() {
    let nats = Nats::start();
    let server = start_server();
    let dir = project();
    // Room for 5 waiting calls. A worker with one slot runs the fan-out's top-level call,
    // which queues its sub-task calls 50 at a time; nothing else takes them.
    let daemon = Daemon::start(&["--nats", &nats.url, "--ack-wait", "2s", "--queue-limit", "5", "--allow-unsigned"]);
    let _first = Worker::start(&nats, "first", 1, dir.path());
    let client = fan_out(&daemon, dir.path(), &server, 60);
    // The queue fills up to its limit, and stays there: the caller waits.
    let queued = || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let jetstream = async_nats::jetstream::new(async_nats::connect(nats.url.as_str()).await.unwrap());
            let Ok(mut stream) = jetstream.get_stream("CAPSULE_CALLS").await else { return 0 };
            stream.info().await.map_or(0, |info| info.state.messages)
        })
    };
    wait_for("the queue to fill", || queued() == 5);
    thread::sleep(Duration::from_secs(1));
    assert_eq!(queued(), 5, "no more than the limit is queued");
    let _worker = Worker::start(&nats, "late", 4, dir.path());
    expect_sum_of_squares(client, 60);
    assert_eq!(hit_counts(&server, 60), (60, 0));
}

#[test]
fn workers_run_only_signed_builds_and_each_user_keeps_to_its_part() {
    let nats = Nats::start_with_users();
    let dir = project();
    let capsule = || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_capsule"));
        command.current_dir(dir.path()).env("CAPSULE_SOCKET", "/nonexistent/capsule.sock");
        command
    };
    let (code, _, stderr) = run(capsule().args(["keygen", "release"]));
    assert_eq!(code, 0, "{stderr}");
    let public = dir.path().join("release.pub");
    let public = public.to_str().unwrap();

    // Neither a worker nor a daemon with `--nats` starts without a key or an explicit choice.
    let (code, _, stderr) = run(capsule().args(["worker", "--nats", &nats.url_as(WORKER)]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--trust KEY.pub") && stderr.contains("--allow-unsigned"), "{stderr}");

    let signed = Daemon::start(&["--nats", &nats.url_as(SUBMITTER), "--ack-wait", "2s", "--trust", public]);
    let _worker = Worker::start_with(&nats.url_as(WORKER), "w1", 2, dir.path(), &["--trust", public]);
    let (code, _, stderr) = run(capsule().args(["build", "main.py", "--sign", "release"]));
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = run(signed
        .capsule()
        .args(["run", "main.py", "--task", "naps", "--json", "--args-json", "[3, 0.1]"])
        .current_dir(dir.path()));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["result"], serde_json::json!([0.1, 0.1, 0.1]));

    // An unsigned build sent by a daemon that accepts unsigned work: the worker refuses it.
    std::fs::copy(dir.path().join("main.py"), dir.path().join("unsigned.py")).unwrap();
    let careless = Daemon::start(&["--nats", &nats.url_as(SUBMITTER), "--ack-wait", "2s", "--allow-unsigned"]);
    let (code, stdout, _) = run(careless
        .capsule()
        .args(["run", "unsigned.py", "--task", "nap", "--json", "--args-json", "[0.1]"])
        .current_dir(dir.path()));
    assert_eq!(code, 1, "{stdout}");
    let envelope: Value = serde_json::from_str(&stdout).unwrap();
    let message = envelope["error"]["message"].as_str().unwrap();
    assert!(message.contains("worker `w1`") && message.contains("is not signed"), "{message}");

    // The server's users: no one without one; a worker cannot plant a build, a submitter
    // cannot record an outcome.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let anonymous = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5));
        assert!(anonymous.connect(nats.url.as_str()).await.is_err(), "a client without a user is refused");
        let connect = |(user, password): (&str, &str)| {
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into()).connect(nats.url.clone())
        };
        let worker = async_nats::jetstream::new(connect(WORKER).await.unwrap());
        let store = worker.get_object_store("capsule-artifacts").await.unwrap();
        let planted =
            tokio::time::timeout(Duration::from_secs(15), store.put("planted", &mut &b"native code"[..])).await;
        assert!(!matches!(planted, Ok(Ok(_))), "a worker uploaded to the artifact store");
        let submitter = async_nats::jetstream::new(connect(SUBMITTER).await.unwrap());
        let results = submitter.get_key_value("capsule-results").await.unwrap();
        let forged = tokio::time::timeout(Duration::from_secs(15), results.put("forged.0", "{}".into())).await;
        assert!(!matches!(forged, Ok(Ok(_))), "a submitter recorded an outcome");
    });
}
