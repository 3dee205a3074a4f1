# Multi-stage build of both services. Build one with --target directory-svc or billing-svc.
# The build stage compiles with the locked dependency set; the final stages are distroless
# (glibc, CA certificates, no shell) and run as an unprivileged user.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p directory-svc -p billing-svc \
 && strip target/release/directory-svc target/release/billing-svc

FROM gcr.io/distroless/cc-debian12:nonroot AS directory-svc
COPY --from=build /src/target/release/directory-svc /usr/local/bin/directory-svc
ENV DIRECTORY_LISTEN=0.0.0.0:50051
EXPOSE 50051
HEALTHCHECK --interval=5s --timeout=3s --retries=5 CMD ["/usr/local/bin/directory-svc", "--health-probe"]
ENTRYPOINT ["/usr/local/bin/directory-svc"]

FROM gcr.io/distroless/cc-debian12:nonroot AS billing-svc
COPY --from=build /src/target/release/billing-svc /usr/local/bin/billing-svc
ENV BILLING_LISTEN=0.0.0.0:50052
EXPOSE 50052
HEALTHCHECK --interval=5s --timeout=3s --retries=5 CMD ["/usr/local/bin/billing-svc", "--health-probe"]
ENTRYPOINT ["/usr/local/bin/billing-svc"]
