//! Operator commands that talk to a running control plane over its REST API.
//!
//! [`Client`] holds the server URL and token and turns every answer into either JSON or an
//! error that carries the API's own message and status. The verbs live in [`bundles`],
//! [`rollouts`], [`fleet`], [`backup`] and [`trust`]; [`table`] lays out their human-readable
//! output.

pub(super) mod backup;
pub(super) mod bundles;
pub(super) mod fleet;
pub(super) mod rollouts;
mod table;
pub(super) mod trust;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use reqwest::blocking::{Body, RequestBuilder, Response};
use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Default for [`RemoteArgs::server`].
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// How long to wait for a TCP connection to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an ordinary API request may take, connection included (uploads have no limit).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the control plane is and which token to present; shared by every remote verb.
#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// Control plane base URL, http:// or https:// [default: http://127.0.0.1:8080].
    #[arg(long, env = "FLOTILLA_SERVER", default_value = DEFAULT_SERVER, hide_default_value = true)]
    pub server: String,
    /// CA certificate(s) (PEM) that signed an https:// server's certificate, trusted instead
    /// of the system's roots.
    #[arg(long, env = "FLOTILLA_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// API bearer token (make one with `flotilla server token`); without one no
    /// Authorization header is sent and the server answers 401.
    #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// A non-2xx answer: the API's `{"error": ...}` message and the status.
#[derive(Debug, thiserror::Error)]
#[error("{message} (HTTP {})", status.as_u16())]
pub struct ApiFailure {
    /// The HTTP status.
    pub status: StatusCode,
    /// The API's error message, or the body text when it sent no JSON error.
    pub message: String,
}

/// A JSON answer and the status it came with.
pub(crate) struct Answer {
    status: StatusCode,
    json: Value,
}

impl Answer {
    /// The answer as a typed view; `what` names it for the error.
    fn parse<T: DeserializeOwned>(&self, what: &str) -> Result<T> {
        serde_json::from_value(self.json.clone())
            .with_context(|| format!("unexpected {what} from the server"))
    }
}

/// A blocking client for one control plane.
pub(crate) struct Client {
    base: Url,
    token: Option<String>,
    http: reqwest::blocking::Client,
    uploads: reqwest::blocking::Client,
}

impl Client {
    /// Checks the URL and builds the HTTP clients; nothing is sent yet.
    pub(crate) fn new(args: &RemoteArgs) -> Result<Self> {
        let base = parse_server_url(&args.server)?;
        let roots = match &args.ca_file {
            Some(path) if base.scheme() == "https" => Some(ca_certificates(path)?),
            Some(_) => bail!(
                "--ca-file is for an https:// server; {} is plain HTTP",
                base
            ),
            None => None,
        };
        let build = |timeout: Option<Duration>| {
            let builder = reqwest::blocking::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(timeout)
                .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")));
            match &roots {
                Some(roots) => builder.tls_certs_only(roots.iter().cloned()),
                None => builder,
            }
            .build()
            .context("cannot set up the HTTP client")
        };
        Ok(Self {
            base,
            token: args.token.clone().filter(|t| !t.trim().is_empty()),
            http: build(Some(REQUEST_TIMEOUT))?,
            // A large bundle over a slow link takes as long as it takes.
            uploads: build(None)?,
        })
    }

    /// `segments` appended to the base URL (each percent-encoded) with `query` pairs.
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("invariant: an http URL can be a base")
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in query {
                pairs.append_pair(key, value);
            }
        }
        url
    }

    /// `GET` under the base URL.
    pub(crate) fn get(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Answer> {
        let url = self.url(segments, query);
        self.send(self.http.get(url.clone()), &url)
    }

    /// `POST` a JSON body (or none) under the base URL.
    pub(crate) fn post_json(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Answer> {
        let url = self.url(segments, query);
        let mut request = self.http.post(url.clone());
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(body).context("cannot encode the request")?);
        }
        self.send(request, &url)
    }

    /// `DELETE` under the base URL; the answer has no body.
    pub(crate) fn delete(&self, segments: &[&str]) -> Result<()> {
        let url = self.url(segments, &[]);
        self.respond(self.http.delete(url.clone()), &url)?;
        Ok(())
    }

    /// `POST` a raw octet stream under the base URL, with no overall time limit.
    pub(crate) fn post_bytes(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
        body: Body,
    ) -> Result<Answer> {
        let url = self.url(segments, query);
        let request = self
            .uploads
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.send(request, &url)
    }

    /// `GET` a response that lasts (an event stream) under the base URL, with no overall time
    /// limit; its body is read as it arrives.
    pub(crate) fn stream(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Response> {
        let url = self.url(segments, query);
        self.respond(self.uploads.get(url.clone()), &url)
    }

    /// `GET` a raw octet stream under the base URL into `out`, with no overall time limit;
    /// returns the bytes copied.
    pub(crate) fn download(&self, segments: &[&str], out: &mut impl std::io::Write) -> Result<u64> {
        let url = self.url(segments, &[]);
        let mut response = self.respond(self.uploads.get(url.clone()), &url)?;
        response
            .copy_to(out)
            .map_err(|e| self.transport_error(&e, &url))
    }

    fn send(&self, request: RequestBuilder, url: &Url) -> Result<Answer> {
        let response = self.respond(request, url)?;
        let status = response.status();

        let text = response.text().map_err(|e| self.transport_error(&e, url))?;
        let json = serde_json::from_str(&text).with_context(|| {
            format!(
                "the server at {} answered {url} with something other than JSON",
                self.base
            )
        })?;
        Ok(Answer { status, json })
    }

    /// Sends with the token; a non-2xx answer is an [`ApiFailure`].
    fn respond(&self, mut request: RequestBuilder, url: &Url) -> Result<Response> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().map_err(|e| self.transport_error(&e, url))?;
        if !response.status().is_success() {
            return Err(api_failure(response).into());
        }
        Ok(response)
    }

    fn transport_error(&self, e: &reqwest::Error, url: &Url) -> anyhow::Error {
        let cause = innermost_cause(e);
        if e.is_connect() && cause.contains("certificate") {
            anyhow!(
                "cannot reach the server at {}: {cause} (--ca-file names the CA that signed \
                 its certificate)",
                self.base
            )
        } else if e.is_connect() {
            anyhow!("cannot reach the server at {}: {cause}", self.base)
        } else if self.base.scheme() == "http" && cause.contains("invalid HTTP version") {
            anyhow!("request to {url} failed: {cause} (is the server https://?)")
        } else if e.is_timeout() {
            anyhow!("the server at {} did not answer in time ({url})", self.base)
        } else {
            anyhow!("request to {url} failed: {cause}")
        }
    }
}

