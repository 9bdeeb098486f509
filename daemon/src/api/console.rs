//! The web console: a single-page app (plain HTML, CSS and ES modules under `daemon/console/`)
//! compiled into the binary, so the daemon serves it with no build step, no runtime download and
//! no CDN. Routes: `GET /` and `GET /console` (the page), `GET /console/assets/{name}` (its
//! scripts, style sheet and icon). The console only calls the public API with the key the user
//! gives it, so these routes are open: the page holds no data and no secret.
//!
//! Caching: every answer carries a strong `ETag` (a digest of its bytes) with
//! `Cache-Control: no-cache`, so browsers revalidate and get `304 Not Modified` until a new
//! binary serves different bytes — asset names are not fingerprinted, so a long `max-age` would
//! keep an old console after an upgrade.
use std::sync::OnceLock;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::handlers::method_not_allowed;

/// The route patterns of the console, which need no API key (see `auth::Auth::required`).
pub const PUBLIC_ROUTES: &[&str] = &["/", "/console", "/console/assets/{name}"];

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        Asset {
            name: $name,
            content_type: $content_type,
            bytes: include_bytes!(concat!("../../console/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// The page itself, served at `/` and `/console`.
const INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");

/// Everything under `/console/assets/`.
const ASSETS: &[Asset] = &[
    asset!("console.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("chart.js", JS),
    asset!("prom.js", JS),
    asset!("jobs.js", JS),
    asset!("job.js", JS),
    asset!("compare.js", JS),
    asset!("adapters.js", JS),
    asset!("serving.js", JS),
];

/// Only this origin's scripts, styles and connections: the console can reach nothing else, and
/// an injected inline script would not run.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn configure(cfg: &mut web::ServiceConfig) {
    fn resource(path: &str) -> actix_web::Resource {
        web::resource(path).default_service(web::to(method_not_allowed))
    }
    cfg.service(resource("/").route(web::get().to(index)))
        .service(resource("/console").route(web::get().to(index)))
        .service(resource("/console/assets/{name}").route(web::get().to(asset)));
}

/// `"<hex digest>"` of each asset, [`INDEX`] last, computed once.
fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .chain(std::iter::once(&INDEX))
            .map(|a| {
                let d = Sha256::digest(a.bytes);
                let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
                format!("\"{hex}\"")
            })
            .collect()
    })
}

fn serve(req: &HttpRequest, a: &Asset, etag: &str) -> HttpResponse {
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut res = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    res.insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"));
    if a.content_type.starts_with("text/html") {
        res.insert_header((header::CONTENT_SECURITY_POLICY, CSP))
            .insert_header((header::X_FRAME_OPTIONS, "DENY"));
    }
    if fresh {
        res.finish()
    } else {
        res.content_type(a.content_type).body(a.bytes)
    }
}

/// `GET /`, `GET /console`: the page.
pub async fn index(req: HttpRequest) -> HttpResponse {
    let tags = etags();
    serve(&req, &INDEX, &tags[tags.len() - 1])
}

/// `GET /console/assets/{name}`: one embedded file; 404 for any other name.
pub async fn asset(req: HttpRequest, name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let i = ASSETS
        .iter()
        .position(|a| a.name == name.as_str())
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "No console asset `{}`",
                name.chars().take(100).collect::<String>()
            ))
        })?;
    Ok(serve(&req, &ASSETS[i], &etags()[i]))
}

#[cfg(test)]
mod tests {
    use actix_web::{test as atest, App};

    use super::*;

    async fn call(req: atest::TestRequest) -> actix_web::dev::ServiceResponse {
        let app = atest::init_service(App::new().configure(crate::api::configure)).await;
        atest::call_service(&app, req.to_request()).await
    }

