//! A stateless application replica for demos and tests: it says which replica
//! answered, and echoes what it received.
//!
//! `cargo run --example replica -- 127.0.0.1:9001 alpha`
//!
//! - `GET /healthz`: 200 `ok`
//! - `GET /headers`: the request headers, one per line
//! - anything else: `replica <name>: <METHOD> <path>`

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| "127.0.0.1:9001".parse().unwrap());
    let name = args.next().unwrap_or_else(|| addr.port().to_string());
    let listener = TcpListener::bind(addr).await?;
    eprintln!("replica {name} listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(name.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(name: String, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.uri().path() {
        "/healthz" => "ok\n".to_string(),
        "/headers" => req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
            .collect(),
        path => format!("replica {name}: {} {path}\n", req.method()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        "x-replica",
        name.parse()
            .expect("a replica name is a valid header value"),
    );
    Ok(resp)
}
