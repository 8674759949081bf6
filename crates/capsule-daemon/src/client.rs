//! The client end of the API, over the Unix socket (or TCP with a token): what `capsule run`,
//! `list`, `stop`, `restart` and `logs` use when a daemon answers.

use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{Accepted, ApiError, ErrorBody, Finished, Health, Line, RunView, SubmitRun};

/// Where a daemon listens.
#[derive(Debug, Clone)]
pub enum Target {
    Unix(PathBuf),
    Tcp { address: String, token: String },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "{}", path.display()),
            Self::Tcp { address, .. } => write!(f, "{address}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no daemon answers on `{target}`: {source}")]
    Unreachable { target: String, source: std::io::Error },
    #[error("the daemon on `{target}` broke off: {message}")]
    Protocol { target: String, message: String },
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl manifest_schema::Explain for ClientError {
    fn category(&self) -> manifest_schema::Category {
        match self {
            Self::Api(error) => error.kind,
            Self::Unreachable { .. } => manifest_schema::Category::Usage,
            Self::Protocol { .. } => manifest_schema::Category::Internal,
        }
    }

    fn problems(&self) -> Vec<manifest_schema::Problem> {
        match self {
            Self::Api(error) => error.problems(),
            other => vec![manifest_schema::Problem { message: other.to_string(), hint: other.hint() }],
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::Unreachable { .. } => Some("start one with `capsule daemon`, or <<in_process>>".into()),
            _ => None,
        }
    }
}

/// One connection to a daemon (HTTP/1.1, kept alive between requests).
pub struct Client {
    target: Target,
    sender: SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(target: Target) -> Result<Self, ClientError> {
        let unreachable = |source| ClientError::Unreachable { target: target.to_string(), source };
        let sender = match &target {
            Target::Unix(path) => handshake(tokio::net::UnixStream::connect(path).await.map_err(unreachable)?).await,
            Target::Tcp { address, .. } => {
                handshake(tokio::net::TcpStream::connect(address).await.map_err(unreachable)?).await
            }
        }
        .map_err(|e| ClientError::Protocol { target: target.to_string(), message: e.to_string() })?;
        Ok(Self { target, sender })
    }

