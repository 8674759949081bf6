//! What models read: tool descriptions and tool results as text.

use manifest_schema::{FileMode, Task, TaskOptions};
use serde_json::Value;

/// The limits of a call and the hosts it may reach, for a tool's description.
pub fn limits(options: &TaskOptions) -> String {
    let timeout = options.timeout.map_or_else(|| "5m".to_string(), |t| t.to_string());
    let mut text =
        format!("Limits per call: compute {}, memory {}, wall-clock {timeout}.", options.compute, options.ram);
    let hosts: Vec<&str> = options.allowed_hosts.texts().collect();
    text.push_str(&match hosts.as_slice() {
        [] => " No network.".to_string(),
        hosts => format!(" HTTP (urllib, capsule.http) to {} only.", hosts.join(", ")),
    });
    text
}

/// The folders a call may use, for a tool's description.
pub fn files(options: &TaskOptions) -> String {
    let files: Vec<String> = options
        .allowed_files
        .iter()
        .map(|grant| match grant.mode {
            FileMode::ReadOnly => format!("{} (read-only)", grant.path),
            FileMode::ReadWrite => format!("{} (read-write)", grant.path),
        })
        .collect();
    match files.as_slice() {
        [] => "No files.".to_string(),
        files => format!("Files: {}.", files.join(", ")),
    }
}

pub fn task_description(task: &Task) -> String {
    let doc = task.signature.as_ref().and_then(|s| s.doc.clone());
    let about = doc.unwrap_or_else(|| format!("Runs the task `{}` (`{}`).", task.name, task.function));
    format!("{about}\n\nRuns in a WebAssembly sandbox. {} {}", limits(&task.options), files(&task.options))
}

/// The text of a result: the value (JSON) or the error with its traceback, then the output.
pub fn envelope(envelope: &Value) -> String {
    let mut text = match envelope["success"].as_bool() {
        Some(true) => match &envelope["result"] {
            Value::String(value) => value.clone(),
            value => serde_json::to_string_pretty(value).unwrap_or_default(),
        },
        _ => {
            let error = &envelope["error"];
            let traceback = error["traceback"].as_str().unwrap_or_default();
            let kind = error["type"].as_str().unwrap_or("error");
            let message = error["message"].as_str().unwrap_or_default();
            match (traceback.is_empty(), error["exc_type"].as_str().unwrap_or_default()) {
                (false, _) => traceback.trim_end().to_string(),
                (true, "") => format!("{kind}: {message}"),
                (true, exc_type) => format!("{exc_type}: {message}"),
            }
        }
    };
    for stream in ["stdout", "stderr"] {
        let output = &envelope["output"][stream];
        let printed = output["text"].as_str().unwrap_or_default();
        if !printed.is_empty() {
            text.push_str(&format!("\n\n[{stream}]\n{}", printed.trim_end()));
            if output["truncated"].as_bool() == Some(true) {
                text.push_str("\n[... truncated]");
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn results_read_as_the_value_then_the_output() {
        let ok = json!({"success": true, "result": {"n": 1}, "output": {"stdout": {"text": "hi\n", "truncated": false}, "stderr": {"text": "", "truncated": false}}});
        assert_eq!(envelope(&ok), "{\n  \"n\": 1\n}\n\n[stdout]\nhi");
        let failed = json!({
            "success": false,
            "error": {"type": "fuel", "message": "the task used up its compute budget", "exc_type": "", "traceback": ""},
            "output": {"stdout": {"text": "x", "truncated": true}, "stderr": {"text": "", "truncated": false}},
        });
        assert_eq!(envelope(&failed), "fuel: the task used up its compute budget\n\n[stdout]\nx\n[... truncated]");
    }
}
