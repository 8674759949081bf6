//! A small HTTP/1.1 server on loopback for the tests that make HTTP calls from tasks, over
//! plain TCP or TLS (a certificate for `127.0.0.1` and `localhost` from a test authority,
//! which the engine of the test process trusts).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use serde_json::json;

/// A small HTTP/1.1 server on a free loopback port; each connection gets one answer.
pub fn start_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let address = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || answer(stream, "http"));
        }
    });
    format!("http://{address}")
}

/// The same server over TLS: `https://127.0.0.1:PORT`.
pub fn start_tls_server() -> String {
    let config = tls_config();
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let address = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = config.clone();
            thread::spawn(move || {
                let Ok(connection) = rustls::ServerConnection::new(config) else { return };
                answer(rustls::StreamOwned::new(connection, stream), "https");
            });
        }
    });
    format!("https://{address}")
}

/// A certificate authority made for this test process, trusted by its tasks' HTTPS, and the
/// server configuration of a certificate it issued for `127.0.0.1` and `localhost`.
fn tls_config() -> Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca.distinguished_name.push(rcgen::DnType::CommonName, "Capsule test authority");
            let ca = ca.self_signed(&ca_key).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            capsule_exec::trust_http_roots(ca.pem().as_bytes()).expect("the test authority");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let private = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
            let config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![leaf.der().clone()], private)
                .unwrap();
            Arc::new(config)
        })
        .clone()
}

fn answer(mut stream: impl Read + Write, scheme: &str) {
    let mut reader = BufReader::new(&mut stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let (mut length, mut authorized) = (0, false);
    // Header names lowercased, as received.
    let mut headers = serde_json::Map::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
        authorized |= lower.starts_with("authorization: bearer secret");
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), json!(value.trim()));
        }
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let port = headers.get("host").and_then(|h| h.as_str()?.rsplit(':').next()?.parse::<u16>().ok()).unwrap_or(80);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    drop(reader);
    let path = target.split('?').next().unwrap_or("");
    let (status, extra, content): (&str, String, Vec<u8>) = match (method.as_str(), path) {
        ("GET", "/json") => ("200 OK", "Content-Type: application/json\r\n".into(), br#"{"hello": "world"}"#.to_vec()),
        (_, "/echo") => {
            let echoed = json!({"method": method, "body": String::from_utf8_lossy(&body), "authorized": authorized});
            ("200 OK", "Content-Type: application/json\r\n".into(), echoed.to_string().into_bytes())
        }
        ("GET", "/headers") => (
            "200 OK",
            "Content-Type: application/json\r\n".into(),
            serde_json::Value::Object(headers).to_string().into_bytes(),
        ),
        // The same server under another name.
        ("GET", "/redirect-to-localhost") => {
            ("302 Found", format!("Location: {scheme}://localhost:{port}/headers\r\n"), Vec::new())
        }
        // The same server in clear, on this port.
        ("GET", "/redirect-to-http") => {
            ("302 Found", format!("Location: http://127.0.0.1:{port}/headers\r\n"), Vec::new())
        }
        ("GET", "/redirect-ok") => ("302 Found", "Location: /json\r\n".into(), Vec::new()),
        // Never contacted: the task's rules refuse the hop before any connection is made.
        ("GET", "/redirect-metadata") => {
            ("302 Found", "Location: http://169.254.169.254/latest/meta-data/\r\n".into(), Vec::new())
        }
        ("GET", "/slow") => {
            thread::sleep(Duration::from_secs(5));
            ("200 OK", String::new(), b"late".to_vec())
        }
        ("GET", "/big") => ("200 OK", String::new(), vec![b'x'; 11 << 20]),
        _ => ("404 Not Found", "Content-Type: text/plain\r\n".into(), b"missing".to_vec()),
    };
    let head = format!("HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n", content.len());
    let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&content));
}
