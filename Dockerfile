# ray-forwarder image: one image for the Ray head, the workers and the RayJob submitter.
#
# Base: the official Ray image for the locked Ray version and Python 3.11. Tags are
# {Ray version}-{pyXY}[-{platform}]; without a platform suffix it is the CPU image (same as
# -cpu). Keep this tag, `ray` in uv.lock, `rayVersion` and the image tags in ray-cluster/ in
# step: tests/test_manifests.py fails when they differ.
#
# Build (from the repository root):
#   docker build -t ghcr.io/example/ray-forwarder:0.1.0-ray2.60.0-py311 .
# The tag pattern <version>-ray<ray version>-<pyXY> is what the manifests and tests expect.

# uv, only to export the locked requirements (pinned; match your local `uv --version`).
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM rayproject/ray:2.60.0-py311

# The base image's non-root user (uid 1000) owns its Python environment, so pip installs need
# no root; stay this user for the build and at runtime.
USER ray
WORKDIR /home/ray/ray-forwarder
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. The locked third-party dependencies, in their own layer (rebuilt only when the lock
#    changes). `ray` itself is left out: the base image already has exactly this version, and
#    reinstalling it would only duplicate a large wheel. Its dependencies stay in the export,
#    so they are installed at the locked versions. --no-deps: the export is the complete,
#    resolved set; pip must not resolve anything else. Hashes are kept and checked.
COPY --from=uv /uv /usr/local/bin/uv
COPY --chown=ray:users pyproject.toml uv.lock ./
RUN uv export --frozen --no-dev --no-emit-project --no-emit-package ray \
        --output-file /tmp/requirements.txt \
    && python -m pip install --no-deps --require-hashes -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && python -c "import ray, sys; assert ray.__version__ == '2.60.0', ray.__version__; assert sys.version_info[:2] == (3, 11), sys.version"

# 2. The package itself (no dependencies: they are all installed above).
COPY --chown=ray:users README.md ./
COPY --chown=ray:users ray_forwarder ./ray_forwarder
RUN python -m pip install --no-deps . \
    && python -c "import ray_forwarder.cli"

# No secrets are baked in: credentials arrive as environment variables at runtime (Kubernetes
# Secrets via secretKeyRef on KubeRay). KubeRay sets each Ray container's command; run alone,
# the image runs the forwarder against RAY_ADDRESS or a local single-node Ray.
CMD ["python", "-m", "ray_forwarder"]
