# One image with every service binary (k8s/base runs each Deployment with its
# own command). Build: docker build -t ghcr.io/estate-mesh/estate:0.1.0 .
# NOTE: CI has no container engine; this file is not built by CI.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked \
      -p estate-identity -p estate-consent -p estate-credentials -p estate-audit -p estate-gate -p estate-mesh -p meshctl \
 && mkdir /out \
 && cp target/release/estate-identity target/release/estate-consent target/release/estate-credentials \
       target/release/estate-audit target/release/estate-gate target/release/estate-mesh target/release/meshctl /out/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
EXPOSE 50051
ENTRYPOINT []
