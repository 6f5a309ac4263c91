# syntax=docker/dockerfile:1
# tether's container image: static tetherd and tetherctl on a distroless base (no shell, no
# package manager). Build: docker build -t ghcr.io/tether-sh/tether:dev . (test/kind/e2e.sh does).
# test/k8s checks this file and runs its build step's command (TestDockerfile).

ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
# Static binaries: no cgo, so nothing from the build image's libc is needed at run time.
ENV CGO_ENABLED=0
RUN go build -trimpath -ldflags="-s -w -X github.com/tether-sh/tether/pkg/version.Version=${VERSION}" -o /out/ ./cmd/tetherd ./cmd/tetherctl

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/tetherd /out/tetherctl /usr/local/bin/
# Non-root by default (tetherctl needs nothing more). tetherd needs root with a few capabilities:
# the DaemonSet sets runAsUser: 0 and adds exactly those (deploy/helm/tether/capabilities.txt).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tetherd"]
