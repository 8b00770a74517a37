#!/usr/bin/env bash
# Certificates for the local demo, in certs/: a CA, Envoy's server certificate (localhost), and
# one client certificate per workload with its SPIFFE ID as a URI SAN, as a mesh issues them.
# Usage: ./make-certs.sh   (idempotent; delete certs/ to start over)
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p certs
cd certs
[ -f ca.pem ] && exit 0
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj /CN=demo-mesh-ca -keyout ca-key.pem -out ca.pem 2>/dev/null
issue() { # issue NAME SUBJECT SAN
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=$2" -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
  printf 'subjectAltName=%s\n' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue envoy localhost "DNS:localhost,IP:127.0.0.1"
issue frontend frontend "URI:spiffe://cluster.local/ns/shop/sa/frontend"
issue checkout checkout "URI:spiffe://cluster.local/ns/shop/sa/checkout"
issue intruder intruder "URI:spiffe://cluster.local/ns/other/sa/intruder"
echo "certificates in $(pwd)"
