# Example RBAC for a shop: who may call what, from the caller's mesh identity (SPIFFE),
# the request's method and path, and the scopes of its end-user token.
#
# Role bindings live in data (policies/rbac/data.json -> data.rbac), not in rules: adding a
# service or a route is a data change, reviewed like any other.
#
# The config's decision rule is data.envoy.authz.result (an object: status, body and headers);
# data.envoy.authz.allow is the plain boolean an OPA-Envoy deployment would query.
package envoy.authz

import rego.v1

# ---------------------------------------------------------------------------------------------
# Facts about the request

http := input.attributes.request.http

# The path without the query string, as decided on.
request_path := concat("/", ["", concat("/", input.parsed_path)])

# Scopes of the verified token: a space-separated "scope" claim or an "scp" array.
token_scopes contains s if {
	some s in split(input.jwt.claims.scope, " ")
	s != ""
}

token_scopes contains s if {
	some s in input.jwt.claims.scp
}

# ---------------------------------------------------------------------------------------------
# Rules

default allow := false

# Health and readiness endpoints are open to every caller, with or without identity.
allow if request_path in data.rbac.public_paths

# The caller's roles: bindings are keyed by the whole identity, trust domain included
# ("cluster.local/ns/<namespace>/sa/<service account>", Istio's principal form), so a
# workload of another trust domain with the same namespace and service account gets nothing.
roles contains data.rbac.roles[name] if {
	some name in data.rbac.bindings[input.peer.istio_principal]
}

# A workload may call a route when one of its roles grants it, unless it is deny-listed.
allow if {
	not denied_principal
	some role in roles
	grants(role)
}

grants(role) if {
	http.method in role.methods
	some pattern in role.paths
	glob.match(pattern, ["/"], request_path)
	scope_ok(role)
}

# A role without "scope" needs no token; one with it needs a token carrying that scope.
scope_ok(role) if not role.scope

scope_ok(role) if role.scope in token_scopes

denied_principal if input.peer.spiffe_id in data.rbac.denied_principals

# ---------------------------------------------------------------------------------------------
# The decision Envoy enforces

default result := {
	"allowed": false,
	"http_status": 403,
	"headers": {"content-type": "application/json"},
	"body": "{\"error\":\"forbidden\"}",
}

# On allow, tell the upstream which workload called (meshauthz overwrites any client copy).
result := {
	"allowed": true,
	"headers": {"x-meshauthz-peer": peer_id},
} if allow

default peer_id := "anonymous"

peer_id := input.peer.spiffe_id

# A route that needs a user token, called without one: 401 with a JSON body.
result := {
	"allowed": false,
	"http_status": 401,
	"headers": {"content-type": "application/json", "www-authenticate": "Bearer"},
	"body": "{\"error\":\"token required\"}",
} if {
	not allow
	not input.jwt
	needs_token
}

needs_token if {
	some role in roles
	role.scope
	http.method in role.methods
	some pattern in role.paths
	glob.match(pattern, ["/"], request_path)
}
