//! The names that install, injection, the webhook, the control plane and
//! `trellis check` must agree on: one place, so they cannot drift apart.

/// The control plane's namespace unless `--namespace` says otherwise.
pub const DEFAULT_NAMESPACE: &str = "trellis-system";
/// The Deployment, ServiceAccount, ClusterRole... of the control plane.
pub const CONTROL_PLANE: &str = "trellis-control";
/// The Service of the proxy API (gRPC) and the HTTP API.
pub const CONTROL_SERVICE: &str = "trellis-control";
/// The Service of the admission webhook.
pub const WEBHOOK_SERVICE: &str = "trellis-webhook";
/// The MutatingWebhookConfiguration (cluster-scoped).
pub const WEBHOOK_CONFIG: &str = "trellis-sidecar-injector";
/// The webhook's name inside it (a fully qualified name, as required).
pub const WEBHOOK_NAME: &str = "sidecar-injector.trellis.dev";
/// The path the webhook serves on.
pub const WEBHOOK_PATH: &str = "/inject";
/// The control plane's readiness: the webhook serves, and the cluster's
/// state has been read once.
pub const WEBHOOK_READY_PATH: &str = "/ready";
/// The port the control plane serves the webhook on (HTTPS).
pub const WEBHOOK_PORT: u16 = 15017;
/// The proxy API (gRPC over TLS).
pub const GRPC_PORT: u16 = 15010;
/// The HTTP API, `/healthz`, `/readyz`, `/metrics`.
pub const HTTP_PORT: u16 = 15080;
/// The Secret that holds the mesh CA (roots, signer, key).
pub const CA_SECRET: &str = "trellis-ca";
/// The Lease whose holder does the singleton work.
pub const LEASE: &str = "trellis-control";
/// The controllerName of route status written by Trellis.
pub const CONTROLLER_NAME: &str = "trellis.dev/control-plane";
/// The audience of the projected ServiceAccount token a sidecar presents.
pub const TOKEN_AUDIENCE: &str = "trellis";
/// The control plane's environment variable naming the image the webhook
/// injects (`trellis install --proxy-image`).
pub const PROXY_IMAGE_ENV: &str = "TRELLIS_PROXY_IMAGE";
/// The audience of the tokens the CLI asks for to use the HTTP API
/// (`stat --kubernetes` and the others), never accepted from a sidecar.
pub const API_AUDIENCE: &str = "trellis-api";
/// The ServiceAccounts (in the control plane's namespace) whose tokens
/// grant the HTTP API's `viewer` and `tap` roles. They hold no Kubernetes
/// permission; who may make their tokens is Kubernetes RBAC (the Roles of
/// the same names).
pub const VIEWER_ACCOUNT: &str = "trellis-viewer";
pub const TAP_ACCOUNT: &str = "trellis-tap";
/// The ConfigMap with the mesh CA's public roots (`roots.pem`), for clients
/// of the control plane's HTTPS API.
pub const ROOTS_CONFIG_MAP: &str = "trellis-ca-roots";
pub const ROOTS_KEY: &str = "roots.pem";

/// Namespace label that opts a namespace's pods into injection.
pub const INJECT_LABEL: &str = "trellis.dev/inject";
/// Pod annotation that overrides the namespace label (`enabled`|`disabled`).
pub const INJECT_ANNOTATION: &str = "trellis.dev/inject";
/// Set on pods the webhook injected (the Trellis version that did it).
pub const INJECTED_ANNOTATION: &str = "trellis.dev/injected";
/// Pod annotations that tune the redirect rules and the proxy.
pub const EXCLUDE_INBOUND_PORTS: &str = "trellis.dev/exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "trellis.dev/exclude-outbound-ports";
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "trellis.dev/exclude-outbound-cidrs";
pub const APP_PORT_ANNOTATION: &str = "trellis.dev/app-port";
pub const PROXY_CPU_ANNOTATION: &str = "trellis.dev/proxy-cpu";
pub const PROXY_MEMORY_ANNOTATION: &str = "trellis.dev/proxy-memory";

/// `app.kubernetes.io/part-of` on everything Trellis installs.
pub const PART_OF_LABEL: &str = "app.kubernetes.io/part-of";
pub const PART_OF: &str = "trellis";
/// The control plane pods' own label, which its Services select.
pub const APP_LABEL: &str = "app.kubernetes.io/name";

/// The init container and the sidecar's names in an injected pod.
pub const INIT_CONTAINER: &str = "trellis-init";
pub const PROXY_CONTAINER: &str = "trellis-proxy";
/// The projected token volume and where the proxy reads it.
pub const TOKEN_VOLUME: &str = "trellis-token";
pub const TOKEN_DIR: &str = "/var/run/secrets/trellis.dev/serviceaccount";
pub const TOKEN_FILE: &str = "/var/run/secrets/trellis.dev/serviceaccount/token";
/// The uid the proxy runs as; the redirect rules let its traffic pass.
pub const PROXY_UID: i64 = 1337;

/// The control plane's in-cluster address for proxies and the webhook's
/// TLS name: `<service>.<namespace>.svc`.
pub fn service_host(service: &str, namespace: &str) -> String {
    format!("{service}.{namespace}.svc")
}
