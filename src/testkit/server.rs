//! The HTTP(S) server under the test kit's fake services: a loopback port,
//! the test CA's certificate when asked, one task per connection, until the
//! returned token is cancelled.

use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A response of a fake service.
pub(crate) type Reply = Response<Full<bytes::Bytes>>;

/// A running fake service: its address and base URL; it stops when dropped.
pub(crate) struct Serving {
    pub(crate) addr: SocketAddr,
    pub(crate) base: String,
    stop: CancellationToken,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves `handle` on a free loopback port, over HTTPS with the certificate
/// chain and key in `tls` (PEM files), or plain HTTP without.
pub(crate) async fn serve<H, F>(
    tls: Option<&(PathBuf, PathBuf)>,
    handle: H,
) -> std::io::Result<Serving>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base = format!("{scheme}://{addr}");
    let acceptor = match tls {
        Some((cert, key)) => Some(acceptor(cert, key)?),
        None => None,
    };
    let stop = CancellationToken::new();
    let st = stop.clone();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                _ = st.cancelled() => return,
            };
            let (handle, acceptor) = (handle.clone(), acceptor.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let f = handle(req);
                    async move { Ok::<_, std::convert::Infallible>(f.await) }
                });
                let builder = http1::Builder::new();
                match acceptor {
                    Some(a) => {
                        if let Ok(tls) = a.accept(stream).await {
                            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    Ok(Serving { addr, base, stop })
}

fn acceptor(cert: &PathBuf, key: &PathBuf) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let bad = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(&e))?;
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(&e))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A request as the fakes judge it.
pub(crate) struct Received {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: String,
    /// Whether it carried `Bearer <token>`.
    pub(crate) authorized: bool,
    /// The JSON body (`Null` when none or not JSON).
    pub(crate) body: serde_json::Value,
}

/// Reads `req`, checking its bearer token against `token`.
pub(crate) async fn read(req: Request<hyper::body::Incoming>, token: &str) -> Received {
    use http_body_util::BodyExt;
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {token}").as_str());
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Received {
        method,
        path,
        query,
        authorized,
        body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    }
}

/// A JSON reply (an empty body for `Null`) with extra headers.
pub(crate) fn json_reply(
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: &serde_json::Value,
) -> Reply {
    let mut rsp = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    for (k, v) in headers {
        rsp = rsp.header(k, v);
    }
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    rsp.body(Full::new(bytes::Bytes::from(text)))
        .expect("a valid response")
}
