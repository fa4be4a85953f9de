//! Bearer tokens: compared by SHA-256, each with a role.

use std::collections::HashMap;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use super::{ApiError, AppState};
use crate::server::config::{hash_token, Role, TokenConfig};

/// The tokens a server accepts, by hash.
#[derive(Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<String, (String, Role)>,
}

impl Tokens {
    /// Tokens from the config.
    pub fn new(tokens: &[TokenConfig]) -> Self {
        Self {
            by_hash: tokens
                .iter()
                .map(|t| (t.sha256.to_ascii_lowercase(), (t.name.clone(), t.role)))
                .collect(),
        }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    fn find(&self, token: &str) -> Option<&(String, Role)> {
        self.by_hash.get(&hash_token(token))
    }
}

/// Whoever presented a valid token.
#[derive(Debug, Clone)]
pub struct Caller {
    name: String,
    role: Role,
}

impl Caller {
    /// The token's name from the config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The token's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Refuses with 403 unless the caller's role includes `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "token {:?} has role {}; this needs {role}",
                    self.name, self.role
                ),
            ))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "missing bearer token"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "Authorization must be `Bearer <token>`",
                )
            })?;
        let (name, role) = state
            .tokens
            .find(token)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unknown token"))?;
        Ok(Caller {
            name: name.clone(),
            role: *role,
        })
    }
}

/// Extractors that refuse a caller below a role before the handler (and its body) runs, so a
/// viewer's upload is refused without reading it.
macro_rules! role_extractor {
    ($name:ident, $role:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone)]
        pub struct $name(pub Caller);

        impl FromRequestParts<AppState> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut Parts,
                state: &AppState,
            ) -> Result<Self, ApiError> {
                let caller = Caller::from_request_parts(parts, state).await?;
                caller.require($role)?;
                Ok(Self(caller))
            }
        }
    };
}

role_extractor!(
    Viewer,
    Role::Viewer,
    "A caller with at least the viewer role."
);
role_extractor!(
    Operator,
    Role::Operator,
    "A caller with at least the operator role."
);
role_extractor!(Admin, Role::Admin, "A caller with the admin role.");

/// Adds the bearer scheme to the OpenAPI document.
pub struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
