//! ServiceAccount identity on Kubernetes: the control plane checks the
//! projected token a sidecar presents (audience `trellis`) with a
//! TokenReview, and signs a certificate for exactly the identity the API
//! server vouches for: `spiffe://<trust domain>/ns/<namespace>/sa/<name>`.
//! No join tokens. Tokens are never logged.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::names::{API_AUDIENCE, TAP_ACCOUNT, TOKEN_AUDIENCE, VIEWER_ACCOUNT};

/// What the API server says a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reviewed {
    pub namespace: String,
    pub service_account: String,
    /// A bound token names its pod (projected tokens always are bound).
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

impl Reviewed {
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the service account token is empty: the sidecar must present its projected token (mounted at {})", crate::names::TOKEN_FILE)]
    Empty,
    #[error("the API server did not authenticate the token ({0}): is it expired, or from another cluster?")]
    NotAuthenticated(String),
    #[error("the token is not for audience `{TOKEN_AUDIENCE}`: the sidecar must present the projected token of the injected volume, not the pod's default token")]
    WrongAudience,
    #[error("the token is not for audience `{API_AUDIENCE}`: the CLI asks for one with `--kubernetes` (a TokenRequest for {VIEWER_ACCOUNT} or {TAP_ACCOUNT})")]
    WrongApiAudience,
    #[error("the service account {0} grants no role here: use a token of {VIEWER_ACCOUNT} (stat, edges, trace, dashboard) or {TAP_ACCOUNT} (tap, top) in the control plane's namespace")]
    NoRole(String),
    #[error("the token belongs to `{0}`, not a service account")]
    NotServiceAccount(String),
    #[error("the token is not bound to a pod: present the pod's projected token")]
    NotBound,
    #[error("TokenReview failed: {0}; does the control plane's ClusterRole allow creating tokenreviews?")]
    Api(#[from] kube::Error),
}

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Reviews a sidecar's `token` with the API server.
pub async fn review(client: kube::Client, token: &str) -> Result<Reviewed, ReviewError> {
    from_status(ask(client, token, TOKEN_AUDIENCE).await?)
}

/// The role of the HTTP API a CLI token grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiRole {
    Viewer,
    Tap,
}

/// Reviews a CLI's `token` (audience `trellis-api`): a token of the
/// viewer or tap ServiceAccount of `namespace` (the control plane's).
pub async fn review_api(
    client: kube::Client,
    token: &str,
    namespace: &str,
) -> Result<(String, ApiRole), ReviewError> {
    api_role(ask(client, token, API_AUDIENCE).await?, namespace)
}

async fn ask(
    client: kube::Client,
    token: &str,
    audience: &str,
) -> Result<TokenReview, ReviewError> {
    if token.trim().is_empty() {
        return Err(ReviewError::Empty);
    }
    let api: Api<TokenReview> = Api::all(client);
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.trim().to_string(),
            audiences: Some(vec![audience.to_string()]),
        },
        ..Default::default()
    };
    Ok(api.create(&PostParams::default(), &review).await?)
}