/// The server URL as the user gave it, checked: `http` or `https` with a host. A trailing path
/// (a reverse proxy's prefix) is kept.
fn parse_server_url(text: &str) -> Result<Url> {
    let url = Url::parse(text.trim())
        .with_context(|| format!("bad server URL {text:?} (expected http(s)://HOST:PORT)"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => bail!(
            "server URL {text:?}: unsupported scheme {other:?} (expected http:// or https://)"
        ),
    }
    if url.host_str().is_none_or(str::is_empty) {
        bail!("server URL {text:?} names no host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("server URL {text:?} must not carry a query or fragment");
    }
    Ok(url)
}

/// The certificates of a `--ca-file`.
fn ca_certificates(path: &Path) -> Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read the CA file {}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("CA file {} is not PEM certificates", path.display()))?;
    if certs.is_empty() {
        bail!("CA file {} holds no certificate", path.display());
    }
    Ok(certs)
}

/// Reads a failed answer's `{"error": ...}` (or its text) into an [`ApiFailure`].
fn api_failure(response: Response) -> ApiFailure {
    let status = response.status();
    let text = response.text().unwrap_or_default();
    let from_json = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned));
    let message = from_json.unwrap_or_else(|| {
        let text = text.trim();
        if text.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("no error message")
                .to_lowercase()
        } else {
            text.to_owned()
        }
    });
    ApiFailure { status, message }
}

/// The last message in an error's source chain: `connection refused` rather than the
/// layers of wrapping above it.
fn innermost_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut current = e;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// Pretty-prints the API's JSON.
fn print_json(json: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(json).context("cannot encode JSON")?;
    emit(&(text + "\n"))
}

/// Writes to standard output; a closed pipe (`| head`) ends the program quietly, as the
/// reader has had enough.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let text = terminal_safe(text);
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => other.context("cannot write to standard output"),
    }
}

/// `text` with every control character but line breaks and tabs escaped (`\u{1b}`): what the
/// CLI prints comes from the server, and some of that from agents (labels, failure reasons),
/// which must not be able to send escape sequences to an operator's terminal.
fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escapes_from_the_server_are_printed_escaped() {
        assert_eq!(terminal_safe("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(
            terminal_safe("label=\u{1b}]0;owned\u{7}\u{1b}[2J\r\n"),
            "label=\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\r\n"
        );
    }

    fn client(server: &str) -> Client {
        Client::new(&RemoteArgs {
            server: server.into(),
            ca_file: None,
            token: None,
        })
        .unwrap()
    }

    #[test]
    fn urls_keep_a_proxy_prefix_and_encode_user_input() {
        let plain = client("http://127.0.0.1:8080");
        assert_eq!(
            plain
                .url(&["api", "v1", "rollouts", "a/b c"], &[("id", "x&y".into())])
                .as_str(),
            "http://127.0.0.1:8080/api/v1/rollouts/a%2Fb%20c?id=x%26y"
        );
        let prefixed = client("http://cp.local/flotilla/");
        assert_eq!(
            prefixed.url(&["api", "v1", "agents"], &[]).as_str(),
            "http://cp.local/flotilla/api/v1/agents"
        );
    }

    #[test]
    fn server_urls_other_than_http_or_https_are_refused_with_the_reason() {
        for (url, reason) in [
            ("127.0.0.1:8080", "bad server URL"),
            ("ftp://cp.local", "unsupported scheme"),
            ("http://cp.local/?x=1", "query"),
        ] {
            let err = Client::new(&RemoteArgs {
                server: url.into(),
                ca_file: None,
                token: None,
            })
            .err()
            .unwrap_or_else(|| panic!("{url} accepted"));
            assert!(err.to_string().contains(reason), "{url}: {err}");
        }
    }

    #[test]
    fn a_ca_file_must_hold_certificates_and_goes_with_https_only() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        for (server, ca_file, reason) in [
            ("http://cp.local", garbage.clone(), "is plain HTTP"),
            (
                "https://cp.local",
                dir.path().join("missing.pem"),
                "cannot read the CA file",
            ),
            ("https://cp.local", garbage, "holds no certificate"),
        ] {
            let err = Client::new(&RemoteArgs {
                server: server.into(),
                ca_file: Some(ca_file),
                token: None,
            })
            .err()
            .unwrap_or_else(|| panic!("{server} accepted"));
            assert!(format!("{err:#}").contains(reason), "{server}: {err:#}");
        }
    }
}
