//! A mock HTTP/1.1 server on loopback: checks the credential, records every request, plays
//! scripted faults per operation, and hands everything else to the cloud's handler.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// One request as the mock saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    /// Operation name the cloud's router gave it (`create`, `get`, ...).
    pub op: String,
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Body text.
    pub body: String,
    /// Status answered.
    pub status: u16,
}

/// A scripted answer for the next request of one operation.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status, body and optional `Retry-After` instead of handling.
    Respond {
        /// Status.
        status: u16,
        /// Body.
        body: String,
        /// `Retry-After` header value.
        retry_after: Option<String>,
    },
    /// Handle the request (its effect happens), then answer with this status and body anyway:
    /// "the create failed but the machine exists".
    AfterEffect {
        /// Status.
        status: u16,
        /// Body.
        body: String,
    },
}

/// A handled request's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status.
    pub status: u16,
    /// JSON (or text) body.
    pub body: String,
}

impl Answer {
    /// 200 with a JSON body.
    pub fn json(v: serde_json::Value) -> Self {
        Self { status: 200, body: v.to_string() }
    }

    /// A status with a JSON body.
    pub fn status(status: u16, v: serde_json::Value) -> Self {
        Self { status, body: v.to_string() }
    }
}

/// What a cloud's mock implements.
pub trait Handler: Send + Sync + 'static {
    /// Name the operation of a request (used for fault scripts and call counts).
    fn route(&self, method: &str, path: &str, body: &str) -> String;
    /// Answer it.
    fn handle(&self, op: &str, method: &str, path: &str, body: &str) -> Answer;
    /// Whether the request carries the right credential.
    fn authorized(&self, headers: &hyper::HeaderMap, path: &str) -> bool;
    /// The body of a 401 for a missing or wrong credential, in the API's shape.
    fn unauthorized_body(&self) -> String {
        r#"{"error":"unauthorized","msg":"invalid or missing API key"}"#.to_string()
    }
    /// For a mock in front of another emulator: the upstream URL operation `op` goes to when no
    /// fault is scripted (`None`: `handle` answers).
    fn forward(&self, _op: &str) -> Option<String> {
        None
    }
}

struct Shared {
    handler: Arc<dyn Handler>,
    log: Mutex<Vec<Logged>>,
    faults: Mutex<HashMap<String, VecDeque<Fault>>>,
}

/// A running mock server; stops when dropped.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for MockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockServer").field("addr", &self.addr).finish()
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockServer {
    /// Serve `handler` on 127.0.0.1 (an ephemeral port).
    pub async fn start(handler: Arc<dyn Handler>) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared { handler, log: Mutex::default(), faults: Mutex::default() });
        let s = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let s = Arc::clone(&s);
                        async move { Ok::<_, std::convert::Infallible>(serve(&s, req).await) }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                });
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Play `fault` for the next request of operation `op` (faults queue up in order).
    pub fn inject(&self, op: &str, fault: Fault) {
        self.shared.faults.lock().expect("faults").entry(op.to_string()).or_default().push_back(fault);
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<Logged> {
        self.shared.log.lock().expect("log").clone()
    }

    /// Requests of operation `op` so far.
    pub fn count(&self, op: &str) -> usize {
        self.shared.log.lock().expect("log").iter().filter(|l| l.op == op).count()
    }

    /// Forget the log.
    pub fn clear_log(&self) {
        self.shared.log.lock().expect("log").clear();
    }
}

async fn serve(s: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    let authorized = s.handler.authorized(req.headers(), &path);
    let headers = req.headers().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let op = s.handler.route(&method, &path, &body);
    let fault = s.faults.lock().expect("faults").get_mut(&op).and_then(VecDeque::pop_front);
    let (status, text, retry_after) = if !authorized {
        (401, s.handler.unauthorized_body(), None)
    } else {
        match fault {
            Some(Fault::Respond { status, body: answer, retry_after }) => (status, answer, retry_after),
            Some(Fault::AfterEffect { status, body: answer }) => {
                match s.handler.forward(&op) {
                    Some(upstream) => {
                        let _ = forward(&upstream, &method, &path, &headers, &body).await;
                    }
                    None => {
                        let _ = s.handler.handle(&op, &method, &path, &body);
                    }
                }
                (status, answer, None)
            }
            None => match s.handler.forward(&op) {
                Some(upstream) => match forward(&upstream, &method, &path, &headers, &body).await {
                    Ok((status, text)) => (status, text, None),
                    Err(e) => (502, format!("mock: upstream {upstream}: {e}"), None),
                },
                None => {
                    let a = s.handler.handle(&op, &method, &path, &body);
                    (a.status, a.body, None)
                }
            },
        }
    };
    s.log.lock().expect("log").push(Logged { op, method, path, body, status });
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    if let Some(r) = retry_after.and_then(|r| hyper::header::HeaderValue::from_str(&r).ok()) {
        response.headers_mut().insert("retry-after", r);
    }
    response
}

/// Pass a request on to `upstream` unchanged (headers but Host and Content-Length included).
async fn forward(upstream: &str, method: &str, path: &str, headers: &hyper::HeaderMap, body: &str) -> Result<(u16, String), String> {
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let mut req = client.request(method, format!("{upstream}{path}")).body(body.to_string());
    for (k, v) in headers {
        if k != "host" && k != "content-length" {
            req = req.header(k.as_str(), v.as_bytes());
        }
    }
    let r = req.send().await.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    Ok((status, r.text().await.map_err(|e| e.to_string())?))
}
