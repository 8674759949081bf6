//! HTTP for tasks: made by the host, never by sockets in the sandbox, and only to the hosts
//! the task's `allowed_hosts` permits. Every hop of a redirect is checked again, names are
//! checked before resolving and addresses after (so a name cannot smuggle in a private
//! address), sizes are capped, and no call outlives the task's deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use manifest_schema::HostPolicy;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::journal::{Completion, Entered, hash_json};
use crate::subtasks::JournalPosition;

/// The largest response body a task may receive.
pub const MAX_RESPONSE_BYTES: usize = 10 << 20;
/// Timeout of a call that names none (always cut to the task's remaining time).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REDIRECTS: usize = 10;

/// A request as the guest sends it.
#[derive(Debug, Deserialize)]
struct HttpRequest {
    method: String,
    url: String,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    body_base64: Option<String>,
    /// Seconds.
    #[serde(default)]
    timeout: Option<f64>,
}

/// One HTTP call, as reported in the envelope: never headers, never the query string.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostRequest {
    pub method: String,
    pub url: String,
    pub status: Option<u16>,
    pub duration_ms: u64,
    pub bytes: usize,
    pub error: Option<String>,
}

/// A task's network permissions for one attempt.
pub struct Network {
    policy: Arc<HostPolicy>,
    deadline: Instant,
    pub requests: Vec<HostRequest>,
    journal: Option<JournalPosition>,
    sequence: Arc<AtomicU32>,
}

impl Network {
    pub fn new(policy: HostPolicy, deadline: Instant) -> Self {
        Self { policy: Arc::new(policy), deadline, requests: Vec::new(), journal: None, sequence: Arc::default() }
    }

    /// Journals every call at its position in the attempt's `sequence`.
    pub fn with_journal(mut self, journal: Option<JournalPosition>, sequence: Arc<AtomicU32>) -> Self {
        self.journal = journal;
        self.sequence = sequence;
        self
    }

    /// Performs the guest's request (JSON) and returns the reply for the guest (JSON); with a
    /// journal, a request that finished in an earlier run of this workflow is replayed.
    pub async fn handle(&mut self, request: &Value) -> Value {
        let seq = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        let Some(position) = self.journal.clone() else { return self.handle_now(request).await };
        let method = request.get("method").and_then(Value::as_str).unwrap_or_default().to_ascii_uppercase();
        let url = request.get("url").and_then(Value::as_str).unwrap_or_default();
        // Headers are left out of the identity: they may carry credentials that change.
        let identity = json!([method, url, request.get("body_base64")]);
        match position.enter(seq, "http", &method, &without_query(url), &hash_json(&identity)) {
            Ok(Entered::Replay { result, .. }) => result,
            Ok(Entered::Run { id }) => {
                let started = Instant::now();
                let reply = self.handle_now(request).await;
                let ok = reply.get("ok") == Some(&Value::Bool(true));
                let how = Completion {
                    ok,
                    result: &reply,
                    error: reply.get("error"),
                    attempts: None,
                    fuel: None,
                    peak_memory_bytes: None,
                    duration_ms: started.elapsed().as_millis() as u64,
                };
                if let Err(error) = position.journal.complete(id, &how) {
                    tracing::error!(%error, "could not record an HTTP call in the journal");
                }
                reply
            }
            Err(message) => failure("refused", message),
        }
    }

    async fn handle_now(&mut self, request: &Value) -> Value {
        let started = Instant::now();
        let request: HttpRequest = match serde_json::from_value(request.clone()) {
            Ok(request) => request,
            Err(error) => return failure("invalid", format!("malformed HTTP request: {error}")),
        };
        let shown_url = without_query(&request.url);
        let method = request.method.to_ascii_uppercase();
        let reply = self.perform(request).await;
        let (status, bytes, error) = match &reply {
            Ok((status, _, _, body)) => (Some(*status), body.len(), None),
            Err((_, message)) => (None, 0, Some(message.clone())),
        };
        self.requests.push(HostRequest {
            method,
            url: shown_url,
            status,
            duration_ms: started.elapsed().as_millis() as u64,
            bytes,
            error,
        });
        match reply {
            Ok((status, url, headers, body)) => json!({
                "ok": true, "status": status, "url": url, "headers": headers, "body_base64": BASE64.encode(body),
            }),
            Err((kind, message)) => failure(kind, message),
        }
    }