    fn header_of(res: &actix_web::dev::ServiceResponse, name: header::HeaderName) -> String {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    #[actix_web::test]
    async fn page_and_assets_are_served_with_types_and_validators() {
        for path in ["/", "/console"] {
            let res = call(atest::TestRequest::get().uri(path)).await;
            assert_eq!(res.status().as_u16(), 200, "{path}");
            assert_eq!(
                header_of(&res, header::CONTENT_TYPE),
                "text/html; charset=utf-8"
            );
            assert!(header_of(&res, header::CONTENT_SECURITY_POLICY).contains("script-src 'self'"));
            let body = atest::read_body(res).await;
            assert!(body.starts_with(b"<!doctype html>"), "{path}");
        }
        for a in ASSETS {
            let uri = format!("/console/assets/{}", a.name);
            let res = call(atest::TestRequest::get().uri(&uri)).await;
            assert_eq!(res.status().as_u16(), 200, "{uri}");
            assert_eq!(header_of(&res, header::CONTENT_TYPE), a.content_type);
            assert_eq!(header_of(&res, header::CACHE_CONTROL), "no-cache");
            assert_eq!(header_of(&res, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
            let etag = header_of(&res, header::ETAG);
            assert!(etag.len() == 34 && etag.starts_with('"'), "{etag}");
            assert_eq!(atest::read_body(res).await.as_ref(), a.bytes);
            // A revalidation with the same tag is answered without a body.
            let again = call(
                atest::TestRequest::get()
                    .uri(&uri)
                    .insert_header((header::IF_NONE_MATCH, etag.as_str())),
            )
            .await;
            assert_eq!(again.status().as_u16(), 304, "{uri}");
            assert!(atest::read_body(again).await.is_empty());
            let stale = call(
                atest::TestRequest::get()
                    .uri(&uri)
                    .insert_header((header::IF_NONE_MATCH, "\"0000\"")),
            )
            .await;
            assert_eq!(stale.status().as_u16(), 200, "{uri}");
        }
    }

    #[actix_web::test]
    async fn unknown_assets_are_404_and_other_methods_405() {
        for uri in [
            "/console/assets/nope.js",
            "/console/assets/..%2Fsrc%2Fmain.rs",
            "/console/assets/index.html",
        ] {
            let res = call(atest::TestRequest::get().uri(uri)).await;
            assert_eq!(res.status().as_u16(), 404, "{uri}");
            let body: serde_json::Value = atest::read_body_json(res).await;
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        }
        let res = call(atest::TestRequest::post().uri("/")).await;
        assert_eq!(res.status().as_u16(), 405);
        let res = call(atest::TestRequest::delete().uri("/console/assets/app.js")).await;
        assert_eq!(res.status().as_u16(), 405);
    }

    /// Every file the page or a module refers to under `/console/assets/` (or `./x.js` from a
    /// module) is embedded, and every embedded file is referred to: a typo would only show in
    /// a browser otherwise.
    #[test]
    fn references_and_embedded_files_agree() {
        let mut referred = std::collections::BTreeSet::new();
        for a in ASSETS.iter().chain(std::iter::once(&INDEX)) {
            let text = std::str::from_utf8(a.bytes).expect("UTF-8 asset");
            for name in asset_refs(text) {
                assert!(
                    ASSETS.iter().any(|x| x.name == name),
                    "{} refers to {name}, which is not embedded",
                    a.name
                );
                referred.insert(name);
            }
        }
        for a in ASSETS {
            assert!(referred.contains(a.name), "{} is never referred to", a.name);
        }
    }

    /// The asset names in `/console/assets/NAME` and `from './NAME'` / `import('./NAME')`.
    fn asset_refs(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (marker, end) in [("/console/assets/", '"'), ("'./", '\'')] {
            let mut rest = text;
            while let Some(i) = rest.find(marker) {
                rest = &rest[i + marker.len()..];
                out.push(rest.chars().take_while(|&c| c != end).collect());
            }
        }
        out
    }

    #[test]
    fn console_routes_are_public() {
        let a = super::super::auth::Auth::new(
            vec![(
                "admin-key-0123456789".into(),
                super::super::auth::Scope::Admin,
            )],
            false,
        )
        .unwrap();
        for p in PUBLIC_ROUTES {
            assert!(
                a.check(&actix_web::http::Method::GET, Some(p), None)
                    .is_ok(),
                "{p}"
            );
        }
    }
}