    /// Connects to the daemon on the default socket ([`crate::default_socket`]).
    pub async fn connect_default() -> Result<Self, ClientError> {
        let socket = crate::default_socket().map_err(|error| ClientError::Unreachable {
            target: "the default socket".into(),
            source: std::io::Error::other(error.to_string()),
        })?;
        Self::connect(Target::Unix(socket)).await
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    fn broke(&self, message: impl std::fmt::Display) -> ClientError {
        ClientError::Protocol { target: self.target.to_string(), message: message.to_string() }
    }

    /// `method path` with `body`, answered: whatever the status.
    async fn respond(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let mut request = Request::builder().method(method).uri(path).header("host", "capsule");
        if let Target::Tcp { token, .. } = &self.target {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| self.broke(e))?;
        self.sender.ready().await.map_err(|e| self.broke(e))?;
        self.sender.send_request(request).await.map_err(|e| self.broke(e))
    }

    /// `method path` with `body`, answered with success, else the API's error.
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let response = self.respond(method, path, body).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| self.broke(e))?.to_bytes();
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api(body.error)),
            Err(_) => Err(self.broke(format!("{status}: {}", String::from_utf8_lossy(&bytes)))),
        }
    }

    /// One request as given (`method`, `route`, a JSON body), answered with the HTTP
    /// status and body, errors included: for clients that read the API's answers themselves
    /// (the Python SDK). Only an unreachable or broken connection is an `Err`.
    pub async fn exchange(
        &mut self,
        method: &str,
        route: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let method = Method::from_bytes(method.as_bytes()).map_err(|e| self.broke(e))?;
        let response = self.respond(method, route, body).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.map_err(|e| self.broke(e))?.to_bytes();
        Ok((status, bytes))
    }

    async fn json<T: DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let response = self.send(method, path, body).await?;
        let bytes = response.into_body().collect().await.map_err(|e| self.broke(e))?.to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| self.broke(format!("unexpected answer: {e}")))
    }

    pub async fn get<T: DeserializeOwned>(&mut self, path: &str) -> Result<T, ClientError> {
        self.json(Method::GET, path, None).await
    }

    pub async fn post<T: DeserializeOwned>(&mut self, path: &str, body: &impl Serialize) -> Result<T, ClientError> {
        self.json(Method::POST, path, Some(serde_json::to_vec(body).expect("requests serialise"))).await
    }

    /// A `DELETE` (answered with no content).
    pub async fn delete(&mut self, path: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, path, None).await.map(drop)
    }

    pub async fn health(&mut self) -> Result<Health, ClientError> {
        self.get("/v1/health").await
    }

    /// Starts a run and returns at once (`wait` is ignored).
    pub async fn submit(&mut self, request: &SubmitRun) -> Result<RunView, ClientError> {
        let request = SubmitRun { wait: false, ..request.clone() };
        Ok(self.post::<Accepted>("/v1/runs", &request).await?.run)
    }

    /// Starts a run and waits for its outcome (one answer, no events).
    pub async fn submit_and_wait(&mut self, request: &SubmitRun) -> Result<Finished, ClientError> {
        let request = SubmitRun { wait: true, stream: false, ..request.clone() };
        self.post("/v1/runs", &request).await
    }

    /// Starts a run and follows it: every line until its outcome.
    pub async fn submit_and_follow(
        &mut self,
        request: &SubmitRun,
        on_line: impl FnMut(Line),
    ) -> Result<(), ClientError> {
        let request = SubmitRun { wait: true, stream: true, ..request.clone() };
        self.stream(Method::POST, "/v1/runs", Some(&request), on_line).await
    }

    pub async fn runs(&mut self, all: bool) -> Result<Vec<RunView>, ClientError> {
        self.get(&format!("/v1/runs?all={all}")).await
    }

    pub async fn run(&mut self, id: &str) -> Result<RunView, ClientError> {
        self.get(&format!("/v1/runs/{}", segment(id))).await
    }

    pub async fn stop(&mut self, id: &str) -> Result<RunView, ClientError> {
        self.post(&format!("/v1/runs/{}/stop", segment(id)), &serde_json::json!({})).await
    }

    pub async fn restart(&mut self, id: &str) -> Result<RunView, ClientError> {
        Ok(self.post::<Accepted>(&format!("/v1/runs/{}/restart", segment(id)), &serde_json::json!({})).await?.run)
    }

    /// What the run's tasks printed, as lines; with `follow`, until the run ends.
    pub async fn logs(&mut self, id: &str, follow: bool, on_line: impl FnMut(Line)) -> Result<(), ClientError> {
        let path = format!("/v1/runs/{}/logs?follow={follow}", segment(id));
        self.stream(Method::GET, &path, None::<&()>, on_line).await
    }

    /// Sends a request whose answer is NDJSON and hands each line over as it arrives.
    async fn stream(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        mut on_line: impl FnMut(Line),
    ) -> Result<(), ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("requests serialise"));
        let mut response = self.send(method, path, body).await?;
        debug_assert_eq!(response.status(), StatusCode::OK);
        let mut pending = Vec::new();
        while let Some(frame) = response.body_mut().frame().await {
            let frame = frame.map_err(|e| self.broke(e))?;
            let Some(data) = frame.data_ref() else { continue };
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = serde_json::from_slice(&line).map_err(|e| self.broke(format!("unexpected line: {e}")))?;
                on_line(line);
            }
        }
        Ok(())
    }
}

/// A run id as a path segment: ids are hex, anything else is escaped so it cannot change the route.
fn segment(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn handshake<S>(stream: S) -> hyper::Result<SendRequest<Full<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "the connection to the daemon ended");
        }
    });
    Ok(sender)
}
