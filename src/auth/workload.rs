//! Kubernetes workload identity: the projected service account token, exchanged as a
//! client assertion (as AKS sets it up through AZURE_FEDERATED_TOKEN_FILE).

use std::path::PathBuf;

use super::certificate::ASSERTION_TYPE;
use super::{AuthError, TokenFuture, TokenSource, post_token_form};

pub struct WorkloadIdentitySource {
    pub http: crate::outbound::Outbound,
    pub token_url: String,
    pub client_id: String,
    pub scope: String,
    pub token_file: PathBuf,
}

impl TokenSource for WorkloadIdentitySource {
    fn fetch(&self) -> TokenFuture<'_> {
        Box::pin(async move {
            // The kubelet rotates the file; read it for every request.
            let federated = tokio::fs::read_to_string(&self.token_file)
                .await
                .map_err(|e| {
                    AuthError::Local(format!(
                        "auth.federated_token_file: cannot read {}: {e}",
                        self.token_file.display()
                    ))
                })?;
            let federated = federated.trim();
            if federated.is_empty() {
                return Err(AuthError::Local(format!(
                    "auth.federated_token_file: {} is empty",
                    self.token_file.display()
                )));
            }
            let form = [
                ("grant_type", "client_credentials"),
                ("client_id", self.client_id.as_str()),
                ("scope", self.scope.as_str()),
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", federated),
            ];
            post_token_form(&self.http, &self.token_url, &form).await
        })
    }
}
