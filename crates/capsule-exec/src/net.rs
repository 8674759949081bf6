//! HTTP for tasks: made by the host, never by sockets in the sandbox, and only to the hosts
//! the task's `allowed_hosts` permits. Every hop of a redirect is checked again, names are
//! checked before resolving and addresses after (so a name cannot smuggle in a private
//! address), sizes are capped, and no call outlives the task's deadline. The task's
//! `secrets` are added here, from the runner's environment, to requests to their hosts only;
//! a redirect that would carry one to another host is refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use manifest_schema::{HostPolicy, Secret};
use python_runtime::{HostReply, HttpErrorKind, HttpRequest, HttpResponse};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::environment::Environment;
use crate::outcome::{HttpCall, duration_ms};

/// A PEM file of certificate authorities tasks' HTTPS trusts besides the public ones (an
/// internal CA, say), read by the runner when its engine is made.
pub const EXTRA_CA_ENV: &str = "CAPSULE_EXTRA_CA_CERTS";

/// Authorities added with [`trust_http_roots`], for every task of this process.
static EXTRA_ROOTS: std::sync::RwLock<Vec<reqwest::Certificate>> = std::sync::RwLock::new(Vec::new());

/// Makes tasks' HTTPS in this process trust the certificate authorities in `pem` too.
pub fn trust_http_roots(pem: &[u8]) -> Result<(), String> {
    let roots = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())?;
    if roots.is_empty() {
        return Err("no certificate in it".into());
    }
    EXTRA_ROOTS.write().unwrap_or_else(|e| e.into_inner()).extend(roots);
    Ok(())
}

/// Reads [`EXTRA_CA_ENV`] once per process, if it is set.
pub(crate) fn trust_roots_from_env() {
    static READ: std::sync::Once = std::sync::Once::new();
    READ.call_once(|| {
        let Some(path) = std::env::var_os(EXTRA_CA_ENV).filter(|p| !p.is_empty()) else { return };
        let path = std::path::PathBuf::from(path);
        if let Err(error) = std::fs::read(&path).map_err(|e| e.to_string()).and_then(|pem| trust_http_roots(&pem)) {
            tracing::error!(%error, file = %path.display(), "`{EXTRA_CA_ENV}` cannot be used; tasks trust the public authorities only");
        }
    });
}

/// The largest response body a task may receive.
pub const MAX_RESPONSE_BYTES: usize = 10 << 20;
/// Timeout of a call that names none (always cut to the task's remaining time).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REDIRECTS: usize = 10;

type Failure = (HttpErrorKind, String);

/// A task's network permissions for one attempt.
pub struct Network {
    policy: Arc<HostPolicy>,
    secrets: BTreeMap<String, Secret>,
    /// Where the secrets' values are read.
    environment: Environment,
    deadline: Instant,
}

impl Network {
    pub fn new(
        policy: HostPolicy,
        secrets: BTreeMap<String, Secret>,
        environment: Environment,
        deadline: Instant,
    ) -> Self {
        Self { policy: Arc::new(policy), secrets, environment, deadline }
    }

    /// The secrets for `scheme://host:port`, as header names and values; an error if one of
    /// them would go in clear or to another port, or is not set in the runner's environment.
    fn secret_headers(&self, scheme: &str, host: &str, port: u16) -> Result<Vec<(String, String, String)>, Failure> {
        let mut headers = Vec::new();
        for (name, secret) in &self.secrets {
            let goes = secret.hosts.secret_goes_to(scheme, host, port).map_err(|why| {
                (HttpErrorKind::Refused, format!("the request would carry the secret `{name}`: {why}"))
            })?;
            if !goes {
                continue;
            }
            let value = self.environment.get(name).ok_or_else(|| {
                (
                    HttpErrorKind::Refused,
                    format!(
                        "the secret `{name}` for `{host}` is not set: the runner has no environment variable `{name}`"
                    ),
                )
            })?;
            headers.push((name.clone(), secret.header.clone(), secret.header_value(&value)));
        }
        Ok(headers)
    }

    /// Performs the guest's request; returns the reply for the guest and the envelope's
    /// record of it.
    pub async fn request(&self, request: HttpRequest) -> (HostReply, HttpCall) {
        let started = Instant::now();
        let shown_url = without_query(&request.url);
        let method = request.method.to_ascii_uppercase();
        let reply = self.perform(request).await;
        let (status, bytes, error) = match &reply {
            Ok((response, bytes)) => (Some(response.status), *bytes, None),
            Err((_, message)) => (None, 0, Some(message.clone())),
        };
        let call =
            HttpCall { method, url: shown_url, status, duration_ms: duration_ms(started.elapsed()), bytes, error };
        let reply = match reply {
            Ok((response, _)) => HostReply::http(&response),
            Err((kind, message)) => HostReply::http_error(kind, message),
        };
        (reply, call)
    }

