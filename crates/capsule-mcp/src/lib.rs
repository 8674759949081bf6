//! Capsule as an MCP server, for agents: `run_python` (a fresh sandbox per call), sessions
//! (`session_create`, `session_run`, `session_close`: state kept between calls) and every
//! `@task` of a built project as a tool whose input schema is the task's signature.
//!
//! It is a client of the daemon, as every front door is: each call is a request to the
//! daemon's API, so limits, sessions and their store are the daemon's. Calls are checked
//! before they are sent; whatever a call does, the server answers it and stays up.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use capsule_daemon::api::{Finished, OpenSession, RunOrder, SessionCall, SessionView, SubmitRun};
use capsule_daemon::{Client, ClientError, Target};
use manifest_schema::{Manifest, TaskOptions};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::{Map, Value, json};

mod text;

/// What the server offers.
pub struct McpConfig {
    /// The daemon that runs the calls.
    pub daemon: Target,
    /// The interpreter image's manifest (`run_python` and sessions).
    pub image: PathBuf,
    /// The limits and grants of every `run_python` and session call.
    pub options: TaskOptions,
    /// The absolute folder `allowed_files` are relative to.
    pub root: PathBuf,
    /// A built project whose tasks are tools too.
    pub project: Option<ProjectTasks>,
}

/// A built project: its manifest, and the file it was built from.
pub struct ProjectTasks {
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
    pub entry: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("task `{0}` has the name of one of the server's own tools")]
    NameTaken(String),
    #[error("the MCP connection failed: {0}")]
    Connection(String),
}

impl manifest_schema::Explain for McpError {
    fn category(&self) -> manifest_schema::Category {
        match self {
            Self::NameTaken(_) => manifest_schema::Category::Usage,
            Self::Connection(_) => manifest_schema::Category::Internal,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::NameTaken(_) => Some("rename the task with `@task(name=\"...\")`".into()),
            Self::Connection(_) => None,
        }
    }
}

const RUN_PYTHON: &str = "run_python";
const SESSION_CREATE: &str = "session_create";
const SESSION_RUN: &str = "session_run";
const SESSION_CLOSE: &str = "session_close";
const BUILT_IN: [&str; 4] = [RUN_PYTHON, SESSION_CREATE, SESSION_RUN, SESSION_CLOSE];

/// Serves MCP on standard input and output until the client closes them.
pub async fn serve_stdio(config: McpConfig) -> Result<(), McpError> {
    let server = Server::new(config)?;
    let sessions = server.sessions.clone();
    let daemon = server.config.daemon.clone();
    let running = server.serve(rmcp::transport::stdio()).await.map_err(|e| McpError::Connection(e.to_string()))?;
    let ended = running.waiting().await;
    // The sessions this server opened end with it.
    let opened: Vec<String> = sessions.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
    if let Ok(mut client) = Client::connect(daemon).await {
        for id in opened {
            let _ = client.delete(&format!("/v1/sessions/{id}")).await;
        }
    }
    ended.map(drop).map_err(|e| McpError::Connection(e.to_string()))
}

struct Server {
    config: Arc<McpConfig>,
    tools: Vec<Tool>,
    /// The sessions opened through this server (the only ones its clients may use).
    sessions: Arc<Mutex<HashSet<String>>>,
}

/// A call that cannot be made as asked: the client gets it as the tool's error.
struct Refused(String);

impl From<ClientError> for Refused {
    fn from(error: ClientError) -> Self {
        Self(match error {
            ClientError::Api(api) => {
                let problems = api.problems().into_iter().map(|p| p.spelled(manifest_schema::problem::FrontDoor::Api));
                manifest_schema::problem::render(&problems.collect::<Vec<_>>())
            }
            other => other.to_string(),
        })
    }
}

fn object(schema: Value) -> Arc<Map<String, Value>> {
    match schema {
        Value::Object(map) => Arc::new(map),
        _ => unreachable!("schemas are objects"),
    }
}

