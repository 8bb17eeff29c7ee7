//! Put Page From URL, which Azurite lacks: performed here against the source
//! the request names, with the authorization rules the service applies.

use super::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};

/// Performs Put Page From URL as the service would, since Azurite does not:
/// reads the source range through the URL's SAS (upstream), then writes it as
/// a page of the destination, signed with the destination account's key.
pub(super) async fn put_page_from_url(
    shared: &Shared,
    seen: &Seen,
    headers: &hyper::HeaderMap,
) -> Result<(StatusCode, hyper::HeaderMap, Bytes), Reset> {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let fail = |status: StatusCode, code: &str| {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>put page from URL (behaviour proxy)</Message></Error>"
        );
        let mut h = hyper::HeaderMap::new();
        h.insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/xml"),
        );
        if let Ok(v) = hyper::header::HeaderValue::from_str(code) {
            h.insert("x-ms-error-code", v);
        }
        Ok((status, h, Bytes::from(body)))
    };
    let account = seen
        .path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let Some(key) = shared.cfg.signers.get(&account) else {
        return fail(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "ProxyHasNoKeyForThisAccount",
        );
    };
    // The destination range comes as `x-ms-range` or as the standard `Range`.
    let range = Some(header("x-ms-range"))
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| header("range"));
    let source = header("x-ms-copy-source");
    let Ok(source_url) = url::Url::parse(&source) else {
        return fail(StatusCode::BAD_REQUEST, "InvalidHeaderValue");
    };
    // The source range is read as the service reads it: through the SAS.
    let read_url = format!(
        "{}{}?{}",
        shared.cfg.upstream,
        source_url.path(),
        source_url.query().unwrap_or_default()
    );
    let read = Request::get(read_url.as_str())
        .header("x-ms-range", header("x-ms-source-range"))
        .header("x-ms-version", header("x-ms-version"))
        .body(Full::new(Bytes::new()))
        .map_err(|_| Reset)?;
    let rsp = shared.client.request(read).await.map_err(|_| Reset)?;
    if !rsp.status().is_success() {
        return fail(StatusCode::FORBIDDEN, "CannotVerifyCopySource");
    }
    let data = rsp
        .into_body()
        .collect()
        .await
        .map_err(|_| Reset)?
        .to_bytes();
    let url = url::Url::parse(&format!("{}{}?comp=page", shared.cfg.upstream, seen.path))
        .map_err(|_| Reset)?;
    let date = crate::azure::auth::http_date(time::OffsetDateTime::now_utc());
    let signed = vec![
        ("x-ms-date".to_owned(), date.clone()),
        ("x-ms-page-write".to_owned(), "update".to_owned()),
        ("x-ms-range".to_owned(), range.clone()),
        ("x-ms-version".to_owned(), header("x-ms-version")),
    ];
    let input = crate::azure::auth::SigningInput {
        method: "PUT",
        url: &url,
        headers: signed.clone(),
        content_length: Some(data.len() as u64),
    };
    let signature = key.sign(&crate::azure::auth::string_to_sign(&account, &input));
    let mut write = Request::put(url.as_str())
        .header("authorization", format!("SharedKey {account}:{signature}"))
        .header("content-length", data.len().to_string());
    for (k, v) in &signed {
        write = write.header(k.as_str(), v.as_str());
    }
    let write = write.body(Full::new(data)).map_err(|_| Reset)?;
    let rsp = shared.client.request(write).await.map_err(|_| Reset)?;
    let status = rsp.status();
    let (parts, body) = rsp.into_parts();
    let bytes = body.collect().await.map_err(|_| Reset)?.to_bytes();
    if status.is_success() {
        shared
            .page_writes
            .lock()
            .expect("page writes lock")
            .push((seen.path.clone(), range));
    }
    Ok((status, parts.headers, bytes))
}
