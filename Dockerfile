# syntax=docker/dockerfile:1
# ray-forwarder image: one image for the Ray head, the workers and the RayJob submitter.
#
# Base: the official Ray image for the locked Ray version and Python 3.11. Tags are
# {Ray version}-{pyXY}[-{platform}]; without a platform suffix it is the CPU image (same as
# -cpu). Keep this tag, `ray` in uv.lock, `rayVersion` and the image tags in ray-cluster/ in
# step: tests/test_manifests.py fails when they differ.
#
# TODO(digest): pin both FROM lines by digest as well as tag (`image:tag@sha256:...`). No
# digest for these tags could be checked from a trustworthy offline source when this was
# written, and an invented one would be worse than none. Take it from the registry when you
# build (`docker buildx imagetools inspect rayproject/ray:2.60.0-py311`, the index digest)
# and add it here; tests/test_dockerfile.py accepts a FROM without a digest only while this
# TODO stands. See docs/deploy.md, "Build and push the image".
#
# Build (from the repository root; BuildKit, the default builder, for RUN --mount):
#   docker build -t ghcr.io/example/ray-forwarder:0.1.0-ray2.60.0-py311 .
# The tag pattern <version>-ray<ray version>-<pyXY> is what the manifests and tests expect.

# uv, only to export the locked requirements (pinned; match your local `uv --version`). It is
# mounted into one RUN step below and never copied into the image.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM rayproject/ray:2.60.0-py311

# The base image's non-root user `ray` is uid 1000, gid 100 (`users`); it owns the Python
# environment, so pip installs need no root. Numeric, so that the kubelet can verify
# runAsNonRoot (the manifests set runAsUser 1000 / runAsGroup 100 / fsGroup 100 to match).
USER 1000:100
WORKDIR /home/ray/ray-forwarder
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. The locked third-party dependencies, in their own layer (rebuilt only when the lock
#    changes). `ray` itself is left out: the base image already has exactly this version, and
#    reinstalling it would only duplicate a large wheel. Its dependencies stay in the export,
#    so they are installed at the locked versions. --no-deps: the export is the complete,
#    resolved set; pip must not resolve anything else. Hashes are kept and checked.
#    tests/test_dockerfile.py runs this same export and install into a clean venv.
COPY --chown=1000:100 pyproject.toml uv.lock ./
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    uv export --frozen --no-dev --no-emit-project --no-emit-package ray \
        --output-file /tmp/requirements.txt \
    && python -m pip install --no-deps --require-hashes -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && python -c "import ray, sys; assert ray.__version__ == '2.60.0', ray.__version__; assert sys.version_info[:2] == (3, 11), sys.version"

# 2. The package itself (no dependencies: they are all installed above). The development
#    tools (simulator, local Kafka, demo, bench) are a separate package in devtools/, in the
#    dev group only: neither the export above nor this copy includes them, and .dockerignore
#    lists what the image may see.
COPY --chown=1000:100 README.md ./
COPY --chown=1000:100 ray_forwarder ./ray_forwarder
RUN python -m pip install --no-deps . \
    && python -c "import ray_forwarder.cli"

# Pods run with a read-only root file system: no bytecode is written at run time (pip
# compiled it at install), and what Ray writes goes to emptyDir volumes (ray-cluster/).
ENV PYTHONDONTWRITEBYTECODE=1

# No secrets are baked in: credentials arrive as environment variables at runtime (Kubernetes
# Secrets via secretKeyRef on KubeRay). KubeRay sets each Ray container's command; run alone,
# the image runs the forwarder against RAY_ADDRESS or a local single-node Ray.
CMD ["python", "-m", "ray_forwarder"]