/// The authenticated user of a review for `audience`.
fn authenticated(
    review: TokenReview,
    audience: &str,
    wrong: ReviewError,
) -> Result<k8s_openapi::api::authentication::v1::UserInfo, ReviewError> {
    let status = review.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(ReviewError::NotAuthenticated(
            status.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    // The API server lists the audiences the token is valid for among those asked.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience))
    {
        return Err(wrong);
    }
    Ok(status.user.unwrap_or_default())
}

/// `system:serviceaccount:<ns>:<name>` → (ns, name).
fn service_account(username: &str) -> Option<(&str, &str)> {
    username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
}

fn api_role(review: TokenReview, namespace: &str) -> Result<(String, ApiRole), ReviewError> {
    let user = authenticated(review, API_AUDIENCE, ReviewError::WrongApiAudience)?;
    let username = user.username.unwrap_or_default();
    let Some((ns, sa)) = service_account(&username) else {
        return Err(ReviewError::NotServiceAccount(username));
    };
    let role = match sa {
        _ if ns != namespace => None,
        VIEWER_ACCOUNT => Some(ApiRole::Viewer),
        TAP_ACCOUNT => Some(ApiRole::Tap),
        _ => None,
    };
    match role {
        Some(role) => Ok((format!("k8s:{ns}/{sa}"), role)),
        None => Err(ReviewError::NoRole(format!("{ns}/{sa}"))),
    }
}

fn from_status(review: TokenReview) -> Result<Reviewed, ReviewError> {
    let user = authenticated(review, TOKEN_AUDIENCE, ReviewError::WrongAudience)?;
    let username = user.username.unwrap_or_default();
    let Some((namespace, sa)) = service_account(&username) else {
        return Err(ReviewError::NotServiceAccount(username));
    };
    let extra = user.extra.unwrap_or_default();
    let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    let pod_name = first(POD_NAME);
    if pod_name.is_none() {
        return Err(ReviewError::NotBound);
    }
    Ok(Reviewed {
        namespace: namespace.to_string(),
        service_account: sa.to_string(),
        pod_name,
        pod_uid: first(POD_UID),
    })
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::json;

    use super::*;
    use crate::testing::{mock, step};

    const PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

    fn answer(status: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {}, "status": status})
    }

    fn bound() -> serde_json::Value {
        answer(json!({
            "authenticated": true,
            "audiences": ["trellis"],
            "user": {
                "username": "system:serviceaccount:shop:web",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:shop"],
                "extra": {"authentication.kubernetes.io/pod-name": ["web-7d9f-x2"],
                          "authentication.kubernetes.io/pod-uid": ["4f1c"]},
            },
        }))
    }

    #[tokio::test]
    async fn a_bound_token_gives_its_namespace_service_account_and_pod() {
        let (client, seen, task) = mock(vec![step(Method::POST, PATH, 201, bound())]);
        let r = review(client, "tok\n").await.unwrap();
        task.await.unwrap();
        assert_eq!(
            r.spiffe_id("trellis.local"),
            "spiffe://trellis.local/ns/shop/sa/web"
        );
        assert_eq!(r.pod_name.as_deref(), Some("web-7d9f-x2"));
        assert_eq!(r.pod_uid.as_deref(), Some("4f1c"));
        // The review asks for the trellis audience.
        let sent = seen.lock().unwrap()[0].body.clone();
        assert_eq!(
            sent["spec"],
            json!({"token": "tok", "audiences": ["trellis"]})
        );
    }

    #[test]
    fn what_the_api_server_does_not_vouch_for_is_refused() {
        let cases = [
            (
                answer(json!({"authenticated": false, "error": "token expired"})),
                "token expired",
            ),
            (
                answer(
                    json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
                           "user": {"username": "system:serviceaccount:shop:web"}}),
                ),
                "audience",
            ),
            (
                answer(json!({"authenticated": true, "audiences": ["trellis"],
                           "user": {"username": "alice"}})),
                "not a service account",
            ),
            (
                answer(json!({"authenticated": true, "audiences": ["trellis"],
                           "user": {"username": "system:serviceaccount:shop:web"}})),
                "not bound",
            ),
        ];
        for (status, says) in cases {
            let err = from_status(serde_json::from_value(status).unwrap()).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[tokio::test]
    async fn a_cli_token_grants_the_role_of_its_service_account_in_the_control_planes_namespace() {
        let api_answer = |user: &str, audience: &str| {
            answer(json!({"authenticated": true, "audiences": [audience],
                          "user": {"username": user}}))
        };
        let (client, seen, task) = mock(vec![step(
            Method::POST,
            PATH,
            201,
            api_answer(
                "system:serviceaccount:trellis-system:trellis-tap",
                "trellis-api",
            ),
        )]);
        let (id, role) = review_api(client, "tok", "trellis-system").await.unwrap();
        task.await.unwrap();
        assert_eq!(
            (id.as_str(), role),
            ("k8s:trellis-system/trellis-tap", ApiRole::Tap)
        );
        assert_eq!(
            seen.lock().unwrap()[0].body["spec"]["audiences"],
            json!(["trellis-api"])
        );
        let ok = |user: &str, audience: &str| {
            api_role(
                serde_json::from_value(api_answer(user, audience)).unwrap(),
                "trellis-system",
            )
        };
        assert_eq!(
            ok(
                "system:serviceaccount:trellis-system:trellis-viewer",
                "trellis-api"
            )
            .unwrap()
            .1,
            ApiRole::Viewer
        );
        for (user, audience, says) in [
            // A sidecar's token is not the CLI's.
            (
                "system:serviceaccount:trellis-system:trellis-tap",
                "trellis",
                "audience",
            ),
            // The same names in another namespace grant nothing.
            (
                "system:serviceaccount:shop:trellis-tap",
                "trellis-api",
                "grants no role",
            ),
            (
                "system:serviceaccount:trellis-system:trellis-control",
                "trellis-api",
                "grants no role",
            ),
            ("alice", "trellis-api", "not a service account"),
        ] {
            let err = ok(user, audience).unwrap_err();
            assert!(err.to_string().contains(says), "{user}: {err}");
        }
    }

    #[tokio::test]
    async fn an_empty_token_never_reaches_the_api_server() {
        let (client, seen, task) = mock(vec![]);
        assert!(matches!(review(client, " ").await, Err(ReviewError::Empty)));
        task.await.unwrap();
        assert!(seen.lock().unwrap().is_empty());
    }
}
