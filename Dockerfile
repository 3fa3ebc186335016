# syntax=docker/dockerfile:1
# attune-notifier: static binary on a distroless, non-root runtime.
#   docker build --build-arg VERSION=v1.0.0 -t attune-notifier .
#   docker run --rm -p 8081:8081 \
#     -e ATTUNE__DATABASE__URL='postgres://postgres:postgres@db:5432/attune?sslmode=disable' attune-notifier

FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/attune-notifier .

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/attune-notifier /attune-notifier
EXPOSE 8081
USER nonroot
# --healthcheck reads the same configuration (ATTUNE__* variables, $ATTUNE_CONFIG) and GETs /health.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["/attune-notifier","--healthcheck"]
ENTRYPOINT ["/attune-notifier"]
