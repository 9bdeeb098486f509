//! API-key authentication and scopes: which key may call which route.
//!
//! Keys come from the config (`[auth] keys = [{ key, scope }]`) and the environment
//! (`ITAMAE_API_KEYS="scope:key,scope:key"`), each with a scope: `inference` (chat, completions,
//! models) or `admin` (everything: files, jobs, adapters, metrics, and deleting a model). `/healthz`, `/readyz` and the
//! web console's page and files (`console::PUBLIC_ROUTES`) are always open; `/metrics` needs
//! admin unless `metrics_public`. Clients send `Authorization: Bearer <key>`. A missing or
//! unknown key is 401 (`invalid_api_key`), a key without the needed scope 403
//! (`permission_denied`).
//!
//! Only SHA-256 digests of the keys are kept, and a presented key is compared against every one
//! of them in constant time (no early exit), so timing tells nothing about which bytes matched.
//!
//! Routes are classified by the route pattern the router will match (on the percent-decoded
//! path, as the router sees it), never by a prefix of the raw path: an encoded path such as
//! `/v1/%66iles` cannot slip past as an unknown route. Patterns not listed here need admin, so a
//! new route is closed until someone opens it.
use actix_web::http::{Method, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// What a key may do. `Admin` includes everything `Inference` may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Inference,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "inference" => Ok(Scope::Inference),
            "admin" => Ok(Scope::Admin),
            other => Err(format!(
                "unknown API key scope `{other}` (expected `inference` or `admin`)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::Admin => "admin",
        }
    }
}

/// What a route requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Required {
    /// No key needed.
    Open,
    /// Any valid key with at least this scope.
    Scope(Scope),
}

/// Shortest accepted key: shorter ones are guessable.
pub const MIN_KEY_LEN: usize = 16;

