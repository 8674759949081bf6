//! `capsule daemon` as a user runs it: a real daemon on a temporary socket, and real
//! `capsule` clients.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Daemon, finished_fetches, run, start_server};

fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name)
}

/// A project folder with `main.py` holding `source`.
fn project(source: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("main.py"), source).unwrap();
    dir
}

const WAITING: &str = r#"
import time
from capsule import task

@task(timeout="120s", max_retries=0)
def sleeper(seconds: float) -> float:
    time.sleep(seconds)
    return seconds

@task(timeout="120s", compute="HIGH", max_retries=0)
def spinner() -> int:
    n = 0
    while True:
        n += 1

@task(timeout="120s", max_retries=0)
def main(seconds: float = 60) -> list:
    print("started", flush=True)
    handles = [sleeper.spawn(seconds), spinner.spawn()]
    return [h.result() for h in handles]

@task(timeout="60s")
def chatty(lines: int = 5) -> int:
    for i in range(lines):
        print(f"line {i}", flush=True)
        time.sleep(0.05)
    return lines
"#;

fn list(daemon: &Daemon, all: bool) -> Vec<Value> {
    let mut command = daemon.capsule();
    command.args(["list", "--json"]);
    if all {
        command.arg("--all");
    }
    let (code, stdout, stderr) = run(&mut command);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str::<Value>(&stdout).unwrap().as_array().unwrap().clone()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn runs_through_the_daemon_look_like_runs_in_process() {
    let daemon = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(example("hello.py"), dir.path().join("hello.py")).unwrap();
    std::fs::copy(fixtures::path("valid/multi_task.py"), dir.path().join("tasks.py")).unwrap();
    for arguments in [
        &["run", "hello.py", "Ada"][..],
        &["run", "tasks.py", "--task", "add", "--args-json", "[20, 22]"],
        &["run", "tasks.py", "--task", "fail", "boom"],
        &["run", "tasks.py", "--task", "nope"],
        &["run", "tasks.py", "--args-json", "{}"],
    ] {
        let through = run(daemon.capsule().args(arguments).arg("--daemon").current_dir(dir.path()));
        let inside = run(daemon.capsule().args(arguments).arg("--no-daemon").current_dir(dir.path()));
        let ids = |text: &str| {
            text.split_whitespace()
                .map(|w| {
                    if w.len() >= 16 && w.trim_matches('`').chars().all(|c| c.is_ascii_hexdigit() || c == '`') {
                        "RUN"
                    } else {
                        w
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!((through.0, &through.1, ids(&through.2)), (inside.0, &inside.1, ids(&inside.2)), "{arguments:?}");
    }
    let (code, stdout, _) =
        run(daemon.capsule().args(["run", "hello.py", "--json", "--daemon", "Bob"]).current_dir(dir.path()));
    assert_eq!(code, 0);
    let envelope: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(envelope["result"], "Hello, Bob, from Capsule!");
    assert_eq!(envelope["output"]["stdout"]["text"], "running inside a wasi sandbox\n");
}

#[test]
fn a_detached_run_shows_as_a_live_tree_and_stops_with_its_children() {
    let daemon = Daemon::start(&[]);
    let dir = project(WAITING);
    let (code, id, stderr) = run(daemon.capsule().args(["run", "main.py", "--detach"]).current_dir(dir.path()));
    assert_eq!(code, 0, "{stderr}");
    let id = id.trim().to_string();
    // Both children appear in the tree while they run.
    wait_for("two running children", || {
        list(&daemon, false).iter().any(|run| {
            run["id"] == id.as_str()
                && run["calls"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|c| c["status"] == "running" && !c["parent"].is_null())
                    .count()
                    == 2
        })
    });
    let (code, tree, _) = run(daemon.capsule().arg("list"));
    assert_eq!(code, 0);
    assert!(
        tree.contains(&format!("run {id} main (running"))
            && tree.contains("sleeper (running")
            && tree.contains("spinner (running"),
        "{tree}"
    );

    // `stop` answers once the run has ended: one child blocked in the host, one spinning.
    let (code, stopped, stderr) = run(daemon.capsule().args(["stop", &id]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stopped.trim(), format!("run {id} cancelled"));
    let runs = list(&daemon, true);
    let run_view = runs.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(run_view["error"]["type"], "cancelled");
    for call in run_view["calls"].as_array().unwrap() {
        assert_ne!(call["status"], "running", "every call ended: {call}");
    }
    let (code, _, stderr) = run(daemon.capsule().args(["stop", &id]));
    assert_eq!(code, 2, "stopping a finished run is refused");
    assert!(stderr.contains("has already finished (cancelled)"), "{stderr}");

    // The journal agrees.
    let journal = rusqlite::Connection::open(dir.path().join(".capsule/journal.db")).unwrap();
    let status: String = journal.query_row("SELECT status FROM runs WHERE id = ?1", [&id], |r| r.get(0)).unwrap();
    assert_eq!(status, "cancelled");
}

#[test]
fn a_run_whose_client_goes_away_is_stopped() {
    let daemon = Daemon::start(&[]);
    let dir = project(WAITING);
    let mut client = daemon
        .capsule()
        .args(["run", "main.py", "--daemon"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let running = || list(&daemon, false).into_iter().find(|run| run["calls"].as_array().unwrap().len() == 3);
    wait_for("the run's children", || running().is_some());
    let id = running().unwrap()["id"].as_str().unwrap().to_string();
    client.kill().unwrap(); // as Ctrl-C would
    client.wait().unwrap();
    wait_for("the run to stop", || {
        list(&daemon, true).iter().any(|r| r["id"] == id.as_str() && r["status"] == "cancelled")
    });
}

#[test]
fn restart_starts_the_same_task_again_and_logs_follow_a_run() {
    let daemon = Daemon::start(&[]);
    let dir = project(WAITING);
    let (code, id, _) = run(daemon
        .capsule()
        .args(["run", "main.py", "--task", "chatty", "--args-json", "[4]", "--detach"])
        .current_dir(dir.path()));
    assert_eq!(code, 0);
    let id = id.trim().to_string();
    let (code, printed, stderr) = run(daemon.capsule().args(["logs", "-f", &id]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(printed, "line 0\nline 1\nline 2\nline 3\n", "-f follows until the run ends");

    let (code, second, stderr) = run(daemon.capsule().args(["restart", &id]));
    assert_eq!(code, 0, "{stderr}");
    let second = second.trim().to_string();
    assert_ne!(second, id);
    wait_for("the restarted run", || {
        list(&daemon, true).iter().any(|r| r["id"] == second.as_str() && r["status"] == "ok")
    });
    let runs = list(&daemon, true);
    let restarted = runs.iter().find(|r| r["id"] == second.as_str()).unwrap();
    assert_eq!((restarted["restarted_from"].as_str(), restarted["task"].as_str()), (Some(id.as_str()), Some("chatty")));
    let (_, printed, _) = run(daemon.capsule().args(["logs", &second]));
    assert_eq!(printed, "line 0\nline 1\nline 2\nline 3\n", "same arguments");

    // Without the daemon, the journal has what each task printed.
    let (code, printed, stderr) =
        run(daemon.capsule().args(["logs", &id]).env("CAPSULE_SOCKET", "/nonexistent/socket").current_dir(dir.path()));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(printed, "line 0\nline 1\nline 2\nline 3\n");
}

#[test]
fn projects_are_namespaced_apart() {
    let daemon = Daemon::start(&[]);
    let (alpha, beta) = (
        project("from capsule import task\n@task\ndef main():\n    return 'a'\n"),
        project("from capsule import task\n@task\ndef main():\n    return 'b'\n"),
    );
    std::fs::write(alpha.path().join("capsule.toml"), "[workflow]\nname = \"alpha\"\n").unwrap();
    for dir in [&alpha, &beta] {
        let (code, _, stderr) = run(daemon.capsule().args(["run", "main.py", "--daemon"]).current_dir(dir.path()));
        assert_eq!(code, 0, "{stderr}");
    }
    let namespaces: Vec<String> =
        list(&daemon, true).iter().map(|r| r["namespace"].as_str().unwrap().to_string()).collect();
    let beta_name = beta.path().file_name().unwrap().to_string_lossy().into_owned();
    assert!(namespaces.contains(&"alpha".to_string()) && namespaces.contains(&beta_name), "{namespaces:?}");
    let (_, tree, _) = run(daemon.capsule().args(["list", "--all"]));
    assert!(tree.contains("alpha\n") && tree.contains(&format!("{beta_name}\n")), "{tree}");
}

#[test]
fn two_hundred_concurrent_clients_all_get_their_results() {
    let daemon = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(example("hello.py"), dir.path().join("hello.py")).unwrap();
    let (code, _, stderr) = run(daemon.capsule().args(["build", "hello.py"]).current_dir(dir.path()));
    assert_eq!(code, 0, "{stderr}");
    let clients: Vec<_> = (0..200)
        .map(|i| {
            daemon
                .capsule()
                .args(["run", "hello.py", "--daemon", &format!("client{i}")])
                .current_dir(dir.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let output = client.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert!(String::from_utf8_lossy(&output.stdout).ends_with(&format!("Hello, client{i}, from Capsule!\n")));
    }
}

#[test]
fn a_killed_daemon_is_replaced_and_the_next_one_resumes_its_runs() {
    let server = start_server();
    let mut daemon = Daemon::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures::path("valid/crash.py"), dir.path().join("crash.py")).unwrap();
    let journal = dir.path().join(".capsule/journal.db");
    let (code, id, stderr) =
        run(daemon.capsule().args(["run", "crash.py", "--detach", &server.base]).current_dir(dir.path()));
    assert_eq!(code, 0, "{stderr}");
    let id = id.trim().to_string();
    wait_for("the blocking call", || {
        finished_fetches(&journal) == 3 && server.hits.lock().unwrap().contains_key("/block")
    });

    // SIGKILL leaves the socket file behind; the next daemon replaces it and resumes the run.
    daemon.kill_and_restart(&[]);
    server.blocking.store(false, Ordering::SeqCst);
    wait_for("the resumed run", || list(&daemon, true).iter().any(|r| r["id"] == id.as_str() && r["status"] == "ok"));
    let hits = server.hits.lock().unwrap().clone();
    let mut hits: Vec<(String, u32)> = hits.into_iter().collect();
    hits.sort();
    assert_eq!(
        hits,
        [("/block", 2), ("/hit/1", 1), ("/hit/2", 1), ("/hit/3", 1), ("/hit/direct", 1)]
            .map(|(p, n)| (p.to_string(), n)),
        "finished calls did not run again; the unfinished one ran once more"
    );
    let db = rusqlite::Connection::open(&journal).unwrap();
    let integrity: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok");
}

#[test]
fn one_daemon_per_socket() {
    let daemon = Daemon::start(&[]);
    let (code, _, stderr) =
        run(daemon.capsule().args(["daemon", "--socket"]).arg(&daemon.socket).arg("--state-dir").arg(&daemon.state));
    assert_eq!(code, 70);
    assert!(stderr.contains("another daemon is already using"), "{stderr}");
}

#[test]
fn bad_requests_get_clear_errors_and_the_daemon_stays_up() {
    let daemon = Daemon::start(&[]);
    let post = |body: &str| {
        daemon.http(&format!(
            "POST /v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
    };
    let error =
        |(status, body): (u16, String)| (status, serde_json::from_str::<Value>(&body).unwrap()["error"].clone());
    let (status, body) = error(post("{not json"));
    assert_eq!((status, body["kind"].as_str()), (400, Some("usage")));
    assert!(body["message"].as_str().unwrap().contains("invalid request body"), "{body}");
    let (status, body) = error(post(r#"{"manifest": "/x/manifest.toml", "colour": "blue"}"#));
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("unknown field `colour`"), "{body}");
    let (status, body) = error(post(r#"{"manifest": "relative/manifest.toml"}"#));
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("must be an absolute path"), "{body}");
    let (status, body) = error(post(r#"{"manifest": "/nowhere/manifest.toml"}"#));
    assert_eq!((status, body["kind"].as_str()), (422, Some("load")));
    let (status, body) = error(daemon.http("GET /v1/runs/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
    assert_eq!((status, body["kind"].as_str()), (404, Some("not_found")));
    let huge = format!(r#"{{"manifest": "/x", "args": ["{}"]}}"#, "x".repeat(17 << 20));
    let (status, _) = post(&huge);
    assert_eq!(status, 413);
    let (status, body) = daemon.http("GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], "ok");
}

#[test]
fn tcp_needs_the_token() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "0123456789abcdef0123\n").unwrap();
    let private =
        |mode| std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    let address = format!("127.0.0.1:{port}");
    // A token others can read protects nothing; a listener beyond loopback needs TLS.
    private(0o644);
    let refused = |extra: &[&str]| {
        let state = dir.path().join("refused");
        let mut command = Command::new(env!("CARGO_BIN_EXE_capsule"));
        command.args(["daemon", "--socket"]).arg(dir.path().join("refused.sock")).arg("--state-dir").arg(&state);
        run(command.args(extra))
    };
    let (code, _, stderr) = refused(&["--listen", &address, "--token-file", token_file.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("its mode is 644") && stderr.contains("chmod 600"), "{stderr}");
    private(0o600);
    let everywhere = format!("0.0.0.0:{port}");
    let (code, _, stderr) = refused(&["--listen", &everywhere, "--token-file", token_file.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is not a loopback address") && stderr.contains("--tls-cert"), "{stderr}");
    let _daemon = Daemon::start(&["--listen", &address, "--token-file", token_file.to_str().unwrap()]);
    let ask = |authorization: &str| {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match std::net::TcpStream::connect(&address) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(error) => panic!("{error}"),
            }
        };
        write!(stream, "GET /v1/health HTTP/1.1\r\nHost: x\r\n{authorization}Connection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    };
    assert!(ask("").starts_with("HTTP/1.1 401"));
    assert!(ask("Authorization: Bearer 0123456789abcdef0124\r\n").starts_with("HTTP/1.1 401"));
    let answer = ask("Authorization: Bearer 0123456789abcdef0123\r\n");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""status":"ok""#));
}

#[test]
fn clients_may_not_widen_a_task_nor_reach_what_capsule_keeps() {
    let daemon = Daemon::start(&[]);
    let image = interpreter_image(&daemon);
    let project = tempfile::tempdir().unwrap();
    std::fs::create_dir(project.path().join("data")).unwrap();
    let options = |change: &dyn Fn(&mut manifest_schema::TaskOptions)| {
        let mut options = manifest_schema::TaskOptions::default();
        change(&mut options);
        serde_json::to_value(options).unwrap()
    };
    let python = |options: Value| {
        let body = serde_json::json!({"code": "1", "project": project.path(), "options": options});
        daemon.json("POST", "/v1/python", &body.to_string())
    };
    let message = |(status, answer): (u16, Value)| {
        assert_eq!(status, 400, "{answer}");
        answer["error"]["message"].as_str().unwrap().to_string()
    };
    // The project folder itself, where `.capsule/` is: refused as the request is read.
    let mut root = options(&|_| {});
    root["allowed_files"] = serde_json::json!([{"path": ".", "mode": "read-write"}]);
    let refused = message(python(root));
    assert!(refused.contains("is the project folder itself, which holds `.capsule/`"), "{refused}");
    // The daemon's own environment, and a secret of its own choosing.
    let passthrough = options(&|o| o.env_passthrough = vec!["HOME".into()]);
    let refused = message(python(passthrough));
    assert!(refused.contains("`options.env_passthrough` asks for the variable `HOME`"), "{refused}");
    // A folder outside the project, through `..`.
    let outside = project.path().join("data/../..");
    let body = serde_json::json!({"manifest": image, "project": project.path(), "files_root": outside});
    let refused = message(daemon.json("POST", "/v1/runs", &body.to_string()));
    assert!(refused.contains("is outside the project"), "{refused}");
    // A granted folder that is fine runs, and the daemon is still there.
    let data = options(&|o| {
        o.allowed_files =
            vec![manifest_schema::FileGrant { path: "data".into(), mode: manifest_schema::FileMode::ReadWrite }]
    });
    let body =
        serde_json::json!({"code": "open('data/x', 'w').write('ok')", "project": project.path(), "options": data});
    let (status, answer) = daemon.json("POST", "/v1/python", &body.to_string());
    assert_eq!((status, &answer["outcome"]["result"]), (200, &serde_json::json!(2)), "{answer}");
    assert_eq!(daemon.json("GET", "/v1/health", "").0, 200);
}

#[test]
fn a_failure_has_one_category_in_process_through_the_daemon_and_in_the_api() {
    let daemon = Daemon::start(&[]);
    let dir = project(&std::fs::read_to_string(fixtures::path("valid/multi_task.py")).unwrap());
    let in_process = run(Command::new(env!("CARGO_BIN_EXE_capsule"))
        .env("CAPSULE_SOCKET", "/nonexistent/capsule.sock")
        .args(["run", "main.py", "--task", "nope"])
        .current_dir(dir.path()));
    let through = run(daemon.capsule().args(["run", "main.py", "--daemon", "--task", "nope"]).current_dir(dir.path()));
    assert_eq!(in_process.0, 2, "{}", in_process.2);
    assert_eq!((through.0, &through.2), (in_process.0, &in_process.2), "the same exit code and the same words");
    // The API answers the same category, with the hint spelled for its callers.
    let manifest = std::fs::canonicalize(dir.path().join(".capsule/build/main/manifest.toml")).unwrap();
    let body = serde_json::json!({"manifest": manifest, "task": "nope", "wait": true}).to_string();
    let (status, answer) = daemon.json("POST", "/v1/runs", &body);
    assert_eq!((status, answer["error"]["kind"].as_str()), (400, Some("usage")), "{answer}");
    assert!(in_process.2.contains(answer["error"]["message"].as_str().unwrap()), "{answer}");
    // A hint naming what a caller can give: a flag on the command line, a field in the API.
    let two = dir.path().join("two.py");
    std::fs::write(&two, "from capsule import task\n\n@task\ndef a():\n    pass\n\n@task\ndef b():\n    pass\n")
        .unwrap();
    let (code, _, stderr) = run(daemon.capsule().args(["run", "two.py", "--daemon"]).current_dir(dir.path()));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("hint: choose one with `--task NAME`: `a`, `b`"), "{stderr}");
    let manifest = std::fs::canonicalize(dir.path().join(".capsule/build/two/manifest.toml")).unwrap();
    let (status, answer) = daemon.json("POST", "/v1/runs", &serde_json::json!({"manifest": manifest}).to_string());
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["hint"], "choose one with `task`: `a`, `b`");
}

/// The interpreter image's manifest, built by the client as the SDK does.
fn interpreter_image(daemon: &Daemon) -> String {
    let (code, stdout, stderr) = run(daemon.capsule().args(["python", "--image"]));
    assert_eq!(code, 0, "{stderr}");
    stdout.trim().to_string()
}

#[test]
fn code_strings_run_once_or_in_sessions_that_keep_their_state() {
    let daemon = Daemon::start(&[]);
    let image = interpreter_image(&daemon);
    let project = tempfile::tempdir().unwrap();
    let body = serde_json::json!({"code": "print('hi')\n6 * 7", "project": project.path()}).to_string();
    let (status, answer) = daemon.json("POST", "/v1/python", &body);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outcome"]["result"], 42);
    assert_eq!(answer["outcome"]["output"]["stdout"]["text"], "hi\n");

    let open = serde_json::json!({"manifest": image}).to_string();
    let (status, session) = daemon.json("POST", "/v1/sessions", &open);
    assert_eq!(status, 201, "{session}");
    let id = session["id"].as_str().unwrap().to_string();
    let workspace = std::path::PathBuf::from(session["workspace"].as_str().unwrap());
    let call = |code: &str, extra: serde_json::Value| {
        let mut body = serde_json::json!({"args": [code]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        daemon.json("POST", &format!("/v1/sessions/{id}/run"), &body.to_string())
    };
    let none = serde_json::json!({});
    assert_eq!(call("seen = [1]", none.clone()).1["success"], true);
    assert_eq!(call("seen.append(2); seen", none.clone()).1["result"], serde_json::json!([1, 2]));
    // Its workspace is its `/`: files go both ways.
    std::fs::write(workspace.join("in.txt"), "from the host").unwrap();
    assert_eq!(call("open('/in.txt').read()", none.clone()).1["result"], "from the host");
    assert_eq!(call("open('/out.txt', 'w').write('from the guest')", none.clone()).1["result"], 14);
    assert_eq!(std::fs::read_to_string(workspace.join("out.txt")).unwrap(), "from the guest");
    // A call stopped by its deadline leaves the state of the calls before it.
    let (_, stopped) = call("seen.append(3)\nwhile True: pass", serde_json::json!({"timeout": "300ms"}));
    assert_eq!(stopped["error"]["type"], "timeout", "{stopped}");
    let (_, fuel) = call("seen.append(4)\nwhile True: pass", serde_json::json!({"compute": "LOW"}));
    assert_eq!(fuel["error"]["type"], "fuel", "{fuel}");
    assert_eq!(call("seen", none.clone()).1["result"], serde_json::json!([1, 2]));

    let (status, saved) = daemon.json("POST", &format!("/v1/sessions/{id}/save"), "");
    assert_eq!(status, 200, "{saved}");
    let saved_id = saved["id"].as_str().unwrap().to_string();
    let (status, fork) = daemon.json("POST", &format!("/v1/sessions/{id}/fork"), "");
    assert_eq!(status, 201, "{fork}");
    let fork_id = fork["id"].as_str().unwrap();
    let fork_call = serde_json::json!({"args": ["seen.append('fork'); seen"]}).to_string();
    let (_, forked) = daemon.json("POST", &format!("/v1/sessions/{fork_id}/run"), &fork_call);
    assert_eq!(forked["result"], serde_json::json!([1, 2, "fork"]));
    assert_eq!(call("seen", none.clone()).1["result"], serde_json::json!([1, 2]), "the fork is apart");
    let (_, sessions) = daemon.json("GET", "/v1/sessions", "");
    assert_eq!(sessions.as_array().unwrap().len(), 2, "{sessions}");

    // Closed: the session and its workspace are gone; the saved state is not.
    assert_eq!(daemon.json("DELETE", &format!("/v1/sessions/{id}"), "").0, 204);
    assert!(!workspace.exists());
    let (status, gone) = call("seen", none.clone());
    assert_eq!((status, gone["error"]["kind"].as_str()), (404, Some("not_found")));
    let restore = serde_json::json!({"manifest": image, "restore": saved_id}).to_string();
    let (status, restored) = daemon.json("POST", "/v1/sessions", &restore);
    assert_eq!(status, 201, "{restored}");
    let restored_call = serde_json::json!({"args": ["seen"]}).to_string();
    let (_, value) =
        daemon.json("POST", &format!("/v1/sessions/{}/run", restored["id"].as_str().unwrap()), &restored_call);
    assert_eq!(value["result"], serde_json::json!([1, 2]));

    // A saved file changed on disk is refused by its hash.
    let file = daemon.state.with_file_name("data").join(format!("capsule/sessions/{saved_id}.session"));
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let (status, error) = daemon.json("POST", "/v1/sessions", &restore);
    assert!(status == 400 && error["error"]["message"].as_str().unwrap().contains("does not match"), "{error}");

    // Bad requests get clear errors; the daemon stays up.
    let bad = |route: &str, body: &str| daemon.json("POST", route, body);
    let (status, error) = bad("/v1/sessions", r#"{"restore": "not-an-id"}"#);
    assert_eq!(status, 400, "{error}");
    let (status, error) = bad("/v1/sessions", &serde_json::json!({"restore": "0".repeat(64)}).to_string());
    assert_eq!(status, 404, "{error}");
    let (status, error) = bad("/v1/sessions", r#"{"idle": 3}"#);
    assert!(status == 400 && error["error"]["message"].as_str().unwrap().contains("unknown field `idle`"), "{error}");
    let (status, error) = bad(&format!("/v1/sessions/{fork_id}/run"), r#"{"args": ["1"], "timeout": "soon"}"#);
    assert!(status == 400 && error["error"]["message"].as_str().unwrap().contains("`timeout`"), "{error}");
    let (status, _) = bad("/v1/python", r#"{"code": 3}"#);
    assert_eq!(status, 400);
    assert_eq!(daemon.json("GET", "/v1/health", "").0, 200);
}
