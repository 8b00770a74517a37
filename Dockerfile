# syntax=docker/dockerfile:1
# meshauthz image: a release build on the pinned toolchain, run on distroless as non-root.
# docker build -t meshauthz .   (the Helm chart in k8s/helm/meshauthz runs it)

# The exact toolchain rust-toolchain.toml pins. That file itself stays out of the context: it also
# asks for rustfmt and clippy, which the image lacks, and rustup would download them mid-build.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml declares [[bench]] targets; cargo refuses a manifest whose declared targets are
# missing, even when it builds only the binary.
COPY benches ./benches
# Cache mounts keep the crate registry and compiled dependencies between builds; the binary is
# copied out because the target directory is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/meshauthz /out/meshauthz

# glibc and libgcc (which the binary links) plus CA certificates (JWKS over https), nothing else:
# no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/meshauthz /usr/local/bin/meshauthz
# The bundled defaults (example policy, demo issuer) so the image runs as is; the Helm chart
# mounts its own config at /etc/meshauthz/meshauthz.yaml and policies over /etc/meshauthz/policies.
COPY config /etc/meshauthz/config
COPY policies /etc/meshauthz/policies
USER nonroot
# 9191: ext_authz gRPC; 8181: /healthz, /readyz, /metrics (and the HTTP ext_authz mode).
EXPOSE 9191 8181
ENTRYPOINT ["/usr/local/bin/meshauthz"]
# The bundled config binds loopback (its demo key is public); a container must listen on its
# interfaces, so the addresses are set here, explicitly.
CMD ["serve", "--config", "/etc/meshauthz/config/meshauthz.yaml", "--grpc-addr", "0.0.0.0:9191", "--http-addr", "0.0.0.0:8181"]