impl Server {
    fn new(config: McpConfig) -> Result<Self, McpError> {
        let limits = text::limits(&config.options);
        let files = text::files(&config.options);
        let code =
            json!({"type": "string", "description": "Python source; the value of its last expression is the result"});
        let session_id = json!({"type": "string", "description": "as `session_create` returned it"});
        let mut tools = vec![
            Tool::new(
                RUN_PYTHON,
                format!(
                    "Runs Python 3.13 code (standard library) in a fresh WebAssembly sandbox, like a notebook \
                     cell: the value of the last expression is the result; what it prints is returned too. \
                     Nothing is kept between calls (use a session for that). {limits} {files}"
                ),
                object(
                    json!({"type": "object", "properties": {"code": code}, "required": ["code"], "additionalProperties": false}),
                ),
            ),
            Tool::new(
                SESSION_CREATE,
                format!(
                    "Opens a Python session: a sandbox whose variables, imports and definitions are kept from \
                     one `session_run` to the next; its files are in a folder of its own, its `/`. Returns its \
                     `session_id`. {limits}"
                ),
                object(json!({"type": "object", "properties": {}, "additionalProperties": false})),
            ),
            Tool::new(
                SESSION_RUN,
                "Runs Python code in a session, like the next cell of a notebook. A call that raises keeps \
                 what it did before raising; a call stopped by a limit leaves the session as it was before it.",
                object(json!({
                    "type": "object",
                    "properties": {"session_id": session_id, "code": code},
                    "required": ["session_id", "code"],
                    "additionalProperties": false,
                })),
            ),
            Tool::new(
                SESSION_CLOSE,
                "Closes a session.",
                object(
                    json!({"type": "object", "properties": {"session_id": session_id}, "required": ["session_id"], "additionalProperties": false}),
                ),
            ),
        ];
        if let Some(project) = &config.project {
            for task in &project.manifest.tasks {
                if BUILT_IN.contains(&task.name.as_str()) {
                    return Err(McpError::NameTaken(task.name.clone()));
                }
                let schema = match &task.signature {
                    Some(signature) => signature.input_schema(),
                    None => json!({"type": "object"}).as_object().cloned().unwrap_or_default(),
                };
                tools.push(Tool::new(task.name.clone(), text::task_description(task), Arc::new(schema)));
            }
        }
        Ok(Self { config: Arc::new(config), tools, sessions: Arc::default() })
    }

    async fn call(&self, name: &str, arguments: Map<String, Value>) -> Result<CallToolResult, Refused> {
        let mut client = Client::connect(self.config.daemon.clone()).await?;
        match name {
            RUN_PYTHON => {
                let code = text_argument(&arguments, "code", &["code"])?;
                let order = RunOrder {
                    options: Some(self.config.options.clone()),
                    files_root: Some(self.config.root.clone()),
                    ..RunOrder::task(Some(RUN_PYTHON.into()), vec![Value::String(code)], Default::default())
                };
                let request = SubmitRun {
                    project: Some(self.config.root.clone()),
                    wait: true,
                    stream: false,
                    ..SubmitRun::of_order(self.config.image.clone(), order)
                };
                let finished: Finished = client.submit_and_wait(&request).await?;
                Ok(envelope_result(serde_json::to_value(finished.outcome).unwrap_or_default()))
            }
            SESSION_CREATE => {
                expect_only(&arguments, &[])?;
                let request = OpenSession {
                    manifest: Some(self.config.image.clone()),
                    options: Some(capsule_daemon::api::CodeOptions(self.config.options.clone())),
                    ..OpenSession::default()
                };
                let view: SessionView = client.post("/v1/sessions", &request).await?;
                self.sessions.lock().unwrap_or_else(|e| e.into_inner()).insert(view.id.clone());
                let answer = json!({"session_id": view.id});
                let mut result = success(answer.to_string());
                result.structured_content = Some(answer);
                Ok(result)
            }
            SESSION_RUN => {
                let id = self.session_id(&arguments, &["session_id", "code"])?;
                let code = text_argument(&arguments, "code", &["session_id", "code"])?;
                let call = SessionCall { args: vec![Value::String(code)], ..SessionCall::default() };
                let outcome: Value = client.post(&format!("/v1/sessions/{id}/run"), &call).await?;
                Ok(envelope_result(outcome))
            }
            SESSION_CLOSE => {
                let id = self.session_id(&arguments, &["session_id"])?;
                self.sessions.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                client.delete(&format!("/v1/sessions/{id}")).await?;
                Ok(success(format!("session {id} closed")))
            }
            task => self.call_task(&mut client, task, arguments).await,
        }
    }

