# Operator image (no torch): kopf controller for finetune.dev TrainingJobs.
# Build from the repository root (context allow-list: Dockerfile.dockerignore):
#   docker build -t finetune-operator:0.1.0 .        (pinned upstream base below)
#   hack/build-images.sh operator                     (podman, base made from Debian packages)
# BASE_IMAGE may be any Debian-like image with python3 >= 3.11 (tomllib) and its venv module.
# RUN --mount needs BuildKit (the default since Docker 23) or podman/buildah.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

# What goes in, chosen at build time from the one definition in operator/pyproject.toml:
# - dependencies: its [project].dependencies, read with tomllib in this throw-away stage (so
#   the install layer below is rebuilt only when they change), less the local finetune-*
#   distributions, which are copied as code;
# - code: finetune_operator and finetune_contract (the torch-free trainer contract). Not the
#   trainer, not finetune_testbed (the test bed).
# The code lives in /opt/finetune/python, on the venv's sys.path through finetune.pth.
FROM ${BASE_IMAGE} AS requirements
WORKDIR /build
COPY operator/pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print(*(d for d in p['dependencies'] if not d.startswith('finetune-')), sep='\n')" > requirements.txt

# The copied sources also get the distribution's metadata (name and version from the same file),
# so importlib.metadata finds the one version there as in a pip install (finetune_operator/version.py).
FROM ${BASE_IMAGE} AS metadata
WORKDIR /build
COPY operator/pyproject.toml ./
RUN python3 -c "import tomllib, pathlib; v = tomllib.load(open('pyproject.toml', 'rb'))['project']['version']; d = pathlib.Path('dist', f'finetune_operator-{v}.dist-info'); d.mkdir(parents=True); (d / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: finetune-operator\nVersion: {v}\n')"

FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

COPY --from=requirements /build/requirements.txt /opt/finetune/requirements.txt
# The pip cache is a build cache mount: reused by the next build, never part of the image.
# WHEELHOUSE (default empty: install from the index): a directory holding every wheel needed;
# pip then installs offline from it. hack/build-images.sh mounts its local one there.
ARG WHEELHOUSE=
RUN --mount=type=cache,id=finetune-pip,target=/root/.cache/pip \
    python3 -m venv --system-site-packages /opt/venv \
    && pip install --progress-bar off ${WHEELHOUSE:+--no-index --find-links "$WHEELHOUSE"} -r /opt/finetune/requirements.txt \
    && echo /opt/finetune/python > "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/finetune.pth"

COPY trainer-image/contract/finetune_contract/ /opt/finetune/python/finetune_contract/
COPY operator/finetune_operator/ /opt/finetune/python/finetune_operator/
COPY --from=metadata /build/dist/ /opt/finetune/python/
RUN python -m compileall -q /opt/finetune/python \
    && python -c "import finetune_operator.__main__" \
    && python -c "from finetune_operator.version import UNKNOWN, __version__ as v; assert v != UNKNOWN, v; print(v)" \
    && groupadd --gid 65532 finetune-operator \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin finetune-operator

# Labels last: a new revision must not invalidate the cached install layers above.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="Kubernetes operator for LoRA fine-tuning jobs (TrainingJob, finetune.dev/v1alpha1)" \
      org.opencontainers.image.source="https://github.com/finetune-dev/finetune-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

USER 65532:65532
# 8080 metrics, 8081 health (/healthz, /readyz)
EXPOSE 8080 8081
# Exec form: python is PID 1 and receives the kubelet's SIGTERM itself.
ENTRYPOINT ["python", "-m", "finetune_operator"]
