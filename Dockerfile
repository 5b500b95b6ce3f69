# syntax=docker/dockerfile:1
# The meshid image: one static binary on distroless-static (no shell, no
# libc), as uid 65532. Built by `make image` (meshid:dev); the manifests in
# deploy/kubernetes pass the subcommand as the first argument, e.g.
# ["server", ...] or ["agent", ...].

# Build stage. go.mod asks for a Go 1.26 patch release; the golang:1.26 tag
# follows the newest one.
FROM golang:1.26 AS build
WORKDIR /src
# Dependencies first, so a source change reuses the downloaded modules.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# The .git directory is not sent (.dockerignore): make image passes the
# version it computed.
ARG VERSION=dev
ARG REVISION=
# The flags of `make build`: CGO_ENABLED=0 makes the binary static (the
# pure-Go resolver and user lookup), which distroless-static needs; the
# image test (deploy/image) proves such a binary runs with no libc at all.
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-X github.com/meshid/meshid/internal/cli.Version=${VERSION} -X github.com/meshid/meshid/controlplane.Version=${VERSION} -X github.com/meshid/meshid/controlplane.Revision=${REVISION}" \
      -o /out/meshid ./cmd/meshid

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/meshid /usr/local/bin/meshid
# nonroot is 65532:65532; stated so that runAsNonRoot can check it.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meshid"]
