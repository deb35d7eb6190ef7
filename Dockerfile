# One Dockerfile, one image per workspace member: build a target with
#   docker build --target fetcher -t tardis/fetcher .
# (targets: fetcher, enricher, writer, demo-source, mock-llm).
# Works with the classic builder and with BuildKit; no BuildKit-only syntax.

ARG RUST_VERSION=1.95
ARG RUNTIME=gcr.io/distroless/cc-debian12:nonroot

FROM rust:${RUST_VERSION}-slim-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
ENV CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0 CARGO_NET_RETRY=5
# The binaries the images ship, built in one cargo invocation so features unify once.
ENV PACKAGES="-p tardis-common -p fetcher -p enricher -p writer -p devtools"

# Dependency layer: the manifests with stub sources. It is rebuilt only when a manifest or
# Cargo.lock changes, so a source edit recompiles the workspace crates alone.
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY common/Cargo.toml common/
COPY fetcher/Cargo.toml fetcher/
COPY enricher/Cargo.toml enricher/
COPY writer/Cargo.toml writer/
COPY devtools/Cargo.toml devtools/
COPY tests/Cargo.toml tests/
RUN set -eu; \
    for m in common fetcher enricher writer devtools tests; do \
      mkdir -p "$m/src"; : > "$m/src/lib.rs"; \
      sed -n '/src\/lib\.rs/!s/^path = "\(src\/.*\.rs\)"$/\1/p' "$m/Cargo.toml" \
        | while read -r p; do mkdir -p "$m/$(dirname "$p")"; echo 'fn main() {}' > "$m/$p"; done; \
    done; \
    cargo build --release --locked $PACKAGES --bins; \
    rm -rf common fetcher enricher writer devtools tests

# The workspace itself. COPY keeps the files' old modification times, so touch them:
# otherwise cargo could take the stub builds above for up to date.
COPY common common
COPY fetcher fetcher
COPY enricher enricher
COPY writer writer
COPY devtools devtools
COPY tests/Cargo.toml tests/
RUN set -eu; \
    mkdir -p tests/src tests/src/bin; : > tests/src/lib.rs; \
    for b in bench-fetch bench-enrich bench-write; do echo 'fn main() {}' > "tests/src/bin/$b.rs"; done; \
    find common fetcher enricher writer devtools -name '*.rs' -exec touch {} +; \
    cargo build --release --locked $PACKAGES --bins; \
    mkdir -p /out; \
    for b in fetcher enricher writer demo-source mock-llm tardis-probe; do cp "target/release/$b" /out/; done

# Runtime: distroless (glibc, libgcc, CA bundle, tzdata), no shell, uid 65532. Every image
# runs with a read-only root filesystem: nothing is written outside stdout and the network.
# HEALTHCHECK runs tardis-probe (no shell, no curl here): a GET of /ready on OPS_ADDR's port
# for the workers; the dev tools (demo-source, mock-llm) set their own on their /health, so
# each image declares exactly one.
FROM ${RUNTIME} AS runtime-base
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.source="https://github.com/tardis-collection/tardis" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Tardis" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
USER 65532:65532
ENV RUST_LOG=info
COPY --from=build /out/tardis-probe /usr/local/bin/tardis-probe

FROM runtime-base AS runtime
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["/usr/local/bin/tardis-probe"]

FROM runtime AS fetcher
LABEL org.opencontainers.image.title="tardis-fetcher" \
      org.opencontainers.image.description="Tardis fetcher: incremental, paginated collection from HTTP APIs into NATS JetStream"
COPY --from=build /out/fetcher /usr/local/bin/fetcher
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/fetcher"]
CMD ["run"]

FROM runtime AS enricher
LABEL org.opencontainers.image.title="tardis-enricher" \
      org.opencontainers.image.description="Tardis enricher: batched, validated LLM enrichment of records"
COPY --from=build /out/enricher /usr/local/bin/enricher
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/enricher"]

FROM runtime AS writer
LABEL org.opencontainers.image.title="tardis-writer" \
      org.opencontainers.image.description="Tardis writer: exactly-once persistence into Postgres; 'writer migrate' applies the schema"
COPY --from=build /out/writer /usr/local/bin/writer
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/writer"]
CMD ["run"]

FROM runtime-base AS demo-source
LABEL org.opencontainers.image.title="tardis-demo-source" \
      org.opencontainers.image.description="Tardis demo source: the legacy source API with generated records (development only)"
COPY --from=build /out/demo-source /usr/local/bin/demo-source
EXPOSE 8081
HEALTHCHECK --interval=5s --timeout=5s --retries=3 CMD ["/usr/local/bin/tardis-probe", "http://127.0.0.1:8081/health"]
ENTRYPOINT ["/usr/local/bin/demo-source"]

FROM runtime-base AS mock-llm
LABEL org.opencontainers.image.title="tardis-mock-llm" \
      org.opencontainers.image.description="Tardis mock LLM: an OpenAI-compatible chat-completions server (development only)"
COPY --from=build /out/mock-llm /usr/local/bin/mock-llm
EXPOSE 8082
HEALTHCHECK --interval=5s --timeout=5s --retries=3 CMD ["/usr/local/bin/tardis-probe", "http://127.0.0.1:8082/health"]
ENTRYPOINT ["/usr/local/bin/mock-llm"]