    /// The response and the size of its body.
    async fn perform(&self, request: HttpRequest) -> Result<(HttpResponse, usize), Failure> {
        let url = reqwest::Url::parse(&request.url)
            .map_err(|e| (HttpErrorKind::Invalid, format!("`{}` is not a URL: {e}", request.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err((HttpErrorKind::Invalid, format!("`{}`: only http and https URLs are supported", request.url)));
        }
        let (host, port) =
            host_and_port(&url).ok_or((HttpErrorKind::Invalid, format!("`{}` has no host", request.url)))?;
        self.policy.check_host(&host, port).map_err(|message| (HttpErrorKind::Refused, message))?;
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err((HttpErrorKind::Timeout, "the task's deadline has passed".into()));
        }
        let timeout = match request.timeout {
            None => DEFAULT_CALL_TIMEOUT,
            Some(seconds) => Duration::try_from_secs_f64(seconds)
                .ok()
                .filter(|t| !t.is_zero())
                .ok_or((HttpErrorKind::Invalid, format!("`timeout={seconds}` is not a positive number of seconds")))?,
        }
        .min(remaining);

        let secrets = self.secret_headers(url.scheme(), &host, port)?;
        let refusal = Arc::new(Mutex::new(None::<String>));
        let current_port = Arc::new(AtomicU16::new(port));
        let carried: Vec<String> = secrets.iter().map(|(name, ..)| name.clone()).collect();
        let client = self.client(timeout, refusal.clone(), current_port.clone(), carried)?;
        let method = reqwest::Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| (HttpErrorKind::Invalid, format!("`{}` is not an HTTP method", request.method)))?;
        let mut builder = client.request(method, url);
        for (name, value) in &request.headers {
            // A header a secret fills is the host's to set.
            if !secrets.iter().any(|(_, header, _)| header.eq_ignore_ascii_case(name)) {
                builder = builder.header(name, value);
            }
        }
        for (_, header, value) in &secrets {
            let mut value = reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                (HttpErrorKind::Invalid, format!("a secret's value cannot go in the `{header}` header"))
            })?;
            value.set_sensitive(true);
            builder = builder.header(header.as_str(), value);
        }
        if let Some(body) = &request.body_base64 {
            let body = BASE64.decode(body).map_err(|e| (HttpErrorKind::Invalid, format!("request body: {e}")))?;
            builder = builder.body(body);
        }
        let classify = |error: reqwest::Error| {
            if let Some(message) = refusal.lock().expect("refusal lock").take() {
                return (HttpErrorKind::Refused, message);
            }
            if error.is_timeout() {
                return (HttpErrorKind::Timeout, format!("no response within {timeout:?}"));
            }
            if error.is_redirect() {
                let reason = std::error::Error::source(&error).map_or_else(|| error.to_string(), ToString::to_string);
                return (HttpErrorKind::Refused, reason);
            }
            (HttpErrorKind::Connection, error_chain(&error))
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
                return Err((
                    HttpErrorKind::TooLarge,
                    format!("the response is larger than {} MiB", MAX_RESPONSE_BYTES >> 20),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((HttpResponse { status, url: final_url, headers, body_base64: BASE64.encode(&body) }, body.len()))
    }

    /// A client for one request; `carried` names the secrets the request carries, which a
    /// redirect may only take to their own hosts.
    fn client(
        &self,
        timeout: Duration,
        refusal: Arc<Mutex<Option<String>>>,
        current_port: Arc<AtomicU16>,
        carried: Vec<String>,
    ) -> Result<reqwest::Client, Failure> {
        let policy = self.policy.clone();
        let secrets: Vec<(String, HostPolicy)> =
            carried.into_iter().map(|name| (name.clone(), self.secrets[&name].hosts.clone())).collect();
        let redirect_port = current_port.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            let Some((host, port)) = host_and_port(attempt.url()) else {
                return attempt.error("a redirect to a URL without a host");
            };
            let scheme = attempt.url().scheme();
            for (name, hosts) in &secrets {
                let target = without_query(attempt.url().as_str());
                match hosts.secret_goes_to(scheme, &host, port) {
                    Ok(true) => {}
                    Ok(false) => {
                        return attempt.error(format!(
                            "redirect to `{target}` refused: the request carries the secret `{name}`, which goes to its own hosts only"
                        ));
                    }
                    Err(why) => {
                        return attempt.error(format!(
                            "redirect to `{target}` refused: the request carries the secret `{name}`: {why}"
                        ));
                    }
                }
            }
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
        let mut builder = reqwest::Client::builder();
        for root in EXTRA_ROOTS.read().unwrap_or_else(|e| e.into_inner()).iter() {
            builder = builder.add_root_certificate(root.clone());
        }
        builder
            .no_proxy()
            .redirect(redirects)
            .dns_resolver(Arc::new(resolver))
            .timeout(timeout)
            .user_agent(concat!("capsule/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| (HttpErrorKind::Connection, format!("cannot create an HTTP client: {e}")))
    }
}

fn host_and_port(url: &reqwest::Url) -> Option<(String, u16)> {
    let host = url.host_str()?.trim_start_matches('[').trim_end_matches(']').to_string();
    Some((host, url.port_or_known_default()?))
}

/// The URL without its query and fragment, which may carry secrets.
pub fn without_query(url: &str) -> String {
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
