# Operator image (no torch): kopf controller for finetune.dev TrainingJobs.
# Build from the repository root:
#   docker build -t finetune-operator:0.1.0 .
FROM python:3.11.13-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/finetune
COPY pyproject.toml README.md ./
COPY operator/finetune_operator/ operator/finetune_operator/
COPY hack/finetune_testbed/ hack/finetune_testbed/
COPY trainer-image/finetune_trainer/ trainer-image/finetune_trainer/
# Without the trainer extra: the operator only imports the torch-free finetune_trainer.contract.
RUN pip install --no-cache-dir . \
    && python -c "import finetune_operator, finetune_trainer.contract" \
    && useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin operator

USER 65532:65532
# 8080 metrics, 8081 health (/healthz, /readyz)
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "finetune_operator"]
