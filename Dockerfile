# The NixMox bot's image: `nixmox serve` with Nix, terraform, git and an OpenSSH client.
#   docker build --network host -t nixmox .
#   docker run -p 8080:8080 -v nixmox-state:/var/lib/nixmox -e NIXMOX_... nixmox
# Base images are arguments so that a build with no registry can use local stand-ins
# (`./dev image FILE` makes them); the defaults are the official images.
ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG TERRAFORM_IMAGE=hashicorp/terraform:1.11.4

# terraform is not packaged by Debian: take HashiCorp's own binary from its image.
FROM ${TERRAFORM_IMAGE} AS terraform

FROM ${DEBIAN_IMAGE} AS build
# Debian's security updates come with each rebuild; pinning exact versions would break it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# the dependencies first, in a layer of their own: it changes only with pyproject.toml
COPY pyproject.toml ./
# A TLS-intercepting proxy's CA can be handed in for the build only (never stored in a layer):
#   --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && python3 -m venv /opt/nixmox \
    && python3 -c 'import tomllib; project = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(project["build-system"]["requires"] + project["project"]["dependencies"]))' > /tmp/requirements.txt \
    && /opt/nixmox/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt
# then the package itself (.dockerignore lets in only its sources)
COPY . .
RUN /opt/nixmox/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation . \
    && /opt/nixmox/bin/nixmox --version

FROM ${DEBIAN_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 nix-bin openssh-client git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=terraform /bin/terraform /usr/local/bin/terraform
COPY --from=build /opt/nixmox /opt/nixmox
COPY contrib/nix.conf /etc/nix/nix.conf
# A single-user Nix store owned by the bot's user: it evaluates, builds and copies closures.
RUN groupadd --system --gid 10001 nixmox \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/nixmox --shell /usr/sbin/nologin nixmox \
    && mkdir -p /nix /var/lib/nixmox /etc/nixmox \
    && chown nixmox:nixmox /nix /var/lib/nixmox \
    && ln -s /opt/nixmox/bin/nixmox /usr/local/bin/nixmox \
    && terraform version
USER 10001:10001
WORKDIR /var/lib/nixmox
ENV HOME=/var/lib/nixmox \
    NIXMOX_WORKDIR=/var/lib/nixmox \
    NIXMOX_DATABASE_URL=sqlite+aiosqlite:////var/lib/nixmox/state.db \
    NIXMOX_PUBLIC_URL=http://127.0.0.1:8080
# State (SQLite, the Git cache, plans, work trees). Secrets are mounted, never baked in:
# the GitHub App key (NIXMOX_GITHUB_PRIVATE_KEY_FILE=/run/secrets/...), SSH keys
# ([runners.ssh] identity_file), and an optional TOML file (NIXMOX_CONFIG=/etc/nixmox/nixmox.toml).
VOLUME ["/var/lib/nixmox"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/nixmox/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["nixmox"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
