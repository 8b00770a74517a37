# Tests for the bundled shop policy. Run: meshauthz test policies/
package envoy.authz_test

import data.envoy.authz
import rego.v1

# An input as meshauthz builds it, for a caller in the shop namespace.
req(sa, method, path) := {
	"attributes": {"request": {"http": {"method": method, "path": path}}},
	"parsed_path": array.slice(split(path, "/"), 1, count(split(path, "/"))),
	"peer": {
		"spiffe_id": sprintf("spiffe://cluster.local/ns/shop/sa/%s", [sa]),
		"trust_domain": "cluster.local",
		"namespace": "shop",
		"service_account": sa,
		"istio_principal": sprintf("cluster.local/ns/shop/sa/%s", [sa]),
	},
}

with_scope(input_doc, scope) := object.union(input_doc, {"jwt": {"provider": "demo", "claims": {"sub": "alice", "scope": scope}}})

# --- SPIFFE RBAC with data-driven role bindings

test_frontend_reads_catalog if {
	authz.allow with input as req("frontend", "GET", "/api/products/42")
}

test_frontend_cannot_delete_products if {
	not authz.allow with input as req("frontend", "DELETE", "/api/products/42")
}

test_unbound_service_account_is_denied if {
	not authz.allow with input as req("payments", "GET", "/api/products/42")
}

test_bindings_come_from_data if {
	authz.allow with input as req("payments", "GET", "/api/products/42")
		with data.rbac.bindings as {"cluster.local/ns/shop/sa/payments": ["catalog-reader"]}
}

test_health_is_public_without_identity if {
	authz.allow with input as {"attributes": {"request": {"http": {"method": "GET"}}}, "parsed_path": ["healthz"]}
}

# --- JWT scope checks per route

test_checkout_places_order_with_scope if {
	authz.allow with input as with_scope(req("checkout", "POST", "/api/orders"), "profile orders:write")
}

test_checkout_needs_the_write_scope if {
	not authz.allow with input as with_scope(req("checkout", "POST", "/api/orders"), "orders:read")
}

test_scp_array_claim_is_understood if {
	authz.allow with input as object.union(req("frontend", "GET", "/api/orders/7"), {"jwt": {"claims": {"scp": ["orders:read"]}}})
}

# --- Deny-list of principals

test_denied_principal_is_refused_despite_binding if {
	not authz.allow with input as req("compromised", "GET", "/api/products/1")
		with data.rbac.bindings as {"cluster.local/ns/shop/sa/compromised": ["catalog-reader"]}
}

# --- Custom 401/403 bodies and the header injected on allow

test_allow_injects_the_peer_header if {
	r := authz.result with input as req("frontend", "GET", "/api/products/1")
	r.allowed
	r.headers["x-meshauthz-peer"] == "spiffe://cluster.local/ns/shop/sa/frontend"
}

test_forbidden_has_a_json_body if {
	r := authz.result with input as req("frontend", "DELETE", "/api/products/1")
	not r.allowed
	r.http_status == 403
	r.body == "{\"error\":\"forbidden\"}"
}

test_missing_token_on_a_scoped_route_is_401 if {
	r := authz.result with input as req("checkout", "POST", "/api/orders")
	r.http_status == 401
	r.headers["www-authenticate"] == "Bearer"
}

# --- Bindings name the trust domain: the same namespace and service account elsewhere get nothing

test_other_trust_domain_gets_no_roles if {
	not authz.allow with input as object.union(req("checkout", "GET", "/api/products/42"), {"peer": {
		"spiffe_id": "spiffe://evil/ns/shop/sa/checkout",
		"trust_domain": "evil",
		"namespace": "shop",
		"service_account": "checkout",
		"istio_principal": "evil/ns/shop/sa/checkout",
	}})
}