    async fn perform(
        &self,
        request: HttpRequest,
    ) -> Result<(u16, String, Vec<(String, String)>, Vec<u8>), (&'static str, String)> {
        let url = reqwest::Url::parse(&request.url)
            .map_err(|e| ("invalid", format!("`{}` is not a URL: {e}", request.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(("invalid", format!("`{}`: only http and https URLs are supported", request.url)));
        }
        let (host, port) = host_and_port(&url).ok_or(("invalid", format!("`{}` has no host", request.url)))?;
        self.policy.check_host(&host, port).map_err(|message| ("refused", message))?;
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(("timeout", "the task's deadline has passed".into()));
        }
        let timeout = request.timeout.map_or(DEFAULT_CALL_TIMEOUT, Duration::from_secs_f64).min(remaining);

        let refusal = Arc::new(Mutex::new(None::<String>));
        let current_port = Arc::new(AtomicU16::new(port));
        let client = self.client(timeout, refusal.clone(), current_port.clone())?;
        let method = reqwest::Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| ("invalid", format!("`{}` is not an HTTP method", request.method)))?;
        let mut builder = client.request(method, url);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        if let Some(body) = &request.body_base64 {
            let body = BASE64.decode(body).map_err(|e| ("invalid", format!("request body: {e}")))?;
            builder = builder.body(body);
        }
        let classify = |error: reqwest::Error| {
            if let Some(message) = refusal.lock().expect("refusal lock").take() {
                return ("refused", message);
            }
            if error.is_timeout() {
                return ("timeout", format!("no response within {timeout:?}"));
            }
            if error.is_redirect() {
                let reason = std::error::Error::source(&error).map_or_else(|| error.to_string(), ToString::to_string);
                return ("refused", reason);
            }
            ("connection", error_chain(&error))
        };
        let mut response = builder.send().await.map_err(classify)?;
        let status = response.status().as_u16();
        let final_url = response.url().to_string();
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(("too_large", format!("the response is larger than {} MiB", MAX_RESPONSE_BYTES >> 20)));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, final_url, headers, body))
    }

    fn client(
        &self,
        timeout: Duration,
        refusal: Arc<Mutex<Option<String>>>,
        current_port: Arc<AtomicU16>,
    ) -> Result<reqwest::Client, (&'static str, String)> {
        let policy = self.policy.clone();
        let redirect_port = current_port.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            let Some((host, port)) = host_and_port(attempt.url()) else {
                return attempt.error("a redirect to a URL without a host");
            };
            match policy.check_host(&host, port) {
                Ok(()) => {
                    redirect_port.store(port, Ordering::SeqCst);
                    attempt.follow()
                }
                Err(message) => {
                    let target = without_query(attempt.url().as_str());
                    attempt.error(format!("redirect to `{target}` refused: {message}"))
                }
            }
        });
        let resolver = PolicyResolver { policy: self.policy.clone(), port: current_port, refusal };
        reqwest::Client::builder()
            .no_proxy()
            .redirect(redirects)
            .dns_resolver(Arc::new(resolver))
            .timeout(timeout)
            .user_agent(concat!("capsule/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ("connection", format!("cannot create an HTTP client: {e}")))
    }
}

fn failure(kind: &str, message: String) -> Value {
    json!({"ok": false, "error": {"kind": kind, "message": message}})
}

fn host_and_port(url: &reqwest::Url) -> Option<(String, u16)> {
    let host = url.host_str()?.trim_start_matches('[').trim_end_matches(']').to_string();
    Some((host, url.port_or_known_default()?))
}

/// The URL without its query and fragment, which may carry secrets.
fn without_query(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.set_query(None);
            parsed.set_fragment(None);
            parsed.to_string()
        }
        Err(_) => url.split(['?', '#']).next().unwrap_or_default().to_string(),
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Resolves names, then keeps only the addresses the policy allows.
struct PolicyResolver {
    policy: Arc<HostPolicy>,
    /// Port of the hop being connected (the redirect policy updates it).
    port: Arc<AtomicU16>,
    refusal: Arc<Mutex<Option<String>>>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let (policy, refusal) = (self.policy.clone(), self.refusal.clone());
        let port = self.port.load(Ordering::SeqCst);
        Box::pin(async move {
            let host = name.as_str().to_string();
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
            let mut allowed = Vec::new();
            let mut last_refusal = None;
            for address in resolved {
                match policy.check_address(&host, port, address.ip()) {
                    Ok(()) => allowed.push(address),
                    Err(message) => last_refusal = Some(message),
                }
            }
            if allowed.is_empty() {
                let message = last_refusal.unwrap_or_else(|| format!("`{host}` did not resolve"));
                *refusal.lock().expect("refusal lock") = Some(message.clone());
                return Err(message.into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_never_recorded() {
        assert_eq!(
            without_query("https://api.example.com/v1/items?token=secret#frag"),
            "https://api.example.com/v1/items"
        );
        assert_eq!(without_query("not a url?x=1"), "not a url");
    }
}