    async fn call_task(
        &self,
        client: &mut Client,
        name: &str,
        arguments: Map<String, Value>,
    ) -> Result<CallToolResult, Refused> {
        let project = self.config.project.as_ref().expect("only listed tools are called");
        let task = project.manifest.task(name).expect("only listed tools are called");
        let (args, kwargs) = match &task.signature {
            Some(signature) => signature.bind(arguments).map_err(Refused)?,
            None => (Vec::new(), arguments),
        };
        let order = RunOrder {
            entry: Some(project.entry.display().to_string()),
            ..RunOrder::task(Some(name.to_string()), args, kwargs)
        };
        let request =
            SubmitRun { wait: true, stream: false, ..SubmitRun::of_order(project.manifest_path.clone(), order) };
        let finished: Finished = client.submit_and_wait(&request).await?;
        Ok(envelope_result(serde_json::to_value(finished.outcome).unwrap_or_default()))
    }

    fn session_id(&self, arguments: &Map<String, Value>, takes: &[&str]) -> Result<String, Refused> {
        let id = text_argument(arguments, "session_id", takes)?;
        if !self.sessions.lock().unwrap_or_else(|e| e.into_inner()).contains(&id) {
            return Err(Refused(format!("no open session `{id}`; open one with `{SESSION_CREATE}`")));
        }
        Ok(id)
    }
}

/// The string argument `name`, the call having no arguments but `takes`.
fn text_argument(arguments: &Map<String, Value>, name: &str, takes: &[&str]) -> Result<String, Refused> {
    expect_only(arguments, takes)?;
    match arguments.get(name) {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(_) => Err(Refused(format!("`{name}` must be a string"))),
        None => Err(Refused(format!("missing argument `{name}`"))),
    }
}

fn expect_only(arguments: &Map<String, Value>, takes: &[&str]) -> Result<(), Refused> {
    match arguments.keys().find(|key| !takes.contains(&key.as_str())) {
        Some(unknown) => Err(Refused(format!("unknown argument `{unknown}`"))),
        None => Ok(()),
    }
}

fn success(text: String) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(text)])
}

/// A run's envelope as a tool result: the envelope as structured content, and as text what
/// a model reads best (the result or the error, then the output).
fn envelope_result(envelope: Value) -> CallToolResult {
    let text = text::envelope(&envelope);
    let mut result = match envelope["success"].as_bool() {
        Some(true) => CallToolResult::success(vec![ContentBlock::text(text)]),
        _ => CallToolResult::error(vec![ContentBlock::text(text)]),
    };
    result.structured_content = Some(envelope);
    result
}

impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("capsule", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Run Python in WebAssembly sandboxes with CPU, memory and time limits: `run_python` for one-off \
                 code, sessions to keep state between calls, and the project's tasks as tools.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools.clone()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if !self.tools.iter().any(|tool| tool.name == request.name) {
            return Err(ErrorData::invalid_params(format!("no tool `{}`", request.name), None));
        }
        let result = match self.call(&request.name, request.arguments.unwrap_or_default()).await {
            Ok(result) => result,
            Err(Refused(message)) => CallToolResult::error(vec![ContentBlock::text(message)]),
        };
        Ok(result.into())
    }
}
