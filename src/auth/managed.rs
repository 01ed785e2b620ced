//! Azure managed identity: the VM's Instance Metadata Service, or the App Service / Container
//! Apps endpoint (IDENTITY_ENDPOINT with its X-IDENTITY-HEADER).

use super::{AuthError, TokenFuture, TokenSource, read_token_answer};
use crate::outbound::Outbound;
use crate::secret::Secret;

pub struct ManagedIdentitySource {
    pub http: Outbound,
    pub endpoint: String,
    /// The resource (the scope without `/.default`).
    pub resource: String,
    /// A user-assigned identity; system-assigned when `None`.
    pub client_id: Option<String>,
    /// Present for the App Service form.
    pub identity_header: Option<Secret>,
}

impl TokenSource for ManagedIdentitySource {
    fn fetch(&self) -> TokenFuture<'_> {
        Box::pin(async move {
            let mut query = vec![("resource", self.resource.as_str())];
            let request = match &self.identity_header {
                Some(header) => {
                    query.push(("api-version", "2019-08-01"));
                    self.http.get(&self.endpoint).header(
                        reqwest::header::HeaderName::from_static("x-identity-header"),
                        header.expose(),
                    )
                }
                None => {
                    query.push(("api-version", "2018-02-01"));
                    self.http
                        .get(&self.endpoint)
                        .header(reqwest::header::HeaderName::from_static("metadata"), "true")
                }
            };
            if let Some(id) = &self.client_id {
                query.push(("client_id", id.as_str()));
            }
            let answer = request
                .query(&query)
                .send()
                .await
                .map_err(|e| AuthError::Transient(format!("managed identity endpoint: {e}")))?;
            read_token_answer(answer).await
        })
    }
}

/// The resource a managed identity token is asked for: the scope without `/.default`.
pub fn resource_of(scope: &str) -> String {
    scope.trim_end_matches("/.default").to_string()
}