/// The configured keys (digests only) and the auth switches. Cheap to clone.
#[derive(Clone, Default)]
pub struct Auth {
    keys: std::sync::Arc<Vec<([u8; 32], Scope)>>,
    metrics_public: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material, not even digests.
        f.debug_struct("Auth")
            .field("keys", &self.keys.len())
            .field("metrics_public", &self.metrics_public)
            .finish()
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// True when `host` (as given to `--host`) names only the loopback interface.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim().trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Auth {
    /// Auth with these keys; with no keys every route is open.
    pub fn new(keys: Vec<(String, Scope)>, metrics_public: bool) -> Result<Self, String> {
        let mut out = Vec::with_capacity(keys.len());
        for (key, scope) in keys {
            if key.len() < MIN_KEY_LEN {
                return Err(format!(
                    "an API key of scope `{}` is shorter than {MIN_KEY_LEN} characters",
                    scope.as_str()
                ));
            }
            if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "an API key of scope `{}` holds whitespace or control characters",
                    scope.as_str()
                ));
            }
            out.push((digest(key.as_bytes()), scope));
        }
        Ok(Self {
            keys: std::sync::Arc::new(out),
            metrics_public,
        })
    }

    /// The checker for the resolved configuration's keys: the file's (errors prefixed
    /// `[auth] keys:`) and the environment's, each scope checked here.
    pub fn from_config(c: &crate::config::AuthConfig) -> Result<Self, String> {
        let parse = |keys: &[crate::config::ApiKeyEntry]| {
            keys.iter()
                .map(|k| Ok((k.key.clone(), Scope::parse(&k.scope)?)))
                .collect::<Result<Vec<_>, String>>()
        };
        let mut keys = parse(&c.file_keys).map_err(|e| format!("[auth] keys: {e}"))?;
        keys.extend(parse(&c.env_keys)?);
        Self::new(keys, c.metrics_public)
    }

    /// No keys: every route is open (allowed only on a loopback bind, see [`Self::check_bind`]).
    pub fn disabled() -> Self {
        Self::default()
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Refuses to serve a non-loopback address without keys.
    pub fn check_bind(&self, host: &str) -> Result<(), String> {
        if self.enabled() || is_loopback_host(host) {
            Ok(())
        } else {
            Err(format!(
                "refusing to serve on `{host}` without API keys: configure `[auth] keys` or set ITAMAE_API_KEYS=\"admin:<key>\" (or bind 127.0.0.1)"
            ))
        }
    }

    /// The scope of `token`, if it is a configured key. Every stored digest is compared, in
    /// constant time, whatever matched before.
    pub fn lookup(&self, token: &str) -> Option<Scope> {
        let d = digest(token.as_bytes());
        let mut admin = subtle::Choice::from(0u8);
        let mut inference = subtle::Choice::from(0u8);
        for (k, scope) in self.keys.iter() {
            let eq = k.ct_eq(&d);
            match scope {
                Scope::Admin => admin |= eq,
                Scope::Inference => inference |= eq,
            }
        }
        if bool::from(admin) {
            Some(Scope::Admin)
        } else if bool::from(inference) {
            Some(Scope::Inference)
        } else {
            None
        }
    }

    /// What the route with this pattern requires (`None`: no route matches, the request will be
    /// a 404, any valid key may learn that).
    pub fn required(&self, method: &Method, pattern: Option<&str>) -> Required {
        match pattern {
            // Deleting a model changes what is served: an admin's act.
            Some("/v1/models/{id:.+}") if method == Method::DELETE => Required::Scope(Scope::Admin),
            Some("/healthz") | Some("/readyz") => Required::Open,
            // The console's page and files: it calls the API with the key the user enters.
            Some(p) if super::console::PUBLIC_ROUTES.contains(&p) => Required::Open,
            Some("/metrics") if self.metrics_public => Required::Open,
            None
            | Some("/v1/models")
            | Some("/v1/models/{id:.+}")
            | Some("/v1/chat/completions")
            | Some("/v1/completions") => Required::Scope(Scope::Inference),
            Some(_) => Required::Scope(Scope::Admin),
        }
    }

    /// Allows or refuses a request to the route `pattern` carrying the `Authorization` header
    /// value `header`.
    pub fn check(
        &self,
        method: &Method,
        pattern: Option<&str>,
        header: Option<&[u8]>,
    ) -> Result<(), ApiError> {
        if !self.enabled() {
            return Ok(());
        }
        let Required::Scope(needed) = self.required(method, pattern) else {
            return Ok(());
        };
        let token = header
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(bearer)
            .ok_or_else(|| {
                unauthorized(
                    "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                )
            })?;
        match self.lookup(token) {
            None => Err(unauthorized("Incorrect API key provided.")),
            Some(s) if s >= needed => Ok(()),
            Some(s) => Err(ApiError {
                status: StatusCode::FORBIDDEN,
                message: format!(
                    "This API key has the `{}` scope; this route needs `{}`.",
                    s.as_str(),
                    needed.as_str()
                ),
                kind: "permission_denied",
                param: None,
                code: Some("permission_denied"),
            }),
        }
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive).
fn bearer(h: &str) -> Option<&str> {
    let (scheme, token) = h.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthorized(message: &str) -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: message.into(),
        kind: "invalid_api_key",
        param: None,
        code: Some("invalid_api_key"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "admin-key-0123456789";
    const INFER: &str = "infer-key-0123456789";

    fn auth(metrics_public: bool) -> Auth {
        Auth::new(
            vec![
                (ADMIN.into(), Scope::Admin),
                (INFER.into(), Scope::Inference),
            ],
            metrics_public,
        )
        .unwrap()
    }

    fn status(a: &Auth, pattern: Option<&str>, header: Option<&str>) -> u16 {
        match a.check(&Method::GET, pattern, header.map(str::as_bytes)) {
            Ok(()) => 200,
            Err(e) => e.status.as_u16(),
        }
    }

    #[test]
    fn lookup_finds_exact_keys_only() {
        let a = auth(false);
        assert_eq!(a.lookup(ADMIN), Some(Scope::Admin));
        assert_eq!(a.lookup(INFER), Some(Scope::Inference));
        for bad in [
            "",
            "admin-key-012345678",
            "admin-key-01234567890",
            "ADMIN-KEY-0123456789",
        ] {
            assert_eq!(a.lookup(bad), None, "{bad}");
        }
    }

    #[test]
    fn scope_matrix() {
        let a = auth(false);
        let b_admin = format!("Bearer {ADMIN}");
        let b_infer = format!("bearer {INFER}");
        let cases: &[(Option<&str>, u16, u16, u16)] = &[
            // (pattern, no key, inference key, admin key)
            (Some("/healthz"), 200, 200, 200),
            (Some("/readyz"), 200, 200, 200),
            (Some("/"), 200, 200, 200),
            (Some("/console/assets/{name}"), 200, 200, 200),
            (Some("/metrics"), 401, 403, 200),
            (Some("/v1/models"), 401, 200, 200),
            (Some("/v1/models/{id:.+}"), 401, 200, 200),
            (Some("/v1/chat/completions"), 401, 200, 200),
            (Some("/v1/completions"), 401, 200, 200),
            (Some("/v1/files"), 401, 403, 200),
            (Some("/v1/files/{id}/content"), 401, 403, 200),
            (Some("/v1/fine_tuning/jobs"), 401, 403, 200),
            (Some("/v1/adapters"), 401, 403, 200),
            (Some("/v1/adapters/{id}/load"), 401, 403, 200),
            (Some("/some/future/route"), 401, 403, 200),
            (None, 401, 200, 200),
        ];
        for &(p, none, inf, adm) in cases {
            assert_eq!(status(&a, p, None), none, "{p:?} without key");
            assert_eq!(status(&a, p, Some(&b_infer)), inf, "{p:?} inference");
            assert_eq!(status(&a, p, Some(&b_admin)), adm, "{p:?} admin");
            let wrong = status(&a, p, Some("Bearer not-a-key-at-all-xx"));
            assert_eq!(wrong, if none == 200 { 200 } else { 401 }, "{p:?} wrong");
        }
        let public = auth(true);
        assert_eq!(status(&public, Some("/metrics"), None), 200);
        // Reading a model is inference; deleting one is admin.
        let del = |h: &str| match a.check(
            &Method::DELETE,
            Some("/v1/models/{id:.+}"),
            Some(h.as_bytes()),
        ) {
            Ok(()) => 200,
            Err(e) => e.status.as_u16(),
        };
        assert_eq!((del(&b_infer), del(&b_admin)), (403, 200));
    }

    #[test]
    fn error_bodies_are_openai_shaped() {
        let a = auth(false);
        let e = a.check(&Method::GET, Some("/v1/files"), None).unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert_eq!(e.body()["error"]["code"], "invalid_api_key");
        let h = format!("Bearer {INFER}");
        let e = a
            .check(&Method::GET, Some("/v1/files"), Some(h.as_bytes()))
            .unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert_eq!(e.body()["error"]["type"], "permission_denied");
        // Other schemes, a bare key and non-UTF-8 are all "no key".
        for h in [
            format!("Basic {ADMIN}"),
            ADMIN.to_string(),
            "Bearer ".into(),
        ] {
            let e = a
                .check(&Method::GET, Some("/v1/files"), Some(h.as_bytes()))
                .unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED, "{h}");
        }
        assert!(a
            .check(&Method::GET, Some("/v1/files"), Some(&[0xff, 0xfe]))
            .is_err());
    }

    #[test]
    fn no_keys_means_open_and_only_on_loopback() {
        let off = Auth::disabled();
        assert!(!off.enabled());
        assert!(off.check(&Method::GET, Some("/v1/files"), None).is_ok());
        for h in ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"] {
            assert!(off.check_bind(h).is_ok(), "{h}");
        }
        for h in ["0.0.0.0", "::", "192.168.1.2", "example.com"] {
            let e = off.check_bind(h).unwrap_err();
            assert!(e.contains("ITAMAE_API_KEYS"), "{e}");
        }
        assert!(auth(false).check_bind("0.0.0.0").is_ok());
    }

    #[test]
    fn env_keys_and_weak_keys() {
        use crate::config::{parse_env_keys, AuthConfig};
        let from_env = |v: &str| {
            Auth::from_config(&AuthConfig {
                env_keys: parse_env_keys(v)?,
                ..Default::default()
            })
        };
        let a = from_env(&format!(" admin:{ADMIN} , inference:{INFER},")).unwrap();
        assert_eq!(a.lookup(ADMIN), Some(Scope::Admin));
        assert_eq!(a.lookup(INFER), Some(Scope::Inference));
        assert_eq!(a.keys.len(), 2);
        // A key may itself hold `:`.
        let a = from_env("admin:aaaaaaaaaaaaaaaa:b").unwrap();
        assert_eq!(a.lookup("aaaaaaaaaaaaaaaa:b"), Some(Scope::Admin));
        assert!(from_env("root:xxxxxxxxxxxxxxxxxxxx").is_err());
        assert!(from_env("justakey").is_err());
        assert!(Auth::new(vec![("short".into(), Scope::Admin)], false).is_err());
        assert!(Auth::new(vec![("has space in the key!".into(), Scope::Admin)], false).is_err());
    }

    /// The file's keys and the environment's together, as `itamaed serve` resolves them.
    #[test]
    fn auth_section_and_env_keys() {
        use crate::config::{FileConfig, ServeArgs, ServeConfig};
        let c: FileConfig = toml::from_str(
            "[auth]\nmetrics_public = true\nkeys = [{ key = \"0123456789abcdef-admin\", scope = \"admin\" }]\n",
        )
        .unwrap();
        let args = ServeArgs {
            api_keys: Some("inference:0123456789abcdef-infer".into()),
            ..Default::default()
        };
        let a = Auth::from_config(&ServeConfig::resolve(c, args).unwrap().auth).unwrap();
        assert!(a.enabled());
        assert!(a.metrics_public);
        assert_eq!(a.lookup("0123456789abcdef-infer"), Some(Scope::Inference));
        assert_eq!(a.lookup("0123456789abcdef-admin"), Some(Scope::Admin));
        let bad: FileConfig =
            toml::from_str("[auth]\nkeys = [{ key = \"0123456789abcdef\", scope = \"root\" }]\n")
                .unwrap();
        let bad = ServeConfig::resolve(bad, ServeArgs::default()).unwrap();
        let e = Auth::from_config(&bad.auth).unwrap_err();
        assert!(e.contains("root") && e.starts_with("[auth] keys: "), "{e}");
        // The shipped config configures no key: auth is off on loopback.
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/itamae.toml");
        let shipped = ServeConfig::resolve(FileConfig::read(&p).unwrap(), ServeArgs::default());
        assert!(!Auth::from_config(&shipped.unwrap().auth).unwrap().enabled());
    }

    #[test]
    fn debug_hides_keys() {
        let s = format!("{:?}", auth(false));
        assert!(!s.contains("admin-key"));
    }
}
